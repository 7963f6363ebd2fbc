"""The Appendix 6.1 model: shapes for any image size, the protocol's terms agree with each other."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import mnist
from iaf_jax import distributions as dist
from iaf_jax.models import build_model
from iaf_jax.models.mnist_vae import INITIAL_LOG_STD, MnistVAE

KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize("shape", [(28, 28, 1), (8, 8, 1), (13, 17, 1), (32, 32, 3)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "logistic"])
def test_full_size_model_shapes_follow_the_data(shape, likelihood):
  """The paper's architecture (8 IAF steps of width 1920) on any HxWxC, traced without compiling."""
  cfg = mnist.get_config("iaf_d8_w1920").model
  cfg.likelihood = likelihood
  model = build_model(cfg, shape)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  variables = jax.eval_shape(model.init, KEY, x, KEY)
  terms = jax.eval_shape(model.apply, variables, x, KEY)
  assert {k: v.shape for k, v in terms.items()} == {"log_px_given_z": (3,), "log_pz": (3,), "log_qz": (3,),
                                                     "kl_per_group": (3, 1)}
  assert jax.eval_shape(lambda v: model.apply(v, KEY, 5, method="sample"), variables).shape == (5, *shape)
  assert jax.eval_shape(lambda v, xx: model.apply(v, xx, KEY, 4, method="log_weights"), variables, x).shape == (4, 3)
  flow = variables["params"]["flow"]
  assert sorted(flow) == [f"step_{t}" for t in range(8)]
  # MADE with 2 hidden layers of width 1920 on 32 latents + the context (its own 200-unit layer, [C])
  assert cfg.context_dim == 200
  kernels = [l.shape for l in jax.tree_util.tree_leaves(flow["step_0"]) if l.ndim == 2]
  assert sorted(kernels) == sorted([(32 + 200, 1920), (1920, 1920), (1920, 64)])


def _conv_kernels(tree):
  return [l.shape[:2] for l in jax.tree_util.tree_leaves(tree) if l.ndim == 4]


@pytest.mark.parametrize("block,convs_per_block", [("report", 1), ("two_conv", 2)])
def test_report_block_is_one_3x3_conv_per_block(block, convs_per_block):
  """[R] Appendix 6.1: each ResNet block is ONE 3x3 conv (plus a 1x1 shortcut where the shape changes), in the
  encoder and in the decoder's mirror; "two_conv" has two."""
  cfg = mnist.get_config("diag").model
  cfg.block = block
  model = build_model(cfg, (28, 28, 1))
  params = jax.eval_shape(model.init, KEY, jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32), KEY)["params"]
  n_blocks = len(cfg.channels)
  enc = [k for name, tree in params.items() if name.startswith("enc_blocks") for k in _conv_kernels(tree)]
  dec = [k for name, tree in params.items() if name.startswith("dec_blocks") for k in _conv_kernels(tree)]
  # shortcuts: 3 strided blocks + the first (1 -> 16 channels) ... in the encoder; the decoder mirrors them
  assert enc.count((3, 3)) == convs_per_block * n_blocks and dec.count((3, 3)) == convs_per_block * n_blocks
  assert enc.count((1, 1)) == 3 and dec.count((1, 1)) == 3


def test_report_identity_block_adds_elu_of_conv_to_its_input():
  """A 1-strided report block computes x + elu(conv(x)): with the conv's output forced to a constant c the
  block adds elu(c) to every input value."""
  from iaf_jax.models.mnist_vae import ReportResBlock
  blk = ReportResBlock(4, 1, weight_norm=False)
  x = jax.random.normal(KEY, (2, 5, 5, 4))
  v = blk.init(KEY, x)
  v = jax.tree_util.tree_map(jnp.zeros_like, v)
  v["params"]["MaskedConv2D_0"]["bias"] = jnp.full((4,), -0.7)
  np.testing.assert_allclose(blk.apply(v, x), x + (np.exp(-0.7) - 1.0), rtol=1e-6)



@pytest.mark.parametrize("in_hw,out_hw", [((4, 4), (7, 7)), ((7, 7), (14, 14)), ((3, 5), (6, 9))])
def test_upsampled_shortcut_is_the_1x1_conv_of_the_upsampled_input(in_hw, out_hw):
  """The decoder's strided shortcut runs its 1x1 conv before the nearest-neighbour upsampling: the same
  data-dependent init and the same values as convolving the upsampled (and cropped) input."""
  import flax.linen as nn
  from iaf_jax.layers import Conv2D, nearest_upsample
  from iaf_jax.models.mnist_vae import _upsampled_shortcut

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return _upsampled_shortcut(x, 5, out_hw, True)

  class UpsampleFirst(nn.Module):
    @nn.compact
    def __call__(self, x):
      return Conv2D(5, 1)(nearest_upsample(x))[:, :out_hw[0], :out_hw[1], :]

  x = jax.random.normal(KEY, (3, *in_hw, 6))
  ours, ref = Ours().init(KEY, x), UpsampleFirst().init(KEY, x)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, ref)
  x2 = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  got = Ours().apply(ours, x2)
  assert got.shape == (3, *out_hw, 5)
  np.testing.assert_allclose(got, UpsampleFirst().apply(ours, x2), rtol=1e-5, atol=1e-5)

