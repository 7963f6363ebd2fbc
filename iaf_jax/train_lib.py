"""The training loop: TrainState, the pure update step, the device mesh, orbax checkpoints, EMA, plateau
annealing and early stopping. Knows nothing of a model's insides: it calls `model.apply` and
`objectives.vae_loss` (see iaf_jax/models/__init__.py for the protocol)."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from iaf_jax import checkpoints, config_lib, data as data_lib, objectives
from iaf_jax.models import build_model

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  """A run that cannot go on (too many non-finite steps, ...): one line for the user."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array                  # number of update steps taken (applied or skipped)
  params: Any
  ema_params: Any                  # Polyak / EMA average of params, used for evaluation
  opt_state: Any
  rng: jax.Array                   # raw uint32[2] key; step keys are fold_in(rng, step)
  num_nonfinite: jax.Array         # steps skipped because loss or gradients were not finite
  consecutive_nonfinite: jax.Array


# ----------------------------------------------------------------------------- optimizer and step

ADAMAX_EPS = 1e-8  # optax.adamax's default, written out because the fused update repeats its arithmetic


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adamax (or Adam) with an injectable learning rate, so plateau annealing can change it in the state."""
  def build(learning_rate):
    if train_cfg.optimizer == "adamax":
      opt = optax.adamax(learning_rate, b1=train_cfg.b1, b2=train_cfg.b2, eps=ADAMAX_EPS)
    else:
      opt = optax.adam(learning_rate, b1=train_cfg.b1, b2=train_cfg.b2)
    chain = [opt]
    if train_cfg.grad_clip_norm > 0:
      chain.insert(0, optax.clip_by_global_norm(train_cfg.grad_clip_norm))
    return optax.chain(*chain)
  return optax.inject_hyperparams(build)(learning_rate=train_cfg.learning_rate)


def fused_adamax(train_cfg: ml_collections.ConfigDict) -> Optional[tuple[float, float, float]]:
  """(b1, b2, eps) when make_optimizer(train_cfg) is plain Adamax (no clipping), else None: what
  make_train_step's `fused_adamax` takes."""
  if train_cfg.optimizer == "adamax" and not train_cfg.grad_clip_norm > 0:
    return (float(train_cfg.b1), float(train_cfg.b2), ADAMAX_EPS)
  return None


