"""The update step on devices and hosts: two processes on localhost (jax.distributed, gloo CPU collectives)
train the tiny model to the losses of one process with the same global batch; the step compiles once per run;
batches are prefetched; the fused Adamax update equals optax's."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, tiny_config
from iaf_jax import hostenv, optim, sharding, train_lib
from iaf_jax.models import build_model

# Few steps, a loss logged every step, one validation (the multi-host gather) and at the same step the best and
# the final checkpoint (orbax across both processes).
RUN = {"train.num_steps": 4, "train.log_every": 1, "train.eval_every": 4, "train.checkpoint_every": 100,
       "train.early_stopping_patience": 0, "train.lr_plateau_patience": 0}

WORKER = r'''
import json, os, signal, sys
from helpers import tiny_config
from iaf_jax import hostenv, train_lib
import jax
if os.environ.get("KILL_AT_STEP"):  # this process sends itself SIGTERM during that update step
  make = train_lib.make_update_step
  def make_killing(*args, **kwargs):
    step, calls = make(*args, **kwargs), [0]
    def killing(state, images):
      calls[0] += 1
      if calls[0] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGTERM)
      return step(state, images)
    return killing
  train_lib.make_update_step = make_killing
summary = train_lib.train_and_evaluate(tiny_config(**json.loads(sys.argv[2])), sys.argv[1])
print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(), "step": summary["step"], "reason": summary["reason"],
                              "losses": summary["train_losses"]}), flush=True)
'''


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(script: str, workdir: str, overrides: dict, env: dict) -> subprocess.Popen:
  # The losses are compared between programs compiled alike, so LLVM's optimisations can be skipped (the same
  # HLO, compiled several times faster).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]), JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_backend_optimization_level=0"]), IAF_JAX_HUGEPAGES="0", **env)
  return subprocess.Popen([sys.executable, script, workdir, json.dumps(overrides)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(procs: dict, timeout: float) -> dict:
  """Waits for every process (name -> Popen); their RESULT records by name. Kills them all on any failure."""
  deadline = time.monotonic() + timeout
  outs = {}
  try:
    for name, p in procs.items():
      try:
        outs[name] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish within {timeout:.0f}s (a hung collective or coordinator?)")
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  results = {}
  for name, p in procs.items():
    out, err = outs[name]
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"{name} failed (exit {p.returncode}):\n{err[-4000:]}"
    results[name] = json.loads(lines[-1][len("RESULT "):])
  return results


def test_two_processes_match_one(tmp_path):
  """One jax.distributed job of two processes on localhost (one CPU device each, the global batch of 16 split
  8 + 8, gradients all-reduced over gloo) and, at the same time, one process alone with the whole batch."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = _free_port()
  procs = {f"process {i} of 2": _start(str(script), str(tmp_path / "two"), {**RUN, "train.distributed": True},
                                       {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                        "JAX_PROCESS_ID": str(i)})
           for i in range(2)}
  procs["one process"] = _start(str(script), str(tmp_path / "one"), RUN, {})
  results = _results(procs, timeout=240)
  single = results.pop("one process")

  assert (single["processes"], single["devices"]) == (1, 1)
  assert [(r["process"], r["processes"], r["devices"]) for r in results.values()] == [(0, 2, 2), (1, 2, 2)]
  expected = np.array([loss for _, loss in single["losses"]])
  assert [s for s, _ in single["losses"]] == [1, 2, 3, 4]
  for name, r in results.items():
    assert r["step"] == 4 and [s for s, _ in r["losses"]] == [1, 2, 3, 4]
    # Same global batch, same keys: only the order of the gradient sums differs.
    np.testing.assert_allclose([loss for _, loss in r["losses"]], expected, rtol=1e-5, err_msg=f"{name} vs one")
  # Process 0 alone writes the metrics; both write the checkpoint (the best and the last: step 4).
  recs = [json.loads(l) for l in open(tmp_path / "two" / "metrics.jsonl")]
  assert [r["step"] for r in recs if "neg_elbo" in r] == [1, 2, 3, 4]
  assert sorted(int(s) for s in os.listdir(tmp_path / "two" / "checkpoints")) == [4]
  assert sorted(int(s) for s in os.listdir(tmp_path / "two" / "best")) == [4]


