"""Tests of iaf_jax.layers: masked, weight-normalised dense/conv layers with data-dependent init.

XLA compiles slowly on the test machines, so random parameters are drawn with numpy into the shapes given by
`jax.eval_shape(model.init, ...)`, and each real `init` is one jitted call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iaf_jax import masks as masks_lib
from iaf_jax.layers import ConvTranspose2D, MaskedConv2D, MaskedDense

RNG_KEY = jax.random.PRNGKey(0)


def random_params(model, x, seed=0, scale=1.0):
  """Every parameter random (masked kernel entries too): only the mask can zero a connection."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, RNG_KEY, x)
  return jax.tree_util.tree_map(lambda s: (scale * rng.normal(size=s.shape) + 0.5).astype(np.float32), shapes)


def made_mask():
  # k=4 latents, 2 context inputs, 8 hidden: the context feeds every unit, so no column is empty.
  return masks_lib.made_masks(4, (8,), num_context=2)[0]  # [6, 8]


def conv_mask():
  return masks_lib.pixelcnn_mask(3, 2, 4, "B", num_groups=2)  # [3, 3, 2, 4]


def dense_input(seed=1, n=64):
  rng = np.random.default_rng(seed)
  # far from zero mean / unit scale, so normalisation has work to do
  return (3.0 + 5.0 * rng.normal(size=(n, 6)) * np.linspace(0.2, 2.0, 6)).astype(np.float32)


def conv_input(seed=2, n=16, hw=4, c=2):
  rng = np.random.default_rng(seed)
  return (-2.0 + 4.0 * rng.normal(size=(n, hw, hw, c))).astype(np.float32)


# ----------------------------------------------------------------------------- data-dependent init

INIT_CASES = [
    ("dense_masked", lambda s: MaskedDense(8, mask=made_mask(), init_scale=s), dense_input, 0.1),
    ("dense_plain", lambda s: MaskedDense(5, init_scale=s), dense_input, 1.0),
    ("conv_masked", lambda s: MaskedConv2D(4, 3, mask=conv_mask(), init_scale=s), conv_input, 1.0),
    ("conv_transpose", lambda s: ConvTranspose2D(3, 3, strides=2, init_scale=s), conv_input, 0.5),
]


@pytest.mark.parametrize("name,make,make_input,init_scale", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_data_dependent_init_normalises_the_init_batch(name, make, make_input, init_scale):
  """Salimans & Kingma: after init on a batch, every output unit has mean 0 and std init_scale on that batch."""
  layer = make(init_scale)
  x = make_input()

  @jax.jit
  def init_and_apply(key, x):
    params = layer.init(key, x)
    return params, layer.apply(params, x)

  params, y = init_and_apply(RNG_KEY, x)
  y = np.asarray(y, np.float64)
  axes = tuple(range(y.ndim - 1))
  assert set(params["params"]) == {"kernel", "scale", "bias"}
  np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-4 * max(1.0, init_scale))
  np.testing.assert_allclose(y.std(axis=axes), init_scale, rtol=2e-3)


def test_data_init_differs_from_batch_to_batch():
  """The init really depends on the data: another batch gives other scale/bias."""
  layer = MaskedDense(5)
  init = jax.jit(layer.init)
  p1 = init(RNG_KEY, dense_input(1))
  p2 = init(RNG_KEY, dense_input(2) * 3.0 + 1.0)
  np.testing.assert_array_equal(p1["params"]["kernel"], p2["params"]["kernel"])  # same key, same v
  assert not np.allclose(p1["params"]["scale"], p2["params"]["scale"])
  assert not np.allclose(p1["params"]["bias"], p2["params"]["bias"])


def test_init_without_data_init_uses_init_scale_and_zero_bias():
  layer = MaskedDense(5, data_init=False, init_scale=0.3)
  x = dense_input()
  params = jax.jit(layer.init)(RNG_KEY, x)["params"]
  np.testing.assert_allclose(params["scale"], 0.3)
  np.testing.assert_array_equal(params["bias"], 0.0)


