"""The training loop: TrainState, the pure update step and its initialisation, orbax checkpoints, EMA. The
optimizer is in optim.py, the mesh and multi-host plumbing in sharding.py, the best-checkpoint, plateau-annealing
and early-stopping rules in validation.py. Knows nothing of a model's insides: it calls `model.apply` and
`objectives.vae_loss` (see iaf_jax/models/__init__.py for the protocol)."""
from __future__ import annotations

import json
import logging
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
from jax.sharding import Mesh

from iaf_jax import checkpoints, config_lib, data as data_lib, objectives, optim, sharding, validation
from iaf_jax import workdir as workdir_lib
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


# ----------------------------------------------------------------------------- step and initialisation

def make_loss_and_grads(model, *, likelihood: str, max_value: int, free_bits: float,
                        num_importance_samples: int = 1, micro_batches: int = 1, batch_sharding=None) -> Callable:
  """(params, uint8 images, key) -> ((loss, metrics), grads): the objective of one step and its gradients, the
  images binarized or scaled with `key` and the posterior drawn with it (arguments: make_train_step)."""
  k, s = int(num_importance_samples), int(micro_batches)

  def batch_loss(params, xb, kb):
    if k == 1:
      return objectives.vae_loss(model.apply({"params": params}, xb, kb), free_bits)
    xk = objectives.repeat_examples(xb, k)
    if batch_sharding is not None:
      xk = jax.lax.with_sharding_constraint(xk, batch_sharding)
    return objectives.importance_weighted_loss(model.apply({"params": params}, xk, kb), k)

  def loss_and_grads(params, images: jax.Array, key: jax.Array):
    k_bin, k_z = jax.random.split(key)
    x = data_lib.model_inputs(k_bin, images, likelihood, max_value)

    def loss_fn(params):
      if s == 1:
        return batch_loss(params, x, k_z)
      # Strided, not contiguous, micro-batches: on a mesh each one keeps an equal share on every device.
      xs = x.reshape(-1, s, *x.shape[1:])
      parts = [batch_loss(params, xs[:, i], jax.random.fold_in(k_z, i)) for i in range(s)]
      return jax.tree_util.tree_map(lambda *a: sum(a) / s, *parts)

    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  return loss_and_grads


def apply_gradients(state: TrainState, loss: jax.Array, metrics: dict, grads, *, optimizer, ema_decay: float,
                    fused_adamax: Optional[tuple[float, float, float]] = None) -> tuple[TrainState, dict]:
  """The update of one step from its loss and gradients: the next TrainState (or only its counters, where the
  loss or the gradients are not finite) and the step's metrics with the gradient norm."""
  # A NaN or Inf in any gradient makes the norm NaN or Inf: one pass over the gradients, which the logged
  # norm needs anyway, instead of a second (is-finite) pass (docs/performance.md). A norm that overflows
  # float32 (> 1.8e19) also counts as non-finite.
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, ema, opt_state = optim.apply_update(state, grads, ok, optimizer, ema_decay, fused_adamax)
  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
      num_nonfinite=state.num_nonfinite + (~ok).astype(jnp.int32),
      consecutive_nonfinite=jnp.where(ok, 0, state.consecutive_nonfinite + 1))
  return new_state, dict(metrics, grad_norm=grad_norm, finite=ok.astype(jnp.float32))


def make_train_step(model, optimizer: optax.GradientTransformation, *, likelihood: str, max_value: int,
                    free_bits: float, ema_decay: float,
                    fused_adamax: Optional[tuple[float, float, float]] = None,
                    num_importance_samples: int = 1, micro_batches: int = 1, batch_sharding=None) -> Callable:
  """(state, uint8 images) -> (state, metrics): one pure update, make_loss_and_grads then apply_gradients. A
  step whose loss or gradients are not finite changes nothing but the step and skip counters. `fused_adamax`
  (`optim.fused_adamax(train_cfg)`, for a plain Adamax optimizer) computes the same update without XLA's
  per-step copies of the state.
  `num_importance_samples` k > 1 trains on the k-sample importance-weighted bound (objectives.
  importance_weighted_loss): the model's terms on k copies of the batch, k independent posterior samples each.
  On a mesh, `batch_sharding` (sharding.batch_sharded) keeps those k copies split by example: without it the
  partitioner gave every device the whole k-times batch (XLA's flops of the 2-device step = the 1-device step's;
  tests/test_distributed.py). `micro_batches` S > 1 computes the loss as the mean of S micro-batches' (example i
  in micro-batch i % S, its own posterior draws): S independent forward and backward chains until the gradient
  sum, which XLA:CPU runs on its cores side by side (docs/performance.md, eighth round). Without free bits it is
  the same objective as the whole batch's; with them it is not (they act on the batch's mean KL), so the config
  refuses that combination."""
  loss_and_grads = make_loss_and_grads(model, likelihood=likelihood, max_value=max_value, free_bits=free_bits,
                                       num_importance_samples=num_importance_samples,
                                       micro_batches=micro_batches, batch_sharding=batch_sharding)

  def train_step(state: TrainState, images: jax.Array):
    (loss, metrics), grads = loss_and_grads(state.params, images, jax.random.fold_in(state.rng, state.step))
    return apply_gradients(state, loss, metrics, grads, optimizer=optimizer, ema_decay=ema_decay,
                           fused_adamax=fused_adamax)

  return train_step