def _is_adam_state(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def _apply_update(state, grads, ok: jax.Array, optimizer, ema_decay: float,
                  adamax: Optional[tuple[float, float, float]]):
  """(params, ema_params, opt_state) after one step, each unchanged where `ok` is False.

  Generic path: optax's update, then `where(ok, new, old)` per leaf. XLA fuses the update into each of its
  consumers (new params, new moments, new EMA) separately, so some fusions read an old buffer after another
  has overwritten it in place (the state is donated), and it copies every parameter and moment leaf each
  step. With `adamax` = (b1, b2, eps) the arithmetic of optax.adamax is written out leaf by leaf instead:
  moments first, params from the new moments, EMA from the new params, each leaf written once, in place.
  """
  # Warmed-up decay (as TF's ExponentialMovingAverage with num_updates): early on the average follows the
  # params instead of staying near the initialisation for ~1/(1-decay) steps.
  decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
  keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
  # optax's new state (counts, hyperparameters); on the fused path its moments and updates are unused, and XLA
  # removes them as dead code.
  updates, new_opt = optimizer.update(grads, state.opt_state, state.params)
  if adamax is None:
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    return keep(params, state.params), keep(ema, state.ema_params), keep(new_opt, state.opt_state)

  b1, b2, eps = adamax
  old_adam = [x for x in jax.tree_util.tree_leaves(state.opt_state, is_leaf=_is_adam_state) if _is_adam_state(x)]
  if len(old_adam) != 1 or "learning_rate" not in getattr(state.opt_state, "hyperparams", {}):
    raise ValueError("fused Adamax update: the optimizer state is not make_optimizer's Adamax")
  old_adam = old_adam[0]
  lr = state.opt_state.hyperparams["learning_rate"]
  count_inc = optax.safe_increment(old_adam.count)
  bias_correction = 1 - b1 ** count_inc

  def leaf(p, g, mu, nu, e):  # optax: update_moment, update_infinity_moment, bias_correction, scale(-lr)
    mu = jnp.where(ok, (1 - b1) * g + b1 * mu, mu)
    nu = jnp.where(ok, jnp.maximum(jnp.abs(g) + eps, b2 * nu), nu)
    step = (-1 * lr).astype(p.dtype) * (mu / bias_correction.astype(mu.dtype) / nu)
    p = jnp.where(ok, jnp.asarray(p + step).astype(p.dtype), p)
    e = jnp.where(ok, decay * e + (1.0 - decay) * p, e)
    return p, mu, nu, e

  treedef = jax.tree_util.tree_structure(state.params)
  out = [leaf(*xs) for xs in zip(*(treedef.flatten_up_to(t) for t in
                                   (state.params, grads, old_adam.mu, old_adam.nu, state.ema_params)))]
  params, mu, nu, ema = (treedef.unflatten([o[i] for o in out]) for i in range(4))
  new_adam = optax.ScaleByAdamState(count=jnp.where(ok, count_inc, old_adam.count), mu=mu, nu=nu)
  opt_state = jax.tree_util.tree_map(
      lambda n, o: new_adam if _is_adam_state(o) else jnp.where(ok, n, o), new_opt, state.opt_state,
      is_leaf=_is_adam_state)
  return params, ema, opt_state


def make_train_step(model, optimizer: optax.GradientTransformation, *, likelihood: str, max_value: int,
                    free_bits: float, ema_decay: float,
                    fused_adamax: Optional[tuple[float, float, float]] = None,
                    num_importance_samples: int = 1) -> Callable:
  """(state, uint8 images) -> (state, metrics): one pure update. A step whose loss or gradients are not
  finite changes nothing but the step and skip counters. `fused_adamax` (`fused_adamax(train_cfg)`, for a
  plain Adamax optimizer) computes the same update without XLA's per-step copies of the state.
  `num_importance_samples` k > 1 trains on the k-sample importance-weighted bound (objectives.
  importance_weighted_loss): the model's terms on k copies of the batch, k independent posterior samples each."""
  k = int(num_importance_samples)

  def train_step(state: TrainState, images: jax.Array):
    key = jax.random.fold_in(state.rng, state.step)
    k_bin, k_z = jax.random.split(key)
    x = data_lib.model_inputs(k_bin, images, likelihood, max_value)

    def loss_fn(params):
      if k == 1:
        return objectives.vae_loss(model.apply({"params": params}, x, k_z), free_bits)
      xk = jnp.broadcast_to(x, (k,) + x.shape).reshape(-1, *x.shape[1:])
      return objectives.importance_weighted_loss(model.apply({"params": params}, xk, k_z), k)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # A NaN or Inf in any gradient makes the norm NaN or Inf: one pass over the gradients, which the logged
    # norm needs anyway, instead of a second (is-finite) pass (docs/performance.md). A norm that overflows
    # float32 (> 1.8e19) also counts as non-finite.
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, ema, opt_state = _apply_update(state, grads, ok, optimizer, ema_decay, fused_adamax)
    new_state = state.replace(
        step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
        num_nonfinite=state.num_nonfinite + (~ok).astype(jnp.int32),
        consecutive_nonfinite=jnp.where(ok, 0, state.consecutive_nonfinite + 1))
    metrics = dict(metrics, grad_norm=grad_norm, finite=ok.astype(jnp.float32))
    return new_state, metrics

  return train_step


LR_SCHEDULES = ("constant", "cosine")


def scheduled_learning_rate(schedule: str, base_lr: float, progress: float, min_lr: float) -> float:
  """The learning rate at `progress` in [0, 1], the fraction of the run done (of its steps or of its time
  budget, whichever ends it first). 'cosine' decays from base_lr to min_lr (Loshchilov & Hutter 2017)."""
  if schedule == "constant":
    return base_lr
  if schedule != "cosine":
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
  p = min(max(float(progress), 0.0), 1.0)
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * p))


def make_eval_elbo(model, *, likelihood: str, max_value: int) -> Callable:
  """(params, uint8 images, key) -> per-example single-sample negative ELBO (nats)."""
  def eval_step(params, images, key):
    k_bin, k_z = jax.random.split(key)
    x = data_lib.model_inputs(k_bin, images, likelihood, max_value)
    t = model.apply({"params": params}, x, k_z)
    return -objectives.elbo(t["log_px_given_z"], t["log_pz"], t["log_qz"])
  return eval_step