# ----------------------------------------------------------------------------- masks and gradients

GRAD_CASES = [
    ("dense_wn", lambda: MaskedDense(8, mask=made_mask()), lambda: dense_input(n=5), made_mask),
    ("dense_plain", lambda: MaskedDense(8, mask=made_mask(), weight_norm=False), lambda: dense_input(n=5),
     made_mask),
    ("conv_wn", lambda: MaskedConv2D(4, 3, mask=conv_mask()), lambda: conv_input(n=3), conv_mask),
    ("conv_plain", lambda: MaskedConv2D(4, 3, mask=conv_mask(), weight_norm=False), lambda: conv_input(n=3),
     conv_mask),
]


@pytest.mark.parametrize("name,make,make_input,make_mask", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_masked_kernel_entries_get_zero_gradient(name, make, make_input, make_mask):
  layer, x, mask = make(), make_input(), make_mask()
  params = random_params(layer, x, seed=3)
  w = np.random.default_rng(4).normal(size=jax.eval_shape(layer.apply, params, x).shape).astype(np.float32)

  @jax.jit
  def grad_kernel(params):
    return jax.grad(lambda p: jnp.sum(layer.apply(p, x) * w))(params)["params"]["kernel"]

  g = np.asarray(grad_kernel(params))
  assert g.shape == mask.shape
  np.testing.assert_array_equal(g * (1.0 - mask), 0.0)
  assert np.all(np.abs(g[mask == 1.0]) > 0), "every kept entry should receive gradient"


@pytest.mark.parametrize("name,make,make_input,make_mask", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_masked_kernel_entries_do_not_affect_the_output(name, make, make_input, make_mask):
  layer, x, mask = make(), make_input(), make_mask()
  params = random_params(layer, x, seed=5)
  changed = jax.tree_util.tree_map(lambda a: a, params)
  kernel = np.array(params["params"]["kernel"])
  kernel[mask == 0.0] += 100.0 * np.random.default_rng(6).normal(size=int((mask == 0).sum()))
  changed["params"]["kernel"] = kernel.astype(np.float32)
  apply = jax.jit(layer.apply)
  np.testing.assert_array_equal(apply(params, x), apply(changed, x))
  # ... whereas a kept entry does
  kernel2 = np.array(params["params"]["kernel"])
  kernel2[tuple(np.argwhere(mask == 1.0)[0])] += 1.0
  changed["params"]["kernel"] = kernel2
  assert not np.allclose(apply(params, x), apply(changed, x))


# ----------------------------------------------------------------------------- weight normalisation


def test_weight_norm_output_invariant_to_kernel_rescaling_and_column_norm_is_scale():
  layer = MaskedDense(8, mask=made_mask())
  x = dense_input(n=5)
  params = random_params(layer, x, seed=7)
  apply = jax.jit(layer.apply)
  scaled = jax.tree_util.tree_map(lambda a: a, params)
  scaled["params"]["kernel"] = params["params"]["kernel"] * 7.5
  np.testing.assert_allclose(apply(params, x), apply(scaled, x), rtol=1e-5, atol=1e-5)
  # The effective weight (the Jacobian of the affine map) has column norms |g|.
  jac = np.asarray(jax.jacfwd(lambda xi: layer.apply(params, xi[None])[0])(x[0]))  # [out, in]
  np.testing.assert_allclose(np.linalg.norm(jac, axis=1), np.abs(params["params"]["scale"]), rtol=1e-4)
  assert np.all(jac.T[made_mask() == 0] == 0)


def test_dense_without_weight_norm_is_a_plain_masked_affine_map():
  layer = MaskedDense(8, mask=made_mask(), weight_norm=False)
  x = dense_input(n=5)
  shapes = jax.eval_shape(layer.init, RNG_KEY, x)
  assert set(shapes["params"]) == {"kernel", "bias"}
  params = jax.jit(layer.init)(RNG_KEY, x)
  np.testing.assert_array_equal(params["params"]["bias"], 0.0)
  params = random_params(layer, x, seed=8)
  kernel, bias = (np.asarray(params["params"][n], np.float64) for n in ("kernel", "bias"))
  expected = x.astype(np.float64) @ (kernel * made_mask()) + bias
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-4, atol=1e-4)


def test_dense_without_bias():
  layer = MaskedDense(5, use_bias=False, weight_norm=False)
  x = dense_input(n=5)
  params = random_params(layer, x, seed=8)
  assert set(params["params"]) == {"kernel"}
  np.testing.assert_allclose(layer.apply(params, x), x @ np.asarray(params["params"]["kernel"]), rtol=1e-4,
                             atol=1e-4)


def numpy_conv_same(x, w, stride=1):
  """Reference NHWC cross-correlation, HWIO kernel, SAME padding for odd kernels, stride 1."""
  kh, kw = w.shape[:2]
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros((n, h, wd, w.shape[-1]))
  for i in range(h):
    for j in range(wd):
      patch = xp[:, i:i + kh, j:j + kw, :]
      out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
  return out


def test_conv_without_weight_norm_is_a_plain_masked_convolution():
  layer = MaskedConv2D(4, 3, mask=conv_mask(), weight_norm=False)
  x = conv_input(n=3)
  params = random_params(layer, x, seed=9)
  assert set(params["params"]) == {"kernel", "bias"}
  kernel, bias = (np.asarray(params["params"][n], np.float64) for n in ("kernel", "bias"))
  expected = numpy_conv_same(x.astype(np.float64), kernel * conv_mask()) + bias
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-4, atol=1e-4)