def make_update_step(model, optimizer: optax.GradientTransformation, config, max_value: int,
                     mesh=None) -> Callable:
  """make_train_step for config.train's settings, jitted with the state donated: the one construction of the
  update step, for the training loop, the bench and the profiler. `mesh`: the 'data' mesh the batch is sharded
  over (None: one device)."""
  tc = config.train
  by_data = sharding.batch_sharded(mesh) if mesh is not None and mesh.devices.size > 1 else None
  return jax.jit(make_train_step(model, optimizer, likelihood=config.model.likelihood, max_value=max_value,
                                 free_bits=tc.free_bits, ema_decay=tc.ema_decay,
                                 fused_adamax=optim.fused_adamax(tc),
                                 num_importance_samples=tc.get("num_importance_samples", 1),
                                 micro_batches=tc.get("micro_batches", 1),
                                 batch_sharding=by_data), donate_argnums=0)


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


# ----------------------------------------------------------------------------- the loop

MAX_STEPS_IN_FLIGHT = 2


class _StopFlag:
  """Set by SIGTERM / SIGINT: the loop saves a checkpoint and exits cleanly at the next step."""
  def __init__(self):
    self.signal = None

  def __call__(self, signum, frame):
    self.signal = signum


class _AgreedEnding:
  """Why the run ends after the current step (NONE, BUDGET or SIGNAL), the same on every process.

  One process: its own view, at once. Several: a SIGTERM to one host, or a budget spent by one host's clock,
  must stop every host after the same step; a host that stopped alone would wait in the checkpoint's barrier
  while the others wait in the next step's all-reduce. So each step's local view is voted on (a max over the
  processes, dispatched behind the step) and read `lag` steps later, when it has finished: no extra host sync."""
  NONE, BUDGET, SIGNAL = 0, 1, 2

  def __init__(self, mesh: Mesh, lag: int):
    self._vote = sharding.max_over_processes(mesh) if jax.process_count() > 1 else None
    self._lag, self._votes = lag, []

  def at_start(self, local: int) -> int:
    return local if self._vote is None else int(self._vote(local))

  def after_step(self, local: int) -> int:
    if self._vote is None:
      return local
    self._votes.append(self._vote(local))
    return int(self._votes.pop(0)) if len(self._votes) > self._lag else self.NONE


def _interval_mean(values: list):
  """A metric's mean over the logging interval: a float, or a list for a vector metric (kl_per_group)."""
  mean = np.mean(np.stack(values), axis=0)
  return float(mean) if mean.ndim == 0 else mean.tolist()


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
  bs = sharding.per_device_multiple(mesh, batch_size)
  total, count = 0.0, 0
  rows = sharding.process_rows(np.arange(bs))  # each process supplies its rows of the (same) padded chunk
  for start, padded, n in data_lib.padded_batches(images, bs):
    vals = eval_fn(params, sharding.global_batch(mesh, padded[rows]),
                   jax.random.fold_in(jax.random.PRNGKey(seed), start))
    vals = sharding.gather(vals)[:n]
    total, count = total + float(vals.sum()), count + n
  return total / max(count, 1)


def _new_meta(learning_rate: float) -> dict:
  """A new run's checkpoint meta: the validation policy's state (iaf_jax/validation.py) and the wall time."""
  return {"best_valid": None, "bad_evals": 0, "wall_time": 0.0, "lr_base": float(learning_rate)}


