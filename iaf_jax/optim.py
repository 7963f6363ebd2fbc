"""The optimizer: Adamax (or Adam) with an injectable learning rate, its learning-rate schedules, and the fused
Adamax update that writes each state leaf once, in place (docs/performance.md)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

ADAMAX_EPS = 1e-8  # optax.adamax's default, written out because the fused update repeats its arithmetic
LR_SCHEDULES = ("constant", "cosine")


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
  train_lib.make_train_step's `fused_adamax` takes."""
  if train_cfg.optimizer == "adamax" and not train_cfg.grad_clip_norm > 0:
    return (float(train_cfg.b1), float(train_cfg.b2), ADAMAX_EPS)
  return None


def scheduled_learning_rate(schedule: str, base_lr: float, progress: float, min_lr: float) -> float:
  """The learning rate at `progress` in [0, 1], the fraction of the run done (of its steps or of its time
  budget, whichever ends it first). 'cosine' decays from base_lr to min_lr (Loshchilov & Hutter 2017)."""
  if schedule == "constant":
    return base_lr
  if schedule != "cosine":
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {LR_SCHEDULES}")
  p = min(max(float(progress), 0.0), 1.0)
  return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * p))


def with_learning_rate(opt_state, learning_rate):
  """make_optimizer's state with its injected learning rate replaced (the moments untouched)."""
  return opt_state._replace(hyperparams=dict(opt_state.hyperparams, learning_rate=learning_rate))


def _is_adam_state(x) -> bool:
  return isinstance(x, optax.ScaleByAdamState)


def apply_update(state, grads, ok: jax.Array, optimizer, ema_decay: float,
                 adamax: Optional[tuple[float, float, float]]):
  """(params, ema_params, opt_state) of a TrainState after one step, each unchanged where `ok` is False.

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
