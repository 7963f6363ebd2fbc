"""Tests of iaf_jax.objectives: ELBO, free bits, importance-sampled log p(x) and unit conversions.

The importance-sampling tests use a linear-Gaussian latent model whose log p(x) is known exactly:
z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D)  =>  p(x) = N(b, W W^T + s^2 I).
The proposal q(z|x) is NOT the posterior: its mean is shifted and its std inflated x1.3.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from iaf_jax import objectives as O

# ----------------------------------------------------------------------------- linear-Gaussian model

D_LAT, D_OBS, NOISE = 2, 3, 0.7
_rng = np.random.default_rng(0)
_Q, _ = np.linalg.qr(_rng.normal(size=(D_OBS, D_OBS)))
W = _Q[:, :D_LAT] * np.array([1.5, 0.8])      # orthogonal columns: diagonal posterior covariance
BIAS = np.array([0.3, -0.5, 1.0])
X = np.array([[0.5, -1.0, 2.0], [-1.5, 0.2, 0.1], [2.5, 1.0, -0.7]])  # a few observations, B = 3
STD_INFLATION, MEAN_SHIFT = 1.3, 0.1            # proposal = posterior, std x1.3, mean + 0.1 posterior std

POST_COV = np.linalg.inv(np.eye(D_LAT) + W.T @ W / NOISE ** 2)
POST_STD = np.sqrt(np.diag(POST_COV))
assert np.allclose(POST_COV, np.diag(np.diag(POST_COV)))
POST_MEAN = (X - BIAS) @ W @ POST_COV.T / NOISE ** 2   # [B, d]
Q_MEAN = POST_MEAN + MEAN_SHIFT * POST_STD
Q_STD = STD_INFLATION * POST_STD


def exact_log_px():
  cov = W @ W.T + NOISE ** 2 * np.eye(D_OBS)
  return scipy.stats.multivariate_normal(BIAS, cov).logpdf(X)


def exact_elbo():
  """E_q[log p(x|z) + log p(z) - log q(z)] in closed form."""
  q_var = Q_STD ** 2
  resid = X - Q_MEAN @ W.T - BIAS
  e_log_lik = (-0.5 * D_OBS * math.log(2 * math.pi * NOISE ** 2)
               - 0.5 / NOISE ** 2 * (np.sum(resid ** 2, axis=1) + np.trace(W @ np.diag(q_var) @ W.T)))
  e_log_prior = -0.5 * D_LAT * math.log(2 * math.pi) - 0.5 * (np.sum(Q_MEAN ** 2, axis=1) + q_var.sum())
  entropy = np.sum(0.5 * np.log(2 * math.pi * math.e * q_var))
  return e_log_lik + e_log_prior + entropy


def relative_weight_variance():
  """Var_q[w] / p(x)^2 = E_q[(p(z|x)/q(z))^2] - 1 for the Gaussian posterior and proposal, per latent product."""
  c, delta = STD_INFLATION, MEAN_SHIFT
  per_dim = c ** 2 / math.sqrt(2 * c ** 2 - 1) * math.exp(delta ** 2 / (2 * c ** 2 - 1))
  return per_dim ** D_LAT - 1.0


def _normal_logpdf(x, mean, std):
  return jnp.sum(-0.5 * jnp.square((x - mean) / std) - jnp.log(std) - 0.5 * math.log(2 * math.pi), axis=-1)


def log_weights(key, n):
  """[n, B] log p(x, z_k) - log q(z_k | x), z_k ~ q, assembled with objectives.elbo."""
  eps = jax.random.normal(key, (n, *Q_MEAN.shape))
  q_mean, q_std = jnp.asarray(Q_MEAN, jnp.float32), jnp.asarray(Q_STD, jnp.float32)
  z = q_mean + q_std * eps
  x = jnp.asarray(X, jnp.float32)
  log_px_given_z = _normal_logpdf(x, z @ jnp.asarray(W.T, jnp.float32) + jnp.asarray(BIAS, jnp.float32), NOISE)
  log_pz = _normal_logpdf(z, 0.0, 1.0)
  log_qz = _normal_logpdf(z, q_mean, q_std)
  return O.elbo(log_px_given_z, log_pz, log_qz)


def estimate(key, num_samples, chunk_size):
  return O.importance_sampled_log_px(log_weights, key, num_samples, chunk_size)


estimate_jit = jax.jit(estimate, static_argnums=(1, 2))


NUM_KEYS = 4000


@functools.partial(jax.jit, static_argnums=(1, 2))
def _estimates(keys, num_samples, chunk_size):
  return jax.vmap(lambda k: estimate(k, num_samples, chunk_size))(keys)


def estimates_over_keys(num_samples, chunk_size, seed):
  """[NUM_KEYS, B] independent estimates (one compile per (K, chunk_size), shared between tests)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), NUM_KEYS)
  return np.asarray(_estimates(keys, num_samples, chunk_size), np.float64)


