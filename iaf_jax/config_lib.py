"""Config checks: every value a user can set is checked before any work starts, and a workdir remembers the
config it was trained with so that resuming or evaluating with an incompatible one is refused."""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import types

import ml_collections

from iaf_jax import data as data_lib
from iaf_jax.workdir import CONFIG_FILE, DATA_INFO_FILE

log = logging.getLogger(__name__)
# Sections that define what a checkpoint holds: resuming with other values here would mix two runs.
_IDENTITY_SECTIONS = ("model", "data")


class ConfigError(ValueError):
  """A bad config value: one line naming the field."""


def need(cond: bool, field: str, value, what: str) -> None:
  """A ConfigError 'config.<field>=<value>: <what>' unless `cond` (the models' checks use it too)."""
  if not cond:
    raise ConfigError(f"config.{field}={value!r}: {what}")


def validate_config(c: ml_collections.ConfigDict) -> None:
  m, t, e, d = c.model, c.train, c.eval, c.data
  need(d.name in data_lib.DATASET_NAMES, "data.name", d.name, f"must be one of {', '.join(data_lib.DATASET_NAMES)}")
  need(d.validation_size >= 0, "data.validation_size", d.validation_size, "must be >= 0")
  need(m.likelihood in data_lib.LIKELIHOODS, "model.likelihood", m.likelihood,
        f"must be one of {', '.join(data_lib.LIKELIHOODS)}")
  from iaf_jax.models import MODEL_KINDS, validate_model_config
  need(m.kind in MODEL_KINDS, "model.kind", m.kind, f"must be one of {', '.join(MODEL_KINDS)}")
  validate_model_config(m)  # the kind's own checks, as one-line ConfigErrors
  need(t.optimizer in ("adamax", "adam"), "train.optimizer", t.optimizer, "must be 'adamax' or 'adam'")
  need(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
  need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
  need(t.num_steps >= 0, "train.num_steps", t.num_steps, "must be >= 0")
  need(0.0 <= t.ema_decay < 1.0, "train.ema_decay", t.ema_decay, "must be in [0, 1)")
  need(t.free_bits >= 0, "train.free_bits", t.free_bits, "(lambda) must be >= 0")
  need(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
  need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
  need(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0 = off)")
  need(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
  need(0 < t.lr_plateau_factor <= 1, "train.lr_plateau_factor", t.lr_plateau_factor, "must be in (0, 1]")
  need(t.get("time_budget_minutes", 0.0) >= 0, "train.time_budget_minutes", t.get("time_budget_minutes"),
        "must be >= 0 (0 = off)")
  from iaf_jax.optim import LR_SCHEDULES
  need(t.get("lr_schedule", "constant") in LR_SCHEDULES, "train.lr_schedule", t.get("lr_schedule"),
        f"must be one of {', '.join(LR_SCHEDULES)}")
  k = t.get("num_importance_samples", 1)
  need(isinstance(k, int) and k >= 1, "train.num_importance_samples", k, "(k) must be an integer >= 1")
  need(k == 1 or t.free_bits == 0, "train.num_importance_samples", k,
        "k > 1 trains on the importance-weighted bound, which has no free-bits form: set train.free_bits=0")
  mb = t.get("micro_batches", 1)
  need(isinstance(mb, int) and mb >= 1, "train.micro_batches", mb, "must be an integer >= 1")
  need(t.batch_size % mb == 0, "train.micro_batches", mb, f"must divide train.batch_size={t.batch_size}")
  need(mb == 1 or t.free_bits == 0, "train.micro_batches", mb,
        "free bits act on the whole batch's mean KL, which micro-batches would change: set train.micro_batches=1")
  need(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite", t.max_consecutive_nonfinite,
        "must be >= 1")
  need(e.num_samples >= 1, "eval.num_samples", e.num_samples, "(K) must be >= 1")
  need(e.chunk_size >= 1, "eval.chunk_size", e.chunk_size, "must be >= 1")
  need(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
  ib = e.get("importance_batch_size", 0)
  need(isinstance(ib, int) and ib >= 0, "eval.importance_batch_size", ib,
       "must be an integer >= 0 (0 = eval.batch_size)")


# Config files loaded so far, by real path: each file is executed once per process, so every tool that reads
# a config file (its NAMES, TABLES, get_config) sees the same module.
_CONFIG_MODULES: dict[str, types.ModuleType] = {}


def load_config_module(path: str) -> types.ModuleType:
  """A config file (configs/mnist.py) as a module. Loaded by path, as ml_collections' config_flags loads
  train.py's --config: configs/ is not a package. ConfigError (one line naming the file) if it does not load."""
  real = os.path.realpath(path)
  if real not in _CONFIG_MODULES:
    if not os.path.isfile(real):
      raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"_iaf_config_{len(_CONFIG_MODULES)}", real)
    module = importlib.util.module_from_spec(spec)
    try:
      spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever a config file raises, as one line naming it
      raise ConfigError(f"{path}: cannot load it ({type(e).__name__}: {e})") from None
    _CONFIG_MODULES[real] = module
  return _CONFIG_MODULES[real]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/mnist.py:NAME' -> the config train.py's --config=configs/mnist.py:NAME starts from (before any
  --config.* override): the file's get_config(NAME), or get_config() without ':NAME'. An unknown name is the
  file's own one-line error, as a ConfigError."""
  path, sep, name = spec.partition(":")
  module = load_config_module(path)
  try:
    return module.get_config(name) if sep else module.get_config()
  except ValueError as e:
    raise ConfigError(str(e)) from None


def to_dict(c: ml_collections.ConfigDict) -> dict:
  return json.loads(c.to_json())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{workdir}: no {CONFIG_FILE} here; is this a training workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  """'field: old -> new' for every leaf that differs between two config dicts."""
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += config_diff(va, vb, f"{prefix}{k}.")
    elif (list(va) if isinstance(va, (list, tuple)) else va) != (list(vb) if isinstance(vb, (list, tuple)) else vb):
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


def _saved_config(workdir: str):
  """The workdir's config.json as a dict, or None for a workdir without one (a new run)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _model_kind(name):
  """The ModelKind named by config.model.kind (None for an unknown kind: validate_config reports it)."""
  from iaf_jax.models import MODEL_KINDS  # here: the models import this module
  return MODEL_KINDS.get(name)


def check_config_compatible(c: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuse a config whose model or data differ from those the workdir was trained with."""
  old = _saved_config(workdir)
  if old is None:
    return
  new = to_dict(c)
  kind = _model_kind(new.get("model", {}).get("kind"))
  init_only = kind.init_only_fields if kind else ()
  identity = lambda cfg: {k: ({f: v for f, v in cfg.get(k, {}).items() if f not in init_only} if k == "model"
                              else cfg.get(k, {})) for k in _IDENTITY_SECTIONS}
  diffs = config_diff(identity(old), identity(new))
  if diffs:
    raise ConfigError(f"{workdir} was trained with another config ({'; '.join(diffs[:3])}); "
                      "use a new --workdir or the same model/data settings")


def adopt_saved_layout(c: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`c` with the model's layout fields (ModelKind.layout_fields, e.g. scan_rungs) set as the workdir saved them.

  A checkpoint restores only into the parameter layout it was saved in, and these fields change nothing the
  model computes, so rerunning a run's command resumes it even after their default changed."""
  old = _saved_config(workdir)
  if old is None:
    return c
  saved, kind = old.get("model", {}), _model_kind(c.model.get("kind"))
  changes = {f: saved.get(f, absent) for f, absent in (kind.layout_fields if kind else ())
             if f in c.model and saved.get(f, absent) != c.model[f]}
  if not changes:
    return c
  c = copy.deepcopy(c)
  for f, v in changes.items():
    log.info("%s: resuming with its saved model.%s=%r (a parameter layout; the same model)", workdir, f, v)
    c.model[f] = v
  return c


def save_config(c: ml_collections.ConfigDict, workdir: str) -> None:
  check_config_compatible(c, workdir)
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), to_dict(c))


def write_json_atomic(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)  # atomic: a crash never leaves half a file


def write_data_info(workdir: str, ds: data_lib.Dataset) -> None:
  """What the model is built for, and what it was trained on: the files read and the sha256 of each array."""
  write_json_atomic(os.path.join(workdir, DATA_INFO_FILE), {
      "name": ds.name, "image_shape": list(ds.image_shape), "max_value": ds.max_value, "source": ds.source,
      "files": list(ds.files), "checksums": dict(ds.checksums)})


def load_data_info(workdir: str) -> dict:
  path = os.path.join(workdir, DATA_INFO_FILE)
  if not os.path.exists(path):
    from iaf_jax.checkpoints import CheckpointError
    raise CheckpointError(f"{workdir}: holds no checkpoint (no {DATA_INFO_FILE}; train into it first)")
  with open(path) as f:
    info = json.load(f)
  info.setdefault("files", [])  # written before files/checksums were recorded
  info.setdefault("checksums", {})
  return info
