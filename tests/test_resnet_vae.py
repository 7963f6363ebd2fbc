"""Tests of the bidirectional-inference ResNet VAE (iaf_jax/models/resnet_vae.py) and configs/cifar10.py.

Models are tiny (h_size 8, z_size 4, 8x8 images) so that the XLA compiles, which dominate the time on CPU,
stay short. Keys for the tiny models are 'rbg' keys (cheaper to compile on CPU than the threefry
expansion); one test runs the model with the classic uint32 PRNGKey too.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iaf_jax import config_lib, objectives
from iaf_jax.models import build_model
from iaf_jax.models.resnet_vae import ResNetVAE, build_resnet_vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rkey(seed):
  return jax.random.key(seed, impl="rbg")


def structured_images(n, hw=8, c=3, seed=0):
  """uint8-valued float images with structure: per-image colour ramps plus stripes, a little noise."""
  rng = np.random.RandomState(seed)
  yy, xx = np.meshgrid(np.arange(hw), np.arange(hw), indexing="ij")
  imgs = []
  for i in range(n):
    colour = rng.uniform(0.2, 1.0, size=c)
    ramp = (xx if i % 2 else yy) / (hw - 1)
    stripes = ((xx + yy + i) % 3 == 0).astype(float)
    img = 255 * (0.6 * ramp[..., None] * colour + 0.3 * stripes[..., None])
    imgs.append(img + rng.randint(-4, 5, size=img.shape))
  return jnp.asarray(np.clip(np.round(np.stack(imgs)), 0, 255), jnp.float32)


TINY = dict(image_shape=(8, 8, 3), h_size=8, z_size=4, depth=2, num_blocks=1, iaf=True)


TINY_MODEL = ResNetVAE(**TINY)


@pytest.fixture(scope="module")
def tiny():
  x = structured_images(8)
  params = jax.jit(TINY_MODEL.init)(rkey(0), x, rkey(1))
  return TINY_MODEL, params, x


@jax.jit
def tiny_loss_and_grad(params, x, key, free_bits, recon_weight):
  """recon_weight * E[-log p(x|z)] + objectives.free_bits_kl(kl_per_group, free_bits) of TINY_MODEL, and its
  gradient. free_bits = -inf gives the plain negative ELBO; recon_weight = 0 the free-bits KL term alone.
  (One compiled function for the free-bits and the training tests.)"""
  def loss(p):
    terms = TINY_MODEL.apply(p, x, key)
    kl_term = objectives.free_bits_kl(terms["kl_per_group"], free_bits)
    return recon_weight * -jnp.mean(terms["log_px_given_z"]) + kl_term, terms["kl_per_group"]

  (value, kl), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return value, kl, grads


def elbo_of(out):
  return objectives.elbo(out["log_px_given_z"], out["log_pz"], out["log_qz"])


# ----------------------------------------------------------------------------- shapes and validation


@pytest.mark.parametrize("depth,num_blocks,hw", [(2, 2, 16), (2, 4, 16), (1, 20, 8)])
def test_output_shapes(depth, num_blocks, hw):
  model = ResNetVAE(image_shape=(hw, hw, 3), h_size=8, z_size=4, depth=depth, num_blocks=num_blocks, scan_rungs=True)
  batch = 3
  x = jax.ShapeDtypeStruct((batch, hw, hw, 3), jnp.float32)
  # Shapes only (abstract evaluation: no compile), which keeps the 20-rung case fast.
  out, params = jax.eval_shape(model.init_with_output, rkey(0), x, rkey(1))
  rungs = depth * num_blocks
  assert model.num_rungs == rungs
  # Runs of identical rungs are scanned: their parameters carry a leading axis, one slice per rung.
  stages = [v for k, v in params["params"].items() if k.startswith("stages_")]
  rungs_per_stage = [v["up_conv1"]["kernel"].shape[0] if v["up_conv1"]["kernel"].ndim == 5 else 1 for v in stages]
  assert sum(rungs_per_stage) == rungs
  if (depth, num_blocks) == (1, 20):
    assert rungs_per_stage == [19, 1]  # 19 identical rungs under the top one (which has no data init)
  for k in ("log_px_given_z", "log_pz", "log_qz"):
    assert out[k].shape == (batch,)
  assert out["kl_per_group"].shape == (batch, rungs)
  # Input conv strides 2; each level after the first halves the map again.
  expected = [(hw // 2 // 2 ** i, hw // 2 // 2 ** i, 4) for i in range(depth) for _ in range(num_blocks)]
  assert model.latent_shapes() == expected
  if rungs <= 4:
    zs, log_q = jax.eval_shape(lambda p, x, k: model.apply(p, x, k, method=ResNetVAE.posterior_sample),
                               params, x, rkey(2))
    assert log_q.shape == (batch,)
    assert [tuple(z.shape[1:]) for z in zs] == expected
    lw = jax.eval_shape(lambda p, x, k: model.apply(p, x, k, 5, method=ResNetVAE.log_weights), params, x, rkey(2))
    assert lw.shape == (5, batch)
    s = jax.eval_shape(lambda p, k: model.apply(p, k, 7, method=ResNetVAE.sample), params, rkey(3))
    assert s.shape == (7, hw, hw, 3)


def test_scanned_rungs_compute_what_unrolled_rungs_compute():
  """scan_rungs=True (one compiled body per run of identical rungs) is the unrolled model with its per-rung
  parameters stacked: same terms, same per-rung IAF."""
  kw = dict(image_shape=(4, 4, 2), h_size=4, z_size=2, depth=1, num_blocks=3, input_stride=1)
  unrolled, scanned = ResNetVAE(**kw, scan_rungs=False), ResNetVAE(**kw, scan_rungs=True)
  x = structured_images(3, hw=4, c=2)
  p_un = unrolled.init(rkey(0), x, rkey(1))["params"]
  p_sc = {k: v for k, v in p_un.items() if not k.startswith("rungs_")}
  p_sc["stages_0"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), p_un["rungs_0"], p_un["rungs_1"])
  p_sc["stages_1"] = p_un["rungs_2"]  # the top rung stands alone
  init_tree = jax.eval_shape(scanned.init, rkey(0), x, rkey(1))["params"]
  assert jax.tree_util.tree_structure(init_tree) == jax.tree_util.tree_structure(p_sc)
  out_un = unrolled.apply({"params": p_un}, x, rkey(2))
  out_sc = scanned.apply({"params": p_sc}, x, rkey(2))
  for k in out_un:
    np.testing.assert_allclose(out_sc[k], out_un[k], rtol=1e-5, atol=1e-4)
  # The same loss and gradients (the scanned rungs' convolutions have hand-written gradients: conv2d_explicit_grads).
  def neg_elbo(model):
    return lambda p: -jnp.mean(elbo_of(model.apply({"params": p}, x, rkey(2))))
  l_un, g_un = jax.value_and_grad(neg_elbo(unrolled))(p_un)
  l_sc, g_sc = jax.value_and_grad(neg_elbo(scanned))(p_sc)
  np.testing.assert_allclose(l_sc, l_un, rtol=1e-5)
  g_un_sc = {k: v for k, v in g_un.items() if not k.startswith("rungs_")}
  g_un_sc["stages_0"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), g_un["rungs_0"], g_un["rungs_1"])
  g_un_sc["stages_1"] = g_un["rungs_2"]
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_un))
  for a, b in zip(jax.tree_util.tree_leaves(g_sc), jax.tree_util.tree_leaves(g_un_sc)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  z, ctx = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 2)), jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
  for rung in range(3):
    a = unrolled.apply({"params": p_un}, rung, z, ctx, method=ResNetVAE.rung_flow)
    b = scanned.apply({"params": p_sc}, rung, z, ctx, method=ResNetVAE.rung_flow)
    for u, v in zip(a, b):
      np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def test_invalid_settings_raise():
  cfg = dict(h_size=12, z_size=8, depth=2, num_blocks=2, iaf=True)
  with pytest.raises(ValueError, match="multiple of z_size"):
    build_resnet_vae(cfg, (8, 8, 3))
  with pytest.raises(ValueError, match="multiple of z_size"):
    jax.eval_shape(ResNetVAE(image_shape=(8, 8, 3), **cfg).init, rkey(0),
                   jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32), rkey(1))
  build_resnet_vae(dict(cfg, iaf=False), (8, 8, 3))  # Gaussian rungs have no masks: any widths
  with pytest.raises(ValueError, match="divisible"):
    build_resnet_vae(dict(cfg, h_size=16), (10, 10, 3))  # 10 / (2 * 2) is not whole
  with pytest.raises(ValueError, match="likelihood"):
    build_resnet_vae(dict(cfg, h_size=16, likelihood="gaussian"), (8, 8, 3))


# ----------------------------------------------------------------------------- the IAF inside a rung


def test_rung_iaf_jacobian_is_triangular_and_logdet_matches(tiny):
  model, params, _ = tiny
  rung = 0  # a 4x4x4 latent map: 64 latents
  h, w, c = model.latent_shapes()[rung]
  kz, kc = jax.random.split(jax.random.PRNGKey(rung))
  z = jax.random.normal(kz, (1, h, w, c))
  ctx = jax.random.normal(kc, (1, h, w, model.h_size))

  def flat_flow(zf):
    zn, log_det = model.apply(params, rung, zf.reshape(1, h, w, c), ctx, method=ResNetVAE.rung_flow)
    return zn.reshape(-1), log_det[0]

  jac, log_det = jax.jit(lambda zf: (jax.jacfwd(lambda a: flat_flow(a)[0])(zf), flat_flow(zf)[1]))(z.reshape(-1))
  jac = np.asarray(jac, np.float64)
  d = h * w * c
  assert jac.shape == (d, d)
  # Raster order over pixels, channel order within a pixel (a C-order flatten of [h, w, c]): output i may
  # depend on inputs j <= i only.
  assert np.all(jac[np.triu_indices(d, k=1)] == 0.0)
  assert np.abs(jac[np.tril_indices(d, k=-1)]).max() > 1e-4  # the flow is not merely elementwise
  assert np.all(np.diag(jac) > 0)
  sign, logabsdet = np.linalg.slogdet(jac)
  assert sign == 1.0
  np.testing.assert_allclose(float(log_det), logabsdet, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- ELBO terms, free bits


def test_terms_consistent_across_protocol_methods(tiny):
  model, params, x = tiny

  per_channel = ResNetVAE(**TINY, kl_groups="channel")  # same parameters, free-bits groups per latent channel

  def run(p, x, k):
    out = model.apply(p, x, k)
    zs, log_q = model.apply(p, x, k, method=ResNetVAE.posterior_sample)
    log_px = model.apply(p, x, zs, method=ResNetVAE.log_likelihood)
    log_pz = model.apply(p, zs, method=ResNetVAE.log_prior)
    return out, (log_px, log_pz, log_q), per_channel.apply(p, x, k)["kl_per_group"]

  out, (log_px, log_pz, log_q), kl_channels = jax.jit(run)(params, x, rkey(5))
  assert out["kl_per_group"].shape == (x.shape[0], model.num_rungs)
  for v in out.values():
    assert np.all(np.isfinite(v))
  kl = out["log_qz"] - out["log_pz"]
  np.testing.assert_allclose(out["kl_per_group"].sum(axis=1), kl, rtol=1e-5, atol=1e-3)
  z = model.z_size
  assert kl_channels.shape == (x.shape[0], model.num_rungs * z)
  for r in range(model.num_rungs):  # rung-major: the channels of rung r sum to rung r's KL
    np.testing.assert_allclose(kl_channels[:, r * z:(r + 1) * z].sum(axis=1), out["kl_per_group"][:, r],
                               rtol=1e-5, atol=1e-3)
  # The same key gives the same latents: the pieces reproduce __call__'s terms.
  np.testing.assert_allclose(log_px, out["log_px_given_z"], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(log_pz, out["log_pz"], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(log_q, out["log_qz"], rtol=1e-5, atol=1e-3)
  # A fresh key gives different latents.
  out2, _, _ = jax.jit(run)(params, x, rkey(6))
  assert not np.allclose(out2["log_qz"], out["log_qz"])


def test_log_q_is_the_density_of_the_posterior_samples():
  """E_{z~q}[p(z) / q(z)] = 1 for the normalised prior p: log q(z|x), IAF log-det included, is the density of
  the samples the model draws. One rung with a 1x1x2 latent map (the IAF couples its two channels)."""
  model = ResNetVAE(image_shape=(2, 2, 3), h_size=4, z_size=2, depth=1, num_blocks=1, iaf=True)
  x = structured_images(2, hw=2)
  params = jax.jit(model.init)(rkey(0), x, rkey(1))
  n = 8192

  @jax.jit
  def log_ratio(p, k):
    xs = jnp.broadcast_to(x[:1], (n,) + x.shape[1:])
    zs, log_q = model.apply(p, xs, k, method=ResNetVAE.posterior_sample)
    return model.apply(p, zs, method=ResNetVAE.log_prior) - log_q

  lr = np.asarray(log_ratio(params, rkey(2)), np.float64)
  w = np.exp(lr)
  assert abs(w.mean() - 1.0) < max(0.03, 5 * w.std() / np.sqrt(n)), (w.mean(), w.std())
  assert lr.std() > 1e-3  # q is not the prior itself


def test_free_bits_per_rung(tiny):
  model, params, x = tiny
  key = rkey(7)

  def fb_grad(lam):  # the free-bits KL term alone and its gradient
    value, kl_mat, grads = tiny_loss_and_grad(params, x, key, lam, 0.0)
    return value, kl_mat, grads

  _, kl_mat, g_all = fb_grad(0.0)
  kl = np.asarray(kl_mat).mean(axis=0)
  assert kl.shape == (model.num_rungs,) and np.all(kl > 0)
  for lam in (0.0, float(kl.mean()), float(kl.max()) + 1.0):
    np.testing.assert_allclose(fb_grad(lam)[0], np.maximum(lam, kl).sum(), rtol=1e-5)
  # Rung 0 (the bottom one) has parameters that feed no other rung's KL: its IAF step and its top-down conv
  # (whose h_det goes on to the decoder only). Through them the KL term has a gradient at lambda = 0 ...
  own = lambda g: [g["params"]["rungs_0"]["iaf_step"], g["params"]["rungs_0"]["down_conv1"]]
  max_abs = lambda tree: max(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(tree))
  assert max_abs(own(g_all)) > 0
  # ... and none once rung 0's mean KL is below lambda: free bits cut the gradient of that rung's KL.
  lam = float(kl[0]) * 1.01 + 1e-3
  _, _, g_fb = fb_grad(lam)
  assert max_abs(own(g_fb)) == 0.0
  if kl[1] > lam:  # rung 1 is still above lambda: its KL still trains the shared parameters
    assert max_abs(g_fb) > 0
  # With lambda above every rung's mean KL, the KL term has no gradient at all.
  _, _, g_none = fb_grad(float(kl.max()) + 1.0)
  assert max_abs(g_none) == 0.0


# ----------------------------------------------------------------------------- importance sampling


def test_log_weights_match_elbo_and_bound(tiny):
  model, params, x = tiny
  n, b = 32, x.shape[0]
  tile = lambda a: jnp.broadcast_to(a, (n,) + a.shape).reshape(-1, *a.shape[1:])
  lw_fn = jax.jit(lambda p, x, k: model.apply(p, x, k, n, method=ResNetVAE.log_weights))
  elbo_fn = jax.jit(lambda p, x, k: elbo_of(model.apply(p, tile(x), k)).reshape(n, b))
  lw = np.asarray(lw_fn(params, x, rkey(11)), np.float64)
  assert lw.shape == (n, b) and np.all(np.isfinite(lw))
  # Same key: the K samples are exactly the single-sample ELBOs of the K-times tiled batch (the bottom-up
  # pass is shared, all rungs are sampled jointly per sample).
  np.testing.assert_allclose(lw, elbo_fn(params, x, rkey(11)), rtol=1e-4, atol=1e-2)
  assert np.all(lw.std(axis=0) > 0)
  # Fresh keys: the mean log weight and the mean ELBO estimate the same number.
  elbos = np.concatenate([np.asarray(elbo_fn(params, x, rkey(100 + i))) for i in range(4)])
  diff = lw.mean(axis=0) - elbos.mean(axis=0)
  se = np.sqrt(lw.var(axis=0) / n + elbos.var(axis=0) / len(elbos))
  assert np.all(np.abs(diff) < 5 * se + 1e-3), (diff, se)
  # The importance-sampled estimate bounds the ELBO from above (Jensen), for these samples and on average.
  is_est = jax.nn.logsumexp(lw, axis=0) - math.log(n)
  assert np.all(is_est >= lw.mean(axis=0))
  assert np.all(is_est >= elbos.mean(axis=0) - 5 * se)


# ----------------------------------------------------------------------------- the likelihood


def test_uniform_model_is_8_bits_per_dim():
  d = 8 * 8 * 3
  assert objectives.nats_to_bits_per_dim(d * math.log(256), d) == pytest.approx(8.0, abs=1e-12)


@pytest.mark.parametrize("decoder", ["shared", "per_subpixel", "mixture", "bernoulli"])
def test_decoder_likelihood_normalises(decoder):
  kw = dict(image_shape=(1, 1, 1), h_size=4, z_size=2, depth=1, num_blocks=1, input_stride=1, iaf=False)
  if decoder == "per_subpixel":
    kw["shared_log_scale"] = False
  elif decoder == "mixture":
    kw["mixture_components"] = 3
  elif decoder == "bernoulli":
    kw["likelihood"] = "bernoulli"
  model = ResNetVAE(**kw)
  values = 2 if decoder == "bernoulli" else 256
  x_init = jnp.asarray(np.random.RandomState(0).randint(0, values, (4, 1, 1, 1)), jnp.float32)
  score = lambda m, x, h: m._log_px(x, m.decode(h))  # the model's own decoder and likelihood
  # Initialise only what the decoder uses (data-dependent init on random feature maps).
  h_init = jax.random.normal(jax.random.PRNGKey(9), (4, 1, 1, model.h_size))
  params = jax.jit(lambda k: model.init(k, x_init, h_init, method=score))(rkey(0))
  if decoder == "shared":  # a sharp logistic, so the test is not trivially flat
    params = jax.tree_util.tree_map(lambda a: a, params)
    params["params"]["dec_log_stdv"] = jnp.asarray(-4.0)
  x_all = jnp.arange(values, dtype=jnp.float32).reshape(values, 1, 1, 1)

  def log_probs(p, h):
    h = jnp.broadcast_to(h, (values, 1, 1, model.h_size))  # one decoder output, scored at every value
    return model.apply(p, x_all, h, method=score)

  for seed in range(3):
    h = 3.0 * jax.random.normal(jax.random.PRNGKey(seed), (1, 1, 1, model.h_size))
    lp = jax.jit(log_probs)(params, h)
    assert lp.shape == (values,)
    np.testing.assert_allclose(float(jax.nn.logsumexp(lp)), 0.0, atol=1e-4)
    if decoder != "bernoulli":
      assert float(jnp.max(lp)) > math.log(2.0 / 256)  # mass is concentrated, not uniform


def test_decoder_pushed_below_black_is_pulled_back(tiny):
  """A decoder whose logistic mean sits far below the black level (what mostly-background data pushes it to)
  still gets a gradient of order 1/scale per bright pixel pulling the mean back up. A bounded mean (clip or
  tanh, as this project had) gives ~0 there, and a Fashion-MNIST run got stuck at all-black images."""
  model, params, x = tiny
  params = jax.tree_util.tree_map(lambda a: a, params)
  params["params"]["x_dec"]["bias"] = jnp.full_like(params["params"]["x_dec"]["bias"], -20.0)

  def recon_nll(bias):
    p = dict(params["params"], x_dec=dict(params["params"]["x_dec"], bias=bias))
    return -jnp.mean(model.apply({"params": p}, x, rkey(5))["log_px_given_z"])

  grad = jax.jit(jax.grad(recon_nll))(params["params"]["x_dec"]["bias"])
  bright = float(jnp.mean(jnp.sum(x > 0, axis=(1, 2))))  # bright sub-pixels per channel per image
  scale = math.exp(float(params["params"]["dec_log_stdv"]))
  # d(-log p)/d(mean) = -1/scale for every pixel far above the mean: the bias gradient is -bright/scale.
  np.testing.assert_allclose(np.asarray(grad), -bright / scale, rtol=0.05)


# ----------------------------------------------------------------------------- training, sampling


def test_tiny_model_overfits_a_few_images(tiny):
  model, params, x = tiny
  d = int(np.prod(x.shape[1:]))
  # Adamax as in [H], at a higher rate than its 0.01 so that 250 steps suffice (the shared log-scale starts at 0).
  opt = optax.adamax(0.03)
  state = opt.init(params)
  update = jax.jit(lambda g, s, p: opt.update(g, s, p))

  losses = []
  for i in range(250):
    loss, _, grads = tiny_loss_and_grad(params, x, rkey(1000 + i), -np.inf, 1.0)  # the negative ELBO
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(float(loss))
  bpd = [objectives.nats_to_bits_per_dim(l, d) for l in losses]
  assert np.all(np.isfinite(bpd))
  initial, final = np.mean(bpd[:5]), np.mean(bpd[-10:])
  assert final < 0.7 * initial, (initial, final)


def test_sample_and_reconstruct(tiny):
  model, params, x = tiny
  sample = jax.jit(lambda p, k: model.apply(p, k, 6, method=ResNetVAE.sample))
  a, b, c = sample(params, rkey(3)), sample(params, rkey(3)), sample(params, rkey(4))
  assert a.shape == (6, 8, 8, 3)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # The classic uint32 key works as well.
  rec = jax.jit(lambda p, x, k: model.apply(p, x, k, method=ResNetVAE.reconstruct))(params, x, jax.random.PRNGKey(0))
  assert rec.shape == x.shape and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0


# ----------------------------------------------------------------------------- configs/cifar10.py


def load_config_module(name):
  """configs/{name}.py through the tools' loader (by path, as ml_collections' config_flags does)."""
  return config_lib.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


def flat_keys(cfg, prefix=""):
  keys = set()
  for k, v in cfg.items():
    if hasattr(v, "items"):
      keys |= flat_keys(v, f"{prefix}{k}.")
    else:
      keys.add(f"{prefix}{k}")
  return keys


EXPECTED_RUNGS = {"rungs4_gauss": 4, "rungs4_iaf": 4, "rungs8_gauss": 8, "rungs8_iaf": 8, "rungs20_gauss": 20,
                  "rungs20_iaf": 20}
BASELINE_NAMES = ("baseline_diag", "baseline_iaf_d2_w320", "baseline_iaf_d2_w1920", "baseline_iaf_d4_w1920",
                  "baseline_iaf_d8_w1920")


def test_cifar10_configs():
  cifar, mnist = load_config_module("cifar10"), load_config_module("mnist")
  assert set(cifar.NAMES) == set(BASELINE_NAMES) | set(EXPECTED_RUNGS)
  structure = flat_keys(cifar.get_config(cifar.NAMES[0]))
  assert flat_keys(mnist.base_config()) <= structure
  for name in cifar.NAMES:
    cfg = cifar.get_config(name)
    assert cfg.name == name and cfg.data.name == "cifar10" and cfg.data.validation_size == 5000
    assert cfg.model.likelihood == "logistic" and cfg.eval.num_samples == 128
    assert flat_keys(cfg) == structure, name
    model = build_model(cfg.model, (32, 32, 3))
    if name in BASELINE_NAMES:
      assert cfg.model.kind == "mnist_vae" and type(model).__name__ == "MnistVAE"
      depth, width, _ = mnist.ROWS[name[len("baseline_"):]]
      assert (model.iaf_depth, model.iaf_width) == (depth, width)
    else:
      assert cfg.model.kind == "resnet_vae" and isinstance(model, ResNetVAE)
      assert model.num_rungs == EXPECTED_RUNGS[name]
      assert model.iaf == name.endswith("_iaf")
      assert (model.h_size, model.z_size, model.input_stride) == (160, 32, 2)
      assert cfg.train.free_bits == 0.25 and cfg.train.batch_size == 128 and cfg.train.ema_decay == 0.999
  with pytest.raises(ValueError, match="rungs4_iaf"):
    cifar.get_config("rungs5_iaf")


def test_cifar10_resnet_builds_at_full_size():
  cifar = load_config_module("cifar10")
  cfg = cifar.get_config("rungs4_iaf")
  model = build_model(cfg.model, (32, 32, 3))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, rkey(0), x, rkey(1))
  out = jax.eval_shape(model.apply, params, x, rkey(2))
  assert out["kl_per_group"].shape == (2, 4)
  assert model.latent_shapes() == [(16, 16, 32)] * 2 + [(8, 8, 32)] * 2
  assert params["params"]["dec_log_stdv"].shape == ()


def test_first_adamax_steps_at_paper_width_keep_kl_near_its_start():
  """Issue #15's warning sign: at the paper's width (h_size 160, z_size 32) and openai/iaf's default rate
  (Adamax 0.01), the first updates must not throw the posterior far from the prior. With data-dependent init
  of the prior/posterior head (before the fix) the KL of these 8 steps reached 6e10 nats and then inf on these
  16x16 images; with the fix its peak was 7.7x its step-0 value. (The paper-size CIFAR-10 model before the fix:
  50,000 nats on average over its first 20 steps.)"""
  import ml_collections
  from iaf_jax import optim, train_lib

  images = structured_images(64, hw=16).astype(np.uint8)
  model = ResNetVAE(image_shape=(16, 16, 3), h_size=160, z_size=32, depth=2, num_blocks=2, iaf=True)
  tc = ml_collections.ConfigDict(dict(optimizer="adamax", learning_rate=0.01, b1=0.9, b2=0.999, grad_clip_norm=0.0))
  opt = optim.make_optimizer(tc)
  state = train_lib.init_state(model, opt, images[:16], 0, likelihood="logistic", max_value=255)
  step = jax.jit(train_lib.make_train_step(model, opt, likelihood="logistic", max_value=255, free_bits=0.25,
                                           ema_decay=0.999, fused_adamax=optim.fused_adamax(tc)))
  rng = np.random.RandomState(0)
  kls = []
  for _ in range(8):
    state, metrics = step(state, images[rng.randint(0, len(images), 16)])
    kls.append(float(metrics["kl"]))
  assert np.all(np.isfinite(kls)), kls
  assert max(kls) < 20 * kls[0], kls


def test_init_only_field_does_not_block_resuming(tmp_path):
  """model.head_data_init only sets the initialisation: a workdir saved before the field existed (or with the
  other value) resumes under today's config, while a change of architecture is still refused."""
  import json

  from iaf_jax import config_lib

  cfg = load_config_module("cifar10").get_config("rungs4_iaf")
  saved = config_lib.to_dict(cfg)
  del saved["model"]["head_data_init"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config_lib.check_config_compatible(cfg, str(tmp_path))  # no error
  with cfg.unlocked():
    cfg.model.head_data_init = True
  config_lib.check_config_compatible(cfg, str(tmp_path))
  with cfg.unlocked():
    cfg.model.h_size = 64
  with pytest.raises(config_lib.ConfigError, match="model.h_size"):
    config_lib.check_config_compatible(cfg, str(tmp_path))


def test_run_saved_unrolled_resumes_unrolled_under_the_scanned_default(tmp_path):
  """configs/cifar10.py now scans the rungs; rerunning the command of a run saved unrolled resumes it from its
  checkpoint (its saved scan_rungs wins: a parameter layout, the same model) instead of refusing it, and the run's
  config.json keeps its layout."""
  import json

  from iaf_jax import train_lib

  rng = np.random.default_rng(0)
  np.savez(tmp_path / "cifar10.npz", x_train=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
           x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
  workdir = str(tmp_path / "run")

  def config(num_steps, **model):
    c = load_config_module("cifar10").get_config("rungs4_iaf")
    with c.unlocked():
      c.data.dir, c.data.validation_size = str(tmp_path), 8
      c.model.h_size, c.model.z_size = 8, 2
      c.train.batch_size, c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 8, num_steps, 2, 2
      c.eval.valid_examples, c.eval.batch_size = 8, 8
      for k, v in model.items():
        c.model[k] = v
    return c

  assert config(2).model.scan_rungs  # the default
  train_lib.train_and_evaluate(config(2, scan_rungs=False), workdir)
  summary = train_lib.train_and_evaluate(config(4), workdir)
  assert summary["step"] == 4
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["scan_rungs"] is False
  steps = [json.loads(line).get("step") for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert max(steps) == 4
  # A change of the model itself is still refused.
  with pytest.raises(config_lib.ConfigError, match="model.h_size"):
    train_lib.train_and_evaluate(config(6, h_size=16), workdir)


def test_top_rung_head_runs_once_per_pass_and_rows_stay_independent(tiny):
  """h_top is the same for every row, so the top rung's head convolution runs at batch 1 (once per pass, not
  once per row), and each row's terms are what that row gives alone."""
  model, params, x = tiny
  zs, _ = model.apply(params, x, rkey(3), method=ResNetVAE.posterior_sample)
  log_pz = model.apply(params, zs, method=ResNetVAE.log_prior)
  log_px = model.apply(params, x, zs, method=ResNetVAE.log_likelihood)
  for i in (0, 5):
    one = [z[i:i + 1] for z in zs]
    np.testing.assert_allclose(model.apply(params, one, method=ResNetVAE.log_prior), log_pz[i:i + 1], rtol=1e-5)
    np.testing.assert_allclose(model.apply(params, x[i:i + 1], one, method=ResNetVAE.log_likelihood),
                               log_px[i:i + 1], rtol=1e-5)
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, rkey(4)))(params)
  conv_batches = [e.invars[0].aval.shape[0] for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert conv_batches.count(1) == 1 and all(b in (1, x.shape[0]) for b in conv_batches), conv_batches
