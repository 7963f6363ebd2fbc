"""Objectives and estimators: the ELBO (report Equation 6), the free-bits objective (Equation 14), the
importance-sampled log p(x) of Burda et al. used for every '~ log p(x)' column, and unit conversions."""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp


def elbo(log_px_given_z: jax.Array, log_pz: jax.Array, log_qz: jax.Array) -> jax.Array:
  """Single-sample ELBO per example: log p(x|z) + log p(z) - log q(z|x)."""
  return log_px_given_z + log_pz - log_qz


def free_bits_kl(kl_per_group: jax.Array, free_bits: float) -> jax.Array:
  """Equation 14's KL term: sum_j max(lambda, E_minibatch[KL_j]).

  kl_per_group is [batch, groups] (one column per latent group, e.g. per rung). The KL is averaged over the
  minibatch BEFORE the max, so a group whose average KL is below lambda gets no gradient at all.
  """
  if kl_per_group.ndim != 2:
    raise ValueError(f"free_bits_kl: expected [batch, groups], got shape {kl_per_group.shape}")
  return jnp.sum(jnp.maximum(free_bits, jnp.mean(kl_per_group, axis=0)))


def vae_loss(terms: Mapping[str, jax.Array], free_bits: float = 0.0) -> tuple[jax.Array, dict]:
  """Minibatch loss (nats per example) and metrics from a model's per-example terms.

  `terms` holds 'log_px_given_z' [B], 'log_pz' [B], 'log_qz' [B] and 'kl_per_group' [B, G] (rows sum to
  log_qz - log_pz). With free_bits = 0 the loss is exactly the negative ELBO.
  """
  metrics = elbo_metrics(terms)
  kl_term = free_bits_kl(terms["kl_per_group"], free_bits) if free_bits > 0 else metrics["kl"]
  loss = metrics["recon"] + kl_term
  return loss, dict(metrics, loss=loss)


def elbo_metrics(terms: Mapping[str, jax.Array]) -> dict:
  """The single-sample ELBO's terms averaged over the rows: 'recon', 'kl', 'neg_elbo', and for a model with
  several latent groups (the ResNet VAE's rungs, or its rungs x channels with kl_groups 'channel') each
  group's mean KL, 'kl_per_group' [G]: the training log then shows when a group stops carrying information
  (posterior collapse), without a diagnostic run. A single group is 'kl' itself."""
  recon = -jnp.mean(terms["log_px_given_z"])
  kl = jnp.mean(terms["log_qz"] - terms["log_pz"])
  metrics = {"neg_elbo": recon + kl, "recon": recon, "kl": kl}
  groups = terms.get("kl_per_group")
  if groups is not None and groups.shape[1] > 1:
    metrics["kl_per_group"] = jnp.mean(groups, axis=0)
  return metrics


def tile_samples(a: jax.Array, num_samples: int) -> jax.Array:
  """[B, ...] -> [num_samples * B, ...]: num_samples copies of the batch, sample-major, the layout that
  importance_weighted_loss and the models' log_weights (reshape(num_samples, B)) read back."""
  return jnp.broadcast_to(a, (num_samples,) + a.shape).reshape(-1, *a.shape[1:])


def untile_samples(a: jax.Array, num_samples: int) -> jax.Array:
  """[num_samples * B, ...] rows in tile_samples' layout -> [num_samples, B, ...]."""
  return a.reshape(num_samples, -1, *a.shape[1:])


def sample_moments(a: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
  """Mean and unbiased (ddof 1) variance over the num_samples samples of each example, rows in tile_samples'
  layout: each [B, ...]."""
  a = untile_samples(a, num_samples)
  return jnp.mean(a, 0), jnp.var(a, 0, ddof=1)


def repeat_examples(a: jax.Array, num_samples: int) -> jax.Array:
  """[B, ...] -> [B * num_samples, ...]: each example num_samples times in a row, example-major (row
  b * num_samples + j is a[b]), the layout importance_weighted_loss reads back. Training uses it, not
  tile_samples: a batch sharded over devices stays split by example, so each device computes only its own
  examples' samples (with tile_samples' sample-major rows the partitioner gave every device all of them)."""
  return jnp.repeat(a, num_samples, axis=0, total_repeat_length=a.shape[0] * num_samples)


def importance_weighted_loss(terms: Mapping[str, jax.Array], num_samples: int) -> tuple[jax.Array, dict]:
  """Burda et al.'s k-sample importance-weighted bound as a loss (openai/iaf's hyperparameter `k`).

  `terms` are a model's per-example terms over a batch of B * num_samples rows in repeat_examples' layout
  (example-major: rows b * k ... b * k + k - 1 are example b's k samples). loss = -mean_b log (1/k) sum_k w_kb
  with log w = log p(x|z) + log p(z) - log q(z|x); k = 1 is exactly the negative ELBO. The metrics keep
  vae_loss's names, averaged over all rows (neg_elbo: the single-sample bound), plus 'neg_iw_bound'.
  """
  log_w = elbo(terms["log_px_given_z"], terms["log_pz"], terms["log_qz"]).reshape(-1, num_samples)
  loss = -jnp.mean(log_mean_exp(log_w, axis=1))
  return loss, dict(elbo_metrics(terms), loss=loss, neg_iw_bound=loss)


def importance_log_weights(log_weight_fn: Callable[[jax.Array, int], jax.Array], key: jax.Array,
                           num_samples: int, chunk_size: int = 128) -> jax.Array:
  """[K, B] log weights log p(x, z_k) - log q(z_k|x), drawn in chunks of `chunk_size` (a sequential lax.map),
  so memory does not grow with K (K=5000 fits). log_weight_fn(key, n) returns n fresh samples' [n, B]."""
  if num_samples < 1:
    raise ValueError(f"importance sampling: num_samples must be >= 1, got {num_samples}")
  if chunk_size < 1:
    raise ValueError(f"importance sampling: chunk_size must be >= 1, got {chunk_size}")
  chunk = min(chunk_size, num_samples)
  num_chunks = -(-num_samples // chunk)
  keys = jax.random.split(key, num_chunks)
  log_w = jax.lax.map(lambda k: log_weight_fn(k, chunk), keys)  # [num_chunks, chunk, B]
  return log_w.reshape(num_chunks * chunk, -1)[:num_samples]


def log_mean_exp(log_w: jax.Array, axis: int = 0) -> jax.Array:
  """log mean exp(log_w) by logsumexp: the weights are never exponentiated."""
  return jax.nn.logsumexp(log_w, axis=axis) - math.log(log_w.shape[axis])


def importance_sampled_log_px(log_weight_fn: Callable[[jax.Array, int], jax.Array], key: jax.Array,
                              num_samples: int, chunk_size: int = 128) -> jax.Array:
  """log p(x) ~ log (1/K) sum_k w_k, w_k = p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016); [B]."""
  return log_mean_exp(importance_log_weights(log_weight_fn, key, num_samples, chunk_size))


def nats_to_bits_per_dim(nats: jax.Array | float, num_dims: int) -> jax.Array | float:
  """Negative log-likelihood in nats per example -> bits per dimension."""
  return nats / (num_dims * math.log(2.0))


def bits_per_dim_to_nats(bits_per_dim: jax.Array | float, num_dims: int) -> jax.Array | float:
  return bits_per_dim * num_dims * math.log(2.0)