def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path):
  """SIGTERM to process 1 alone, during its third step: both processes end after the same step (the vote is
  read MAX_STEPS_IN_FLIGHT steps later), write that step's checkpoint together and exit cleanly; rerun, both
  resume from it. (Stopping alone, process 1 would wait in the checkpoint's barrier and process 0 in the next
  step's all-reduce: a hang.)"""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  run = {**RUN, "train.num_steps": 10, "train.eval_every": 0}
  kill_at, lag = 3, train_lib.MAX_STEPS_IN_FLIGHT

  def job(overrides, kill: bool) -> dict:
    port = _free_port()
    return _results({i: _start(str(script), str(tmp_path / "run"), {**overrides, "train.distributed": True},
                               {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                "JAX_PROCESS_ID": str(i), **({"KILL_AT_STEP": str(kill_at)} if kill and i else {})})
                     for i in range(2)}, timeout=150)

  first = job(run, kill=True)
  assert [first[i]["step"] for i in (0, 1)] == [kill_at + lag] * 2
  assert first[1]["reason"] == "signal SIGTERM" and first[0]["reason"] == "a signal to another process"
  assert sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints")) == [kill_at + lag]
  again = job(run, kill=False)
  for i in (0, 1):
    assert again[i]["step"] == 10 and again[i]["reason"] == "num_steps"
    assert [s for s, _ in again[i]["losses"]] == list(range(kill_at + lag + 1, 11))
  assert again[0]["losses"] == again[1]["losses"]


def test_update_step_compiles_once_and_batches_are_prefetched(tmp_path, monkeypatch):
  """Across a run with logging, validation, checkpoints and a learning-rate change, the update step is traced
  and compiled once; every batch is on the device before the step that uses it is dispatched."""
  traces, jitted = [], []
  make = train_lib.make_train_step

  def counting_make(*args, **kwargs):
    step = make(*args, **kwargs)

    def counted(state, images):
      traces.append(images.shape)
      return step(state, images)
    return counted

  real_jit = jax.jit

  def recording_jit(fn, *args, **kwargs):
    j = real_jit(fn, *args, **kwargs)
    if getattr(fn, "__name__", "") == "counted":
      jitted.append(j)
    return j

  prefetched = []
  real_prefetch = sharding.prefetch_batches

  def recording_prefetch(*args, **kwargs):
    for batch in real_prefetch(*args, **kwargs):
      prefetched.append(batch)
      yield batch

  monkeypatch.setattr(train_lib, "make_train_step", counting_make)
  monkeypatch.setattr(train_lib.jax, "jit", recording_jit)
  monkeypatch.setattr(sharding, "prefetch_batches", recording_prefetch)
  # Validation every 2 steps without improvement (patience 1) halves the learning rate in the state.
  cfg = tiny_config(**{"train.num_steps": 8, "train.log_every": 2, "train.eval_every": 2,
                       "train.checkpoint_every": 4, "train.lr_plateau_patience": 1, "train.lr_plateau_factor": 0.5,
                       "train.early_stopping_patience": 0, "train.learning_rate": 1e-9,
                       "train.min_learning_rate": 1e-12})
  train_lib.train_and_evaluate(cfg, str(tmp_path / "run"))
  monkeypatch.undo()
  recs = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert len({r["lr"] for r in recs if "lr" in r}) > 1, "the run was meant to change the learning rate"
  assert len(traces) == 1, f"the update step was traced {len(traces)} times"
  assert len(jitted) == 1 and jitted[0]._cache_size() == 1
  assert len(prefetched) == 8
  assert all(isinstance(b, jax.Array) and b.committed and b.shape == (16, 8, 8, 1) for b in prefetched)


def test_prefetch_batches_follow_the_step_order():
  mesh = sharding.make_mesh()
  images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1)
  it = sharding.prefetch_batches(mesh, images, 8, first_step=3, seed=5)
  from iaf_jax import data as data_lib
  for step in range(3, 9):
    np.testing.assert_array_equal(np.asarray(next(it)), images[data_lib.batch_indices(40, 8, step, 5)])