def init_state(model, optimizer, images: np.ndarray, seed: int, *, likelihood: str, max_value: int) -> TrainState:
  """Parameters with data-dependent init on a real batch (weight norm), the optimizer state and the EMA."""
  rng = jax.random.PRNGKey(seed)
  k_init, k_bin, k_z, k_run = jax.random.split(rng, 4)
  x = data_lib.model_inputs(k_bin, jnp.asarray(images), likelihood, max_value)
  params = jax.jit(model.init)(k_init, x, k_z)["params"]
  zero = jnp.zeros((), jnp.int32)
  state = TrainState(step=zero, params=params, ema_params=params, opt_state=optimizer.init(params), rng=k_run,
                     num_nonfinite=zero, consecutive_nonfinite=zero)
  # Every leaf gets its own buffer: the step donates its input, and a buffer may be donated only once.
  return jax.tree_util.tree_map(jnp.array, state)


# ----------------------------------------------------------------------------- devices

def make_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D 'data' mesh over every device of every host (or the first `num_devices`): batch sharded,
  parameters replicated."""
  return Mesh(np.asarray(jax.devices()[:num_devices]), ("data",))


def global_batch(mesh: Mesh, local_images: np.ndarray) -> jax.Array:
  """This process's rows of the global batch -> one global array sharded over 'data'."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local_images)


def process_rows(indices: np.ndarray) -> np.ndarray:
  """The slice of a global batch's example indices that this process loads."""
  per = len(indices) // jax.process_count()
  return indices[jax.process_index() * per:(jax.process_index() + 1) * per]


