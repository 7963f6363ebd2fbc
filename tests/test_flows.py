"""Tests of iaf_jax.flows: MADE / PixelCNN autoregressive networks, IAF steps and stacked flows.

The Jacobian / log-det tests run jitted and not (chex variants). Parameters are random (numpy draws into the
shapes given by `jax.eval_shape(model.init, ...)`, masked kernel entries included), so the masks, not init
values, are what makes Jacobians triangular. XLA compiles slowly here, so all tests share a few tiny shapes.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from iaf_jax import flows
from iaf_jax.flows import MADE, IAFFlow, IAFStep, PixelCNNNetwork

KEY = jax.random.PRNGKey(0)

# Shared tiny shapes. MADE: z [B, k], context [B, c]; PixelCNN: z [B, H, W, C], context map [B, H, W, c].
B = 3
K, C_VEC, MADE_HIDDEN = 5, 3, (10, 10)            # sequential degrees, widths >= k
PIX_SHAPE, C_MAP, PIX_HIDDEN = (3, 3, 2), 2, (4,)  # hidden widths are multiples of C


def random_params(model, *args, seed=0):
  """Random parameters of `model`: kernels N(0.3, 1), weight-norm scales N(1, 0.5), biases N(0, 0.5)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, KEY, *args)

  def draw(path, s):
    name = path[-1].key
    loc, scale = {"kernel": (0.3, 1.0), "scale": (1.0, 0.5), "bias": (0.0, 0.5)}[name]
    return (loc + scale * rng.normal(size=s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(kind, seed=1):
  rng = np.random.default_rng(seed)
  if kind == "made":
    z, h = rng.normal(size=(B, K)), rng.normal(size=(B, C_VEC))
  else:
    z, h = rng.normal(size=(B, *PIX_SHAPE)), rng.normal(size=(B, *PIX_SHAPE[:2], C_MAP))
  return z.astype(np.float32), h.astype(np.float32)


def make_step(kind, learnt_sigma=True, reverse=False):
  hidden = MADE_HIDDEN if kind == "made" else PIX_HIDDEN
  return IAFStep(kind=kind, hidden=hidden, learnt_sigma=learnt_sigma, reverse=reverse, kernel_size=3)


def make_flow(kind, depth, learnt_sigma=True):
  hidden = MADE_HIDDEN if kind == "made" else PIX_HIDDEN
  return IAFFlow(depth=depth, kind=kind, hidden=hidden, learnt_sigma=learnt_sigma, kernel_size=3)


def per_example_blocks(jac, batch, dim):
  """Full batch Jacobian [B, ..., B, ...] -> per-example blocks [B, D, D] (row-major flatten of the event)."""
  jac = np.asarray(jac).reshape(batch, dim, batch, dim)
  for a in range(batch):
    for b in range(batch):
      if a != b:
        assert not jac[a, :, b, :].any(), "examples of a batch must not influence each other"
  return np.stack([jac[b, :, b, :] for b in range(batch)])


def strictly_upper(m):
  return np.triu(m, 1)


def strictly_lower(m):
  return np.tril(m, -1)


def assert_triangular(blocks, reverse):
  """Forward order: dz'_j/dz_i = 0 for i > j (lower triangular); reversed: upper triangular."""
  for m in blocks:
    zero_part, live_part = (strictly_lower(m), strictly_upper(m)) if reverse else (strictly_upper(m), strictly_lower(m))
    np.testing.assert_array_equal(zero_part, 0.0)
    assert np.count_nonzero(live_part) > 0, "the step must not be merely elementwise"


def network_sigma(kind, params, z, h, reverse):
  """sigma = sigmoid(s + SIGMA_BIAS) of Eq. 11 from the step's own autoregressive network, in z's order."""
  axes = (-1,) if kind == "made" else (-3, -2, -1)
  flip = (lambda a: np.flip(a, axes)) if reverse else (lambda a: a)
  if kind == "made":
    net, sub, ctx = MADE(MADE_HIDDEN, 2), "MADE_0", h
  else:
    net, sub, ctx = PixelCNNNetwork(PIX_HIDDEN, 3, 2), "PixelCNNNetwork_0", flip(h)
  out = np.asarray(_net_apply(net, {"params": params["params"][sub]}, flip(z), ctx))
  return flip(1.0 / (1.0 + np.exp(-(out[..., 1].astype(np.float64) + flows.SIGMA_BIAS))))


def _jac_and_output(module, params, z, h):
  """(d module(z, h)[0] / dz, module(z, h)). Module-level with the module static, so jit caches are shared."""
  return jax.jacfwd(lambda zz: module.apply(params, zz, h)[0])(z), module.apply(params, z, h)


# the same function jitted: shares jit caches with the chex with_jit variant of the same (module, shapes)
jac_and_output = jax.jit(_jac_and_output, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _net_apply(net, params, z, h):
  return net.apply(params, z, h)


@functools.partial(jax.jit, static_argnums=0)
def context_jacobian(module, params, z, h):
  """d module(z, h)[0] / dh."""
  return jax.jacfwd(lambda hh: module.apply(params, z, hh)[0])(h)


@functools.partial(jax.jit, static_argnums=0)
def made_jacobians(made, params, z, h):
  """(d MADE(z, h) / dz, d MADE(z, h) / dh); h may be None."""
  f = lambda zz, hh: made.apply(params, zz, hh) if hh is not None else made.apply(params, zz)
  if h is None:
    return jax.jacfwd(f)(z, None), None
  return jax.jacfwd(f, argnums=(0, 1))(z, h)


def slogdet_per_example(blocks):
  sign, logabs = jnp.linalg.slogdet(jnp.asarray(blocks))
  return np.asarray(sign), np.asarray(logabs)


# ----------------------------------------------------------------------------- one IAF step


class IAFStepJacobianTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=("made", "pixelcnn"), learnt_sigma=(True, False), reverse=(False, True))
  def test_step_jacobian_triangular_diag_sigma_and_logdet(self, kind, learnt_sigma, reverse):
    step = make_step(kind, learnt_sigma, reverse)
    z, h = inputs(kind, seed=2 + reverse)
    params = random_params(step, z, h, seed=10 + 2 * learnt_sigma + reverse)

    jac, (_, log_det) = self.variant(_jac_and_output, static_argnums=0)(step, params, z, h)
    dim = int(np.prod(z.shape[1:]))
    blocks = per_example_blocks(jac, B, dim)
    assert log_det.shape == (B,)
    assert_triangular(blocks, reverse)
    diag = np.stack([np.diag(m) for m in blocks])
    if learnt_sigma:
      sigma = network_sigma(kind, params, z, h, reverse).reshape(B, dim)
      np.testing.assert_allclose(diag, sigma, rtol=1e-5, atol=1e-6)
      assert np.all(diag > 0) and np.all(diag < 1)
      assert np.ptp(diag) > 1e-2, "random parameters should give varied sigmas"
    else:
      np.testing.assert_array_equal(diag, 1.0)
      np.testing.assert_array_equal(log_det, 0.0)
    sign, logabs = slogdet_per_example(blocks)
    np.testing.assert_array_equal(sign, 1.0)
    np.testing.assert_allclose(log_det, logabs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["made", "pixelcnn"])
def test_step_output_depends_on_context(kind, reverse):
  step = make_step(kind, reverse=reverse)
  z, h = inputs(kind, seed=4)
  params = random_params(step, z, h, seed=5)
  jac = np.asarray(context_jacobian(step, params, z, h))
  dim, cdim = int(np.prod(z.shape[1:])), int(np.prod(h.shape[1:]))
  jac = jac.reshape(B, dim, B, cdim)
  for b in range(B):
    per_output = np.abs(jac[b, :, b, :]).sum(axis=1)
    assert np.all(per_output > 0), "every output must see the context"


@pytest.mark.parametrize("reverse", [False, True])
def test_pixelcnn_context_map_stays_aligned_with_z(reverse):
  """With 1x1 kernels output pixel p sees the context at p only, also when the step runs reversed."""
  step = IAFStep(kind="pixelcnn", hidden=PIX_HIDDEN, reverse=reverse, kernel_size=1)
  z, h = inputs("pixelcnn", seed=6)
  params = random_params(step, z, h, seed=7)
  jac = np.asarray(context_jacobian(step, params, z, h))  # [B,H,W,C,B,H,W,c]
  H, W, _ = PIX_SHAPE
  for b in range(B):
    for p in np.ndindex(H, W):
      for q in np.ndindex(H, W):
        block = jac[b, p[0], p[1], :, b, q[0], q[1], :]
        if p == q:
          assert np.all(np.abs(block).sum(axis=1) > 0), (p, q)
        else:
          assert not block.any(), f"output pixel {p} sees context pixel {q}"


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["made", "pixelcnn"])
def test_step_without_hidden_layers(kind, reverse):
  """hidden=(): a single masked layer (MADE output mask / PixelCNN type A) is still autoregressive."""
  step = IAFStep(kind=kind, hidden=(), reverse=reverse, kernel_size=3)
  z, h = inputs(kind, seed=8)
  params = random_params(step, z, h, seed=9)
  jac, (_, log_det) = jac_and_output(step, params, z, h)
  blocks = per_example_blocks(jac, B, int(np.prod(z.shape[1:])))
  assert_triangular(blocks, reverse)
  np.testing.assert_allclose(log_det, slogdet_per_example(blocks)[1], rtol=1e-4, atol=1e-4)


def test_unknown_network_kind_raises():
  with pytest.raises(ValueError):
    IAFStep(kind="wavenet", hidden=(4,)).init(KEY, *inputs("made"))


# ----------------------------------------------------------------------------- stacked flows


FLOW_CASES = [
    dict(testcase_name=f"{kind}_depth{depth}_{'learnt' if ls else 'const'}", kind=kind, depth=depth, learnt_sigma=ls)
    for kind, depth, ls in (("made", 2, True), ("made", 3, True), ("made", 2, False), ("pixelcnn", 2, True),
                            ("pixelcnn", 3, True))
]


class IAFFlowJacobianTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*FLOW_CASES)
  def test_flow_logdet_and_per_step_triangularity(self, kind, depth, learnt_sigma):
    flow = make_flow(kind, depth, learnt_sigma)
    z, h = inputs(kind, seed=20 + depth)
    params = random_params(flow, z, h, seed=30 + depth + learnt_sigma)
    dim = int(np.prod(z.shape[1:]))
    assert sorted(params["params"]) == [f"step_{t}" for t in range(depth)]

    jac, (z_out, log_det) = self.variant(_jac_and_output, static_argnums=0)(flow, params, z, h)
    blocks = per_example_blocks(jac, B, dim)
    sign, logabs = slogdet_per_example(blocks)
    np.testing.assert_array_equal(sign, 1.0)
    np.testing.assert_allclose(log_det, logabs, rtol=1e-4, atol=1e-4)
    if not learnt_sigma:
      np.testing.assert_array_equal(log_det, 0.0)
    # With reversal the flow's Jacobian is full: non-zero on both sides of the diagonal.
    assert all(np.count_nonzero(strictly_upper(m)) and np.count_nonzero(strictly_lower(m)) for m in blocks)

    # Replay the flow step by step with each step's own parameters: step t runs reversed iff t is odd.
    zt, total = z, np.zeros(B)
    for t in range(depth):
      step = make_step(kind, learnt_sigma, reverse=bool(t % 2))
      step_params = {"params": params["params"][f"step_{t}"]}
      sj, (z_next, ld) = jac_and_output(step, step_params, zt, h)
      step_blocks = per_example_blocks(sj, B, dim)
      assert_triangular(step_blocks, reverse=bool(t % 2))
      np.testing.assert_allclose(ld, slogdet_per_example(step_blocks)[1], rtol=1e-4, atol=1e-4)
      zt, total = np.asarray(z_next), total + np.asarray(ld)
    np.testing.assert_allclose(z_out, zt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(log_det, total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["made", "pixelcnn"])
def test_depth0_flow_is_identity(kind):
  flow = make_flow(kind, 0)
  z, h = inputs(kind, seed=40)
  variables = flow.init(KEY, z, h)
  assert not jax.tree_util.tree_leaves(variables)
  z_out, log_det = flow.apply(variables, z, h)
  np.testing.assert_array_equal(z_out, z)
  assert log_det.shape == (B,)
  np.testing.assert_array_equal(log_det, 0.0)


def test_negative_depth_raises():
  with pytest.raises(ValueError):
    make_flow("made", -1).init(KEY, *inputs("made"))


# ----------------------------------------------------------------------------- MADE network by gradients


@pytest.mark.parametrize("hidden_degrees", ["sequential", "random"])
@pytest.mark.parametrize("with_context", [False, True])
@pytest.mark.parametrize("r", [1, 2])
def test_made_network_gradients_are_autoregressive(hidden_degrees, with_context, r):
  made = MADE(MADE_HIDDEN, num_outputs_per_latent=r, hidden_degrees=hidden_degrees, seed=3)
  z, h = inputs("made", seed=50)
  args = (z, h) if with_context else (z,)
  params = random_params(made, *args, seed=51)
  out_shape = jax.eval_shape(made.apply, params, *args).shape
  assert out_shape == (B, K, r)

  jac, cjac = made_jacobians(made, params, z, h if with_context else None)
  jac = np.asarray(jac)  # [B, K, r, B, K]
  nz = np.abs(jac) > 0
  for b in range(B):
    for j in range(K):
      for i in range(K):
        if i >= j:
          assert not nz[b, j, :, b, i].any(), f"d out_{j} / d z_{i} must be 0 for i >= j"
  some_lower = [nz[b, j, rr, b, i] for b in range(B) for j in range(K) for i in range(j) for rr in range(r)]
  assert any(some_lower)
  if hidden_degrees == "sequential":
    assert all(some_lower), "with sequential degrees and widths >= k every i < j is connected"
  if with_context and hidden_degrees == "sequential":
    cjac = np.asarray(cjac)  # [B, K, r, B, c]
    for b in range(B):
      assert np.all(np.abs(cjac[b, :, :, b, :]).sum(axis=-1) > 0), "every output must see the context"


@pytest.mark.parametrize("kind", ["made", "pixelcnn"])
def test_context_repeats_is_the_flow_of_the_tiled_context(kind):
  """IAFFlow(z, h, context_repeats=r), z holding r sample-major copies of h's rows (importance sampling: one
  context per image, K samples): the same z' and log-det as with the context tiled (objectives.tile_samples)."""
  from iaf_jax.objectives import tile_samples
  r = 4
  flow = make_flow(kind, depth=2)
  z, h = inputs(kind, seed=60)
  zk = np.asarray(jax.random.normal(jax.random.PRNGKey(61), (r * B,) + z.shape[1:]))
  hk = tile_samples(h, r)
  params = random_params(flow, zk, hk, seed=62)
  want = flow.apply(params, zk, hk)
  got = flow.apply(params, zk, h, r)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
