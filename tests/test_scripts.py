"""The measurement scripts' own logic (scripts/ is not a package: loaded by path)."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_update_bandwidth_reads_the_entry_computation_of_compiled_hlo():
  """entry_instructions finds the ENTRY's fusion of a known program, its full-size output shape, and its
  operands by name back to the parameters (what the bytes-moved count is built from)."""
  ub = _load("update_bandwidth")
  f = jax.jit(lambda a, b: jnp.where(a > 0, a * b + 1.0, b), donate_argnums=0)
  a, b = jnp.ones((300, 200)), jnp.ones((300, 200))
  instrs = ub.entry_instructions(f.lower(a, b).compile().as_text())
  params = {n for n, (_, _, op, _) in instrs.items() if op == "parameter"}
  assert len(params) == 2 and all(instrs[n][1] == (300, 200) for n in params)
  fusions = [v for v in instrs.values() if v[2] == "fusion"]
  assert len(fusions) == 1
  dtype, shape, _, operands = fusions[0]
  assert (dtype, shape) == ("f32", (300, 200)) and set(operands) == params


def test_dot_shapes_times_the_step_matmuls_against_the_ceiling(capsys, monkeypatch):
  """The script runs end to end at a small size and reports the ceiling and the three step matmuls."""
  ds = _load("dot_shapes")
  monkeypatch.setattr(sys, "argv", ["dot_shapes.py", "--batch", "8", "--width", "64", "--n", "128", "--repeats", "2"])
  ds.main()
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert [r["op"] for r in result["rows"]] == ["ceiling n^3", "forward x @ W", "dX = g @ W^T", "dW = x^T @ g"]
  assert all(r["xla_gflops"] > 0 and r["numpy_gflops"] > 0 for r in result["rows"])


def test_step_page_faults_counts_the_faults_of_fresh_temporaries(monkeypatch, capsys):
  """The script runs end to end on a tiny model and reports, per round, a positive step time and a mean number of
  faults per step no larger than the step's temporaries could take (a fault per 4 KiB page of a few MB at most)."""
  spf = _load("step_page_faults")
  tiny = ["model.channels=(4, 8)", "model.strides=(2, 2)", "model.hidden_dim=16", "model.latent_dim=4",
          "model.iaf_width=16", "model.context_dim=8"]
  monkeypatch.setattr(sys, "argv", ["step_page_faults.py", "--config", os.path.join(ROOT, "configs/mnist.py:iaf_d2_w320"),
                                    "--batch", "4", "--steps", "2", "--rounds", "2"]
                      + [a for o in tiny for a in ("--override", o)])
  rows = spf.main()
  assert [r["round"] for r in rows] == [1, 2]
  assert all(r["ms_per_step"] > 0 and 0 <= r["minor_faults_per_step"] < 10_000 for r in rows)
  assert capsys.readouterr().out.count("minor faults/step") == 2


def test_interleaved_steps_compiles_a_variant_with_xla_options_to_the_same_step(monkeypatch):
  """A variant with XLA compiler options is the same update step compiled differently: after the same warm-up
  steps its loss equals the plain variant's (to float rounding); a comma-separated option value stays whole; an
  option XLA does not know is a one-line error."""

  import pytest
  ils = _load("interleaved_steps")
  assert ils.parse_variant("model.x=1,xla:opt=A,B,xla:flag=false,xla:n=128") == (
      ["model.x=1"], {"opt": "A,B", "flag": False, "n": 128})
  tiny = "model.channels=(4, 8),model.strides=(2, 2),model.hidden_dim=16,model.latent_dim=4"
  argv = ["interleaved_steps.py", "--config", os.path.join(ROOT, "configs/mnist.py:diag"), "--batch", "4",
          "--steps", "1", "--rounds", "1"]
  monkeypatch.setattr(sys, "argv", argv + ["--variant", tiny, "--variant", tiny + ",xla:xla_cpu_use_xnnpack=false"])
  rows = ils.main()
  assert len(rows) == 2 and all(r["median_img_per_s"] > 0 for r in rows)
  assert abs(rows[0]["loss_after_warmup"] - rows[1]["loss_after_warmup"]) <= 1e-4 * abs(rows[0]["loss_after_warmup"])
  monkeypatch.setattr(sys, "argv", argv + ["--variant", tiny + ",xla:xla_cpu_no_such_option=1"])
  with pytest.raises(SystemExit, match="XLA refused"):
    ils.main()