def test_proposal_is_not_the_posterior():
  """Sanity of the setup: the ELBO is well below log p(x), so closing the gap is a real test."""
  gap = exact_log_px() - exact_elbo()
  assert np.all(gap > 0.1)


def test_large_k_estimate_matches_exact_log_px():
  num_samples = 50_000
  # standard error of the estimate ~ sqrt(relvar / K): make the 0.01-nat tolerance at least 4 of them
  assert 4 * math.sqrt(relative_weight_variance() / num_samples) < 0.01
  got = np.asarray(estimate_jit(jax.random.PRNGKey(1), num_samples, 500))
  assert got.shape == (X.shape[0],)
  np.testing.assert_allclose(got, exact_log_px(), atol=0.01)


def test_k1_is_the_elbo_and_is_below_larger_k_on_average():
  k1 = estimates_over_keys(1, 128, seed=2)      # [keys, B]
  k100 = estimates_over_keys(100, 30, seed=3)
  elbo, log_px = exact_elbo(), exact_log_px()
  se1 = k1.std(axis=0) / math.sqrt(k1.shape[0])
  np.testing.assert_array_less(np.abs(k1.mean(axis=0) - elbo), 5 * se1)
  se100 = k100.std(axis=0) / math.sqrt(k100.shape[0])
  # IS >= ELBO in expectation, and K=100 is already close to log p(x) (bias ~ relvar / 2K)
  assert np.all(k100.mean(axis=0) - k1.mean(axis=0) > 5 * np.sqrt(se1 ** 2 + se100 ** 2))
  np.testing.assert_array_less(np.abs(k100.mean(axis=0) - log_px), 5 * se100 + relative_weight_variance() / 100)


@pytest.mark.parametrize("num_samples,chunk_size", [(100, 30), (1, 128)])
def test_exp_estimate_is_unbiased_for_any_chunking(num_samples, chunk_size):
  """exp(estimate) is an unbiased estimator of p(x) for every K, also when chunk_size does not divide K
  (100 = 3 x 30 + 10) or exceeds it."""
  ests = estimates_over_keys(num_samples, chunk_size, seed=num_samples * 100 + chunk_size)
  ratio = np.exp(ests - exact_log_px())
  se = ratio.std(axis=0) / math.sqrt(ratio.shape[0])
  np.testing.assert_array_less(np.abs(ratio.mean(axis=0) - 1.0), 5 * se + 1e-3)


@functools.partial(jax.jit, static_argnums=(2, 3))
def constant_estimate(value, key, num_samples, chunk_size):
  fn = lambda k, n: jnp.full((n, 2), value) + 0.0 * jax.random.uniform(k, (n, 2))
  return O.importance_sampled_log_px(fn, key, num_samples, chunk_size)


@pytest.mark.parametrize("num_samples,chunk_size", [(7, 3), (1, 4), (12, 5)])
def test_constant_weights_give_exactly_that_weight(num_samples, chunk_size):
  """If every log weight is c, log-mean-exp is c: no extra samples are counted, none missing."""
  got = constant_estimate(-3.25, jax.random.PRNGKey(0), num_samples, chunk_size)
  np.testing.assert_allclose(got, [-3.25, -3.25], atol=1e-5)
  # memory: log_weight_fn is never asked for more than chunk_size samples at once
  sizes = []

  def recording(key, n):
    sizes.append(n)
    return jnp.zeros((n, 2))

  jax.eval_shape(lambda k: O.importance_sampled_log_px(recording, k, num_samples, chunk_size), jax.random.PRNGKey(0))
  assert sizes and all(1 <= n <= chunk_size for n in sizes)


@jax.jit
def extreme_estimate(offset, key):
  """log weights uniform in [offset, offset + 1]."""
  return O.importance_sampled_log_px(lambda k, n: offset + jax.random.uniform(k, (n, 3)), key, 1000, 300)


@pytest.mark.parametrize("offset", [-1e4, -3e4, 1e3])
def test_no_overflow_or_underflow_for_extreme_log_weights(offset):
  got = np.asarray(extreme_estimate(jnp.float32(offset), jax.random.PRNGKey(4)))
  assert np.all(np.isfinite(got))
  # log-mean-exp of values in [offset, offset + 1] lies in that interval (and above their mean offset + 0.5)
  assert np.all(got >= offset + 0.5 - 1e-2) and np.all(got <= offset + 1.0 + 1e-2)


