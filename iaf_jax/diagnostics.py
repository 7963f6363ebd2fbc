"""Posterior-collapse diagnostics: the KL term split over latent units, and the active units of Burda et al.
(2016, "Importance Weighted Autoencoders", section 5.2).

Active units. A latent unit u is active when its activity A_u = Cov_x(E_{q(z|x)}[z_u]) exceeds 0.01: the
posterior mean moves with the input. The variance over x is the population variance (ddof 0) over the
examples given. Where E_q[z_u] has no closed form it is estimated from S posterior samples per example
(z pushed through the flow); the sampling noise of that estimate would add E_x[Var_q(z_u)] / S to the
variance over x (0.0625 for a collapsed unit with S=16, above the threshold), so it is subtracted:
    A_u = Var_x(m_u) - (N-1)/N * mean_x(v_u) / S,
with m_u, v_u the mean and the unbiased (ddof 1) variance of the S samples of example x. This is unbiased
for the population variance of the exact posterior means; it can come out slightly negative for a dead unit.

KL per unit.
  MNIST model (iaf_jax/models/mnist_vae.py, prior N(0, I)): `kl_per_dim[u]` = E_x KL(N(m_u, v_u) || N(0, 1)),
    the KL of the Gaussian with the mean m_u and variance v_u of z_u under q(z|x).
    * Diagonal Gaussian posterior (iaf_depth 0): m_u, v_u are the encoder's mean and std^2, the value is the
      analytic per-dimension KL and the dimensions sum exactly to the analytic KL(q(z|x) || p(z)).
    * IAF posterior: the KL does not separate over dimensions. m_u, v_u are estimated from S samples of z_T.
      Because the prior is a Gaussian, KL(q || p) = sum_u KL(N(m_u, v_u) || N(0, 1)) + sum_u KL(q_u || N(m_u,
      v_u)) + TC(q), where q_u is q's marginal along u and TC its total correlation (all terms >= 0): the
      per-dimension values are what the first and second moments of z_u cost, and sum to at most the total
      KL (the sample moments' bias in the KL is corrected: `moment_kl_per_dim`). `kl_total` is then the
      Monte Carlo estimate E_x E_q[log q(z|x) - log p(z)] over the same samples, and `kl_remainder` =
      kl_total - sum(kl_per_dim) holds the non-Gaussian shape and the correlations.
  ResNet VAE (iaf_jax/models/resnet_vae.py): `kl_per_rung[r]` = E_x E_q[log q(z_r|z_>r, x) - log p(z_r|z_>r)]
    (Monte Carlo over S joint samples of all rungs; sums exactly to `kl_total`), and `kl_per_channel[r][c]`,
    the model's own per-channel split of a rung's KL (Gaussian parts per channel, an IAF step's log-det shared
    equally among the channels; rows sum to `kl_per_rung`).
    Active units are counted over the elements of the latent maps: unit (r, i, j, c) is entry (i, j, c) of rung
    r's map, E_q taken under the joint posterior of all rungs (so the marginal q(z_r|x)). `active_units` counts
    elements over all rungs (`num_latent_units` = sum over rungs of h*w*z_size); `active_units_per_rung` per
    rung. A channel's activity is the mean of its elements' activities over the map's positions; a channel is
    active when that mean exceeds the threshold (`active_channels` of `num_latent_channels`).

All KL values are in nats per example. For a Bernoulli model the images are binarised with keys derived from
`seed`, as the evaluator does.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from iaf_jax import data as data_lib

ACTIVITY_THRESHOLD = 0.01   # Burda et al. 2016
DEFAULT_NUM_SAMPLES = 16    # posterior samples per example where E_q[z] has no closed form
_ROWS_PER_CALL = 512        # examples x samples pushed through the model at once


# ----------------------------------------------------------------------------- the formulas

def gaussian_kl_per_dim(mean, log_std):
  """Elementwise KL(N(mean, exp(log_std)^2) || N(0, 1)) = (mean^2 + std^2 - 1) / 2 - log std."""
  mean, log_std = np.asarray(mean, np.float64), np.asarray(log_std, np.float64)
  return 0.5 * (np.square(mean) + np.exp(2.0 * log_std) - 1.0) - log_std


def moment_kl_per_dim(mean, var, num_samples: Optional[int] = None):
  """Elementwise KL(N(mean, var) || N(0, 1)): the KL that the first two moments of a unit cost.

  With `num_samples` = S, mean and var are the sample mean and unbiased sample variance of S draws, and the
  estimate is corrected for their bias (exactly for Gaussian draws): E[mean^2] = m^2 + v / S and
  E[log var] = log v + digamma((S-1)/2) - log((S-1)/2). Without it the KL comes out too high by about
  1/(2(S-1)) + 1/(2S) nats per unit (0.06 with S = 16).
  """
  mean, var = np.asarray(mean, np.float64), np.maximum(np.asarray(var, np.float64), 1e-30)
  sq, log_var = np.square(mean), np.log(var)
  if num_samples:
    from scipy.special import digamma
    half = (num_samples - 1) / 2.0
    sq = sq - var / num_samples
    log_var = log_var - (digamma(half) - np.log(half))
  return 0.5 * (sq + var - 1.0 - log_var)


def unit_activity(posterior_means, within_var=None, num_samples: Optional[int] = None) -> np.ndarray:
  """A_u = Cov_x(E_q[z_u]) from posterior means [N, ...units]: the population variance over axis 0.

  With `within_var` [N, ...] (the unbiased variance of the `num_samples` samples each mean was averaged from)
  the sampling noise is subtracted: A_u = Var_x(m_u) - (N-1)/N * mean_x(within_var_u) / num_samples.
  """
  m = np.asarray(posterior_means, np.float64)
  act = m.var(axis=0)
  if within_var is not None:
    if not num_samples:
      raise ValueError("unit_activity: within_var needs num_samples")
    n = m.shape[0]
    act = act - (n - 1) / n * np.asarray(within_var, np.float64).mean(axis=0) / num_samples
  return act


def active_units(posterior_means, threshold: float = ACTIVITY_THRESHOLD, within_var=None,
                 num_samples: Optional[int] = None) -> tuple[int, np.ndarray]:
  """(number of units with A_u > threshold, A_u) for posterior means [N, ...units] (Burda et al. 2016)."""
  act = unit_activity(posterior_means, within_var, num_samples)
  return int(np.sum(act > threshold)), act


class _Moments:
  """Running sums over examples for the activity of many units without keeping [N, units] in memory."""

  def __init__(self):
    self.n, self.s1, self.s2, self.sv = 0, 0.0, 0.0, 0.0

  def add(self, means, within_var):
    m = np.asarray(means, np.float64)
    self.n += m.shape[0]
    self.s1 = self.s1 + m.sum(0)
    self.s2 = self.s2 + np.square(m).sum(0)
    self.sv = self.sv + np.asarray(within_var, np.float64).sum(0)

  def activity(self, num_samples: int) -> np.ndarray:
    n = self.n
    mean = self.s1 / n
    var = np.maximum(self.s2 / n - np.square(mean), 0.0)
    return var - (n - 1) / n * (self.sv / n) / num_samples


# ----------------------------------------------------------------------------- on a model

def _batches(images: np.ndarray, batch: int):
  """(index, chunk, number of real rows): a short last chunk is padded to the others' shape (one compile)."""
  for start, chunk, n in data_lib.padded_batches(images, batch, pad_last=batch < len(images)):
    yield start // batch, chunk, n


