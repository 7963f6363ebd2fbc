"""Throughput benchmark: training, importance-sampling evaluation and prior sampling on synthetic images.

  python -m iaf_jax.experiments.bench [--configs mnist:diag,cifar10:rungs4_iaf] [--batch 64] [--devices 1,2]
                                      [--repeats 5] [--steps 10] [--json out.json] [--override model.h_size=64] [--quick]

One row per (config, batch, devices), every time measured after compilation with `jax.block_until_ready`:

  train_images_per_s     batch * steps / median over --repeats of the time of --steps update steps
  train_cpu_ms_per_step  user + system CPU time of the process per update step over those timings: on a shared
                         host, a steadier comparison than wall time (other jobs slow the wall clock, not this)
  is_samples_per_s       examples * K / median time of one importance-sampling evaluation (eval_lib's, K=128)
  is_gflops_per_s        is_flops_per_sample (XLA cost analysis of one chunk of that evaluation / its samples)
                         * is_samples_per_s / 1e9: the evaluation's rate against the matmul ceiling
  flops_per_image        XLA cost analysis of the compiled update step, 'flops' / batch (per-device program
                         flops * devices / batch on a mesh: every device runs its shard of the batch). XLA counts
                         a loop's body once; the dots and convolutions of the further iterations of a scan
                         (scanned ResNet rungs) are added from the jaxpr (loop_flops_missed_by_xla), here and in
                         is_flops_per_sample
  gflops_per_s           flops_per_image * train_images_per_s / 1e9
  matmul_ceiling_gflops  2 * n^3 / median time of a float32 n x n matmul (n = 2048), in the same process
  compile_s              lower + compile of the update step (the persistent compilation cache, if enabled,
                         makes this small)
  peak_rss_mb            the process's peak resident set so far (ru_maxrss)
  ms_per_image_batched / ms_per_image_single   (ResNet VAE rows) sampling from the prior, batch and batch 1

Images are synthetic uint8 of the shape of the config's dataset (MNIST configs 28x28x1, CIFAR-10 configs 32x32x3;
--image_shape overrides), so no dataset files are needed; throughput does not depend on pixel values. With
N > 1 devices the update step runs as train_lib runs it: a 1-D 'data' mesh over the first N devices, the
(global) batch sharded over it, the state replicated. On a CPU host extra devices must be requested before
JAX starts: `python -m iaf_jax.experiments.bench --devices 1,2` restarts itself with
XLA_FLAGS=--xla_force_host_platform_device_count=2 (both rows then run in that process, at the same global
batch). It also restarts with train.py's malloc: tcmalloc where installed (IAF_JAX_MALLOC=glibc turns that off),
else glibc's on transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1; IAF_JAX_HUGEPAGES=0 turns that
off); see docs/performance.md. The JSON's machine.malloc says which ran. Called as a library (main(argv)) it
does neither.

  analytic_train_flops_per_image   (rows of models with `analytic_flops`, the MNIST VAE) 3 x the forward
                                   multiply-adds x 2 of the architecture (analytic_forward_flops_per_image
                                   splits it)
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from iaf_jax.experiments import REPO

CONFIG_DIR = os.path.join(REPO, "configs")
# Both MNIST block forms: the report's one-conv block (the configs' default) and the two-conv block.
TWO_CONV = "@model.block=two_conv@model.context_dim=0"
DEFAULT_CONFIGS = ("mnist:diag", "mnist:iaf_d2_w320", "mnist:iaf_d8_w1920", "mnist:diag" + TWO_CONV,
                   "mnist:iaf_d2_w320" + TWO_CONV, "mnist:iaf_d8_w1920" + TWO_CONV, "cifar10:rungs4_iaf",
                   "cifar10:rungs20_iaf")
# Image shape of the dataset a config names (config.data.name), so that no data has to be loaded.
NATURAL_SHAPES = {"binarized_mnist": (28, 28, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1),
                  "cifar10": (32, 32, 3), "digits": (8, 8, 1)}
# --quick: tiny models (fields a config does not have are skipped), 2 steps, 1 repeat, K=8.
QUICK_OVERRIDES = {
    "model.channels": (4, 8), "model.strides": (2, 2), "model.hidden_dim": 16, "model.latent_dim": 4,
    "model.iaf_width": 16, "model.context_dim": 8, "model.h_size": 8, "model.z_size": 4, "eval.chunk_size": 8,
}
QUICK_SETTINGS = {"steps": 2, "repeats": 1, "num_samples": 8}
REQUIRED_KEYS = ("config", "batch", "devices", "train_images_per_s", "is_samples_per_s", "is_flops_per_sample",
                 "is_gflops_per_s", "flops_per_image",
                 "gflops_per_s", "matmul_ceiling_gflops", "compile_s", "peak_rss_mb")
RESNET_KEYS = ("ms_per_image_batched", "ms_per_image_single")


class BenchError(ValueError):
  """A bad flag value or an impossible request: one line for the user."""


def _progress(msg: str) -> None:
  sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
  sys.stderr.flush()


# ----------------------------------------------------------------------------- flags

def _int_list(text: str, flag: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise BenchError(f"{flag}={text!r}: expected comma-separated integers") from None
  if not values or any(v < 1 for v in values):
    raise BenchError(f"{flag}={text!r}: expected comma-separated integers >= 1")
  return values


def parse_override(text: str) -> tuple[str, Any]:
  """'model.h_size=64' -> ('model.h_size', 64); values are Python literals ((4,8), 1e-3, True) or strings, as
  ml_collections reads an untyped --config.* value. Parsed before any config is known: one --override applies
  to every config with the field, whose type set_field then applies."""
  key, sep, raw = text.partition("=")
  key = key.strip()
  if not sep or key.count(".") != 1 or not all(key.split(".")):
    raise BenchError(f"--override {text!r}: expected section.field=value, e.g. model.h_size=64")
  try:
    value = ast.literal_eval(raw.strip())
  except (ValueError, SyntaxError):
    value = raw.strip()
  if isinstance(value, list):
    value = tuple(value)
  return key, value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m iaf_jax.experiments.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                 help="comma-separated FILE:NAME[@SECTION.FIELD=VALUE...] (FILE: mnist, cifar10 or a path to a "
                 "config .py file; each @ an override of that config only, e.g. mnist:diag@model.block=two_conv)")
  p.add_argument("--batch", default="64", help="comma-separated global batch sizes")
  p.add_argument("--devices", default="1", help="comma-separated device counts (a mesh over the first N)")
  p.add_argument("--repeats", type=int, default=None, help="timings per measurement; the median is reported "
                 "(default 5, --quick 1)")
  p.add_argument("--steps", type=int, default=None, help="update steps per training timing (default 10, --quick 2)")
  p.add_argument("--num_samples", type=int, default=None, help="K of the importance-sampling evaluation "
                 "(default 128, --quick 8)")
  p.add_argument("--is_examples", type=int, default=0,
                 help="examples per importance-sampling evaluation (0 = the batch)")
  p.add_argument("--image_shape", default="", help="H,W,C of the synthetic images (default: the config's "
                 "dataset: MNIST 28,28,1, CIFAR-10 32,32,3)")
  p.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                 help="config override applied to every config that has the field (repeatable), "
                 "e.g. --override model.h_size=64 --override 'model.channels=(8,16)'")
  p.add_argument("--matmul_size", type=int, default=2048, help="n of the n x n float32 matmul ceiling")
  p.add_argument("--no_sampling", action="store_true", help="skip the ResNet VAE prior-sampling timings")
  p.add_argument("--json", default="", help="write the results here")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help=f"tiny models and short timings for tests: overrides {QUICK_OVERRIDES} (where the config "
                 f"has the field; --override wins), {QUICK_SETTINGS} unless given")
  args = p.parse_args(argv)
  defaults = QUICK_SETTINGS if args.quick else {"steps": 10, "repeats": 5, "num_samples": 128}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.batch_sizes = _int_list(args.batch, "--batch")
  args.device_counts = _int_list(args.devices, "--devices")
  for name in ("repeats", "steps", "num_samples", "matmul_size"):
    if getattr(args, name) < 1:
      raise BenchError(f"--{name}={getattr(args, name)}: must be >= 1")
  if args.is_examples < 0:
    raise BenchError(f"--is_examples={args.is_examples}: must be >= 0")
  args.config_specs = [s.strip() for s in args.configs.split(",") if s.strip()]
  if not args.config_specs:
    raise BenchError("--configs: no config given")
  args.image_shape_tuple = None
  if args.image_shape:
    shape = _int_list(args.image_shape, "--image_shape")
    if len(shape) != 3:
      raise BenchError(f"--image_shape={args.image_shape!r}: expected H,W,C")
    args.image_shape_tuple = tuple(shape)
  args.overrides = [parse_override(o) for o in args.override]
  return args


# ----------------------------------------------------------------------------- configs

def config_module(file_part: str):
  """The config file of a --configs entry's FILE: mnist, cifar10 (configs/) or a path to a .py config file."""
  from iaf_jax import config_lib

  path = file_part if file_part.endswith(".py") else os.path.join(CONFIG_DIR, f"{file_part}.py")
  try:
    return config_lib.load_config_module(os.path.abspath(path))
  except config_lib.ConfigError as e:
    raise BenchError(f"{e} (use mnist, cifar10 or a path to a .py config file)") from None


