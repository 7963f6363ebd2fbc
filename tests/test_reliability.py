"""Reliability under faults and bad input: each test injects one fault (SIGKILL, damaged checkpoint files, a run of
non-finite steps, a full disk, bad data files, bad flags) and checks what the user gets: a run that resumes
from its last complete checkpoint, or one line on stderr and nothing overwritten. docs/reliability.md lists every
fault tried, including those checked in test_train.py and test_cli.py."""
import collections
import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import REPO, cli_flags, run_cli, tiny_config
from iaf_jax import checkpoints, cli, config_lib, data as data_lib, eval_lib, sharding, train_lib

CONFIG = "--config=configs/mnist.py:demo"

# After a failed restore orbax abandons reads that report themselves through sys.unraisablehook; the CLI drops them
# (checkpoints._quiet_reads_after_a_failed_restore, checked on real subprocesses below), but pytest swaps in its own
# hook for each test and would turn each of them into a warning.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
                               ":pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:(?s)Exception ignored.*Event loop is closed:pytest.PytestUnraisableExceptionWarning"),
]


# ----------------------------------------------------------------------------- helpers

def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_steps(workdir):
  return [r["step"] for r in _records(workdir) if "neg_elbo" in r]


def _complete_steps(workdir):
  """Finalised checkpoints: orbax writes a step to '<step>.orbax-checkpoint-tmp' and renames it when done."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _tmp_dirs(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(n for n in os.listdir(d) if "tmp" in n) if os.path.isdir(d) else []


def _assert_same_leaves(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(tree))


def _one_error_line(stderr, message):
  """stderr holds exactly one 'error: ...' line, containing message, and no traceback. (An error raised during
  training follows the progress bar, which ends in '\r' and no newline, on the same line: from 'error:' on.)"""
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line[line.index("error:"):] for line in stderr.splitlines() if "error:" in line]
  assert len(errors) == 1, stderr[-3000:]
  assert message in errors[0], errors[0]
  return errors[0]


def _snapshot(workdir):
  """{relative path: sha1} of every file under workdir: to check that a refused run changed nothing."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
  return out


def _cli_run(job, capsys):
  """What train.py / evaluate.py do with `job` (cli.run), in this process: (exit status, stderr)."""
  capsys.readouterr()
  status = cli.run(job, False)
  return status, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run: checkpoints 2 and 4, no validation."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  train_lib.train_and_evaluate(tiny_config(**{"train.num_steps": 4, "train.checkpoint_every": 2,
                                              "train.log_every": 2, "train.eval_every": 0}), workdir)
  return workdir


def _copy(workdir, tmp_path, name="copy"):
  dst = str(tmp_path / name)
  shutil.copytree(workdir, dst)
  return dst


# ----------------------------------------------------------------------------- 1. SIGKILL

KILL_OVERRIDES = {"train.num_steps": 24, "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 0}


def _start_train(workdir, log_path):
  args = [sys.executable, os.path.join(REPO, "train.py"), CONFIG, f"--workdir={workdir}", *cli_flags(**KILL_OVERRIDES)]
  with open(log_path, "w") as log:  # a file, not a pipe: a pipe nobody reads could fill up and stall the run
    return subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                            stderr=log)


def _wait_until(condition, proc, log_path, timeout=240.0):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"train.py exited early:\n{open(log_path).read()[-3000:]}"
    assert time.time() < deadline, f"timed out:\n{open(log_path).read()[-3000:]}"
    time.sleep(0.003)


def _kill9(proc):
  assert proc.poll() is None, "the run finished before it could be killed"
  proc.kill()  # SIGKILL: no handler runs, no checkpoint is saved on the way out
  proc.wait(timeout=60)


def _resumed_at(log_text):
  found = re.findall(r"resumed .* at step (\d+)", log_text)
  assert len(found) == 1, log_text[-3000:]
  return int(found[0])


