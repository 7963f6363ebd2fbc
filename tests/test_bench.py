"""python -m iaf_jax.experiments.bench: the JSON it writes (keys, finite positive numbers, FLOP bookkeeping) and its errors.

The end-to-end test runs the bench as a subprocess with --quick on one tiny MNIST config at batch 8 and 16. It
checks the bench's bookkeeping, not the speed of the code, so the subprocess compiles at LLVM optimisation level
0 (the same HLO and so the same cost analysis, compiled several times faster).
"""
import functools
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from helpers import REPO
from iaf_jax import hostenv
from iaf_jax.models import build_model
from iaf_jax.experiments import bench

MACHINE_KEYS = ("platform", "device_kind", "cpu_count", "jax", "date")


def _run_bench(*args, timeout=300):
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=flags)
  return subprocess.run([sys.executable, "-m", "iaf_jax.experiments.bench", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_quick_bench_json(tmp_path):
  out = tmp_path / "bench.json"
  env_before = {k: v for k, v in os.environ.items() if "force_host_platform_device_count" not in v}
  # --devices 1,2 on a 1-device CPU host: the bench restarts itself with 2 forced host devices.
  # One micro-batch: each micro-batch repeats the per-parameter work (weight norm and its gradient), which for the
  # quick model's few flops per image would break the per-image comparison of batch 8 and 16 below.
  proc = _run_bench("--configs", "mnist:diag", "--batch", "8,16", "--devices", "1,2", "--is_examples", "8",
                    "--quick", "--override", "train.micro_batches=1", "--json", str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiling the update step" in proc.stderr      # progress goes to stderr
  assert "train img/s" in proc.stdout                     # the table goes to stdout
  result = json.loads(out.read_text())

  machine = result["machine"]
  for key in MACHINE_KEYS:
    assert machine.get(key), key
  assert machine["jax"] == jax.__version__

  assert machine["num_devices"] >= 2 and "xla_force_host_platform_device_count=2" in machine["xla_flags"]
  if hostenv.hugepages_env(env_before) is not None:   # Linux, glibc, THP available: restarted with them
    assert hostenv.HUGEPAGES_TUNABLE in machine["glibc_tunables"]
  # the allocator that the process really loaded: tcmalloc wherever it is installed and not switched off
  if sys.platform.startswith("linux"):
    off = env_before.get("IAF_JAX_MALLOC") == "glibc" or hostenv.find_tcmalloc() is None
    assert machine["malloc"] == ("glibc" if off else "tcmalloc")

  rows = result["rows"]
  assert [(r["config"], r["batch"], r["devices"]) for r in rows] == [
      ("mnist:diag", 8, 1), ("mnist:diag", 8, 2), ("mnist:diag", 16, 1), ("mnist:diag", 16, 2)]
  for r in rows:
    missing = set(bench.REQUIRED_KEYS) - set(r)
    assert not missing, missing
    for key in bench.REQUIRED_KEYS[1:]:
      assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert not set(bench.RESNET_KEYS) & set(r)            # sampling timings are for ResNet rows only
    assert r["gflops_per_s"] == pytest.approx(r["flops_per_image"] * r["train_images_per_s"] / 1e9, rel=1e-6)
    assert r["train_images_per_s"] == pytest.approx(1000 * r["batch"] / r["train_step_ms"], rel=1e-6)
    assert r["train_cpu_ms_per_step"] > 0   # CPU time of the process, all threads: at least some per step
    assert r["is_samples_per_s"] > 0 and r["is_num_samples"] == bench.QUICK_SETTINGS["num_samples"]
    # A training step does at least a forward (2 flops per weight use) and a backward pass per image.
    assert r["flops_per_image"] > 4 * r["num_params"], r
    assert r["matmul_ceiling_gflops"] == machine["matmul_ceiling_gflops"]
    # The architecture's count (3 x forward multiply-adds x 2) and XLA's agree roughly: XLA skips the taps that
    # fall on SAME padding, counts elementwise work and the zero blocks of sub-pixel (transposed) convolutions.
    # The quick model's one-conv blocks (4 and 8 channels) do so little arithmetic that the elementwise work is
    # a large share of XLA's count (2.4x here; 1.01x at the report's full size, docs/performance.md).
    assert 0.5 < r["flops_per_image"] / r["analytic_train_flops_per_image"] < 3.0, r
    fwd = r["analytic_forward_flops_per_image"]
    assert fwd["flow"] == 0 and fwd["encoder"] > 0 and fwd["decoder"] > 0   # diag: no IAF
    # An importance sample runs the decoder forward (the encoder once per chunk of samples): more than the
    # decoder's multiply-adds less its padded taps, less than a training image's forward and backward passes.
    assert 0.5 * fwd["decoder"] < r["is_flops_per_sample"] < 0.5 * r["flops_per_image"], r
    assert r["is_gflops_per_s"] == pytest.approx(r["is_flops_per_sample"] * r["is_samples_per_s"] / 1e9, rel=1e-6)

  # Same global batch on 1 and 2 devices: about the same cost per image in total; a little more on 2, where
  # every device repeats the per-parameter work (weight norm, optimizer, EMA) on its replica.
  for one, two in (rows[0:2], rows[2:4]):
    assert one["flops_per_image"] <= two["flops_per_image"] <= 1.5 * one["flops_per_image"], (one, two)
    assert two["is_flops_per_sample"] == pytest.approx(one["is_flops_per_sample"], rel=0.2), (one, two)
  small, large = rows[0], rows[2]
  # Per-image cost: most of the step scales with the batch, so dividing by it gives about the same number.
  assert large["flops_per_image"] == pytest.approx(small["flops_per_image"], rel=0.2)
  assert large["num_params"] == small["num_params"]


def test_too_few_devices_is_one_line(capsys):
  wanted = len(jax.devices()) + 1
  with pytest.raises(SystemExit) as e:
    bench.main(["--configs", "mnist:diag", "--devices", f"1,{wanted}", "--quick"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert f"XLA_FLAGS=--xla_force_host_platform_device_count={wanted}" in err


@pytest.mark.parametrize("argv, message", [
    (["--configs", "mnist:nope"], "unknown config name"),
    (["--configs", "mnist"], "not FILE:NAME"),
    (["--override", "model.no_such_field=3"], "none of the configs has this field"),
    (["--override", "model.hidden_dim=wide"], "model.hidden_dim"),
    (["--override", "hidden_dim=3"], "section.field=value"),
    (["--batch", "0"], "--batch"),
    (["--image_shape", "28,28"], "H,W,C"),
])
def test_bad_flags_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(argv + ["--quick"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err, err


def test_overrides_apply_where_the_field_exists():
  overrides = [bench.parse_override("model.h_size=64"), bench.parse_override("model.channels=(8, 16)"),
               bench.parse_override("model.strides=[2, 2]"), bench.parse_override("train.learning_rate=1")]
  assert overrides[1] == ("model.channels", (8, 16))
  mnist, shape = bench.load_config("mnist:diag", overrides, quick=False)
  assert shape == (28, 28, 1) and tuple(mnist.model.channels) == (8, 16) and "h_size" not in mnist.model
  assert tuple(mnist.model.strides) == (2, 2)
  assert mnist.train.learning_rate == 1.0
  resnet, shape = bench.load_config("cifar10:rungs4_iaf", overrides, quick=True)
  assert shape == (32, 32, 3) and resnet.model.h_size == 64           # --override wins over --quick
  assert resnet.model.z_size == bench.QUICK_OVERRIDES["model.z_size"]


class _FakeCompiled:
  def __init__(self, analysis):
    self.analysis = analysis

  def cost_analysis(self):
    return self.analysis


# Appendix 6.1's encoder by hand, 28x28 -> 14 -> 14 -> 7 -> 7 -> 4, channels 16, 16, 32, 32, 32 (multiply-adds):
_REPORT_CONVS = (196 * 9 * 16 + 196 * 16 + 196 * 9 * 16 * 16 + 49 * 9 * 16 * 32 + 49 * 16 * 32   # one 3x3 conv
                 + 49 * 9 * 32 * 32 + 16 * 9 * 32 * 32 + 16 * 32 * 32)                         # a block, shortcuts
_SECOND_CONVS = 196 * 9 * 16 * 16 * 2 + 49 * 9 * 32 * 32 * 2 + 16 * 9 * 32 * 32               # two_conv's extra
_DENSE = 512 * 450 + 450 * 64                                                                    # 450 units, 2 x 32


@pytest.mark.parametrize("spec,encoder,context", [
    ("mnist:iaf_d8_w1920", _REPORT_CONVS + _DENSE + 450 * 200, 200),   # the report's block, 200-unit context
    ("mnist:iaf_d8_w1920@model.block=two_conv@model.context_dim=0", _REPORT_CONVS + _SECOND_CONVS + _DENSE, 450)])
def test_analytic_flops_of_the_report_architecture(spec, encoder, context):
  """Appendix 6.1 by hand (3.56 M encoder multiply-adds with two convs per block, 1.70 M with the report's one),
  and the IAF 8/1920 steps on 32 latents + the context."""
  config, shape = bench.load_config(spec, [], quick=False)
  f = build_model(config.model, shape).analytic_flops()
  assert f["encoder"] == 2 * encoder
  assert f["flow"] == 2 * 8 * ((32 + context) * 1920 + 1920 * 1920 + 1920 * 64)
  assert f["train"] == 3 * (f["encoder"] + f["flow"] + f["decoder"])


def test_cost_flops_dict_or_list():
  assert bench.cost_flops(_FakeCompiled({"flops": 10.0, "bytes accessed": 3.0})) == 10.0
  assert bench.cost_flops(_FakeCompiled([{"flops": 7.0}])) == 7.0
  assert bench.cost_flops(_FakeCompiled([{}, {"flops": 5.0}])) == 5.0
  assert bench.cost_flops(_FakeCompiled(None)) == 0.0


def test_loop_flops_missed_by_xla_counts_every_scan_iteration():
  """XLA's cost analysis counts a loop's body once; loop_flops_missed_by_xla adds the iterations after the
  first (dots and convolutions, from the jaxpr), so a scanned program and its unrolled twin count alike."""
  import jax.numpy as jnp
  m, n, k, length = 8, 16, 32, 5
  a, w = jnp.ones((m, k)), jnp.ones((length, k, n))
  ws = jnp.ones((length, k, k))
  assert bench.loop_flops_missed_by_xla(lambda a, w: a @ w[0], a, w) == 0.0
  scanned = lambda a, ws: jax.lax.scan(lambda c, wi: (c @ wi, None), a, ws)[0]
  assert bench.loop_flops_missed_by_xla(scanned, a, ws) == (length - 1) * 2 * m * k * k
  unrolled = lambda a, ws: functools.reduce(lambda c, i: c @ ws[i], range(length), a)
  xla = lambda f: bench.cost_flops(jax.jit(f).lower(a, ws).compile())
  assert xla(unrolled) == pytest.approx(length * 2 * m * k * k, rel=0.01)
  assert xla(scanned) + bench.loop_flops_missed_by_xla(scanned, a, ws) == pytest.approx(xla(unrolled), rel=0.01)
  # A 3x3 convolution inside a scan, and a shard_map body counted once per device.
  x, kern = jnp.ones((2, 6, 6, 3)), jnp.ones((4, 3, 3, 3, 3))
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv_scan = lambda x, ks: jax.lax.scan(lambda c, ki: (conv(c, ki), None), x, ks)[0]
  assert bench.loop_flops_missed_by_xla(conv_scan, x, kern) == 3 * 2 * (2 * 6 * 6 * 3) * (3 * 3 * 3)
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  P = jax.sharding.PartitionSpec
  sharded = jax.shard_map(scanned, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  assert bench.loop_flops_missed_by_xla(sharded, a, ws) == (length - 1) * 2 * m * k * k