def set_field(config, key: str, value) -> bool:
  """Sets config.section.field as ml_collections applies a --config.section.field override, if the config has
  the field (False if not): a tuple field takes a scalar as a 1-tuple (its TupleParser), and ConfigDict's own
  assignment converts ints for float fields and lists for tuple fields, and refuses other types."""
  from ml_collections.config_flags import config_path, tuple_parser

  section, field = key.split(".")
  if section not in config or field not in config[section]:
    return False
  if config_path.get_type(key, config) is tuple:
    value = tuple_parser.TupleParser().parse(value)
  try:
    config_path.set_value(key, config, value)
  except (TypeError, ValueError) as e:
    raise BenchError(f"--override {key}={value!r}: {str(e).splitlines()[0]}") from None
  return True


def load_config(spec: str, overrides: Sequence[tuple[str, Any]], quick: bool):
  """'mnist:diag' -> (ConfigDict with the overrides applied, natural image shape)."""
  from iaf_jax import config_lib

  spec, *own_overrides = spec.split("@")
  file_part, sep, name = spec.partition(":")
  if not sep or not file_part or not name:
    raise BenchError(f"--configs: {spec!r} is not FILE:NAME (e.g. mnist:diag, cifar10:rungs4_iaf)")
  module = config_module(file_part)
  try:
    config = config_lib.load_config_file(f"{module.__file__}:{name}")
  except config_lib.ConfigError as e:
    raise BenchError(str(e)) from None
  if quick:
    for key, value in QUICK_OVERRIDES.items():
      set_field(config, key, value)
  for key, value in overrides:
    set_field(config, key, value)  # fields this config lacks are skipped (see _check_overrides_exist)
  for key, value in map(parse_override, own_overrides):
    if not set_field(config, key, value):
      raise BenchError(f"--configs {spec}@{key}: {spec} has no field {key}")
  try:
    config_lib.validate_config(config)
  except config_lib.ConfigError as e:
    raise BenchError(f"{spec}: {e}") from None
  return config, NATURAL_SHAPES.get(config.data.name)  # None: unknown here, --image_shape must say