@pytest.mark.parametrize("num_samples", [0, -1])
def test_num_samples_below_one_raises(num_samples):
  with pytest.raises(ValueError):
    O.importance_sampled_log_px(log_weights, jax.random.PRNGKey(0), num_samples)


# ----------------------------------------------------------------------------- ELBO, free bits, vae_loss


def test_elbo_definition():
  a, b, c = np.array([-3.0, -1.0]), np.array([-2.0, -0.5]), np.array([-1.5, 0.25])
  np.testing.assert_allclose(O.elbo(a, b, c), a + b - c)


KL = np.array([[0.1, 2.0, 0.4, 5.0],
               [0.3, 1.0, 0.2, 3.0],
               [0.2, 3.0, 0.9, 4.0]], np.float32)  # group means 0.2, 2.0, 0.5, 4.0


@pytest.mark.parametrize("free_bits", [0.0, 0.35, 1.0, 3.0, 10.0])
def test_free_bits_kl_value_and_gradient(free_bits):
  means = KL.mean(axis=0)
  expected = np.sum(np.maximum(free_bits, means))
  got = O.free_bits_kl(jnp.asarray(KL), free_bits)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  grad = np.asarray(jax.grad(lambda k: O.free_bits_kl(k, free_bits))(jnp.asarray(KL)))
  batch = KL.shape[0]
  for j, m in enumerate(means):
    expected_col = 1.0 / batch if m > free_bits else 0.0
    np.testing.assert_allclose(grad[:, j], expected_col, rtol=1e-6)


def test_free_bits_kl_averages_before_the_max():
  """One example far above lambda in a group whose mean is below lambda gives no KL gradient at all."""
  kl = jnp.asarray([[3.0], [0.0], [0.0], [0.0]])  # mean 0.75 < lambda = 1
  np.testing.assert_allclose(O.free_bits_kl(kl, 1.0), 1.0)
  np.testing.assert_array_equal(jax.grad(lambda k: O.free_bits_kl(k, 1.0))(kl), 0.0)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_free_bits_kl_rejects_non_matrix(shape):
  with pytest.raises(ValueError):
    O.free_bits_kl(jnp.ones(shape), 0.5)


def _terms(seed=0, batch=3):
  rng = np.random.default_rng(seed)
  kl = np.abs(rng.normal(size=(batch, 4))).astype(np.float32) * 2.0
  log_pz = rng.normal(size=batch).astype(np.float32) - 5.0
  return {"log_px_given_z": rng.normal(size=batch).astype(np.float32) - 80.0,
          "log_pz": log_pz,
          "log_qz": log_pz + kl.sum(axis=1),   # rows of kl_per_group sum to log_qz - log_pz
          "kl_per_group": kl}