def initialize_distributed() -> None:
  """jax.distributed.initialize() for a multi-host run. Clusters JAX detects (TPU pods, SLURM, Open MPI,
  Kubernetes...) need nothing; elsewhere JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID say it (JAX itself reads only the first). CPU hosts exchange gradients through gloo."""
  if jax.distributed.is_initialized():
    return
  env = {k: os.environ.get(k) for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  try:
    num = int(env["JAX_NUM_PROCESSES"]) if env["JAX_NUM_PROCESSES"] else None
    pid = int(env["JAX_PROCESS_ID"]) if env["JAX_PROCESS_ID"] else None
  except ValueError:
    raise config_lib.ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers, got {env}") from None
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(num_processes=num, process_id=pid)


def replicate(tree, mesh: Mesh):
  """A pytree (the same values on every process) -> global arrays replicated over the mesh. On one host a
  device_put; across hosts each process supplies its copy, since arrays may not be moved between processes."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already a global array (restored from a checkpoint with this sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(jax.device_get(x)))
  return jax.tree_util.tree_map(put, tree)


def prefetch_batches(mesh: Mesh, images: np.ndarray, batch_size: int, first_step: int, seed: int,
                     size: int = 2):
  """Yields the global batch of each step from `first_step` on, sharded over the mesh's 'data' axis, each
  process loading only its rows. `size` batches are in flight ahead of the one yielded: their host-to-device
  copies are issued (asynchronously) while earlier steps compute, so a step never waits for its input."""
  queue: list = []
  step = first_step
  while True:
    while len(queue) <= size:
      idx = process_rows(data_lib.batch_indices(len(images), batch_size, step + len(queue), seed))
      queue.append(global_batch(mesh, images[idx]))
    yield queue.pop(0)
    step += 1


def _maybe_gather(x: jax.Array) -> np.ndarray:
  """A (possibly multi-host) global array -> its full value as numpy on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------- the loop

MAX_STEPS_IN_FLIGHT = 2


class _StopFlag:
  """Set by SIGTERM / SIGINT: the loop saves a checkpoint and exits cleanly at the next step."""
  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    self.signal = signum


def _progress(step, total, t0, step0, batch, extra=""):
  rate = (step - step0) / max(time.time() - t0, 1e-9)
  width = 24
  done = int(width * step / max(total, 1))
  line = (f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total}  {rate:.2f} step/s  "
          f"{rate * batch:.0f} img/s  {extra}")
  sys.stderr.write(line[:200].ljust(120))
  sys.stderr.flush()


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def validation_neg_elbo(eval_fn, params, images: np.ndarray, mesh: Mesh, batch_size: int, seed: int) -> float:
  """Mean single-sample negative ELBO over the given images (fixed keys, so comparable across evaluations)."""
  n_dev = mesh.devices.size
  bs = max(n_dev, (batch_size // n_dev) * n_dev)
  total, count = 0.0, 0
  for start in range(0, len(images), bs):
    chunk = images[start:start + bs]
    pad = bs - len(chunk)
    padded = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
    rows = process_rows(np.arange(bs))  # each process supplies its rows of the (same) padded chunk
    vals = eval_fn(params, global_batch(mesh, padded[rows]), jax.random.fold_in(jax.random.PRNGKey(seed), start))
    vals = _maybe_gather(vals)[:len(chunk)]
    total, count = total + float(vals.sum()), count + len(chunk)
  return total / max(count, 1)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train the model `config` describes into `workdir`, resuming from its latest checkpoint if any.

  Returns the final summary (also the last line of workdir/metrics.jsonl).
  """
  config_lib.validate_config(config)
  tc = config.train
  if tc.distributed:
    initialize_distributed()
  checkpoints.check_workdir_writable(workdir)
  config_lib.check_config_compatible(config, workdir)  # before any work; saved only once every check passed

  ds = data_lib.load_dataset(config.data.name, config.data.dir or None, validation_size=config.data.validation_size,
                             seed=config.seed, likelihood=config.model.likelihood,
                             max_train=config.data.max_train or None)
  if len(ds.train) < tc.batch_size:
    raise data_lib.DataError(f"{ds.name}: {len(ds.train)} training examples < batch size {tc.batch_size}")
  if jax.process_index() == 0:
    config_lib.write_data_info(workdir, ds)
  mesh = make_mesh()
  n_dev = mesh.devices.size
  if tc.batch_size % n_dev:
    raise config_lib.ConfigError(f"config.train.batch_size={tc.batch_size} must be a multiple of the "
                                 f"{n_dev} devices")
  model = build_model(config.model, ds.image_shape)
  if jax.process_index() == 0:  # one writer: hosts sharing the workdir would race on config.json.tmp
    config_lib.save_config(config, workdir)
  optimizer = make_optimizer(tc)
  lik, maxv = config.model.likelihood, ds.max_value

  manager = checkpoints.CheckpointManager(workdir, keep=tc.keep_checkpoints)
  first_batch = ds.train[data_lib.batch_indices(len(ds.train), tc.batch_size, 0, config.seed)]
  fresh = lambda: init_state(model, optimizer, first_batch, config.seed, likelihood=lik, max_value=maxv)
  replicated = NamedSharding(mesh, P())
  state, meta = manager.restore_latest(fresh, replicated)
  if meta is None:
    state = fresh()
    meta = {"best_valid": None, "bad_evals": 0, "wall_time": 0.0, "lr_base": float(tc.learning_rate)}
    log.info("starting a new run in %s (%d parameters)", workdir,
             sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  else:
    log.info("resumed %s at step %d", workdir, int(state.step))

  # The rate plateau annealing scales; the schedule's rate is derived from it. (Runs saved before schedules
  # existed: the rate in their optimizer state.)
  meta.setdefault("lr_base", float(state.opt_state.hyperparams["learning_rate"]))
  state = replicate(state, mesh)
  budget_s = 60.0 * tc.time_budget_minutes

  def progress(step_now):
    done = step_now / max(tc.num_steps, 1)
    return max(done, (wall0 + time.time() - t0) / budget_s) if budget_s else done

  def scheduled(st, step_now):
    """`st` with the rate the schedule gives at step_now, from meta['lr_base']."""
    lr = scheduled_learning_rate(tc.lr_schedule, meta["lr_base"], progress(step_now), tc.min_learning_rate)
    hp = dict(st.opt_state.hyperparams, learning_rate=replicate(np.float32(lr), mesh))
    return st.replace(opt_state=st.opt_state._replace(hyperparams=hp))

  train_step = jax.jit(make_train_step(model, optimizer, likelihood=lik, max_value=maxv, free_bits=tc.free_bits,
                                       ema_decay=tc.ema_decay, fused_adamax=fused_adamax(tc),
                                       num_importance_samples=tc.num_importance_samples), donate_argnums=0)
  eval_fn = jax.jit(make_eval_elbo(model, likelihood=lik, max_value=maxv))
  valid = ds.valid[:config.eval.valid_examples]
  metrics_path = os.path.join(workdir, "metrics.jsonl")

  stop = _StopFlag()
  old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  step = int(state.step)
  t0, step0, wall0 = time.time(), step, meta["wall_time"]
  pending: list = []
  stop_reason = "num_steps"

  def save(st, best=False):
    meta["wall_time"] = wall0 + time.time() - t0
    if best and jax.process_count() > 1:
      # Orbax names its multi-host barriers after the step, so the latest and best managers saving one step at
      # once collide ("Barrier _async_write_complete.N is already ongoing"): one after the other.
      manager.save(int(st.step), st, meta)
      manager.wait()
    manager.save(int(st.step), st, meta, best=best)

  batches = prefetch_batches(mesh, ds.train, tc.batch_size, step, config.seed)
  train_losses: list = []   # (step, mean loss over the logging interval), returned for multi-host checks
  # A run that stopped early stays stopped when its command is rerun (raise the patience to continue it).
  stopped_early = bool(tc.early_stopping_patience and meta["bad_evals"] >= tc.early_stopping_patience)
  if stopped_early:
    stop_reason = (f"early stopping after {meta['bad_evals']} evaluations without improvement (stopped before; "
                   f"raise train.early_stopping_patience to continue)")
  try:
    if tc.lr_schedule != "constant":
      state = scheduled(state, step)
    while step < tc.num_steps and not stopped_early:
      if stop.signal is not None:
        stop_reason = f"signal {signal.Signals(stop.signal).name}"
        break
      if budget_s and wall0 + time.time() - t0 >= budget_s:
        stop_reason = f"time budget of {tc.time_budget_minutes:g} minutes spent"
        break
      state, metrics = train_step(state, next(batches))
      pending.append(metrics)
      step += 1
      if len(pending) > MAX_STEPS_IN_FLIGHT:
        # Bound how far the host runs ahead of the devices: a SIGTERM is seen (and a checkpoint written)
        # within a few steps, not after a whole logging interval of queued work.
        pending[-1 - MAX_STEPS_IN_FLIGHT]["loss"].block_until_ready()

      if step % tc.log_every == 0 or step == tc.num_steps:
        # The only host sync of the loop: metrics of the last log_every steps, averaged.
        host = jax.device_get(pending)
        pending = []
        record = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        train_losses.append((step, record["loss"]))
        record.update(step=step, lr=float(state.opt_state.hyperparams["learning_rate"]),
                      skipped_steps=int(state.num_nonfinite), wall_time=wall0 + time.time() - t0)
        if jax.process_index() == 0:
          _append_jsonl(metrics_path, record)
          _progress(step, tc.num_steps, t0, step0, tc.batch_size,
                    f"-elbo {record['neg_elbo']:.2f}  kl {record['kl']:.2f}  skipped {record['skipped_steps']}")
        if tc.lr_schedule != "constant":  # the rate moves at the logging interval, where the host syncs anyway
          state = scheduled(state, step)
        if int(state.consecutive_nonfinite) >= tc.max_consecutive_nonfinite:
          raise TrainingError(
              f"{int(state.consecutive_nonfinite)} consecutive steps had non-finite loss or gradients "
              f"(step {step}); stopped. The last good checkpoint in {workdir} is intact.")

      evaluated_best = False
      if tc.eval_every and len(valid) and step % tc.eval_every == 0:
        v = validation_neg_elbo(eval_fn, state.ema_params, valid, mesh, config.eval.batch_size, config.seed)
        improved = meta["best_valid"] is None or v < meta["best_valid"]
        if improved:
          meta["best_valid"], meta["bad_evals"] = v, 0
        else:
          meta["bad_evals"] += 1
        if (not improved and tc.lr_plateau_patience and meta["bad_evals"] % tc.lr_plateau_patience == 0
            and meta["lr_base"] > tc.min_learning_rate):
          meta["lr_base"] = max(meta["lr_base"] * tc.lr_plateau_factor, tc.min_learning_rate)
          state = scheduled(state, step)
        lr = float(state.opt_state.hyperparams["learning_rate"])
        if jax.process_index() == 0:
          _append_jsonl(metrics_path, {"step": step, "valid_neg_elbo": v, "best_valid_neg_elbo": meta["best_valid"],
                                       "lr": lr})
          sys.stderr.write(f"\nstep {step}: validation -ELBO {v:.3f} (best {meta['best_valid']:.3f}), lr {lr:g}\n")
        if improved:
          save(state, best=True)
          evaluated_best = True
        if tc.early_stopping_patience and meta["bad_evals"] >= tc.early_stopping_patience:
          stop_reason = f"early stopping after {meta['bad_evals']} evaluations without improvement"
          break

      if step % tc.checkpoint_every == 0 and not evaluated_best:
        save(state)
  finally:
    for s, h in old_handlers.items():
      signal.signal(s, h)
    manager.wait()

  if int(state.step) not in manager.steps():
    save(state)
  manager.wait()
  summary = {"event": "end", "step": int(state.step), "reason": stop_reason,
             "skipped_steps": int(state.num_nonfinite), "best_valid_neg_elbo": meta["best_valid"],
             "wall_time": wall0 + time.time() - t0}
  if jax.process_index() == 0:
    _append_jsonl(metrics_path, summary)
    sys.stderr.write(f"\n{json.dumps(summary)}\n")
  return dict(summary, train_losses=train_losses)