def test_conv_with_weight_norm_matches_normalised_reference():
  """y = g * conv(x, v*mask / ||v*mask||) + b, the norm over (kh, kw, in) per output channel."""
  layer = MaskedConv2D(4, 3, mask=conv_mask())
  x = conv_input(n=3)
  params = random_params(layer, x, seed=10)
  p = {n: np.asarray(a, np.float64) for n, a in params["params"].items()}
  v = p["kernel"] * conv_mask()
  w = v / np.sqrt(np.sum(v ** 2, axis=(0, 1, 2)))
  expected = numpy_conv_same(x.astype(np.float64), w * p["scale"]) + p["bias"]
  np.testing.assert_allclose(layer.apply(params, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_transpose_upsamples(stride):
  layer = ConvTranspose2D(3, 3, strides=stride, weight_norm=False)
  x = conv_input(n=2)
  out = jax.eval_shape(layer.init_with_output, RNG_KEY, x)[0]
  assert out.shape == (2, 4 * stride, 4 * stride, 3)


def test_mask_shape_mismatch_raises():
  with pytest.raises(ValueError):
    MaskedDense(8, mask=np.ones((5, 8), np.float32)).init(RNG_KEY, dense_input(n=2))
  with pytest.raises(ValueError):
    MaskedConv2D(4, 3, mask=np.ones((3, 3, 3, 4), np.float32)).init(RNG_KEY, conv_input(n=2))


def numpy_conv_transpose_same(x, w, s):
  """The definition: the zero-dilated input (s-1 zeros between pixels), padded as lax.conv_transpose's SAME,
  correlated with w. x [B,H,W,C] float64, w [kh,kw,C,O]."""
  kh, kw = w.shape[:2]
  b, h, wd, c = x.shape
  dil = np.zeros((b, (h - 1) * s + 1, (wd - 1) * s + 1, c))
  dil[:, ::s, ::s] = x
  pads = []
  for k in (kh, kw):
    total = k + s - 2
    lo = k - 1 if s > k - 1 else -(-total // 2)
    pads.append((lo, total - lo))
  xp = np.pad(dil, ((0, 0), pads[0], pads[1], (0, 0)))
  out = np.zeros((b, h * s, wd * s, w.shape[-1]))
  for i in range(h * s):
    for j in range(wd * s):
      out[:, i, j] = np.einsum("bhwc,hwco->bo", xp[:, i:i + kh, j:j + kw], w)
  return out


@pytest.mark.parametrize("kernel,stride", [((3, 3), 2), ((5, 5), 2), ((4, 3), 2), ((3, 3), 1), ((2, 2), 3), ((1, 1), 2)])
def test_conv2d_transpose_is_the_dilated_convolution(kernel, stride):
  """The sub-pixel form computes the transposed convolution's definition: its values both forward only (the
  convolution form) and under differentiation (the matmul form), and its input/kernel gradients and
  forward-mode derivatives (those of lax.conv_transpose)."""
  from iaf_jax.layers import conv2d_transpose

  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
  w = rng.normal(size=(*kernel, 3, 4)).astype(np.float32)
  ours_t = lambda a, k: conv2d_transpose(a, k, (stride, stride))
  lax_t = lambda a, k: jax.lax.conv_transpose(a, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = numpy_conv_transpose_same(x.astype(np.float64), w.astype(np.float64), stride)
  dx, dw = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=w.shape).astype(np.float32)
  got_jvp, tangent = jax.jvp(ours_t, (x, w), (dx, dw))
  for got in (ours_t(x, w), jax.jit(ours_t)(x, w), got_jvp):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tangent, jax.jvp(lax_t, (x, w), (dx, dw))[1], rtol=1e-4, atol=1e-4)
  cot = rng.normal(size=want.shape).astype(np.float32)
  ours = jax.grad(lambda a, k: jnp.sum(ours_t(a, k) * cot), argnums=(0, 1))(x, w)
  ref = jax.grad(lambda a, k: jnp.sum(lax_t(a, k) * cot), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c_in", [1, 3])
@pytest.mark.parametrize("kernel,stride", [((3, 3), 1), ((3, 3), 2), ((1, 1), 1), ((1, 1), 2), ((5, 4), 2), ((2, 2), 3)])
def test_conv2d_matches_xla_same_convolution(c_in, kernel, stride):
  """conv2d (single input channel: a sum of shifted slices, differentiated as one matmul of them; 1x1 kernel: a
  matmul over the strided pixels) computes lax's SAME convolution: values, gradients (also of the kernel alone, as
  for a first layer on data) and forward-mode derivatives, odd and even kernels, strides that do and do not divide
  the size."""
  from iaf_jax.layers import conv2d

  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 7, 6, c_in)).astype(np.float32)
  w = rng.normal(size=(*kernel, c_in, 4)).astype(np.float32)
  lax_conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (stride, stride), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  got = conv2d(x, w, (stride, stride))
  np.testing.assert_allclose(got, lax_conv(x, w), rtol=1e-5, atol=1e-5)
  if stride == 1 and kernel[0] % 2 and kernel[1] % 2:
    np.testing.assert_allclose(got, numpy_conv_same(x.astype(np.float64), w.astype(np.float64)), rtol=1e-5, atol=1e-5)
  cot = rng.normal(size=got.shape).astype(np.float32)
  ours = jax.grad(lambda a, k: jnp.sum(conv2d(a, k, (stride, stride)) * cot), argnums=(0, 1))(x, w)
  ref = jax.grad(lambda a, k: jnp.sum(lax_conv(a, k) * cot), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  kernel_only = jax.grad(lambda k: jnp.sum(conv2d(x, k, (stride, stride)) * cot))(w)
  np.testing.assert_allclose(kernel_only, ref[1], rtol=1e-4, atol=1e-4)
  dx, dw = rng.normal(size=x.shape).astype(np.float32), rng.normal(size=w.shape).astype(np.float32)
  (val, tan), (val_ref, tan_ref) = (jax.jvp(lambda a, k: f(a, k), (x, w), (dx, dw))
                                    for f in (lambda a, k: conv2d(a, k, (stride, stride)), lax_conv))
  np.testing.assert_allclose(val, val_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tan, tan_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", [(3, 3), (1, 1), (5, 4), (2, 2), (4, 4)])
def test_explicit_grad_convolution_has_lax_values_and_gradients_also_inside_scan(kernel):
  """conv2d_explicit_grads (the scanned rungs' convolution) is lax's SAME stride-1 convolution: values and
  input/kernel gradients, odd and even (asymmetrically padded) kernels, alone and as the body of lax.scan."""
  from iaf_jax.layers import conv2d_explicit_grads

  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  ws = rng.normal(size=(2, *kernel, 3, 3)).astype(np.float32)
  lax_conv = lambda a, k: jax.lax.conv_general_dilated(a, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(conv2d_explicit_grads(x, ws[0]), lax_conv(x, ws[0]), rtol=1e-5, atol=1e-5)
  cot = rng.normal(size=x.shape).astype(np.float32)

  def loss(conv, scan):
    def f(a, k):
      if scan:
        a, _ = jax.lax.scan(lambda h, kk: (h + 0.5 * jnp.tanh(conv(h, kk)), None), a, k)
      else:
        a = conv(a, k[0])
      return jnp.sum(a * cot)
    return jax.jit(jax.grad(f, argnums=(0, 1)))

  for scan in (False, True):
    ours, ref = loss(conv2d_explicit_grads, scan)(x, ws), loss(lax_conv, scan)(x, ws)
    for a, b in zip(ours, ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # The layer flag routes stride-1 multi-channel convolutions through it and leaves strided ones to lax.
  layer = MaskedConv2D(4, kernel, explicit_grads=True)
  p = layer.init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(layer.apply(p, x), MaskedConv2D(4, kernel).apply(p, x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- a shared input, multiplied once


@pytest.mark.parametrize("weight_norm", [True, False])
def test_dense_with_shared_rows_is_the_dense_of_the_tiled_input(weight_norm):
  """MaskedDense(x, shared, repeats): the layer of concat([x, tile_samples(shared, repeats)]) (the same kernel,
  the same values and parameter gradients), with shared's rows multiplied once."""
  from iaf_jax.objectives import tile_samples
  repeats, n_shared = 3, 4
  layer = MaskedDense(8, mask=made_mask(), weight_norm=weight_norm)
  full = dense_input(n=repeats * n_shared)                 # [12, 6]: 4 latent columns, then 2 context columns
  shared = full[:n_shared, 4:]
  x = full[:, :4]
  tiled = np.concatenate([x, np.asarray(tile_samples(shared, repeats))], axis=-1)
  params = random_params(layer, tiled, seed=9)
  split_shapes = jax.eval_shape(lambda k, a, b: layer.init(k, a, b, repeats), RNG_KEY, x, shared)
  assert jax.tree_util.tree_map(np.shape, split_shapes) == jax.tree_util.tree_map(np.shape, params)
  np.testing.assert_allclose(layer.apply(params, x, shared, repeats), layer.apply(params, tiled), rtol=1e-5, atol=1e-4)
  g_split = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, x, shared, repeats))))(params)
  g_tiled = jax.grad(lambda p: jnp.sum(jnp.sin(layer.apply(p, tiled))))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_split), jax.tree_util.tree_leaves(g_tiled)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # Data-dependent init sees the same outputs, so it sets the same scales and biases.
  if weight_norm:
    p_split = layer.init(RNG_KEY, x, shared, repeats)["params"]
    p_tiled = layer.init(RNG_KEY, tiled)["params"]
    for name in ("scale", "bias"):
      np.testing.assert_allclose(p_split[name], p_tiled[name], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="repeats"):
    layer.apply(params, x, shared, repeats + 1)