def test_sigkill_at_random_moments_resumes_from_last_complete_checkpoint(tmp_path):
  """kill -9 once at a random moment after the first checkpoint, then once while a checkpoint is being written;
  each rerun resumes from the newest complete checkpoint, and the result is bit-identical to a straight run."""
  rng = random.Random(20240607)
  workdir = str(tmp_path / "killed")

  # Kill 1: a seeded random delay after the first checkpoint is complete.
  log1 = str(tmp_path / "run1.log")
  proc = _start_train(workdir, log1)
  _wait_until(lambda: _complete_steps(workdir), proc, log1)
  time.sleep(rng.uniform(0.0, 1.5))
  _kill9(proc)
  complete1, partial1 = _complete_steps(workdir), _tmp_dirs(workdir)
  assert complete1 and max(complete1) < KILL_OVERRIDES["train.num_steps"]

  # Kill 2: during a checkpoint write (an orbax temporary directory exists), after this process has finished a
  # checkpoint of its own (so the temporary directory is not a leftover of kill 1).
  partial2 = []
  for attempt in range(3):
    log2 = str(tmp_path / f"run2_{attempt}.log")
    before = max(_complete_steps(workdir))
    proc = _start_train(workdir, log2)
    _wait_until(lambda: max(_complete_steps(workdir)) > before, proc, log2)
    _wait_until(lambda: _tmp_dirs(workdir), proc, log2)
    _kill9(proc)
    assert _resumed_at(open(log2).read()) == before  # the newest complete checkpoint at the previous kill
    assert "unreadable" not in open(log2).read()     # and it was whole: nothing to fall back past
    complete2, partial2 = _complete_steps(workdir), _tmp_dirs(workdir)
    if partial2:  # killed mid-write (almost always: a write takes most of the time between two checkpoints)
      break
  assert partial2, "no kill landed during a checkpoint write"
  partial_steps = [int(n.split(".")[0]) for n in partial2]
  assert all(s > max(complete2) for s in partial_steps), (partial2, complete2)

  # Rerun the same command to completion.
  final = run_cli("train.py", CONFIG, f"--workdir={workdir}", *cli_flags(**KILL_OVERRIDES))
  assert final.returncode == 0, final.stderr[-3000:]
  assert _resumed_at(final.stderr) == max(complete2)  # not the half-written step
  assert "unreadable" not in final.stderr
  assert not _tmp_dirs(workdir)  # the half-written directory was cleared when that step was saved again
  end = _records(workdir)[-1]
  assert end["event"] == "end" and end["step"] == KILL_OVERRIDES["train.num_steps"]

  straight = str(tmp_path / "straight")
  train_lib.train_and_evaluate(tiny_config(**dict(KILL_OVERRIDES, **{"train.checkpoint_every": 24,
                                                                      "train.log_every": 24})), straight)
  a, b = eval_lib.load_run(straight, "latest"), eval_lib.load_run(workdir, "latest")
  assert a.step == b.step == KILL_OVERRIDES["train.num_steps"]
  _assert_same_leaves(a.params, b.params)
  print(f"kill 1 after checkpoints {complete1} (partial: {partial1}); kill 2 after {complete2} (partial: {partial2})")


# ----------------------------------------------------------------------------- 2. damaged checkpoint files

DAMAGE_OVERRIDES = {"train.num_steps": 8, "train.checkpoint_every": 2, "train.log_every": 1, "train.eval_every": 0}


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
  """A run to step 8 (checkpoints 4, 6, 8) and its step-8 EMA params, to copy and damage."""
  workdir = str(tmp_path_factory.mktemp("eight") / "run")
  train_lib.train_and_evaluate(tiny_config(**DAMAGE_OVERRIDES), workdir)
  assert _complete_steps(workdir) == [4, 6, 8]
  return workdir, eval_lib.load_run(workdir, "latest").params