def test_profile_concurrency_counts_threads_busy_at_once_and_short_ops():
  """Two threads: A busy over [0, 10) us (with an op nested inside another), B over [5, 15) and [20, 21) us.
  Over the span [0, 21): 0 threads busy for 5 us, 1 for 11, 2 for 5; the nested op counts once; two of the five
  ops are shorter than 2 us."""
  ps = _load("profile_step")
  ev = lambda tid, ts, dur: {"pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": "fusion.1"}
  events = [ev("A", 0, 10), ev("A", 2, 1), ev("B", 5, 10), ev("B", 20, 1), ev("A", 4, 6)]
  c = ps.concurrency(events, steps=1, short_us=2)
  assert c["threads"] == 2 and abs(c["span_ms"] - 0.021) < 1e-12
  assert {n: round(v * 21, 9) for n, v in c["busy_share"].items()} == {0: 5, 1: 11, 2: 5}
  assert abs(c["mean_busy_threads"] - 21 / 21) < 1e-12
  assert c["ops_per_step"] == 5 and c["short_ops_per_step"] == 2 and abs(c["short_op_ms_per_step"] - 0.002) < 1e-12


def test_profile_step_on_two_devices_shows_the_all_reduce_and_the_thread_shares(tmp_path):
  """`profile_step.py --devices 2` profiles the update step on a 2-device mesh, as train.py runs it: the gradient
  all-reduce is among its op kinds (a 1-device step has none), the concurrency line is printed and saved, and
  without the devices it stops with the one-line error saying what to set."""
  tiny = ["--override", "model.channels=(4,8)", "--override", "model.strides=(2,2)", "--override",
          "model.hidden_dim=16", "--override", "model.latent_dim=4"]
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "profile_step.py"), "--config", "configs/mnist.py:diag",
         "--batch", "8", "--steps", "2", *tiny]
  env = dict(os.environ, IAF_JAX_MALLOC="glibc")
  run = subprocess.run(cmd + ["--devices", "2", "--out", str(tmp_path / "d2")], cwd=ROOT, text=True,
                       capture_output=True, timeout=300,
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert run.returncode == 0, run.stderr[-2000:]
  assert "update step on 2 device(s)" in run.stdout and "threads running an op" in run.stdout
  out = json.load(open(tmp_path / "d2" / "summary.json"))
  assert "all-reduce" in {k for k, _, _ in out["kinds"]} and out["devices"] == 2
  c = out["concurrency"]
  assert c["ops_per_step"] > 0 and abs(sum(c["busy_share"].values()) - 1) < 1e-6
  bad = subprocess.run(cmd + ["--devices", "2", "--out", str(tmp_path / "bad")], cwd=ROOT, text=True,
                       capture_output=True, timeout=300, env=dict(env, XLA_FLAGS=""))
  assert bad.returncode != 0 and "xla_force_host_platform_device_count=2" in bad.stderr.strip().splitlines()[-1]


def test_independent_halves_times_the_halves_the_update_and_the_library_step(tmp_path):
  """scripts/independent_halves.py times half the batch's gradients alone and both halves at once (one per
  device), the update and the library step, and derives the ratios it prints from those medians; without two
  devices it stops with a one-line error naming the flag."""
  tiny = ["--override", "model.channels=(4,8)", "--override", "model.strides=(2,2)", "--override",
          "model.hidden_dim=16", "--override", "model.latent_dim=4"]
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "independent_halves.py"), "--config", "configs/mnist.py:diag",
         "--batch", "8", "--rounds", "2", "--steps", "2", *tiny]
  env = dict(os.environ, IAF_JAX_MALLOC="glibc")
  run = subprocess.run(cmd + ["--json", str(tmp_path / "h.json")], cwd=ROOT, text=True, capture_output=True,
                       timeout=300, env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert run.returncode == 0, run.stderr[-2000:]
  out = json.load(open(tmp_path / "h.json"))
  med = out["median_ms"]
  assert set(med) == {"half alone", "both halves", "update", "library step"}
  assert all(len(v) == 2 and min(v) > 0 for v in out["ms"].values())
  assert out["halves_plus_update_ms"] == pytest.approx(med["both halves"] + med["update"])
  assert out["halves_at_once_speedup"] == pytest.approx(2 * med["half alone"] / med["both halves"])
  assert out["library_img_per_s"] == pytest.approx(8e3 / med["library step"])
  assert "both halves + update" in run.stdout
  bad = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=300,
                       env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1"))
  assert bad.returncode != 0 and "xla_force_host_platform_device_count=2" in bad.stderr.strip().splitlines()[-1]


def test_op_threads_reports_rates_from_its_own_shapes_and_times(tmp_path):
  """scripts/op_threads.py times a 3x3 convolution and a matmul, forward and with gradients: the FLOPs follow
  from the shapes, the GFLOP/s from those and the times (three times the forward's with gradients), the CPU/wall
  ratios are those of a running process; a malformed shape gets a one-line error."""
  script = os.path.join(ROOT, "scripts", "op_threads.py")
  run = subprocess.run([sys.executable, script, "--conv", "2,6,6,3,4", "--dot", "8,16,4", "--calls", "2",
                        "--json", str(tmp_path / "o.json")], cwd=ROOT, text=True, capture_output=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  conv, dot = json.load(open(tmp_path / "o.json"))["ops"]
  assert conv["mflop_forward"] == pytest.approx(2 * 2 * 6 * 6 * 3 * 4 * 9 / 1e6)
  assert dot["mflop_forward"] == pytest.approx(2 * 8 * 16 * 4 / 1e6)
  for r in (conv, dot):
    assert r["forward_gflops"] == pytest.approx(r["mflop_forward"] / r["forward_ms"])
    assert r["forward_and_grads_gflops"] == pytest.approx(3 * r["mflop_forward"] / r["forward_and_grads_ms"])
    assert 0 < r["forward_cpu_per_wall"] < 64 and 0 < r["forward_and_grads_cpu_per_wall"] < 64
  bad = subprocess.run([sys.executable, script, "--conv", "1,2,3"], cwd=ROOT, text=True, capture_output=True,
                       timeout=120)
  assert bad.returncode != 0 and "--conv '1,2,3'" in bad.stderr.strip().splitlines()[-1]


def test_the_scripts_xla_flags_keep_the_users_flags_after_them():
  """XLA stops reading XLA_FLAGS at a word that is not a flag (`intra_op_parallelism_threads=1` was one), and
  drops every flag after it. Each shell script that prepends to XLA_FLAGS must leave the user's flags working: with
  the user's --xla_force_host_platform_device_count=2 appended, JAX sees 2 devices."""
  found = 0
  for name in sorted(os.listdir(os.path.join(ROOT, "scripts"))):
    if not name.endswith(".sh"):
      continue
    for value in re.findall(r'XLA_FLAGS="([^"]*)\$\{XLA_FLAGS:-\}"', open(os.path.join(ROOT, "scripts", name)).read()):
      found += 1
      assert all(w.startswith("--") for w in value.split()), (name, value)
      flags = value + "--xla_force_host_platform_device_count=2"
      run = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"], text=True,
                           capture_output=True, timeout=120, env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"))
      assert run.stdout.strip() == "2", (name, flags, run.stderr[-500:])
  assert found >= 2  # budget_run.sh and speed_vs_reference.sh