def _tiny(**kw):
  return MnistVAE(image_shape=(8, 8, 1), latent_dim=4, iaf_width=16, channels=(4, 8), strides=(2, 2),
                  hidden_dim=16, **kw)


def _binary(n=32):
  return (jax.random.uniform(jax.random.PRNGKey(5), (n, 8, 8, 1)) > 0.5).astype(jnp.float32)


def test_log_weights_are_the_single_sample_elbo():
  """Averaged over samples, log_weights and __call__ estimate the same ELBO (same estimator, two code paths)."""
  model, x = _tiny(iaf_depth=2), _binary(4)
  v = model.init(KEY, x, KEY)
  lw = model.apply(v, x, jax.random.PRNGKey(1), 2000, method="log_weights")
  t = jax.vmap(lambda k: model.apply(v, x, k))(jax.random.split(jax.random.PRNGKey(2), 2000))
  elbo = t["log_px_given_z"] + t["log_pz"] - t["log_qz"]
  se = jnp.std(lw, axis=0) / np.sqrt(2000)
  assert bool(jnp.all(jnp.abs(lw.mean(0) - elbo.mean(0)) < 5 * se + 1e-3))
  np.testing.assert_allclose(t["kl_per_group"][..., 0], t["log_qz"] - t["log_pz"], rtol=1e-5, atol=1e-5)


def test_posterior_density_is_base_minus_log_det():
  """log q(z_T|x) = log N(z0; mean, std) - sum of the IAF log-dets (Equation 10): with constant sigma the flow
  is volume preserving, so log q equals the base density of the same draw."""
  x = _binary(4)
  const = _tiny(iaf_depth=2, learnt_sigma=False)
  v = const.init(KEY, x, KEY)
  mean, log_std, _ = const.apply(v, x, method="encode")
  z0 = dist.diag_gaussian_sample(jax.random.PRNGKey(3), mean, log_std)
  _, log_q = const.apply(v, x, jax.random.PRNGKey(3), method="posterior_sample")
  np.testing.assert_allclose(log_q, dist.diag_gaussian_log_prob(z0, mean, log_std), rtol=1e-5)


@pytest.mark.parametrize("initial_log_std", [INITIAL_LOG_STD, -2.0])
def test_encoder_log_std_starts_at_its_offset_with_small_spread(initial_log_std):
  model, x = _tiny(iaf_depth=0, initial_log_std=initial_log_std), _binary(64)
  v = model.init(KEY, x, KEY)
  _, log_std, _ = model.apply(v, x, method="encode")
  assert abs(float(log_std.mean()) - initial_log_std) < 0.3 and float(log_std.std()) < 0.3


def test_depth_zero_is_the_diagonal_gaussian_baseline():
  model, x = _tiny(iaf_depth=0), _binary(4)
  v = model.init(KEY, x, KEY)
  assert "flow" not in v["params"] or not jax.tree_util.tree_leaves(v["params"]["flow"])
  mean, log_std, _ = model.apply(v, x, method="encode")
  z, log_q = model.apply(v, x, jax.random.PRNGKey(3), method="posterior_sample")
  np.testing.assert_allclose(z, dist.diag_gaussian_sample(jax.random.PRNGKey(3), mean, log_std), rtol=1e-6)
  np.testing.assert_allclose(log_q, dist.diag_gaussian_log_prob(z, mean, log_std), rtol=1e-6)


def test_wrong_image_shape_is_a_clear_error():
  model = _tiny()
  with pytest.raises(ValueError, match=r"expected images of shape \(8, 8, 1\)"):
    model.init(KEY, jnp.zeros((2, 9, 9, 1)), KEY)


def test_config_saved_before_the_new_fields_builds_the_model_it_trained():
  """A config.json written before model.block / context_dim / initial_log_std existed rebuilds the two-conv
  model with the hidden layer as context and the log-std offset -2 it was trained with."""
  cfg = mnist.get_config("diag").model
  for name in ("block", "context_dim", "initial_log_std"):
    del cfg[name]
  model = build_model(cfg, (28, 28, 1))
  assert (model.block, model.context_dim, model.initial_log_std) == ("two_conv", 0, -2.0)