def _tiny_state():
  """The tiny model with a discretized logistic likelihood: a NaN pixel makes the loss NaN (a Bernoulli
  model would binarise it)."""
  cfg = tiny_config(**{"model.likelihood": "logistic"})
  model = build_model(cfg.model, (8, 8, 1))
  opt = optim.make_optimizer(cfg.train)
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.float32)
  return cfg, model, opt, images, train_lib.init_state(model, opt, images, 0, likelihood="logistic", max_value=255)


def _assert_trees_close(a, b, rtol, atol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(y, x, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
    else:
      np.testing.assert_array_equal(y, x, err_msg=jax.tree_util.keystr(path))


def test_fused_adamax_update_equals_optax():
  """Given the same gradients, the leaf-by-leaf Adamax update gives optax's params, moments, counts and EMA,
  also across a skipped (non-finite) step: integers exactly, floats to rounding (XLA contracts multiply-adds
  into FMAs differently in differently fused programs; a wrong formula, such as a missing bias correction, is
  off by percents)."""
  cfg, _, opt, _, state = _tiny_state()
  rng = np.random.default_rng(1)
  update = lambda adamax: jax.jit(lambda s, g, ok: s.replace(step=s.step + 1, **dict(zip(
      ("params", "ema_params", "opt_state"), optim.apply_update(s, g, ok, opt, 0.99, adamax)))))
  generic, fused = update(None), update(optim.fused_adamax(cfg.train))
  assert optim.fused_adamax(cfg.train) == (cfg.train.b1, cfg.train.b2, optim.ADAMAX_EPS)
  a = b = state
  for i in range(5):
    grads = jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), state.params)
    ok = jnp.asarray(i != 2)  # step 2 is skipped: nothing may change
    a, b = generic(a, grads, ok), fused(b, grads, ok)
  _assert_trees_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("nonfinite_at", [None, 2])
def test_fused_adamax_train_step_matches_optax(nonfinite_at):
  """The whole update step with either update: the same state after a few steps, a non-finite one included
  (the gradients themselves differ by rounding between the two compiled programs)."""
  cfg, model, opt, images, state = _tiny_state()
  kw = dict(likelihood="logistic", max_value=255, free_bits=0.0, ema_decay=0.99)
  generic = jax.jit(train_lib.make_train_step(model, opt, **kw))
  fused = jax.jit(train_lib.make_train_step(model, opt, fused_adamax=optim.fused_adamax(cfg.train), **kw))
  a = b = state
  for i in range(4):
    x = images.copy()
    if i == nonfinite_at:
      x[0, 0, 0, 0] = np.nan
    a, ma = generic(a, jnp.asarray(x))
    b, mb = fused(b, jnp.asarray(x))
    assert float(ma["finite"]) == float(mb["finite"]) == (0.0 if i == nonfinite_at else 1.0)
  _assert_trees_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_adamax_only_for_plain_adamax():
  assert optim.fused_adamax(tiny_config(**{"train.optimizer": "adam"}).train) is None
  assert optim.fused_adamax(tiny_config(**{"train.grad_clip_norm": 1.0}).train) is None


def test_hugepages_env(monkeypatch):
  env = hostenv.hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  if env is not None:  # Linux with glibc and THP available
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hostenv.HUGEPAGES_TUNABLE
    assert hostenv.hugepages_env(env) is None   # already set: no second restart
  assert hostenv.hugepages_env({"IAF_JAX_HUGEPAGES": "0"}) is None


def test_allocator_env_preloads_tcmalloc_where_found_and_keeps_the_users_preload():
  found = lambda: "/x/libtcmalloc_minimal.so.4"
  env = hostenv.allocator_env({"LD_PRELOAD": "/y/libfoo.so"}, find=found)
  if not sys.platform.startswith("linux"):
    assert env is None
    return
  assert env["LD_PRELOAD"] == "/x/libtcmalloc_minimal.so.4:/y/libfoo.so"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
  assert hostenv.allocator_env(env, find=found) is None                     # preloaded: no second restart
  assert hostenv.allocator_env({"IAF_JAX_MALLOC": "glibc"}, find=found) is None
  assert hostenv.allocator_env({}, find=lambda: None) is None                # not installed: glibc, no error
  with pytest.raises(SystemExit, match="IAF_JAX_MALLOC=tcmalloc, but no libtcmalloc_minimal.so.4"):
    hostenv.allocator_env({"IAF_JAX_MALLOC": "tcmalloc"}, find=lambda: None)
  with pytest.raises(SystemExit, match="must be auto, tcmalloc or glibc"):
    hostenv.allocator_env({"IAF_JAX_MALLOC": "jemalloc"}, find=found)