def times_sampling(spec: str) -> bool:
  """Whether the bench times prior sampling for a --configs entry: the names its config file lists in
  SAMPLING_TIMED (configs/cifar10.py: the ResNet VAEs, whose sampling speed the paper reports)."""
  file_part, _, name = spec.split("@")[0].partition(":")
  return name in getattr(config_module(file_part), "SAMPLING_TIMED", ())


def _check_overrides_exist(specs, overrides):
  """An override no config has is a typo; one some configs lack (model.h_size on MNIST configs) is fine."""
  for key, _ in overrides:
    section, field = key.split(".")
    if not any(section in c and field in c[section] for c in specs):
      raise BenchError(f"--override {key}: none of the configs has this field")


# ----------------------------------------------------------------------------- measurements

def matmul_ceiling_gflops(n: int, repeats: int) -> float:
  """GFLOP/s of a float32 n x n x n matmul on the default device (median of `repeats`)."""
  import jax
  import jax.numpy as jnp

  from iaf_jax.eval_lib import median_seconds

  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  seconds = median_seconds(lambda: mm(a, b), repeats)
  return 2.0 * n ** 3 / seconds / 1e9


def _dot_conv_flops(jaxpr, loops: bool) -> float:
  """2 x multiply-adds of the dot_generals and convolutions of a jaxpr, sub-jaxprs included; a scan's body
  counted `length` times with loops, once without (a cond: its costliest branch)."""
  import numpy as np
  from jax.extend import core as jcore

  total = 0.0
  for e in jaxpr.eqns:
    name, out = e.primitive.name, e.outvars[0].aval.shape if e.outvars else ()
    if name == "dot_general":
      (contract, _), _ = e.params["dimension_numbers"]
      lhs = e.invars[0].aval.shape
      total += 2.0 * np.prod(out) * np.prod([lhs[i] for i in contract])
    elif name == "conv_general_dilated":
      rhs = e.invars[1].aval.shape  # per output feature: kernel window x input features / groups
      total += 2.0 * np.prod(out) * np.prod(rhs) / rhs[e.params["dimension_numbers"].rhs_spec[0]]
    elif name == "scan":
      total += (e.params["length"] if loops else 1) * _dot_conv_flops(e.params["jaxpr"].jaxpr, loops)
    elif name == "cond":
      total += max(_dot_conv_flops(b.jaxpr, loops) for b in e.params["branches"])
    elif name == "shard_map":  # its body has one device's shapes; every device runs it
      total += e.params["mesh"].size * _dot_conv_flops(e.params["jaxpr"], loops)
    else:
      for v in e.params.values():
        for sub in v if isinstance(v, (list, tuple)) else (v,):
          if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            total += _dot_conv_flops(getattr(sub, "jaxpr", sub), loops)
  return float(total)


