"""Densities used by the models. Every log-density sums over the event axes (all but the batch axis 0) and
returns one value per example; all are written to stay finite in float32 for extreme logits and scales."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)
NUM_BINS = 256  # 8-bit pixels
# Events at least this large (an image's pixels, not a latent vector) are summed as a matrix-vector product.
DOT_SUM_MIN_EVENT = 256


def _sum_event(x: jax.Array) -> jax.Array:
  """One sum per example over the event axes. An image's log-probabilities are summed as a product with a vector
  of ones: XLA:CPU's reduce over the minor axis of [1024, 784] (an importance-sampling pass) took 4-5 ms where
  the product, the elementwise terms fused in, took 1.1-1.3 ms (docs/performance.md, sixteenth round). HIGHEST
  precision so that a GPU does not round the terms to TF32."""
  x = x.reshape(x.shape[0], -1)
  if x.shape[1] < DOT_SUM_MIN_EVENT:
    return jnp.sum(x, axis=-1)
  return jnp.dot(x, jnp.ones((x.shape[1],), x.dtype), precision=jax.lax.Precision.HIGHEST)


def diag_gaussian_sample(key: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
  """Reparameterised sample mean + exp(log_std) * eps."""
  return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)


def diag_gaussian_log_prob(x: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
  eps = (x - mean) * jnp.exp(-log_std)
  return _sum_event(-0.5 * (LOG_2PI + jnp.square(eps)) - log_std)


def standard_normal_log_prob(x: jax.Array) -> jax.Array:
  return _sum_event(-0.5 * (LOG_2PI + jnp.square(x)))


def bernoulli_log_prob(x: jax.Array, logits: jax.Array) -> jax.Array:
  """log Bernoulli(x; sigmoid(logits)) for x in {0, 1}: x*l - softplus(l), exact for |l| up to float max."""
  return _sum_event(x * logits - jax.nn.softplus(logits))


def bin_centres(x_int: jax.Array) -> jax.Array:
  """Pixel value k in 0..255 -> centre of its bin in [-0.5, 0.5] (the IAF code's (x + 0.5) / 256 - 0.5)."""
  return (x_int + 0.5) / NUM_BINS - 0.5


def _discretized_logistic_log_probs(x_int: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
  """Elementwise log P(bin x) under a logistic(mean, exp(log_scale)) on the [-0.5, 0.5] scale.

  Bins have width 1/256; bin 0 extends to -inf and bin 255 to +inf (PixelCNN++), so the 256 masses sum to 1.
  """
  centred = bin_centres(x_int) - mean
  inv_s = jnp.exp(-log_scale)
  plus = inv_s * (centred + 0.5 / NUM_BINS)
  minus = inv_s * (centred - 0.5 / NUM_BINS)
  log_cdf_plus = plus - jax.nn.softplus(plus)            # log sigmoid(plus)
  log_one_minus_cdf_minus = -jax.nn.softplus(minus)      # log (1 - sigmoid(minus))
  # log(sigmoid(plus) - sigmoid(minus)) computed without cancellation:
  # = log sigmoid(plus) + log(1 - exp(minus - plus)) + log sigmoid(-minus)
  delta = jnp.minimum(minus - plus, -1e-30)  # = -inv_s / 256 < 0; kept < 0 so the log stays finite
  log_mid = log_cdf_plus + jnp.log(-jnp.expm1(delta)) - jax.nn.softplus(minus)
  # Only if inv_s itself overflows (log_scale < -88) is that not finite: then use density * bin width.
  mid_in = inv_s * centred
  log_pdf_mid = mid_in - log_scale - 2.0 * jax.nn.softplus(mid_in) - math.log(NUM_BINS)
  log_mid = jnp.where(jnp.isfinite(log_mid), log_mid, log_pdf_mid)
  return jnp.where(x_int <= 0, log_cdf_plus, jnp.where(x_int >= NUM_BINS - 1, log_one_minus_cdf_minus, log_mid))


def discretized_logistic_log_prob(x_int: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
  """log p(x) of 8-bit pixels x in {0..255} (any float/int dtype), mean on the [-0.5, 0.5] scale, per example.

  The mean may lie anywhere: models feed it unbounded. Bounding it (the IAF code clips to +-(0.5 - 1/512); a
  tanh bound saturates the same way) kills the gradient that pulls a mean back from beyond the edge bins, and
  on images that are mostly background (Fashion-MNIST: 57% zeros) the decoder got stuck predicting black
  everywhere. Unbounded, a bright pixel's log-mass keeps a slope of 1/scale in the mean however far out it is.
  """
  return _sum_event(_discretized_logistic_log_probs(x_int.astype(mean.dtype), mean, log_scale))


def discretized_logistic_mixture_log_prob(x_int: jax.Array, logit_probs: jax.Array, means: jax.Array,
                                          log_scales: jax.Array) -> jax.Array:
  """Mixture of discretized logistics per sub-pixel; the mixture axis is the last axis of every parameter."""
  x = x_int.astype(means.dtype)[..., None]
  log_probs = _discretized_logistic_log_probs(x, means, log_scales)
  return _sum_event(jax.nn.logsumexp(log_probs + jax.nn.log_softmax(logit_probs, axis=-1), axis=-1))