def test_a_restarted_entry_point_runs_on_the_allocator_host_env_names(tmp_path):
  """The process that reexec_with_host_env starts has tcmalloc mapped exactly when it is installed (and only
  then), and runs the same command line."""
  script = tmp_path / "entry.py"
  script.write_text("from iaf_jax import hostenv\nhostenv.reexec_with_host_env()\n"
                    "import os\nprint(hostenv.malloc_in_use(), os.environ.get('IAF_JAX_PROBE'))\n")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "IAF_JAX_MALLOC")}
  env.update(PYTHONPATH=REPO, IAF_JAX_PROBE="kept")
  for mode in ("auto", "glibc"):
    out = subprocess.run([sys.executable, str(script)], env=dict(env, IAF_JAX_MALLOC=mode), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    want = "tcmalloc" if mode == "auto" and hostenv.find_tcmalloc() and sys.platform.startswith("linux") else None
    if sys.platform.startswith("linux"):
      assert out.stdout.split() == [want or "glibc", "kept"], (mode, out.stdout)


def test_cpu_devices_env(monkeypatch):
  flag = hostenv.CPU_DEVICES_FLAG
  env = hostenv.cpu_devices_env({"XLA_FLAGS": "--xla_cpu_enable_fast_min_max=false", "IAF_JAX_CPU_DEVICES": "3"})
  assert env["XLA_FLAGS"] == f"{flag}=3 --xla_cpu_enable_fast_min_max=false"   # the user's flags kept
  assert hostenv.cpu_devices_env(env) is None                                   # set: no second restart
  assert hostenv.cpu_devices_env({"XLA_FLAGS": f"{flag}=4", "IAF_JAX_CPU_DEVICES": "2"}) is None  # XLA_FLAGS wins
  assert hostenv.cpu_devices_env({"IAF_JAX_CPU_DEVICES": "1"}) is None
  monkeypatch.setattr(hostenv, "usable_cores", lambda: 2)
  assert hostenv.cpu_devices_env({})["XLA_FLAGS"] == f"{flag}=2"               # 'auto': one per core
  monkeypatch.setattr(hostenv, "usable_cores", lambda: 1)
  assert hostenv.cpu_devices_env({"IAF_JAX_CPU_DEVICES": "auto"}) is None      # one core: nothing to split
  for bad in ("0", "two", "-1"):
    with pytest.raises(SystemExit, match="IAF_JAX_CPU_DEVICES"):
      hostenv.cpu_devices_env({"IAF_JAX_CPU_DEVICES": bad})


def test_the_device_count_applies_after_a_word_xla_does_not_read():
  """XLA stops reading XLA_FLAGS at a word that is not a flag; a user's 'intra_op_parallelism_threads=1' (a
  TensorFlow option often put there) must not cost evaluate.py its devices: JAX started in cpu_devices_env's
  environment sees the asked-for 2 devices."""
  user = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  env = hostenv.cpu_devices_env(dict(os.environ, XLA_FLAGS=user, IAF_JAX_CPU_DEVICES="2", JAX_PLATFORMS="cpu"))
  run = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"], env=env, text=True,
                       capture_output=True, timeout=120)
  assert run.stdout.strip() == "2", run.stderr[-500:]