def loop_flops_missed_by_xla(fn, *args) -> float:
  """The dot and convolution flops of fn(*args) in loop iterations after the first: XLA's cost analysis counts
  a while loop's body once (a scanned run of R ResNet rungs as one rung: at 4 rungs, h_size 32, the update step
  read 205 MFLOP per image scanned against 344 unrolled). 0 for a program without loops."""
  import jax

  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return _dot_conv_flops(jaxpr, loops=True) - _dot_conv_flops(jaxpr, loops=False)


def cost_flops(compiled) -> float:
  """'flops' of XLA's cost analysis of a compiled computation: a dict, or on some jax versions a list with one
  dict per program (an SPMD computation is one program, the one every device runs)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = next((a for a in analysis if a), {})
  return float((analysis or {}).get("flops", 0.0))


def process_cpu_seconds() -> float:
  """User + system CPU time of this process: unlike wall time, barely changed by other jobs on the host."""
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kib / 1024.0 if sys.platform.startswith("linux") else kib / 2 ** 20  # macOS reports bytes


def synthetic_images(key: int, n: int, shape, max_value: int) -> np.ndarray:
  return np.random.default_rng(key).integers(0, max_value + 1, size=(n, *shape), dtype=np.uint8)


def make_mesh(num_devices: int):
  """The training mesh (sharding.make_mesh) over the first `num_devices` devices; a clear error when there are
  fewer."""
  import jax
  from iaf_jax import sharding

  available = jax.devices()
  if len(available) < num_devices:
    raise BenchError(
        f"--devices {num_devices}: JAX sees {len(available)} {available[0].platform} device(s); on a CPU host set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} in the environment before starting python")
  return sharding.make_mesh(num_devices)


class ConfigBench:
  """One config's model, initialised once (data-dependent init on the first batch, as train_lib does), and
  its evaluation and sampling functions, compiled once per mesh and shape and shared by that config's rows."""

  def __init__(self, spec: str, config, image_shape, args):
    import jax

    from iaf_jax import optim, train_lib
    from iaf_jax import data as data_lib
    from iaf_jax.models import build_model

    self.spec, self.config, self.image_shape, self.args = spec, config, tuple(image_shape), args
    self.likelihood = config.model.likelihood
    self.max_value = data_lib.MAX_VALUE.get(config.data.name, 255)  # the table only: no data is loaded
    self.model = build_model(config.model, self.image_shape)
    self.optimizer = optim.make_optimizer(config.train)
    n = max(max(args.batch_sizes), args.is_examples)
    self.images = synthetic_images(args.seed, n, self.image_shape, self.max_value)
    _progress(f"{spec}: initialising {config.model.kind} for {'x'.join(map(str, self.image_shape))} images")
    # Every row starts from a copy of this state: the update step donates (consumes) its input state.
    self.state = train_lib.init_state(self.model, self.optimizer, self.images[:args.batch_sizes[0]], args.seed,
                                      likelihood=self.likelihood, max_value=self.max_value)
    self.num_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(self.state.params))
    self._sample_fns: dict = {}

  def is_fn(self, mesh, num_samples: Optional[int] = None):
    """The importance-sampling evaluation as eval_lib.evaluate compiles it for `mesh` (K = --num_samples)."""
    import jax

    from iaf_jax import eval_lib, sharding

    num_samples = num_samples or self.args.num_samples
    return jax.jit(sharding.shard_examples(eval_lib.make_importance_eval(
        self.model, likelihood=self.likelihood, max_value=self.max_value, num_samples=num_samples,
        chunk_size=min(self.config.eval.chunk_size, num_samples)), mesh))

  def is_flops_per_sample(self, mesh, params, images, key) -> float:
    """XLA's flops of one chunk of the importance-sampling evaluation / (examples x chunk), summed over the
    devices. One chunk on its own: XLA's cost analysis counts the body of the chunk loop (a while loop) once,
    whatever its trip count."""
    chunk = min(self.config.eval.chunk_size, self.args.num_samples)
    fn = self.is_fn(mesh, chunk)
    compiled = fn.lower(params, images, key).compile()
    missed = loop_flops_missed_by_xla(fn, params, images, key)  # e.g. scanned rungs inside the chunk
    return (cost_flops(compiled) * mesh.devices.size + missed) / (images.shape[0] * chunk)

  def sample_fn(self, out_sharding=None):
    """Prior sampling, jit-compiled per output sharding (batch sharded over a mesh's 'data' axis or not)."""
    import jax

    if out_sharding not in self._sample_fns:
      model = self.model
      self._sample_fns[out_sharding] = jax.jit(lambda p, k, n: model.apply({"params": p}, k, n, method="sample"),
                                               static_argnums=2, out_shardings=out_sharding)
    return self._sample_fns[out_sharding]

  def row(self, batch: int, num_devices: int, ceiling: float) -> dict:
    """All measurements of one (config, batch, devices)."""
    import jax

    from iaf_jax import sharding, train_lib
    from iaf_jax.eval_lib import median_seconds  # one home for the timing rule

    args, config = self.args, self.config
    if batch % num_devices:
      raise BenchError(f"--batch {batch} is not a multiple of --devices {num_devices} (the global batch is sharded)")
    is_examples = args.is_examples or batch
    if is_examples % num_devices:
      raise BenchError(f"--is_examples {is_examples} is not a multiple of --devices {num_devices}")
    label = f"{self.spec} batch {batch} devices {num_devices}"
    mesh = make_mesh(num_devices)
    replicated, by_data = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    # As train_lib.train_and_evaluate: state replicated over the mesh, the global batch sharded over 'data'.
    state = jax.device_put(jax.tree_util.tree_map(lambda x: x.copy(), self.state), replicated)
    params = jax.device_put(self.state.ema_params, replicated)   # what evaluation and sampling use
    train_batch = jax.device_put(self.images[:batch], by_data)
    step_fn = train_lib.make_update_step(self.model, self.optimizer, config, self.max_value, mesh)
    _progress(f"{label}: compiling the update step ({self.num_params:,} parameters)")
    t = time.perf_counter()
    compiled = step_fn.lower(state, train_batch).compile()
    compile_s = time.perf_counter() - t
    # The program each device runs holds its shard of the batch: total flops = per-device flops * devices, plus
    # what XLA's count leaves out of loops (counted on the whole, unpartitioned program).
    flops_per_image = (cost_flops(compiled) * num_devices
                       + loop_flops_missed_by_xla(step_fn, state, train_batch)) / batch

    holder = {"state": state}

    def run_steps():
      s = holder["state"]
      for _ in range(args.steps):
        s, metrics = compiled(s, train_batch)
      holder["state"] = s
      return s, metrics

    _progress(f"{label}: compiled in {compile_s:.1f}s; timing {args.repeats} x {args.steps} update steps")
    jax.block_until_ready(run_steps())  # warm-up outside the CPU-time window
    cpu0 = process_cpu_seconds()
    train_s = median_seconds(run_steps, args.repeats, warmup=0)
    train_cpu_ms = 1000 * (process_cpu_seconds() - cpu0) / (args.repeats * args.steps)
    train_ips = batch * args.steps / train_s
    holder.clear()  # frees the trained state before the evaluation measurements
    del state

    row = {"config": self.spec, "batch": batch, "devices": num_devices, "model_kind": config.model.kind,
           "image_shape": list(self.image_shape), "num_params": self.num_params, "steps": args.steps,
           "repeats": args.repeats, "train_images_per_s": train_ips, "train_step_ms": 1000 * train_s / args.steps,
           "train_cpu_ms_per_step": train_cpu_ms}
    _progress(f"{label}: {train_ips:.1f} images/s training; importance sampling {is_examples} examples x "
              f"K={args.num_samples}")
    is_fn = self.is_fn(mesh)
    is_images = jax.device_put(self.images[:is_examples], by_data)
    key = jax.random.PRNGKey(args.seed)
    is_s = median_seconds(lambda: is_fn(params, is_images, key), args.repeats)
    is_flops = self.is_flops_per_sample(mesh, params, is_images, key)
    row.update(is_examples=is_examples, is_num_samples=args.num_samples,
               is_samples_per_s=is_examples * args.num_samples / is_s, is_flops_per_sample=is_flops,
               is_gflops_per_s=is_flops * is_examples * args.num_samples / is_s / 1e9)

    if times_sampling(self.spec) and not args.no_sampling:
      _progress(f"{label}: {row['is_samples_per_s']:.1f} IS samples/s; timing prior sampling")
      # Batched: as eval_lib.sample (one call for the batch), the batch sharded over this row's devices;
      # single: batch 1 on one device.
      batched = self.sample_fn(by_data)
      key_r = jax.device_put(key, replicated)
      t_batched = median_seconds(lambda: batched(params, key_r, batch), args.repeats)
      single = self.sample_fn()
      single_params = jax.device_put(self.state.ema_params, jax.devices()[0])
      t_single = median_seconds(lambda: single(single_params, key, 1), args.repeats)
      row.update(ms_per_image_batched=1000 * t_batched / batch, ms_per_image_single=1000 * t_single)

    if hasattr(self.model, "analytic_flops"):  # the models that count their own arithmetic (models/__init__.py)
      analytic = self.model.analytic_flops()
      row.update(analytic_train_flops_per_image=analytic["train"],
                 analytic_forward_flops_per_image={k: analytic[k] for k in ("encoder", "flow", "decoder")})
    row.update(flops_per_image=flops_per_image, gflops_per_s=flops_per_image * train_ips / 1e9,
               matmul_ceiling_gflops=ceiling, compile_s=compile_s, peak_rss_mb=peak_rss_mb())
    _progress(f"{label}: done ({row['gflops_per_s']:.2f} GFLOP/s; matmul ceiling {ceiling:.1f})")
    return row


