"""Tests of iaf_jax.distributions against scipy and exact float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from iaf_jax import distributions as D

NUM_BINS = 256
VALUES = np.arange(NUM_BINS, dtype=np.float32)

# including the extremes asked for: log-scale -8 and +6, means -0.6, 0, 0.6 (outside and at the edges of bins)
MEANS = np.array([-0.6, -0.5, -0.3, 0.0, 0.001, 0.25, 0.5, 0.6], np.float32)
LOG_SCALES = np.array([-8.0, -7.0, -5.0, -3.0, -1.0, 0.0, 2.0, 6.0], np.float32)
GRID_MEANS, GRID_LOG_SCALES = (a.ravel() for a in np.meshgrid(MEANS, LOG_SCALES, indexing="ij"))


def exact_log_bin_mass(x, mean, log_scale):
  """float64 log P(bin x) of a logistic, in log space (no underflow): bins of width 1/256 on [-0.5, 0.5],
  bin 0 extended to -inf and bin 255 to +inf."""
  x, mean, log_scale = (np.asarray(a, np.float64) for a in (x, mean, log_scale))
  centre = (x + 0.5) / NUM_BINS - 0.5
  inv_s = np.exp(-log_scale)
  upper = inv_s * (centre - mean + 0.5 / NUM_BINS)
  lower = inv_s * (centre - mean - 0.5 / NUM_BINS)
  log_sig = lambda t: -np.logaddexp(0.0, -t)
  # sigma(u) - sigma(l) = sigma(u) * sigma(-l) * (1 - exp(l - u))
  mid = log_sig(upper) + log_sig(-lower) + np.log(-np.expm1(lower - upper))
  return np.where(x <= 0, log_sig(upper), np.where(x >= NUM_BINS - 1, log_sig(-lower), mid))


@jax.jit
def elementwise_table(means, log_scales):
  """[num_params, 256] elementwise log-probs of every value for every (mean, log_scale)."""
  x = jnp.asarray(VALUES)[None, :]
  return D._discretized_logistic_log_probs(x, means[:, None] * jnp.ones_like(x), log_scales[:, None] * jnp.ones_like(x))


@jax.jit
def per_example_table(means, log_scales):
  """The same through the per-example API: batch = 256 values, event = one pixel."""
  x = jnp.asarray(VALUES)[:, None]
  one = lambda m, s: D.discretized_logistic_log_prob(x, jnp.full_like(x, m), jnp.full_like(x, s))
  return jax.vmap(one)(means, log_scales)


# ----------------------------------------------------------------------------- discretized logistic


@pytest.mark.parametrize("table_fn", [elementwise_table, per_example_table], ids=["elementwise", "per_example"])
def test_discretized_logistic_sums_to_one(table_fn):
  table = np.asarray(table_fn(GRID_MEANS, GRID_LOG_SCALES), np.float64)
  assert table.shape == (len(GRID_MEANS), NUM_BINS)
  assert np.all(np.isfinite(table)) and np.all(table <= 1e-6)
  total = np.exp(scipy.special.logsumexp(table, axis=1))
  np.testing.assert_allclose(total, 1.0, atol=1e-4)


def test_discretized_logistic_matches_exact_bin_masses():
  """Every one of the 256 log-masses equals the exact float64 value, far tails and tiny scales included."""
  table = np.asarray(elementwise_table(GRID_MEANS, GRID_LOG_SCALES), np.float64)
  ref = exact_log_bin_mass(VALUES[None, :], GRID_MEANS[:, None], GRID_LOG_SCALES[:, None])
  bad = ~np.isclose(table, ref, rtol=1e-5, atol=1e-4)
  if bad.any():
    p, v = np.argwhere(bad)[np.argmax(np.abs(table - ref)[bad])]
    raise AssertionError(
        f"{bad.sum()} of {bad.size} log-masses are off; worst: x={v}, mean={GRID_MEANS[p]}, "
        f"log_scale={GRID_LOG_SCALES[p]}: got {table[p, v]:.4f}, exact {ref[p, v]:.4f}")


def test_discretized_logistic_moderate_params_match_scipy_logistic():
  means = np.array([-0.2, 0.0, 0.1, 0.37], np.float32)
  log_scales = np.array([-4.0, -2.5, -1.0, 0.5], np.float32)
  table = np.asarray(elementwise_table(means, log_scales), np.float64)
  edges = np.concatenate([[-np.inf], (np.arange(1, NUM_BINS) / NUM_BINS) - 0.5, [np.inf]])
  for row, m, s in zip(table, means, log_scales):
    cdf = scipy.stats.logistic.cdf(edges, loc=float(m), scale=float(np.exp(np.float64(s))))
    mass = np.diff(cdf)
    ok = mass > 1e-12
    np.testing.assert_allclose(row[ok], np.log(mass[ok]), rtol=1e-4, atol=1e-4)
    assert np.all(row[~ok] < np.log(1e-11))


def test_discretized_logistic_per_example_sums_event_and_accepts_int_pixels():
  rng = np.random.default_rng(0)
  x = rng.integers(0, NUM_BINS, size=(3, 2, 2, 3))
  mean = rng.uniform(-0.5, 0.5, size=x.shape).astype(np.float32)
  log_scale = rng.uniform(-3.0, 1.0, size=x.shape).astype(np.float32)
  f = jax.jit(D.discretized_logistic_log_prob)
  got_int = f(jnp.asarray(x, jnp.int32), mean, log_scale)
  got_float = f(jnp.asarray(x, jnp.float32), mean, log_scale)
  ref = exact_log_bin_mass(x, mean, log_scale).reshape(3, -1).sum(axis=1)
  assert got_int.shape == (3,)
  np.testing.assert_allclose(got_int, ref, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got_float, got_int, rtol=1e-6)


def test_discretized_logistic_gradients_finite_at_extremes():
  """Gradients w.r.t. every (value, mean, log_scale) of the grid, elementwise, are finite."""

  @jax.jit
  def grads(means, log_scales):
    x = jnp.asarray(VALUES)[None, :] * jnp.ones((means.shape[0], 1))
    m = means[:, None] * jnp.ones_like(x)
    s = log_scales[:, None] * jnp.ones_like(x)
    return jax.grad(lambda m, s: jnp.sum(D._discretized_logistic_log_probs(x, m, s)), argnums=(0, 1))(m, s)

  gm, gs = grads(GRID_MEANS, GRID_LOG_SCALES)
  assert np.all(np.isfinite(np.asarray(gm))) and np.all(np.isfinite(np.asarray(gs)))
  assert np.any(np.asarray(gm) != 0) and np.any(np.asarray(gs) != 0)


def test_discretized_logistic_gradient_points_mean_towards_the_observed_bin():
  x = jnp.asarray([[10.0], [128.0], [250.0]])
  mean = jnp.asarray([[0.3], [-0.2], [0.0]])
  g = jax.jit(jax.grad(lambda m: jnp.sum(D.discretized_logistic_log_prob(x, m, jnp.full_like(m, -3.0)))))(mean)
  centres = np.asarray(D.bin_centres(x))
  assert np.all(np.sign(np.asarray(g)) == np.sign(centres - np.asarray(mean)))


def test_bin_centres():
  c = np.asarray(D.bin_centres(jnp.asarray(VALUES)))
  np.testing.assert_allclose(c[0], -0.5 + 0.5 / 256, atol=1e-7)
  np.testing.assert_allclose(c[-1], 0.5 - 0.5 / 256, atol=1e-7)
  np.testing.assert_allclose(np.diff(c), 1 / 256, atol=1e-6)


@jax.jit
def mixture_table(logit_probs, means, log_scales):
  """[num_mixtures_sets, 256]: batch = 256 values, event = one pixel, mixture axis last."""
  x = jnp.asarray(VALUES)[:, None]

  def one(lp, m, s):
    tile = lambda a: jnp.broadcast_to(a, (NUM_BINS, 1, a.shape[-1]))
    return D.discretized_logistic_mixture_log_prob(x, tile(lp), tile(m), tile(s))

  return jax.vmap(one)(logit_probs, means, log_scales)


def test_discretized_logistic_mixture_sums_to_one_and_matches_reference():
  rng = np.random.default_rng(1)
  n, k = 12, 4
  logit_probs = rng.normal(scale=3.0, size=(n, k)).astype(np.float32)
  means = rng.choice(MEANS, size=(n, k)).astype(np.float32)
  log_scales = rng.choice(LOG_SCALES, size=(n, k)).astype(np.float32)
  table = np.asarray(mixture_table(logit_probs, means, log_scales), np.float64)
  assert table.shape == (n, NUM_BINS)
  np.testing.assert_allclose(np.exp(scipy.special.logsumexp(table, axis=1)), 1.0, atol=1e-4)
  # against log sum_k pi_k P_k(x) in float64, where the mass is not negligible
  log_pi = scipy.special.log_softmax(logit_probs.astype(np.float64), axis=-1)
  comp = exact_log_bin_mass(VALUES[None, :, None], means[:, None, :], log_scales[:, None, :])
  ref = scipy.special.logsumexp(comp + log_pi[:, None, :], axis=-1)
  ok = ref > -60
  np.testing.assert_allclose(table[ok], ref[ok], rtol=1e-4, atol=1e-4)


def test_mixture_of_identical_components_equals_single_logistic():
  rng = np.random.default_rng(2)
  x = rng.integers(0, NUM_BINS, size=(4, 3)).astype(np.float32)
  m = rng.uniform(-0.5, 0.5, size=(4, 3)).astype(np.float32)
  s = rng.uniform(-5, 0, size=(4, 3)).astype(np.float32)
  rep = lambda a: np.repeat(a[..., None], 5, axis=-1)
  logits = rng.normal(size=(4, 3, 5)).astype(np.float32)
  mix, single = jax.jit(lambda: (D.discretized_logistic_mixture_log_prob(x, logits, rep(m), rep(s)),
                                 D.discretized_logistic_log_prob(x, m, s)))()
  np.testing.assert_allclose(mix, single, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- Bernoulli


def test_bernoulli_matches_scipy():
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=4.0, size=(5, 2, 7)).astype(np.float32)
  x = rng.integers(0, 2, size=logits.shape).astype(np.float32)
  got = np.asarray(D.bernoulli_log_prob(x, logits))
  p = scipy.special.expit(logits.astype(np.float64))
  ref = scipy.stats.bernoulli.logpmf(x, p).reshape(5, -1).sum(axis=1)
  assert got.shape == (5,)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_bernoulli_finite_for_huge_logits():
  logits = jnp.asarray([[1e4], [1e4], [-1e4], [-1e4]])
  x = jnp.asarray([[1.0], [0.0], [0.0], [1.0]])
  got, g = jax.jit(lambda l: (D.bernoulli_log_prob(x, l), jax.grad(lambda l: jnp.sum(D.bernoulli_log_prob(x, l)))(l)))(
      logits)
  got = np.asarray(got)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, [0.0, -1e4, 0.0, -1e4], rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(g)[:, 0], [0.0, -1.0, 0.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 28, 28, 1), (3, 16, 16, 3)])
def test_bernoulli_of_an_image_sums_its_pixels_in_float32_and_differentiates(shape):
  # Image-sized events are summed as a product with a vector of ones (distributions.DOT_SUM_MIN_EVENT): the sum
  # and its gradient must still be the float64 references, under jit, with a few extreme logits mixed in.
  assert np.prod(shape[1:]) >= D.DOT_SUM_MIN_EVENT
  rng = np.random.default_rng(4)
  logits = rng.normal(scale=4.0, size=shape).astype(np.float32)
  logits.reshape(-1)[::97] = 3e3
  x = rng.integers(0, 2, size=shape).astype(np.float32)
  f = jax.jit(lambda l: D.bernoulli_log_prob(x, l))
  got, g = f(logits), jax.jit(jax.grad(lambda l: jnp.sum(f(l) * jnp.arange(1.0, shape[0] + 1.0))))(logits)
  l64 = logits.astype(np.float64)
  ref = (x * l64 - np.logaddexp(0.0, l64)).reshape(shape[0], -1).sum(axis=1)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)
  ref_g = (x - scipy.special.expit(l64)) * np.arange(1.0, shape[0] + 1.0).reshape((-1,) + (1,) * (len(shape) - 1))
  np.testing.assert_allclose(np.asarray(g), ref_g, rtol=1e-5, atol=1e-5)  # x - sigmoid(l) cancels in float32


# ----------------------------------------------------------------------------- Gaussians


def test_diag_gaussian_log_prob_matches_scipy():
  rng = np.random.default_rng(4)
  shape = (4, 3, 2)
  x, mean = rng.normal(size=shape), rng.normal(size=shape)
  log_std = rng.uniform(-3, 2, size=shape)
  got = D.diag_gaussian_log_prob(*(jnp.asarray(a, jnp.float32) for a in (x, mean, log_std)))
  ref = scipy.stats.norm.logpdf(x, mean, np.exp(log_std)).reshape(4, -1).sum(axis=1)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)


def test_standard_normal_log_prob_matches_scipy():
  x = np.random.default_rng(5).normal(scale=2.0, size=(6, 5))
  got = D.standard_normal_log_prob(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, scipy.stats.norm.logpdf(x).sum(axis=1), rtol=1e-5, atol=1e-4)


def test_diag_gaussian_sample_moments():
  n = 200_000
  mean = jnp.broadcast_to(jnp.asarray([-1.0, 0.5, 3.0]), (n, 3))
  log_std = jnp.broadcast_to(jnp.log(jnp.asarray([0.1, 1.0, 2.5])), (n, 3))
  s = np.asarray(jax.jit(D.diag_gaussian_sample)(jax.random.PRNGKey(6), mean, log_std), np.float64)
  std = np.array([0.1, 1.0, 2.5])
  # 5 standard errors
  assert np.all(np.abs(s.mean(axis=0) - [-1.0, 0.5, 3.0]) < 5 * std / np.sqrt(n))
  np.testing.assert_allclose(s.std(axis=0), std, rtol=5 / np.sqrt(2 * n))
  corr = np.corrcoef(s.T)
  np.testing.assert_allclose(corr[np.triu_indices(3, 1)], 0.0, atol=5 / np.sqrt(n))
  # different keys give different samples, the same key the same
  key = jax.random.PRNGKey(7)
  a = D.diag_gaussian_sample(key, mean[:4], log_std[:4])
  np.testing.assert_array_equal(a, D.diag_gaussian_sample(key, mean[:4], log_std[:4]))
  assert not np.allclose(a, D.diag_gaussian_sample(jax.random.PRNGKey(8), mean[:4], log_std[:4]))


def test_diag_gaussian_sample_is_reparameterised():
  key = jax.random.PRNGKey(9)
  mean = jnp.asarray([[0.3, -1.0, 2.0], [0.0, 0.0, 1.0]])
  log_std = jnp.asarray([[-1.0, 0.0, 0.5], [1.0, -2.0, 0.0]])

  @jax.jit
  def run(mean, log_std):
    jac_mean = jax.jacfwd(lambda m: D.diag_gaussian_sample(key, m, log_std))(mean)
    g = jax.grad(lambda ls: jnp.sum(D.diag_gaussian_sample(key, mean, ls)))(log_std)
    return jac_mean, g, D.diag_gaussian_sample(key, mean, log_std)

  jac_mean, g, s = run(mean, log_std)
  np.testing.assert_allclose(np.asarray(jac_mean).reshape(6, 6), np.eye(6), atol=1e-7)
  # d sample / d log_std = exp(log_std) * eps = sample - mean
  np.testing.assert_allclose(g, s - mean, rtol=1e-5, atol=1e-6)
