"""The files of a training workdir, named in one place: train.py writes the config, the data's description, the
metrics and the checkpoints; evaluate.py the eval and sampling results; the sweep and the report read them."""
from __future__ import annotations

import json
import os
import re
from typing import NamedTuple, Optional

CONFIG_FILE = "config.json"
DATA_INFO_FILE = "data_info.json"  # image shape and pixel range: what a model is built for
METRICS_FILE = "metrics.jsonl"     # one JSON record per line, appended by train_lib
SAMPLES_FILE = "samples.json"      # eval_lib.sample's timings
SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
CHECKPOINTS_DIR = "checkpoints"    # the latest train.keep_checkpoints steps
BEST_DIR = "best"                  # the step with the best validation -ELBO

_EVAL_FILE = re.compile(r"^eval_(?P<split>[^_]+)_(?P<checkpoint>.+?)_K(?P<k>\d+)(?:_n(?P<n>\d+))?\.json$")


class EvalName(NamedTuple):
  split: str
  checkpoint: str   # 'best', 'latest' or a step number
  num_samples: int  # K
  subset: int = 0   # N of a fixed random subset of N examples (evaluate.py --max_examples); 0 = the whole split


def eval_file(split: str, checkpoint: str, num_samples: int, subset: int = 0) -> str:
  """The name of evaluate.py's result for one split, checkpoint and K, and `subset` N for an evaluation of
  data.fixed_subset's N examples (0: the whole split): a partial evaluation never replaces a full one."""
  return f"eval_{split}_{checkpoint}_K{num_samples}" + (f"_n{subset}" if subset else "") + ".json"


def parse_eval_file(name: str) -> Optional[EvalName]:
  """eval_file's arguments back from a file name, or None for another file."""
  m = _EVAL_FILE.match(name)
  return EvalName(m["split"], m["checkpoint"], int(m["k"]), int(m["n"] or 0)) if m else None


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def metrics_path(workdir: str) -> str:
  return path(workdir, METRICS_FILE)


def eval_path(workdir: str, split: str, checkpoint: str, num_samples: int, subset: int = 0) -> str:
  return path(workdir, eval_file(split, checkpoint, num_samples, subset))


def is_workdir(directory: str) -> bool:
  """A training workdir: train.py has written its config there."""
  return os.path.exists(path(directory, CONFIG_FILE))


def read_metrics_records(workdir: str) -> Optional[list]:
  """The JSON objects of workdir/metrics.jsonl in order, or None without the file. A line that does not parse
  (one cut short by a crash mid-write) is left out."""
  records = []
  try:
    with open(metrics_path(workdir)) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict):
          records.append(rec)
  except OSError:
    return None
  return records