def machine_record(args) -> dict:
  import flax
  import jax
  import jaxlib
  from iaf_jax import hostenv

  devices = jax.devices()
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  return {
      "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
      "python": platform.python_version(), "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind, "num_devices": len(devices), "cpu_count": os.cpu_count(),
      "cpus_usable": affinity, "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "malloc": hostenv.malloc_in_use(),
      # A persistent compilation cache turns compile_s into the time to load a cached executable.
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir or "",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "matmul_size": args.matmul_size,
  }


# ----------------------------------------------------------------------------- output

_COLUMNS = (("config", "config", "{:<48}"), ("batch", "batch", "{:>5}"), ("devices", "dev", "{:>3}"),
            ("train_images_per_s", "train img/s", "{:>11.1f}"),
            ("train_cpu_ms_per_step", "cpu ms/step", "{:>11.1f}"), ("is_samples_per_s", "IS smp/s", "{:>10.0f}"),
            ("is_gflops_per_s", "IS GFLOP/s", "{:>10.2f}"),
            ("flops_per_image", "MFLOP/img", "{:>10.2f}"), ("gflops_per_s", "GFLOP/s", "{:>8.2f}"),
            ("matmul_ceiling_gflops", "ceiling", "{:>8.1f}"), ("compile_s", "compile s", "{:>9.2f}"),
            ("peak_rss_mb", "RSS MB", "{:>7.0f}"), ("ms_per_image_batched", "smp ms/img", "{:>10.3f}"),
            ("ms_per_image_single", "smp1 ms", "{:>8.3f}"))