def test_an_early_stopped_run_stays_stopped_when_rerun(tmp_path):
  """Rerunning the command of a run that stopped early (patience 1, a learning rate too small to improve)
  trains no further step; a larger patience continues it."""
  overrides = {"train.num_steps": 12, "train.log_every": 2, "train.eval_every": 2, "train.checkpoint_every": 2,
               "train.early_stopping_patience": 1, "train.lr_plateau_patience": 0, "train.learning_rate": 1e-12}
  workdir = str(tmp_path / "run")
  first = train_lib.train_and_evaluate(tiny_config(**overrides), workdir)
  assert first["reason"].startswith("early stopping") and first["step"] < 12
  again = train_lib.train_and_evaluate(tiny_config(**overrides), workdir)
  assert again["step"] == first["step"] and again["reason"].startswith("early stopping")
  assert again["train_losses"] == []
  more = train_lib.train_and_evaluate(tiny_config(**dict(overrides, **{"train.early_stopping_patience": 50})), workdir)
  assert more["step"] == 12


SHARD_EXAMPLES = r'''
import jax, numpy as np
from iaf_jax import sharding
mesh = sharding.make_mesh(2)
f = lambda params, x, key: (x * params + jax.random.normal(key, x.shape), x.sum() + 0 * x)
x, key = np.arange(8.0, dtype=np.float32), jax.random.PRNGKey(3)
g = jax.jit(sharding.shard_examples(f, mesh))
out, sums = map(np.asarray, g(np.float32(2.0), jax.device_put(x, sharding.batch_sharded(mesh)), key))
for d in range(2):   # device d: exactly its 4 examples (their sum is over its shard only), with its own key
  want, want_sum = f(np.float32(2.0), x[4 * d:4 * d + 4], jax.random.fold_in(key, d))
  np.testing.assert_allclose(out[4 * d:4 * d + 4], want, rtol=1e-6)
  np.testing.assert_allclose(sums[4 * d:4 * d + 4], want_sum)
noise = out - 2 * x
assert not np.allclose(noise[:4], noise[4:])   # the devices' draws differ
print("OK")
'''


def test_shard_examples_runs_each_device_on_its_own_examples_with_its_own_draws():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", SHARD_EXAMPLES], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
  # And on one device it is the function itself.
  f = lambda params, x, key: x
  assert sharding.shard_examples(f, sharding.make_mesh(1)) is f


K_SAMPLE_STEP = r'''
import jax, numpy as np
from helpers import tiny_config
from iaf_jax import optim, sharding, train_lib
from iaf_jax.experiments.bench import cost_flops
from iaf_jax.models import build_model
import sys
c = tiny_config(**dict(eval(sys.argv[1]), **{"train.free_bits": 0.0}))
model, opt = build_model(c.model, (8, 8, 1)), optim.make_optimizer(c.train)
images = np.random.default_rng(0).integers(0, 2, size=(16, 8, 8, 1), dtype=np.uint8)
state0 = train_lib.init_state(model, opt, images, 0, likelihood=c.model.likelihood, max_value=1)
flops, losses = [], []
for n in (1, 2):
  mesh = sharding.make_mesh(n)
  state = jax.device_put(jax.tree_util.tree_map(lambda x: x.copy(), state0), sharding.replicated(mesh))
  batch = jax.device_put(images, sharding.batch_sharded(mesh))
  step = train_lib.make_update_step(model, opt, c, 1, mesh)
  flops.append(cost_flops(step.lower(state, batch).compile()))
  losses.append(float(step(state, batch)[1]["loss"]))
print("FLOPS", flops, "LOSSES", losses)
assert flops[1] < 0.6 * flops[0], flops           # each device: its own 8 examples' 64 rows, not all 128
np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)   # the same bound on the same draws
print("OK")
'''


@pytest.mark.parametrize("overrides", [{"train.num_importance_samples": 8, "train.micro_batches": 1},
                                       {"train.micro_batches": 2}, {"train.num_importance_samples": 4, "train.micro_batches": 2}])
def test_k_sample_training_step_is_split_by_example_over_devices(overrides):
  """train.num_importance_samples = k > 1 (and train.micro_batches) on 2 devices: each device computes only its
  half of the (k-times) batch (before the fix both computed all of it: 8.24 vs 8.25 MFLOP), and the loss equals
  1 device's."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
  proc = subprocess.run([sys.executable, "-c", K_SAMPLE_STEP, repr(overrides)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