def test_vae_loss_without_free_bits_is_negative_elbo():
  terms = _terms()
  loss, metrics = O.vae_loss(terms, free_bits=0.0)
  neg_elbo = -np.mean(terms["log_px_given_z"] + terms["log_pz"] - terms["log_qz"])
  np.testing.assert_allclose(loss, neg_elbo, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_elbo"], neg_elbo, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["recon"], -np.mean(terms["log_px_given_z"]), rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], np.mean(terms["log_qz"] - terms["log_pz"]), rtol=1e-5)


def test_vae_loss_with_free_bits():
  terms = _terms()
  means = terms["kl_per_group"].mean(axis=0)
  lam = float(np.sort(means)[1] + 1e-3)  # some groups below lambda, some above
  loss, metrics = O.vae_loss(terms, free_bits=lam)
  recon = -np.mean(terms["log_px_given_z"])
  np.testing.assert_allclose(loss, recon + np.sum(np.maximum(lam, means)), rtol=1e-6)
  assert loss > metrics["neg_elbo"]  # the free-bits objective clamps KL from below
  # lambda below every group mean: same as the ELBO
  loss_low, metrics_low = O.vae_loss(terms, free_bits=float(means.min()) * 0.5)
  np.testing.assert_allclose(loss_low, metrics_low["neg_elbo"], rtol=1e-5)


def test_kl_per_group_metric_is_each_groups_batch_mean_and_only_for_several_groups():
  terms = _terms()
  for loss_fn in (lambda t: O.vae_loss(t, free_bits=0.0), lambda t: O.importance_weighted_loss(t, 1)):
    _, metrics = loss_fn(terms)
    np.testing.assert_allclose(metrics["kl_per_group"], terms["kl_per_group"].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(np.sum(metrics["kl_per_group"]), metrics["kl"], rtol=1e-5)
    one = dict(terms, kl_per_group=terms["kl_per_group"].sum(axis=1, keepdims=True))
    assert "kl_per_group" not in loss_fn(one)[1]   # a single group is 'kl' itself


# ----------------------------------------------------------------------------- units


def test_uniform_over_256_values_is_8_bits_per_dim():
  for num_dims in (1, 784, 3072):
    nats = num_dims * math.log(256.0)
    np.testing.assert_allclose(O.nats_to_bits_per_dim(nats, num_dims), 8.0, rtol=1e-12)
    np.testing.assert_allclose(O.bits_per_dim_to_nats(8.0, num_dims), nats, rtol=1e-12)


def test_bits_nats_round_trip():
  nats = jnp.asarray([0.0, 1.0, 79.3, 2500.0])
  for num_dims in (1, 784, 3072):
    np.testing.assert_allclose(O.bits_per_dim_to_nats(O.nats_to_bits_per_dim(nats, num_dims), num_dims), nats,
                               rtol=1e-6)
    # 1 bit = log 2 nats
    np.testing.assert_allclose(O.nats_to_bits_per_dim(num_dims * math.log(2.0), num_dims), 1.0, rtol=1e-12)


# ----------------------------------------------------------------------------- k-sample training bound (IWAE)


def _iw_terms(key, k):
  """The linear-Gaussian model's per-row terms for k samples of each of the B examples, example-major
  (objectives.repeat_examples' layout, which train_lib's k copies of a batch have)."""
  eps = jax.random.normal(key, (k, *Q_MEAN.shape))
  q_mean, q_std = jnp.asarray(Q_MEAN, jnp.float32), jnp.asarray(Q_STD, jnp.float32)
  z = q_mean + q_std * eps
  x = jnp.asarray(X, jnp.float32)
  t = {"log_px_given_z": _normal_logpdf(x, z @ jnp.asarray(W.T, jnp.float32) + jnp.asarray(BIAS, jnp.float32), NOISE),
       "log_pz": _normal_logpdf(z, 0.0, 1.0), "log_qz": _normal_logpdf(z, q_mean, q_std)}
  return {n: v.swapaxes(0, 1).reshape(-1) for n, v in t.items()}   # [k, B] -> rows b * k + j


def test_k1_importance_weighted_loss_is_exactly_the_elbo_loss():
  t = _iw_terms(jax.random.PRNGKey(7), 1)
  loss, m = O.importance_weighted_loss(t, 1)
  ref, ref_m = O.vae_loss(dict(t, kl_per_group=(t["log_qz"] - t["log_pz"])[:, None]))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)  # the same sum, another rounding order
  assert all(float(m[n]) == float(ref_m[n]) for n in ("neg_elbo", "recon", "kl"))


@functools.partial(jax.jit, static_argnums=1)
def _iw_bounds(keys, k):
  """[keys] the k-sample bound (-loss, averaged over the B examples) for independent keys."""
  return jax.vmap(lambda key: -O.importance_weighted_loss(_iw_terms(key, k), k)[0])(keys)


def test_importance_weighted_bound_grows_with_k_towards_log_px():
  """E[L_k] is at least the ELBO, grows with k, and stays below the exact mean log p(x) (Burda et al. Thm 1)."""
  keys = jax.random.split(jax.random.PRNGKey(8), 4000)
  means, ses = [], []
  for k in (1, 4, 64):
    b = np.asarray(_iw_bounds(keys, k), np.float64)
    means.append(b.mean())
    ses.append(b.std() / math.sqrt(len(b)))
  elbo, log_px = exact_elbo().mean(), exact_log_px().mean()
  assert abs(means[0] - elbo) < 5 * ses[0]
  for lo, hi, se_lo, se_hi in zip(means, means[1:], ses, ses[1:]):
    assert hi - lo > 5 * math.sqrt(se_lo ** 2 + se_hi ** 2)
  assert means[-1] < log_px + 5 * ses[-1]
  assert log_px - means[-1] < 0.1 * (log_px - elbo)  # k = 64 closes most of the gap


def test_importance_weighted_loss_gradients_are_finite_for_large_k():
  """Weights far apart (1e4 nats) and k = 5000: the gradient is that of logsumexp, no overflow."""
  k, b = 5000, 3
  log_px = jnp.linspace(-1e4, 0.0, k * b)

  def loss(lp):
    return O.importance_weighted_loss({"log_px_given_z": lp, "log_pz": jnp.zeros_like(lp),
                                       "log_qz": jnp.zeros_like(lp)}, k)[0]

  g = jax.grad(loss)(log_px)
  assert bool(jnp.all(jnp.isfinite(g)))
  # d(-mean_b logmeanexp)/d log w sums to -1 per example: -1/B over each example's k weights
  np.testing.assert_allclose(np.asarray(g).reshape(b, k).sum(axis=1), -1.0 / b, rtol=1e-5)
