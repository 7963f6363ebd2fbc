"""The report's tables from evaluated workdirs:

  python -m iaf_jax.experiments.report --workdirs runs/* --out results.md [--split test] [--format md|csv]
                                 [--skip_missing]

Each workdir needs config.json (written by train.py), an eval_{split}_{checkpoint}_K{K}.json (written by
evaluate.py) and, for steps and wall time, metrics.jsonl. Of several eval files on the split, the one with the
largest K is used (checkpoint 'best' first, then 'latest', then the newest step); the table names it.

Numbers follow the replication report's sign convention: VLB = -ELBO and ~-log p(x) = the importance-sampled
negative log-likelihood, both positive, and Delta = VLB - (~-log p(x)) >= 0. Bernoulli runs (MNIST-type) are
in nats per image, discretized-logistic runs (CIFAR-type) in bits/dim, decided by config.json's
model.likelihood. Rows are grouped into the report's Tables 1-4 by config name, as the config files' TABLES
list them (configs/mnist.py, configs/cifar10.py); anything else goes to "Other runs". The published figures
in QUOTED are copied from the sources named beside them: quoted, not measured here.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import sys
from typing import Optional

import ml_collections

from iaf_jax import config_lib, workdir as workdir_lib
from iaf_jax.experiments import REPO, config_tables


class ReportError(config_lib.ConfigError):
  """A workdir or eval file the report cannot use: one line naming the file (exit status 2, as cli.run does)."""


class MissingEval(ReportError):
  """A workdir without any eval file on the requested split (--skip_missing turns it into a warning)."""


# ------------------------------------------------------------------------------------------ quoted figures
# NOT MEASURED HERE. Copied by hand from:
#   [R] the seed replication report, ../shared/seed/iaf-replication-report.txt (Tables 1-4): test set,
#       importance sampling with K=128; MNIST in nats (binarized MNIST), CIFAR-10 in bits/dim.
#   [P] the IAF paper (Kingma et al. 2016) as quoted in [R] Table 1 ("Original" columns) and in
#       ../shared/reference-hparams.md ("Paper tables (as quoted in the seed report)").
# Each entry: (VLB, ~-log p(x), Delta), positive numbers, in the table's unit.
SOURCES = {
    "R1": "[R] replication report Table 1, 'Replication' columns (binarized MNIST, nats, K=128)",
    "P1": "[P] IAF paper, as quoted in [R] Table 1 'Original' columns and in reference-hparams.md (nats, K=128)",
    "R2": "[R] replication report Table 2, 'Constant sigma' columns (binarized MNIST, nats, K=128)",
    "R3": "[R] replication report Table 3 (CIFAR-10, bits/dim, K=128)",
    "R4": "[R] replication report Table 4 (CIFAR-10, bits/dim, K=128)",
}
QUOTED = {
    # [R] Table 1, Replication columns.                     [P] via [R] Table 1, Original columns.
    "diag": {"R1": (86.80, 83.22, 3.58), "P1": (84.08, 81.08, 3.00)},
    "iaf_d2_w320": {"R1": (84.40, 81.58, 2.82), "P1": (82.02, 79.77, 2.25)},
    "iaf_d2_w1920": {"R1": (84.34, 81.56, 2.78), "P1": (81.17, 79.30, 1.87)},
    "iaf_d4_w1920": {"R1": (84.22, 81.49, 2.73), "P1": (80.93, 79.17, 1.76)},
    "iaf_d8_w1920": {"R1": (84.70, 81.69, 3.01), "P1": (80.80, 79.10, 1.70)},
    # [R] Table 2, Constant sigma columns (its Learnt sigma columns repeat [R] Table 1).
    "iaf_d2_w320_const": {"R2": (84.67, 82.02, 2.65)},
    "iaf_d2_w1920_const": {"R2": (84.99, 82.27, 2.72)},
    "iaf_d4_w1920_const": {"R2": (84.83, 82.13, 2.70)},
    "iaf_d8_w1920_const": {"R2": (85.18, 82.42, 2.76)},
    # [R] Table 3: MNIST architecture, discretized logistic output, CIFAR-10.
    "baseline_diag": {"R3": (6.460, 6.431, 0.029)},
    "baseline_iaf_d2_w320": {"R3": (6.452, 6.424, 0.028)},
    "baseline_iaf_d2_w1920": {"R3": (6.456, 6.427, 0.029)},
    "baseline_iaf_d4_w1920": {"R3": (6.452, 6.424, 0.028)},
    "baseline_iaf_d8_w1920": {"R3": (6.464, 6.431, 0.033)},
    # [R] Table 4: ResNet VAE with bidirectional inference.
    "rungs4_gauss": {"R4": (6.393, 6.360, 0.033)},
    "rungs4_iaf": {"R4": (6.081, 6.050, 0.031)},
    "rungs8_gauss": {"R4": (5.840, 5.808, 0.032)},
    "rungs8_iaf": {"R4": (5.830, 5.799, 0.031)},
    "rungs20_gauss": {"R4": (5.713, 5.678, 0.035)},
    "rungs20_iaf": {"R4": (5.518, 5.485, 0.033)},
}

# ------------------------------------------------------------------------------------------ table layout
# The table unit of each likelihood: the report's MNIST tables are in nats, its CIFAR-10 tables in bits/dim.
UNITS = {"bernoulli": "nats", "logistic": "bits/dim"}
# The quoted columns beside each table's rows: (header, QUOTED keys; a row shows the first it has).
_R, _P = "report [R], quoted", "paper [P], quoted"
QUOTED_COLUMNS = {"1": ((_R, ("R1",)), (_P, ("P1",))), "2": ((_R, ("R1", "R2")),), "3": ((_R, ("R3",)),),
                  "4": ((_R, ("R4",)),)}


def _table_layout() -> dict:
  """id -> (title, config file, config names in row order, unit, the report's dataset, quoted columns). Which
  configs form a table is the config files' TABLES; its unit and dataset are those of its rows' configs."""
  out = {}
  for t, (title, config_file, names) in config_tables().items():
    module = config_lib.load_config_module(os.path.join(REPO, config_file))
    configs = [module.get_config(n) for n in names]
    units = {UNITS.get(c.model.likelihood) for c in configs}
    datasets = {c.data.name for c in configs}
    if len(units) != 1 or len(datasets) != 1:
      raise ReportError(f"{config_file}: table {t}'s configs mix units {sorted(map(str, units))} or datasets "
                        f"{sorted(datasets)}; one table is one unit on one dataset")
    out[t] = (title, config_file, names, units.pop(), datasets.pop(), QUOTED_COLUMNS.get(t, ()))
  return out


TABLES = _table_layout()
OTHER = "Other runs"

NUMERIC_KEYS = ("neg_elbo_nats", "nll_nats", "gap_nats", "bits_per_dim_elbo", "bits_per_dim_nll")
INT_KEYS = ("num_examples", "num_samples", "checkpoint_step")


# ------------------------------------------------------------------------------------------ reading a workdir
def _read_json(path: str, what: str):
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ReportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except UnicodeDecodeError:
    raise ReportError(f"{path}: not valid JSON (not UTF-8 text)") from None
  except OSError as e:
    raise ReportError(f"{path}: cannot read the {what} ({e.strerror})") from None


def find_eval_files(workdir: str, split: str) -> list[tuple[str, str, int]]:
  """(path, checkpoint, K) of every eval_{split}_*_K*.json in workdir, the preferred one first: largest K,
  then the whole split before a subset (eval_*_K*_nN.json), then checkpoint 'best', 'latest', then the
  highest step."""
  found = []
  try:
    names = os.listdir(workdir)
  except OSError as e:
    raise ReportError(f"{workdir}: cannot list it ({e.strerror})") from None
  for name in names:
    e = workdir_lib.parse_eval_file(name)
    if e and e.split == split:
      found.append((os.path.join(workdir, name), e.checkpoint, e.num_samples, e.subset))

  def rank(item):
    _, ckpt, k, subset = item
    order = {"best": 2, "latest": 1}.get(ckpt, 0)
    step = int(ckpt) if ckpt.isdigit() else -1
    return (k, subset == 0, order, step)

  return [item[:3] for item in sorted(found, key=rank, reverse=True)]


def load_eval(path: str, split: str, k: Optional[int] = None) -> dict:
  """An eval JSON with every key the table needs, checked: one-line ReportError naming the file otherwise."""
  r = _read_json(path, "eval file")
  if not isinstance(r, dict):
    raise ReportError(f"{path}: not an evaluation result (a JSON {type(r).__name__}, not an object)")
  missing = [key for key in NUMERIC_KEYS + INT_KEYS if key not in r]
  if missing:
    raise ReportError(f"{path}: incomplete evaluation result, missing key(s) {', '.join(missing)}")
  for key in NUMERIC_KEYS:
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ReportError(f"{path}: {key} is {v!r}, not a number")
    if not math.isfinite(v):
      raise ReportError(f"{path}: {key} is {v!r}, not a finite number")
  for key in INT_KEYS:
    v = r[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
      raise ReportError(f"{path}: {key} is {v!r}, not an integer")
  if k is not None and int(r["num_samples"]) != k:
    raise ReportError(f"{path}: num_samples is {r['num_samples']}, but the file name says K={k}")
  if "split" in r and r["split"] != split:
    raise ReportError(f"{path}: split is {r['split']!r}, but the file name says {split!r}")
  return r


def read_metrics(workdir: str) -> dict:
  """Training steps, wall time and stop reason from metrics.jsonl: its last record with a step (the 'end'
  summary of the last run when there is one). Unreadable lines (a crash mid-write) are ignored; no file -> {}."""
  records = workdir_lib.read_metrics_records(workdir)
  if records is None:
    return {}
  last: dict = next((r for r in reversed(records) if isinstance(r.get("step"), (int, float))), {})
  return {"train_steps": int(last["step"]) if "step" in last else None,
          "wall_time": last.get("wall_time"), "stop_reason": last.get("reason", "" if last.get("event") else
                                                                     "running or killed")}


def model_label(config: dict) -> str:
  """The report's name for the model a config.json describes: its model kind's labeller (models.model_label),
  from the fields, not the config's name. ValueError for a model kind the package does not know."""
  from iaf_jax import models  # here: the labellers' modules import jax, which nothing else in the report needs

  return models.model_label(ml_collections.ConfigDict(config.get("model", {})))


@functools.cache
def table_model_label(table: str, name: str) -> str:
  """The label of the table's config `name` at its config file's defaults: the report's model for that row."""
  config_file = TABLES[table][1]
  config = config_lib.load_config_file(f"{os.path.join(REPO, config_file)}:{name}")
  return model_label(config_lib.to_dict(config))


def read_run(workdir: str, split: str) -> dict:
  """One table row from one workdir; ReportError (MissingEval when it has no eval file on `split`)."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: not a directory")
  cfg_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(cfg_path):
    raise ReportError(f"{workdir}: no {workdir_lib.CONFIG_FILE} here; is this a training workdir?")
  config = _read_json(cfg_path, "config")
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise ReportError(f"{cfg_path}: not a training config (no 'model' section)")
  files = find_eval_files(workdir, split)
  if not files:
    raise MissingEval(f"{workdir}: no evaluation on the {split} split (no eval_{split}_*_K*.json); run "
                      f"python evaluate.py --workdir={workdir} --split={split}")
  path, checkpoint, k = files[0]
  r = load_eval(path, split, k)
  likelihood = config["model"].get("likelihood", r.get("likelihood"))
  if likelihood not in UNITS:
    raise ReportError(f"{cfg_path}: model.likelihood is {likelihood!r}; expected 'bernoulli' or 'logistic'")
  unit = UNITS[likelihood]
  keys = ("neg_elbo_nats", "nll_nats") if unit == "nats" else ("bits_per_dim_elbo", "bits_per_dim_nll")
  vlb, nll = (float(r[k]) for k in keys)
  name = str(config.get("name") or r.get("config") or "")
  try:
    label = model_label(config)
  except ValueError as e:
    raise ReportError(f"{cfg_path}: {e}") from None
  row = {
      "config": name, "model": label, "unit": unit, "vlb": vlb, "log_px": nll,
      "gap": float(r["gap_nats"]) if unit == "nats" else vlb - nll,
      "num_samples": int(r["num_samples"]), "num_examples": int(r["num_examples"]), "split": split,
      "checkpoint": checkpoint, "checkpoint_step": int(r["checkpoint_step"]),
      "dataset": str(r.get("dataset") or config.get("data", {}).get("name", "")),
      "workdir": workdir, "eval_file": path, "other_eval_files": [p for p, _, _ in files[1:]],
  }
  row.update({"train_steps": None, "wall_time": None, "stop_reason": None}, **read_metrics(workdir))
  return row


def expand_workdirs(paths: list[str]) -> list[str]:
  """The given workdirs; a directory without config.json but with workdirs under it (a sweep's --root)
  stands for those. Duplicates (same real path) are dropped."""
  out, seen = [], set()
  for p in paths:
    p = p.rstrip("/") or "/"
    subs = []
    if os.path.isdir(p) and not workdir_lib.is_workdir(p):
      subs = sorted(os.path.join(p, d) for d in os.listdir(p)
                    if workdir_lib.is_workdir(os.path.join(p, d)))
    for w in subs or [p]:
      real = os.path.realpath(w)
      if real not in seen:
        seen.add(real)
        out.append(w)
  return out


# ------------------------------------------------------------------------------------------ grouping
def assign_tables(row: dict) -> list[str]:
  """Table ids a row belongs to (the learnt-sigma IAF rows are in Tables 1 and 2, as in the report)."""
  ids = [t for t, (_, _, names, unit, _, _) in TABLES.items() if row["config"] in names and row["unit"] == unit]
  return ids or [OTHER]


def quoted_for(row: dict, table: str) -> dict:
  """The quoted figures shown beside a row: only when it is the report's model on the report's data."""
  if table == OTHER:
    return {}
  dataset = TABLES[table][4]
  if row["dataset"] != dataset or row["model"] != table_model_label(table, row["config"]):
    return {}
  keys = {k for _, ks in TABLES[table][5] for k in ks}
  return {key: v for key, v in QUOTED.get(row["config"], {}).items() if key in keys}


def group(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
  """[(table id, title, rows)] in the report's order; rows in the table's config order, then by workdir."""
  out = []
  for t, (title, _, names, unit, _, _) in TABLES.items():
    members = [r for r in rows if t in assign_tables(r)]
    if members:
      members.sort(key=lambda r: (names.index(r["config"]), r["workdir"]))
      out.append((t, f"{title} ({unit})", members))
  for unit in ("nats", "bits/dim"):
    members = sorted((r for r in rows if assign_tables(r) == [OTHER] and r["unit"] == unit),
                     key=lambda r: (r["config"], r["workdir"]))
    if members:
      out.append((OTHER, f"{OTHER} ({unit})", members))
  return out


# ------------------------------------------------------------------------------------------ formatting
def format_seconds(s) -> str:
  if s is None:
    return "?"
  s = float(s)
  if s < 60:
    return f"{s:.1f}s"
  if s < 3600:
    return f"{int(s // 60)}m{int(s % 60):02d}s"
  return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _num(v: float, unit: str) -> str:
  return f"{v:.2f}" if unit == "nats" else f"{v:.3f}"


def _steps(r: dict) -> str:
  if r["train_steps"] is None:
    return "?"
  reason = r["stop_reason"]
  return f"{r['train_steps']} ({reason})" if reason and reason != "num_steps" else str(r["train_steps"])


def _cell(s) -> str:
  return str(s).replace("|", "\\|")


def to_markdown(rows: list[dict], split: str, warnings: list[str] = ()) -> str:
  lines = [
      "# Results",
      "",
      f"Generated by `python -m iaf_jax.experiments.report` from {len(rows)} evaluated workdir(s), {split} split. "
      "VLB is -ELBO and ~-log p(x) the importance-sampled negative log-likelihood (K samples), both "
      "positive as in the replication report; Delta = VLB - (~-log p(x)). Nats per image for Bernoulli runs, "
      "bits/dim for discretized-logistic runs. *quoted* columns are copied from the sources listed at the end, "
      "not measured here, and are shown only for the report's model on the report's dataset.",
  ]
  for t, title, members in group(rows):
    unit = members[0]["unit"]
    qcols = TABLES[t][5] if t != OTHER else ()
    head = ["Model", "config", "VLB", "~-log p(x)", "Delta", "K", "examples", "dataset", "checkpoint (step)",
            "trained steps", "wall time"]
    head += [f"{h}: VLB / ~-log p(x) / Delta" for h, _ in qcols] + ["workdir", "eval file"]
    lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in members:
      q = quoted_for(r, t)
      cells = [r["model"], f"`{r['config']}`", _num(r["vlb"], unit), _num(r["log_px"], unit),
               _num(r["gap"], unit), r["num_samples"], r["num_examples"], r["dataset"],
               f"{r['checkpoint']} ({r['checkpoint_step']})",
               _steps(r), format_seconds(r["wall_time"])]
      for _, keys in qcols:
        k = next((k for k in keys if k in q), None)
        cells.append(f"{' / '.join(_num(v, unit) for v in q[k])} ({k})" if k else "-")
      cells += [f"`{r['workdir']}`", f"`{os.path.basename(r['eval_file'])}`"]
      lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
  used = sorted({k for t, _, members in group(rows) for r in members for k in quoted_for(r, t)})
  if used:
    lines += ["", "Quoted figures (not measured here):", ""]
    lines += [f"- {k}: {SOURCES[k]}" for k in used]
  elif any(t != OTHER for t, _, _ in group(rows)):
    lines += ["", "No quoted figures: no row is the report's model on the report's dataset."]
  notes = [f"- `{r['workdir']}`: used `{os.path.basename(r['eval_file'])}`; also there: "
           + ", ".join(f"`{os.path.basename(p)}`" for p in r["other_eval_files"]) for r in rows
           if r["other_eval_files"]]
  if notes:
    lines += ["", "Eval files: the largest K on the split is used (checkpoint best first).", ""] + notes
  if warnings:
    lines += ["", "Skipped:", ""] + [f"- {w}" for w in warnings]
  return "\n".join(lines) + "\n"


CSV_COLUMNS = ["table", "model", "config", "unit", "vlb", "log_px", "gap", "num_samples", "num_examples", "split",
               "checkpoint", "checkpoint_step", "dataset", "train_steps", "wall_time_s", "stop_reason",
               "quoted_source", "quoted_vlb", "quoted_log_px", "quoted_gap", "workdir", "eval_file"]


def to_csv(rows: list[dict]) -> str:
  """One line per (table, row, quoted source); full precision; quoted_* empty when nothing is quoted."""
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(CSV_COLUMNS)
  for t, _, members in group(rows):
    for r in members:
      quoted = quoted_for(r, t) or {"": ("", "", "")}
      for source, (qv, ql, qg) in quoted.items():
        w.writerow([t, r["model"], r["config"], r["unit"], repr(r["vlb"]), repr(r["log_px"]), repr(r["gap"]),
                    r["num_samples"], r["num_examples"], r["split"], r["checkpoint"], r["checkpoint_step"],
                    r["dataset"], "" if r["train_steps"] is None else r["train_steps"],
                    "" if r["wall_time"] is None else r["wall_time"], r["stop_reason"] or "",
                    SOURCES[source] if source else "", qv, ql, qg, r["workdir"], r["eval_file"]])
  return buf.getvalue()


# ------------------------------------------------------------------------------------------ entry points
def build_report(workdirs: list[str], *, split: str = "test", fmt: str = "md",
                 skip_missing: bool = False) -> tuple[str, list[dict], list[str]]:
  """(text, rows, warnings). Raises ReportError (one line naming the file) on a bad workdir or eval file."""
  if fmt not in ("md", "csv"):
    raise ReportError(f"--format={fmt!r}: must be md or csv")
  if split not in ("test", "valid", "train"):
    raise ReportError(f"--split={split!r}: must be test, valid or train")
  rows, warnings = [], []
  for w in expand_workdirs(workdirs):
    try:
      rows.append(read_run(w, split))
    except MissingEval as e:
      if not skip_missing:
        raise
      warnings.append(str(e))
  if not rows:
    raise ReportError("no evaluated workdir to report" + (f" ({len(warnings)} skipped: no eval file)"
                                                         if warnings else ""))
  text = to_markdown(rows, split, warnings) if fmt == "md" else to_csv(rows)
  return text, rows, warnings


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2, like the absl front ends (iaf_jax.cli)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
  p = _Parser(prog="python -m iaf_jax.experiments.report", description=__doc__.split("\n\n")[0])
  p.add_argument("--workdirs", nargs="+", required=True, help="Evaluated training workdirs (or a sweep root).")
  p.add_argument("--out", default="", help="Write the tables here (default: stdout).")
  p.add_argument("--split", default="test", choices=("test", "valid", "train"))
  p.add_argument("--format", default="", choices=("", "md", "csv"),
                 help="md or csv (default: from --out's extension, else md).")
  p.add_argument("--skip_missing", action="store_true",
                 help="A workdir without an eval file on the split is a warning, not an error.")
  p.add_argument("--traceback", action="store_true", help="Show the full traceback of a user error.")
  return p.parse_args(argv)


def main(argv=None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
  except SystemExit as e:  # a flag error (one line printed) or --help
    return e.code
  fmt = args.format or ("csv" if args.out.endswith(".csv") else "md")

  def job():
    text, rows, warnings = build_report(args.workdirs, split=args.split, fmt=fmt, skip_missing=args.skip_missing)
    for w in warnings:
      print(f"warning: {w}; skipped", file=sys.stderr)
    if args.out:
      try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
          f.write(text)
        os.replace(tmp, args.out)
      except OSError as e:
        raise ReportError(f"{args.out}: cannot write the report ({e.strerror})") from None
      print(f"wrote {args.out}: {len(rows)} run(s) in {len(group(rows))} table(s)", file=sys.stderr)
    else:
      sys.stdout.write(text)

  from iaf_jax import cli  # the shared error convention: one 'error: ...' line, exit status 2
  return cli.run(job, args.traceback)


if __name__ == "__main__":
  sys.exit(main())