def _save(manager: checkpoints.CheckpointManager, state: TrainState, meta: dict, best: bool = False) -> None:
  """The latest checkpoint of state.step, and the best one too where `best`."""
  if best and jax.process_count() > 1:
    # Orbax names its multi-host barriers after the step, so the latest and best managers saving one step at
    # once collide ("Barrier _async_write_complete.N is already ongoing"): one after the other.
    manager.save(int(state.step), state, meta)
    manager.wait()
  manager.save(int(state.step), state, meta, best=best)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train the model `config` describes into `workdir`, resuming from its latest checkpoint if any.

  Returns the final summary (also the last line of workdir/metrics.jsonl).
  """
  config_lib.validate_config(config)
  tc = config.train
  if tc.distributed:
    sharding.initialize_distributed()
  checkpoints.check_workdir_writable(workdir)
  config = config_lib.adopt_saved_layout(config, workdir)  # e.g. a run saved unrolled resumes unrolled
  config_lib.check_config_compatible(config, workdir)  # before any work; saved only once every check passed

  ds = data_lib.load_for_config(config)
  if len(ds.train) < tc.batch_size:
    raise data_lib.DataError(f"{ds.name}: {len(ds.train)} training examples < batch size {tc.batch_size}")
  if jax.process_index() == 0:
    config_lib.write_data_info(workdir, ds)
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  micro_batches = tc.get("micro_batches", 1)
  if tc.batch_size % (n_dev * micro_batches):
    raise config_lib.ConfigError(f"config.train.batch_size={tc.batch_size} must be a multiple of the {n_dev} "
                                 f"devices x train.micro_batches={micro_batches}")
  model = build_model(config.model, ds.image_shape)
  if jax.process_index() == 0:  # one writer: hosts sharing the workdir would race on config.json.tmp
    config_lib.save_config(config, workdir)
  optimizer = optim.make_optimizer(tc)
  lik, maxv = config.model.likelihood, ds.max_value

  manager = checkpoints.CheckpointManager(workdir, keep=tc.keep_checkpoints)
  first_batch = ds.train[data_lib.batch_indices(len(ds.train), tc.batch_size, 0, config.seed)]
  fresh = lambda: init_state(model, optimizer, first_batch, config.seed, likelihood=lik, max_value=maxv)
  state, meta = manager.restore_latest(fresh, sharding.replicated(mesh))
  if meta is None:
    state, meta = fresh(), _new_meta(tc.learning_rate)
    log.info("starting a new run in %s (%d parameters)", workdir,
             sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  else:
    log.info("resumed %s at step %d", workdir, int(state.step))

  # The rate plateau annealing scales; the schedule's rate is derived from it. (Runs saved before schedules
  # existed: the rate in their optimizer state.)
  meta.setdefault("lr_base", float(state.opt_state.hyperparams["learning_rate"]))
  policy = validation.ValidationPolicy.from_config(tc, meta)
  state = sharding.replicate(state, mesh)
  budget_s = 60.0 * tc.time_budget_minutes
  step = int(state.step)
  t0, step0, wall0 = time.time(), step, meta["wall_time"]
  elapsed = lambda: wall0 + time.time() - t0   # wall time of the run, over all its resumptions
  # What each checkpoint saves beside the state: the policy's state and the wall time, under meta's keys.
  # `wall`: the wall time the loop's budget check sees for this step, so that a checkpoint never records less
  # than the time that stopped the run (a rerun of a spent budget then trains nothing more).
  save = lambda st, best=False, wall=None: _save(manager, st, dict(meta, **policy.meta(),
                                                                   wall_time=elapsed() if wall is None else wall), best)

  def scheduled(st, step_now):
    """`st` with the rate the schedule gives at step_now, from the policy's lr_base."""
    done = step_now / max(tc.num_steps, 1)
    progress = max(done, elapsed() / budget_s) if budget_s else done
    lr = optim.scheduled_learning_rate(tc.lr_schedule, policy.lr_base, progress, tc.min_learning_rate)
    return st.replace(opt_state=optim.with_learning_rate(st.opt_state, sharding.replicate(np.float32(lr), mesh)))

  train_step = make_update_step(model, optimizer, config, maxv, mesh)
  eval_fn = jax.jit(make_eval_elbo(model, likelihood=lik, max_value=maxv))
  valid = ds.valid[:config.eval.valid_examples]
  metrics_path = workdir_lib.metrics_path(workdir)

  validating = bool(tc.eval_every and len(valid))
  validate = lambda st: validation_neg_elbo(eval_fn, st.ema_params, valid, mesh, config.eval.batch_size,
                                            config.seed)

  def report_validation(st, step_now, v, **extra):
    lr = float(st.opt_state.hyperparams["learning_rate"])
    if jax.process_index() == 0:
      _append_jsonl(metrics_path, {"step": step_now, "valid_neg_elbo": v, "best_valid_neg_elbo": policy.best_valid,
                                   "lr": lr, "wall_time": elapsed(), **extra})
      sys.stderr.write(f"\nstep {step_now}: validation -ELBO {v:.3f} (best {policy.best_valid:.3f}), lr {lr:g}"
                       f"{' (the run ends here)' if extra.get('closing') else ''}\n")

  stop = _StopFlag()
  agreed = _AgreedEnding(mesh, lag=MAX_STEPS_IN_FLIGHT)
  local_ending = lambda now: (_AgreedEnding.SIGNAL if stop.signal is not None else
                              _AgreedEnding.BUDGET if budget_s and now >= budget_s else _AgreedEnding.NONE)
  old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  pending: list = []
  stop_reason = "num_steps"
  batches = sharding.prefetch_batches(mesh, ds.train, tc.batch_size, step, config.seed)
  train_losses: list = []   # (step, mean loss over the logging interval), returned for multi-host checks
  early_stop_reason = lambda: f"early stopping after {policy.bad_evals} evaluations without improvement"
  # A run that stopped early stays stopped when its command is rerun (raise the patience to continue it).
  stopped_early = policy.patience_spent
  if stopped_early:
    stop_reason = f"{early_stop_reason()} (stopped before; raise train.early_stopping_patience to continue)"
  try:
    if tc.lr_schedule != "constant":
      state = scheduled(state, step)
    ending = agreed.at_start(local_ending(elapsed()))
    while step < tc.num_steps and not stopped_early:
      if ending == _AgreedEnding.SIGNAL:
        stop_reason = (f"signal {signal.Signals(stop.signal).name}" if stop.signal is not None
                       else "a signal to another process")
        break
      if ending == _AgreedEnding.BUDGET:
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
        record = {k: _interval_mean([m[k] for m in host]) for k in host[0]}
        train_losses.append((step, record["loss"]))
        record.update(step=step, lr=float(state.opt_state.hyperparams["learning_rate"]),
                      skipped_steps=int(state.num_nonfinite), wall_time=elapsed())
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
      regular_eval = validating and step % tc.eval_every == 0
      if regular_eval:
        v = validate(state)
        now = elapsed()
        decision = policy.update(v)
        if decision.annealed:
          state = scheduled(state, step)
        report_validation(state, step, v)
        if decision.improved:
          save(state, best=True, wall=now)
          evaluated_best = True
        if decision.stop:
          stop_reason = early_stop_reason()
          break

      if not evaluated_best:
        now = elapsed()
      ending = agreed.after_step(local_ending(now))
      if ending == _AgreedEnding.BUDGET:
        now = max(now, budget_s)  # a host whose clock lags still records the budget spent: a rerun trains no more
      # The closing evaluation: a run that ends on num_steps or its budget between two regular evaluations
      # would leave its last steps out of the best checkpoint, the one evaluate.py and budget_run.sh use. It
      # comes before this step's checkpoint, so that the checkpoint's meta holds its best_valid.
      if (validating and not regular_eval and ending != _AgreedEnding.SIGNAL
          and (step >= tc.num_steps or ending == _AgreedEnding.BUDGET)):
        v = validate(state)
        improved = policy.update_at_end(v)
        report_validation(state, step, v, closing=True)
        if improved:
          save(state, best=True, wall=now)
          evaluated_best = True
      if step % tc.checkpoint_every == 0 and not evaluated_best:
        save(state, wall=now)
  finally:
    for s, h in old_handlers.items():
      signal.signal(s, h)
    manager.wait()

  if int(state.step) not in manager.steps():
    save(state)
  manager.wait()
  summary = {"event": "end", "step": int(state.step), "reason": stop_reason,
             "skipped_steps": int(state.num_nonfinite), "best_valid_neg_elbo": policy.best_valid,
             "wall_time": elapsed()}
  if jax.process_index() == 0:
    _append_jsonl(metrics_path, summary)
    sys.stderr.write(f"\n{json.dumps(summary)}\n")
  return dict(summary, train_losses=train_losses)