def collapse_diagnostics(model, params, images: np.ndarray, *, likelihood: str, max_value: int,
                         num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0,
                         threshold: float = ACTIVITY_THRESHOLD) -> dict:
  """KL per latent unit (or per rung and channel) and active units of `model` on uint8 `images`, from the
  model's `latent_statistics` (models/__init__.py): one latent vector gets the per-dimension report, latent
  maps [B, h, w, C] (one group per rung) the per-group one.

  Returns a JSON-ready dict; see the module docstring for what each key means.
  """
  images = np.asarray(images)
  if len(images) < 2:
    raise ValueError(f"collapse diagnostics: need at least 2 examples (a variance over x), got {len(images)}")
  if num_samples < 2:
    raise ValueError(f"collapse diagnostics: num_samples must be >= 2, got {num_samples}")
  v = {"params": params}

  @jax.jit
  def stats(key, chunk):
    k_bin, k_z = jax.random.split(key)
    x = data_lib.model_inputs(k_bin, jnp.asarray(chunk), likelihood, max_value)
    return model.apply(v, x, k_z, num_samples, method="latent_statistics")

  shapes = jax.eval_shape(stats, jax.random.PRNGKey(seed), images[:1])
  exact = "log_std" in shapes  # exact posterior moments: one row per example, not num_samples
  batches = _statistics(stats, images, max(1, _ROWS_PER_CALL // (1 if exact else num_samples)), seed)
  if shapes["mean"][0].ndim == 2:
    out = _per_dim_report(batches, exact, num_samples, threshold)
  else:
    out = _per_group_report(batches, len(images), num_samples, threshold)
  out.update(active_units_threshold=threshold, diagnostics_num_examples=int(len(images)))
  return out


def _statistics(stats, images, batch, seed):
  """The model's latent statistics batch by batch, as numpy arrays without the padding rows."""
  for b, chunk, n in _batches(images, batch):
    out = stats(jax.random.fold_in(jax.random.PRNGKey(seed), b), chunk)
    yield jax.tree_util.tree_map(lambda a: np.asarray(a)[:n], out)


def _per_dim_report(batches, exact, s, threshold):
  """One latent vector z [B, D]: KL per dimension, exact (diagonal Gaussian) or from the moments of samples."""
  batches = list(batches)
  means = np.concatenate([b["mean"][0] for b in batches])
  if exact:
    log_std = np.concatenate([b["log_std"][0] for b in batches])
    kl_dim = gaussian_kl_per_dim(means, log_std).mean(0)
    count, act = active_units(means, threshold)  # the encoder's mean is E_q[z] exactly
    kl_total, method = float(kl_dim.sum()), "analytic"
  else:
    variances = np.concatenate([b["var"][0] for b in batches])
    kl_dim = moment_kl_per_dim(means, variances, num_samples=s).mean(0)
    count, act = active_units(means, threshold, within_var=variances, num_samples=s)
    kl_total, method = float(np.concatenate([b["kl"][:, 0] for b in batches]).mean()), "monte_carlo"
  return {
      "kl_per_dim": kl_dim.tolist(), "kl_total": kl_total, "kl_total_method": method,
      "kl_remainder": kl_total - float(kl_dim.sum()),
      "kl_per_dim_definition": ("analytic KL(q_u || N(0,1)) of the diagonal Gaussian posterior" if exact else
                                "KL(N(m_u, v_u) || N(0,1)) with m_u, v_u the moments of z_u under q(z|x), "
                                f"from {s} samples (bias-corrected)"),
      "unit_activity": act.tolist(), "active_units": count, "num_latent_units": int(means.shape[-1]),
      "diagnostics_num_samples": 0 if exact else s,
  }


def _per_group_report(batches, n, s, threshold):
  """Latent maps, one group per rung: KL per rung and channel, activity per map element, accumulated over the
  batches (the maps of all examples need not fit in memory)."""
  acc = None
  kl_rung_sum, kl_chan_sum = 0.0, 0.0
  for b in batches:
    acc = acc or [_Moments() for _ in b["mean"]]
    for a, m, var in zip(acc, b["mean"], b["var"]):
      a.add(m, var)
    kl_rung_sum = kl_rung_sum + np.asarray(b["kl"], np.float64).sum(0)
    kl_chan_sum = kl_chan_sum + np.asarray(b["kl_per_channel"], np.float64).sum(0)
  kl_rung, kl_chan = kl_rung_sum / n, kl_chan_sum / n
  acts = [a.activity(s) for a in acc]                             # per rung [h, w, C]
  chan_act = np.stack([a.reshape(-1, a.shape[-1]).mean(0) for a in acts])   # [R, C]
  per_rung = [int(np.sum(a > threshold)) for a in acts]
  return {
      "kl_per_rung": kl_rung.tolist(), "kl_per_channel": kl_chan.tolist(), "kl_total": float(kl_rung.sum()),
      "kl_total_method": "monte_carlo",
      "active_units": int(sum(per_rung)), "num_latent_units": int(sum(a.size for a in acts)),
      "active_units_per_rung": per_rung, "latent_units_per_rung": [int(a.size) for a in acts],
      "channel_activity": chan_act.tolist(), "active_channels": int(np.sum(chan_act > threshold)),
      "num_latent_channels": int(chan_act.size), "diagnostics_num_samples": s,
  }
