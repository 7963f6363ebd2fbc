"""The command-line contract: train.py / evaluate.py on 1 and 2 forced CPU devices, SIGTERM, one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import REPO, cli_flags, run_cli

CONFIG = "--config=configs/mnist.py:demo"
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_same_loss_on_one_and_two_devices_then_evaluate_and_sample(tmp_path):
  overrides = {"train.num_steps": 6, "train.log_every": 1, "train.eval_every": 3}
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  r1 = run_cli("train.py", CONFIG, f"--workdir={one}", *cli_flags(**overrides))
  assert r1.returncode == 0, r1.stderr[-2000:]
  r2 = run_cli("train.py", CONFIG, f"--workdir={two}", *cli_flags(**overrides), env=TWO_DEVICES)
  assert r2.returncode == 0, r2.stderr[-2000:]
  l1, l2 = _train_losses(one), _train_losses(two)
  assert len(l1) == len(l2) == 6
  np.testing.assert_allclose(l1, l2, rtol=2e-4)  # same seed, same global batch: same run up to rounding

  ev = run_cli("evaluate.py", f"--workdir={two}", "--num_samples=8", "--split=test", "--max_examples=30",
               env=TWO_DEVICES)
  assert ev.returncode == 0, ev.stderr[-2000:]
  assert "VLB" in ev.stdout and "bits/dim" in ev.stdout
  result = json.load(open(os.path.join(two, "eval_test_best_K8_n30.json")))
  assert result["devices"] == 2 and result["num_examples"] == 30 and result["gap_nats"] >= 0

  sm = run_cli("evaluate.py", f"--workdir={two}", "--mode=sample", "--num=16", env=TWO_DEVICES)
  assert sm.returncode == 0, sm.stderr[-2000:]
  timing = json.load(open(os.path.join(two, "samples.json")))
  assert timing["ms_per_image_batched"] > 0 and timing["ms_per_image_single"] > 0 and timing["ms_forward"] > 0
  import matplotlib.image as mpimg
  img = mpimg.imread(os.path.join(two, "samples.png"))
  # 16 images of 8x8 in a 8-column grid, 1-pixel padding, scaled x4: 2 rows x 8 cols
  assert img.shape[:2] == ((2 * 9 + 1) * 4, (8 * 9 + 1) * 4)
  assert os.path.getsize(os.path.join(two, "reconstructions.png")) > 0


def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, os.path.join(REPO, "train.py"), CONFIG, f"--workdir={workdir}",
          *cli_flags(**{"train.num_steps": 100000, "train.log_every": 1, "train.checkpoint_every": 100000,
                        "train.eval_every": 0})]
  proc = subprocess.Popen(args, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 3):
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))]
  end = json.loads(open(metrics).readlines()[-1])
  assert end["event"] == "end" and end["reason"] == "signal SIGTERM"
  assert saved == [end["step"]] and 3 <= end["step"] < 100000


@pytest.mark.parametrize("args, message", [
    (["--config=configs/mnist.py:no_such_row"], "unknown config name"),
    ([CONFIG, "--config.model.no_such_field=1"], "no_such_field"),
    ([CONFIG, "--config.model.iaf_width=-2"], "config.model.iaf_width=-2"),
    ([CONFIG, "--config.data.name=fashion_mnist", "--config.data.dir=/nonexistent/dir"], "/nonexistent/dir"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
  r = run_cli("train.py", *args, f"--workdir={tmp_path / 'w'}")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr
  assert message in r.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_evaluate_without_checkpoint_is_one_line(tmp_path):
  r = run_cli("evaluate.py", f"--workdir={tmp_path}")
  assert r.returncode == 2 and "Traceback" not in r.stderr and "no config.json" in r.stderr


def test_resnet_vae_train_evaluate_sample_on_mock_cifar_with_two_devices(tmp_path):
  """The Table 4 job end to end on CIFAR-shaped mock data (a local cifar10.npz), 2 forced CPU devices."""
  rng = np.random.default_rng(0)
  data_dir = tmp_path / "cifar"
  data_dir.mkdir()
  np.savez(data_dir / "cifar10.npz", x_train=rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8),
           x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
  workdir = str(tmp_path / "run")
  flags = ["--config=configs/cifar10.py:rungs4_iaf", f"--workdir={workdir}", f"--config.data.dir={data_dir}",
           "--config.data.validation_size=8", "--config.model.h_size=8", "--config.model.z_size=2",
           "--config.train.batch_size=8", "--config.train.num_steps=4", "--config.train.log_every=2",
           "--config.train.eval_every=2", "--config.train.checkpoint_every=2", "--config.eval.valid_examples=8",
           "--config.eval.batch_size=8", "--config.eval.chunk_size=4"]
  tr = run_cli("train.py", *flags, env=TWO_DEVICES)
  assert tr.returncode == 0, tr.stderr[-2000:]
  # The training log's KL per rung (bottom-up), over the same rows as its KL: they add up to it.
  recs = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "neg_elbo" in r]
  assert [r["step"] for r in recs] == [2, 4]
  for r in recs:
    assert len(r["kl_per_group"]) == 4
    np.testing.assert_allclose(sum(r["kl_per_group"]), r["kl"], rtol=1e-4, atol=1e-3)
  # No XLA_FLAGS: evaluate.py restarts itself with one CPU device per asked-for core (hostenv.cpu_devices_env).
  ev = run_cli("evaluate.py", f"--workdir={workdir}", "--num_samples=4", env={"IAF_JAX_CPU_DEVICES": "2"})
  assert ev.returncode == 0, ev.stderr[-2000:]
  r = json.load(open(os.path.join(workdir, "eval_test_best_K4.json")))
  assert r["devices"] == 2 and r["num_examples"] == 8 and r["num_dims"] == 8 * 8 * 3
  assert np.isfinite(r["bits_per_dim_nll"]) and r["bits_per_dim_nll"] <= r["bits_per_dim_elbo"]
  sm = run_cli("evaluate.py", f"--workdir={workdir}", "--mode=sample", "--num=4", env=TWO_DEVICES)
  assert sm.returncode == 0, sm.stderr[-2000:]
  timing = json.load(open(os.path.join(workdir, "samples.json")))
  assert all(timing[k] > 0 for k in ("ms_per_image_batched", "ms_per_image_single", "ms_forward"))