def format_table(rows: Sequence[dict]) -> str:
  head = []
  for key, title, fmt in _COLUMNS:
    width = int("".join(ch for ch in fmt.split(":")[1] if ch.isdigit() or ch == ".").split(".")[0])
    head.append(title.ljust(width) if "<" in fmt else title.rjust(width))
  lines = ["  ".join(head)]
  for r in rows:
    cells = []
    for key, title, fmt in _COLUMNS:
      value = r.get(key)
      if key == "flops_per_image" and value is not None:
        value = value / 1e6
      if value is None:
        width = len(fmt.format(0.0 if "f" in fmt else 0))
        cells.append("-".rjust(width))
      else:
        cells.append(fmt.format(value))
    lines.append("  ".join(cells))
  return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
  configs = [(spec, *load_config(spec, args.overrides, args.quick)) for spec in args.config_specs]
  _check_overrides_exist([c for _, c, _ in configs], args.overrides)
  make_mesh(max(args.device_counts))  # fail before any work if devices are missing
  machine = machine_record(args)
  _progress(f"{machine['backend']} {machine['device_kind']} x{machine['num_devices']}, {machine['cpu_count']} CPUs, "
            f"load average {machine['load_average']}; matmul ceiling ({args.matmul_size}^3 float32)")
  ceiling = matmul_ceiling_gflops(args.matmul_size, args.repeats)
  machine["matmul_ceiling_gflops"] = ceiling
  _progress(f"matmul ceiling {ceiling:.1f} GFLOP/s")
  rows = []
  for spec, config, shape in configs:
    if not (args.image_shape_tuple or shape):
      raise BenchError(f"{spec}: no image shape known for data.name={config.data.name!r}; give --image_shape H,W,C")
    cb = ConfigBench(spec, config, args.image_shape_tuple or shape, args)
    for batch in args.batch_sizes:
      for n in args.device_counts:
        rows.append(cb.row(batch, n, ceiling))
    del cb
  result = {"machine": machine,
            "settings": {"steps": args.steps, "repeats": args.repeats, "num_samples": args.num_samples,
                         "is_examples": args.is_examples or "batch", "quick": args.quick,
                         "overrides": {k: v for k, v in args.overrides}, "image_shape": args.image_shape_tuple,
                         "seed": args.seed},
            "rows": rows}
  print(format_table(rows))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    os.replace(tmp, args.json)
    _progress(f"wrote {args.json}")
  return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Parse argv (default sys.argv[1:]), run, return the result; a BenchError exits with one line, status 2."""
  try:
    return run(parse_args(argv))
  except BenchError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def _command_line_environment(argv: Sequence[str]) -> Optional[dict]:
  """For `python -m iaf_jax.experiments.bench`: the environment to restart in, or None. On a CPU host with fewer devices
  than --devices asks for, XLA_FLAGS gets --xla_force_host_platform_device_count (it must be set before JAX
  starts); malloc is tcmalloc where installed, else glibc's on transparent huge pages (hostenv.host_env, as
  train.py)."""
  from iaf_jax import hostenv

  env = hostenv.host_env() or dict(os.environ)
  try:
    wanted = max(parse_args(argv).device_counts)
  except (BenchError, SystemExit):
    wanted = 1  # main() reports the bad flag
  flags = env.get("XLA_FLAGS", "")
  if wanted > 1 and "xla_force_host_platform_device_count" not in flags and env.get("JAX_PLATFORMS", "cpu") == "cpu":
    import jax
    if jax.default_backend() == "cpu" and len(jax.devices()) < wanted:
      env["XLA_FLAGS"] = hostenv.with_cpu_device_count(flags, wanted)
  return env if env != dict(os.environ) else None


if __name__ == "__main__":
  _env = _command_line_environment(sys.argv[1:])
  if _env is not None and getattr(sys, "orig_argv", None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, _env)
  main()