def _array_files(step_dir):
  """The array data files of one checkpoint step (OCDBT data files under state/.../d/)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
  assert files, os.listdir(step_dir)
  return files


def _damage(step_dir, how):
  if how == "truncated":
    for f in _array_files(step_dir):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == "overwritten":
    rng = np.random.default_rng(0)
    for f in _array_files(step_dir):
      size = os.path.getsize(f)
      with open(f, "r+b") as fh:
        fh.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
  elif how == "data_files_missing":
    for f in _array_files(step_dir):
      os.remove(f)
  elif how == "ocdbt_dir_missing":  # its error quotes the arrays' zarr spec, "shape" included
    shutil.rmtree(os.path.join(step_dir, "state", "ocdbt.process_0"))
  elif how == "metadata_missing":  # its error is a "pytree structure error"
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated", "overwritten", "data_files_missing", "ocdbt_dir_missing",
                                 "metadata_missing"])
def test_damaged_latest_checkpoint_falls_back_and_is_replaced(eight_steps, tmp_path, how, caplog, capsys):
  source, params8 = eight_steps
  workdir = _copy(source, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "8")
  _damage(step_dir, how)

  # Evaluating the damaged step: one line (what evaluate.py prints; the real subprocess is checked below).
  status, err = _cli_run(lambda: eval_lib.evaluate(workdir, num_samples=2, checkpoint="latest", max_examples=8,
                                                   progress=False), capsys)
  assert status == 2
  _one_error_line(err, "checkpoint 8 could not be restored")

  # Rerunning the same command: a warning names the damaged step, the run resumes from step 6 and rewrites 8.
  n_before = len(_records(workdir))
  caplog.clear()
  with caplog.at_level("WARNING", logger="iaf_jax.checkpoints"):
    summary = train_lib.train_and_evaluate(tiny_config(**DAMAGE_OVERRIDES), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "iaf_jax.checkpoints"]
  assert len(warnings) == 1 and f"{workdir}/checkpoints/8 is unreadable" in warnings[0], warnings
  new_steps = [r["step"] for r in _records(workdir)[n_before:] if "neg_elbo" in r]
  assert new_steps == [7, 8]  # resumed at 6, the previous good step
  assert summary["step"] == 8 and _complete_steps(workdir) == [4, 6, 8]
  run = eval_lib.load_run(workdir, "latest")  # the damaged step was replaced by a good one
  assert run.step == 8
  _assert_same_leaves(run.params, params8)  # and it is the same step 8 as before the damage


@pytest.mark.parametrize("how", ["truncated", "ocdbt_dir_missing"])
def test_evaluate_cli_on_damaged_checkpoint_is_one_line(eight_steps, tmp_path, how):
  """Also no traceback from the reads orbax abandons when one fails (before the fix: up to ~2000 lines of them,
  varying from run to run)."""
  source, _ = eight_steps
  workdir = _copy(source, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", "8"), how)
  before = _snapshot(workdir)
  r = run_cli("evaluate.py", f"--workdir={workdir}", "--checkpoint=latest", "--num_samples=2")
  assert r.returncode == 2
  _one_error_line(r.stderr, f"{workdir}: checkpoint 8 could not be restored")
  assert _snapshot(workdir) == before


def test_every_checkpoint_damaged_is_one_clear_error(eight_steps, tmp_path, capsys):
  source, _ = eight_steps
  workdir = _copy(source, tmp_path)
  for step in (4, 6, 8):
    _damage(os.path.join(workdir, "checkpoints", str(step)), "truncated")
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(tiny_config(**DAMAGE_OVERRIDES), workdir), capsys)
  assert status == 2
  _one_error_line(err, "none of the checkpoints [8, 6, 4] could be restored")
  assert _complete_steps(workdir) == [4, 6, 8]  # nothing deleted: the user may want to look at them


def test_resume_with_checkpoints_of_another_model_is_refused(trained, tmp_path, capsys):
  """config.json edited to match the new model, so only the checkpoints tell: every step fails the same way, and
  the run is refused with one line rather than started over or resumed from a damaged-looking step."""
  workdir = _copy(trained, tmp_path)
  _edit_config_json(workdir, "model", "latent_dim", 6)
  before = {k: v for k, v in _snapshot(workdir).items() if k != "config.json"}
  cfg = tiny_config(**{"model.latent_dim": 6, "train.num_steps": 8, "train.checkpoint_every": 2, "train.log_every": 2,
                       "train.eval_every": 0})
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(cfg, workdir), capsys)
  assert status == 2
  _one_error_line(err, f"{workdir}: checkpoint 4 does not match this config's model")
  assert {k: v for k, v in _snapshot(workdir).items() if k != "config.json"} == before


# ----------------------------------------------------------------------------- 3. non-finite steps

def test_many_consecutive_nonfinite_steps_stop_the_run_with_good_checkpoints(tmp_path, monkeypatch, capsys):
  """From step 7 on every batch gives NaN inputs: the steps are skipped (params unchanged), and after
  max_consecutive_nonfinite=4 of them in a row the run stops with a TrainingError (exit status 3, one line)."""
  first_bad = 7
  calls = {"n": 0}
  real_global_batch, real_model_inputs = sharding.global_batch, data_lib.model_inputs

  def global_batch(mesh, images):  # called once per step, in order, by the loop of a fresh run
    calls["n"] += 1
    if calls["n"] >= first_bad:
      images = np.full_like(images, 255)  # marks the batch: 255 > the digits' max_value of 16
    return real_global_batch(mesh, images)

  def model_inputs(key, images, likelihood, max_value):
    import jax.numpy as jnp
    x = real_model_inputs(key, images, likelihood, max_value)
    return jnp.where(jnp.max(images) > max_value, jnp.nan, x)

  monkeypatch.setattr(sharding, "global_batch", global_batch)
  monkeypatch.setattr(data_lib, "model_inputs", model_inputs)
  workdir = str(tmp_path / "run")
  cfg = tiny_config(**{"train.num_steps": 40, "train.checkpoint_every": 2, "train.log_every": 1,
                       "train.eval_every": 0, "train.max_consecutive_nonfinite": 4})
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(cfg, workdir), capsys)
  assert status == 3
  _one_error_line(err, f"4 consecutive steps had non-finite loss or gradients (step 10); stopped. "
                       f"The last good checkpoint in {workdir} is intact.")

  recs = [r for r in _records(workdir) if "neg_elbo" in r]
  assert [r["step"] for r in recs] == list(range(1, 11))
  assert [r["finite"] for r in recs] == [1.0] * 6 + [0.0] * 4
  assert [r["skipped_steps"] for r in recs] == [0] * 6 + [1, 2, 3, 4]
  assert not any(r.get("event") == "end" for r in _records(workdir))
  # Checkpoints 4 and 6 from before the NaNs, 8 written while steps were being skipped, none at 10 (it stopped
  # there): all restore, all finite, and 8 holds exactly the parameters of 6.
  assert _complete_steps(workdir) == [4, 6, 8]
  runs = {s: eval_lib.load_run(workdir, str(s)) for s in (4, 6, 8)}
  assert all(_all_finite(r.params) for r in runs.values())
  _assert_same_leaves(runs[8].params, runs[6].params)
  assert eval_lib.load_run(workdir, "latest").step == 8


# ----------------------------------------------------------------------------- 4. disk full

Usage = collections.namedtuple("Usage", "total used free")


def _disk_with_free_mib(monkeypatch, mib):
  monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: Usage(100 << 30, (100 << 30) - (mib << 20),
                                                                           mib << 20))


def test_disk_full_is_refused_before_training(tmp_path, monkeypatch, capsys):
  _disk_with_free_mib(monkeypatch, 5)
  with pytest.raises(checkpoints.CheckpointError, match="only 5 MiB free on its disk; need at least 64 MiB"):
    checkpoints.check_workdir_writable(str(tmp_path / "direct"))
  assert os.listdir(tmp_path / "direct") == []  # the write probe is gone

  workdir = str(tmp_path / "new")
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(tiny_config(), workdir), capsys)
  assert status == 2
  _one_error_line(err, f"{workdir}: only 5 MiB free on its disk")
  assert os.listdir(workdir) == []  # no checkpoints dir, no config.json, no metrics


def test_disk_full_leaves_an_existing_workdir_untouched(trained, tmp_path, monkeypatch, capsys):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  _disk_with_free_mib(monkeypatch, 1)
  cfg = tiny_config(**{"train.num_steps": 8, "train.checkpoint_every": 2, "train.log_every": 2, "train.eval_every": 0})
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(cfg, workdir), capsys)
  assert status == 2
  _one_error_line(err, "only 1 MiB free")
  assert _snapshot(workdir) == before


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_disk_full_during_a_checkpoint_write(tmp_path):
  """Every file is capped at 60 kB (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a bigger write fails with EFBIG, as on
  a full disk): the first checkpoint write fails in orbax's background thread. Nothing half-written looks complete;
  the failure should be one line, but today it is a traceback (xfail below)."""
  workdir = str(tmp_path / "run")
  args = ["prlimit", "--fsize=60000:60000", sys.executable, os.path.join(REPO, "train.py"), CONFIG,
          f"--workdir={workdir}", *cli_flags(**DAMAGE_OVERRIDES)]
  r = subprocess.run(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                     timeout=600)
  assert r.returncode != 0
  assert "File too large" in r.stderr
  assert _complete_steps(workdir) == [] and _tmp_dirs(workdir)  # the failed write stays a temporary directory
  assert not any(rec.get("event") == "end" for rec in _records(workdir))
  if r.returncode != 2 or "Traceback" in r.stderr:
    pytest.xfail(f"known: a failed checkpoint write ends the run with exit status {r.returncode} and "
                 f"{r.stderr.count('Traceback')} tracebacks (orbax's background-thread error surfaces from "
                 "CheckpointManager.save/wait as a ValueError, not a CheckpointError)")
  _one_error_line(r.stderr, "checkpoint")


# ----------------------------------------------------------------------------- 5. bad inputs

def test_load_run_with_another_model_config_is_refused(trained, capsys):
  with pytest.raises(config_lib.ConfigError, match=r"its checkpoints hold another model \(model.latent_dim: 4 -> 6"):
    eval_lib.load_run(trained, "latest", config=tiny_config(**{"model.latent_dim": 6}))
  status, err = _cli_run(lambda: eval_lib.load_run(trained, config=tiny_config(**{"model.iaf_width": 8})), capsys)
  assert status == 2
  _one_error_line(err, "model.iaf_width: 16 -> 8")


def _edit_config_json(workdir, section, field, value):
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    c = json.load(f)
  c[section][field] = value
  with open(path, "w") as f:
    json.dump(c, f)


def test_evaluate_cli_with_config_json_edited_to_another_model_is_one_line(trained, tmp_path):
  """config.json says latent_dim 6, the checkpoints hold latent_dim 4: one line, nothing written."""
  workdir = _copy(trained, tmp_path)
  _edit_config_json(workdir, "model", "latent_dim", 6)
  before = _snapshot(workdir)
  r = run_cli("evaluate.py", f"--workdir={workdir}", "--checkpoint=latest", "--num_samples=2")
  assert r.returncode == 2
  line = _one_error_line(r.stderr, "checkpoint 4 could not be restored for this config")
  assert "is not compatible with the stored shape" in line  # names one of the arrays whose shapes differ
  assert _snapshot(workdir) == before


@pytest.mark.parametrize("field, value", [("iaf_depth", 1), ("hidden_dim", 8)])
def test_evaluate_with_config_json_edited_to_another_model_is_one_line(trained, tmp_path, capsys, field, value):
  workdir = _copy(trained, tmp_path)
  _edit_config_json(workdir, "model", field, value)
  status, err = _cli_run(lambda: eval_lib.evaluate(workdir, num_samples=2, checkpoint="latest", progress=False),
                         capsys)
  assert status == 2
  _one_error_line(err, "checkpoint 4 could not be restored for this config")


def _write_idx(path, images):
  n, h, w = images.shape
  with open(path, "wb") as f:
    f.write(np.array([0x803, n, h, w], ">u4").tobytes() + images.astype(np.uint8).tobytes())


def _mnist_like(n):
  return np.random.default_rng(0).integers(0, 256, (n, 28, 28)).astype(np.uint8)


def _bad_data(kind, d):
  """Writes a broken data set into directory d; returns (config overrides, expected message)."""
  os.makedirs(d)
  if kind == "idx_truncated":
    _write_idx(os.path.join(d, "train-images-idx3-ubyte"), _mnist_like(40))
    _write_idx(os.path.join(d, "t10k-images-idx3-ubyte"), _mnist_like(10))
    path = os.path.join(d, "train-images-idx3-ubyte")
    os.truncate(path, os.path.getsize(path) - 1000)
    return {"data.name": "mnist"}, "train-images-idx3-ubyte: file is truncated"
  if kind == "npz_nan_pixels":
    x = _mnist_like(40).astype(np.float32)
    x[3, 5, 5] = np.nan
    np.savez(os.path.join(d, "mnist.npz"), x_train=x, x_test=_mnist_like(10))
    return {"data.name": "mnist"}, "mnist.npz [x_train]: NaN pixels"
  if kind == "npz_out_of_range":
    x = _mnist_like(40).astype(np.int16)
    x[0, 0, 0] = 300
    np.savez(os.path.join(d, "mnist.npz"), x_train=x, x_test=_mnist_like(10))
    return {"data.name": "mnist"}, "values out of range [0, 300]"
  if kind == "amat_non_binary":
    rows = np.random.default_rng(0).integers(0, 2, (30, 784))
    for split in ("train", "valid", "test"):
      r = rows.copy()
      if split == "train":
        r[2, 100] = 2
      np.savetxt(os.path.join(d, f"binarized_mnist_{split}.amat"), r, fmt="%d")
    return {"data.name": "binarized_mnist"}, "binarized_mnist_train.amat: non-binary values (found 2)"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["idx_truncated", "npz_nan_pixels", "npz_out_of_range", "amat_non_binary"])
def test_bad_data_files_via_cli_are_one_line(tmp_path, kind):
  overrides, message = _bad_data(kind, str(tmp_path / "data"))
  workdir = tmp_path / "w"
  r = run_cli("train.py", CONFIG, f"--workdir={workdir}",
              *cli_flags(**overrides, **{"data.dir": str(tmp_path / "data"), "data.max_train": 0,
                                         "data.validation_size": 5}))
  assert r.returncode == 2
  _one_error_line(r.stderr, message)
  assert not os.path.exists(workdir / "checkpoints") and not os.path.exists(workdir / "metrics.jsonl")


def test_evaluate_cli_num_samples_zero_is_one_line(trained):
  before = _snapshot(trained)
  r = run_cli("evaluate.py", f"--workdir={trained}", "--num_samples=0")
  assert r.returncode == 2
  _one_error_line(r.stderr, "--num_samples=0: K must be >= 1")
  assert _snapshot(trained) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint": "last"}, "--checkpoint='last': must be best, latest or a step number"),
    ({"checkpoint": "99"}, "no checkpoint at step 99; have [2, 4]"),
    ({"split": "validation"}, "--split='validation': must be test, valid or train"),
    ({"num_samples": -3}, "--num_samples=-3: K must be >= 1"),
])
def test_evaluate_bad_arguments_are_one_line(trained, capsys, kwargs, message):
  before = _snapshot(trained)
  status, err = _cli_run(lambda: eval_lib.evaluate(trained, **{"num_samples": 2, "progress": False, **kwargs}),
                         capsys)
  assert status == 2
  _one_error_line(err, message)
  assert _snapshot(trained) == before


def test_evaluate_negative_chunk_size_is_one_line(trained, capsys):
  status, err = _cli_run(lambda: eval_lib.evaluate(trained, num_samples=2, chunk_size=-1, progress=False), capsys)
  assert status == 2
  _one_error_line(err, "chunk_size")


def test_evaluate_negative_max_examples_is_refused(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  status, err = _cli_run(lambda: eval_lib.evaluate(workdir, num_samples=2, max_examples=-1, progress=False), capsys)
  assert status == 2
  _one_error_line(err, "max_examples")


# ----------------------------------------------------------------------------- refused runs overwrite nothing

def test_refused_incompatible_run_leaves_workdir_unchanged(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(tiny_config(**{"model.latent_dim": 6}), workdir), capsys)
  assert status == 2
  _one_error_line(err, "was trained with another config (model.latent_dim: 4 -> 6)")
  assert _snapshot(workdir) == before


# config.json is written only once every check has passed, so a refused run leaves none behind.
def test_run_refused_after_loading_data_leaves_config_json_unchanged(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  before = _snapshot(workdir)
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(tiny_config(**{"train.batch_size": 512}), workdir),
                         capsys)
  assert status == 2
  _one_error_line(err, "256 training examples < batch size 512")
  assert _snapshot(workdir) == before


def test_run_refused_for_bad_data_dir_does_not_block_the_corrected_command(tmp_path, capsys):
  good = str(tmp_path / "data")
  os.makedirs(good)
  np.savez(os.path.join(good, "mnist.npz"), x_train=_mnist_like(40), x_test=_mnist_like(10))
  workdir = str(tmp_path / "w")
  overrides = {"data.name": "mnist", "data.max_train": 0, "data.validation_size": 5, "train.num_steps": 0}
  status, err = _cli_run(lambda: train_lib.train_and_evaluate(
      tiny_config(**overrides, **{"data.dir": str(tmp_path / "typo")}), workdir), capsys)
  assert status == 2
  _one_error_line(err, "no such directory")
  assert not os.path.exists(os.path.join(workdir, "config.json"))
