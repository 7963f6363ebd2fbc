"""The bidirectional-inference "ResNet VAE" of the IAF paper (report section 4.3 Experiment #2, Appendix 6.2).

Architecture facts follow the IAF paper's public code ([H]: ../../shared/reference-hparams.md, openai/iaf
`tf_train.py`):

  x (8-bit) -> (x + 0.5) / 256 - 0.5 -> conv 5x5 stride `input_stride` to h_size channels
  bottom-up, rung by rung (level i = 0..depth-1, block j = 0..num_blocks-1; the first rung of every level
  i > 0 halves the resolution):
      elu -> conv3x3 (stride 2 where downsampling) -> [qz_mean, qz_logsd, up_context, h]
      h -> elu -> conv3x3;  out = input (nearest-neighbour downsampled where downsampling) + 0.1 * h
  top-down, from a learned vector `h_top` tiled over the smallest map, rungs in reverse order:
      elu -> conv3x3 -> [pz_mean, pz_logsd, rz_mean, rz_logsd, down_context, h_det]
      prior p(z) = N(pz_mean, exp(pz_logsd)); posterior q(z0|.) = N(rz_mean + qz_mean, exp(rz_logsd + qz_logsd))
      z0 ~ q; IAF (optional): (z, log-det) = IAFStep('pixelcnn')(z0; up_context + down_context);
      log q(z) = log q(z0) - log-det; KL of the rung = log q(z) - log p(z) (summed over the rung's map)
      h = elu(concat(z, h_det)) -> conv3x3 (transposed conv x2 where upsampling);
      out = input (nearest-neighbour upsampled where upsampling) + 0.1 * h
  elu -> transposed conv 5x5 stride `input_stride` -> discretized logistic mean (unbounded here; [H] clips
  it to [-0.5 + 1/512, 0.5 - 1/512], see distributions.discretized_logistic_log_prob) with ONE learned scalar log-scale (`dec_log_stdv`, [H]) or a per-sub-pixel
  log-scale, or a per-sub-pixel mixture of discretized logistics, or Bernoulli logits for {0, 1} data.

Rungs are indexed in bottom-up order: rung r = level * num_blocks + block, so rung 0 is the one nearest the
data and rung R-1 the top one. Every list of latents (`zs`) and every column block of `kl_per_group` uses that
order. The random key is an explicit argument (no flax rng collections): one standard-normal draw of shape
[batch, total latent size] is split into the rungs' noise maps, so every example (and each of the n*B rows of
`log_weights`) has all of its rungs sampled jointly.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iaf_jax import distributions as dist
from iaf_jax.flows import IAFStep
from iaf_jax.layers import ConvTranspose2D, MaskedConv2D

# openai/iaf's conv2d/deconv2d default init_scale: every layer starts with outputs of std 0.1 over the init batch.
_INIT_SCALE = 0.1
# Residual branches are added with weight 0.1 ([H]: output = input + 0.1 * h).
_RESIDUAL_WEIGHT = 0.1
# Lower bound of the mixture's log-scales (PixelCNN++ uses the same), keeps the logistic from collapsing.
_MIN_MIXTURE_LOG_SCALE = -7.0

LIKELIHOODS = ("logistic", "bernoulli")
KL_GROUPS = ("rung", "channel")


def validate_resnet_vae(image_shape: Sequence[int], *, h_size: int, z_size: int, depth: int, num_blocks: int,
                        iaf: bool, likelihood: str, input_stride: int, mixture_components: int,
                        kl_groups: str = "rung") -> None:
  """Raises ValueError with a clear message when the settings cannot build a ResNet VAE (image_shape None:
  only the settings, before the data is loaded)."""
  if image_shape is not None and len(tuple(image_shape)) != 3:
    raise ValueError(f"ResNetVAE: image_shape must be (H, W, C), got {tuple(image_shape)}")
  if h_size < 1 or z_size < 1:
    raise ValueError(f"ResNetVAE: h_size and z_size must be >= 1, got h_size={h_size}, z_size={z_size}")
  if depth < 1 or num_blocks < 1:
    raise ValueError(f"ResNetVAE: depth and num_blocks must be >= 1, got depth={depth}, num_blocks={num_blocks}")
  if input_stride < 1:
    raise ValueError(f"ResNetVAE: input_stride must be >= 1, got {input_stride}")
  if iaf and h_size % z_size:
    raise ValueError(
        f"ResNetVAE: with iaf=True the PixelCNN hidden widths (h_size={h_size}) must be a multiple of z_size="
        f"{z_size}: the masks split hidden channels into z_size equal groups, one per latent channel")
  if likelihood not in LIKELIHOODS:
    raise ValueError(f"ResNetVAE: likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
  if mixture_components < 0:
    raise ValueError(f"ResNetVAE: mixture_components must be >= 0, got {mixture_components}")
  if mixture_components and likelihood != "logistic":
    raise ValueError("ResNetVAE: mixture_components > 0 needs likelihood='logistic'")
  if kl_groups not in KL_GROUPS:
    raise ValueError(f"ResNetVAE: kl_groups must be one of {KL_GROUPS}, got {kl_groups!r}")
  if image_shape is None:
    return
  h, w, _ = image_shape
  factor = input_stride * 2 ** (depth - 1)
  if h % factor or w % factor:
    raise ValueError(
        f"ResNetVAE: image size {h}x{w} must be divisible by input_stride * 2**(depth-1) = {factor} so the "
        f"top-down pass upsamples back to the bottom-up sizes (input_stride={input_stride}, depth={depth})")


def _nearest_down(x: jax.Array) -> jax.Array:
  """Nearest-neighbour downsampling by 2 (tf.image.resize_nearest_neighbor to half size picks pixel 2i)."""
  return x[:, ::2, ::2, :]


def _nearest_up(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Rung(nn.Module):
  """One stochastic layer: its bottom-up half (`up`) and its top-down half (`down`)."""
  h_size: int
  z_size: int
  downsample: bool = False
  iaf: bool = True
  learnt_sigma: bool = True
  weight_norm: bool = True
  top: bool = False  # the top rung (its own scanned segment; kept so scanned parameter layouts stay as saved)

  def setup(self):
    h, z, wn = self.h_size, self.z_size, self.weight_norm
    stride = 2 if self.downsample else 1
    self.up_conv1 = MaskedConv2D(2 * z + 2 * h, 3, stride, weight_norm=wn, init_scale=_INIT_SCALE)
    self.up_conv2 = MaskedConv2D(h, 3, weight_norm=wn, init_scale=_INIT_SCALE)
    # The prior / posterior head starts as a plain weight-normed layer (g = 0.1), without data-dependent init.
    # Its input, the top-down stream, barely varies over the batch at init (it grows from the constant h_top by
    # 0.1-weighted residuals), so data-dependent init gave it gains of 6-12 (other layers: ~1), and then the first
    # Adamax steps, which move every kernel entry by about the learning rate, turned ~20% of the normalised
    # kernel per step at lr 0.01 and moved the log-std outputs by several units: KL of 50,000 nats (up to 1e13)
    # in the first 20 steps at the paper's size. Measured in docs/cifar10.md; tests/test_resnet_vae.py.
    self.down_conv1 = MaskedConv2D(4 * z + 2 * h, 3, weight_norm=wn, init_scale=_INIT_SCALE, data_init=False)
    if self.downsample:
      self.down_conv2 = ConvTranspose2D(h, 3, 2, weight_norm=wn, init_scale=_INIT_SCALE)
    else:
      self.down_conv2 = MaskedConv2D(h, 3, weight_norm=wn, init_scale=_INIT_SCALE)
    if self.iaf:
      self.iaf_step = IAFStep("pixelcnn", (h, h), self.learnt_sigma, weight_norm=wn)

  def up(self, x: jax.Array):
    """Bottom-up half: x -> (output, (qz_mean, qz_logsd, up_context))."""
    z, h = self.z_size, self.h_size
    t = self.up_conv1(nn.elu(x))
    qz_mean, qz_logsd, up_context, hid = jnp.split(t, [z, 2 * z, 2 * z + h], axis=-1)
    hid = self.up_conv2(nn.elu(hid))
    if self.downsample:
      x = _nearest_down(x)
    return x + _RESIDUAL_WEIGHT * hid, (qz_mean, qz_logsd, up_context)

  def flow(self, z: jax.Array, context: jax.Array):
    """The rung's IAF step on a latent map z [B, h, w, z_size] -> (z', log|det dz'/dz| [B]); identity without IAF."""
    if not self.iaf:
      return z, jnp.zeros(z.shape[:1], z.dtype)
    return self.iaf_step(z, context)

  def down(self, x: jax.Array, eps: Optional[jax.Array], up: Any = None, z_fixed: Optional[jax.Array] = None):
    """Top-down half; eps is standard normal noise of the latent map's shape. Three modes:

    up given (posterior): z0 = q's mean + q's std * eps, z = IAF(z0), returns log q(z) [B];
    z_fixed given: z = z_fixed (a latent of this rung, after any IAF), log q is None;
    neither (prior): z = p's mean + p's std * eps, log q is None.
    Returns (output, z, log_q, log_p [B], kl_channels) with kl_channels = log q - log p per latent channel,
    [B, z_size] (posterior mode only, else None).
    """
    z_size, h = self.z_size, self.h_size
    t = self.down_conv1(nn.elu(x))
    pz_mean, pz_logsd, rz_mean, rz_logsd, down_context, h_det = jnp.split(
        t, [z_size, 2 * z_size, 3 * z_size, 4 * z_size, 4 * z_size + h], axis=-1)
    log_q = kl_channels = None
    if z_fixed is not None:
      z = z_fixed
    elif up is None:
      z = pz_mean + jnp.exp(pz_logsd) * eps
    else:
      qz_mean, qz_logsd, up_context = up
      post_mean, post_logsd = rz_mean + qz_mean, rz_logsd + qz_logsd
      z0 = post_mean + jnp.exp(post_logsd) * eps
      log_q_el = _gaussian_log_density(z0, post_mean, post_logsd)
      z, log_det = self.flow(z0, up_context + down_context)
      log_q = jnp.sum(log_q_el, axis=(1, 2, 3)) - log_det
    log_p_el = _gaussian_log_density(z, pz_mean, pz_logsd)
    log_p = jnp.sum(log_p_el, axis=(1, 2, 3))
    if up is not None and z_fixed is None:
      # Per-channel KL, the free-bits groups of openai/iaf's tf_train.py (kl_groups='channel').
      kl_channels = _per_channel_kl(log_q, log_q_el, log_p_el)
    hid = nn.elu(jnp.concatenate([z, h_det], axis=-1))
    hid = self.down_conv2(hid)
    if self.downsample:
      x = _nearest_up(x)
    return x + _RESIDUAL_WEIGHT * hid, z, log_q, log_p, kl_channels


  def down_step(self, x: jax.Array, xs):
    """`down` in the shape nn.scan wants: carry x, per-rung inputs xs = (eps, up, z_fixed) (None where unused),
    per-rung outputs (z, log_q, log_p, kl_channels)."""
    eps, up, z_fixed = xs
    x, z, log_q, log_p, kl_c = self.down(x, eps, up=up, z_fixed=z_fixed)
    return x, (z, log_q, log_p, kl_c)


def _scanned_rungs(length: int):
  """`length` identical rungs as ONE module whose parameters carry a leading rung axis: `up` scans bottom-up,
  `down_step` top-down (reverse). XLA then compiles one rung body per run of identical rungs instead of
  unrolling all of them."""
  common = dict(variable_axes={"params": 0}, split_rngs={"params": True}, length=length)
  return nn.scan(Rung, methods={"up": dict(common), "down_step": dict(common, reverse=True)})


def _rung_segments(depth: int, num_blocks: int) -> list[tuple[int, int, bool, bool]]:
  """Runs of consecutive rungs with the same structure, bottom-up: [(first rung, length, downsample, top)]."""
  flags = [(i > 0 and j == 0, i == depth - 1 and j == num_blocks - 1)
           for i in range(depth) for j in range(num_blocks)]
  segments = []
  for r, f in enumerate(flags):
    if segments and segments[-1][2:] == f:
      first, length = segments[-1][:2]
      segments[-1] = (first, length + 1) + f
    else:
      segments.append((r, 1) + f)
  return segments


def _stack(trees):
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree, length: int) -> list:
  """A pytree with a leading axis of `length` -> a list of `length` pytrees (None leaves stay None)."""
  return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(length)]


def _gaussian_log_density(x, mean, log_std):
  """Elementwise log N(x; mean, exp(log_std))."""
  eps = (x - mean) * jnp.exp(-log_std)
  return -0.5 * (dist.LOG_2PI + jnp.square(eps)) - log_std


def _per_channel_kl(log_q, log_q_el, log_p_el):
  """[B, C] KL per latent channel of a rung whose rows sum exactly to the rung's KL (log_q - sum log_p_el).

  log q of the IAF output has no per-channel split (the log-det couples channels); the Gaussian part of log q
  and log p are split per channel and the log-det's share goes in equal parts to every channel.
  """
  q_gauss = jnp.sum(log_q_el, axis=(1, 2))            # [B, C]
  p_chan = jnp.sum(log_p_el, axis=(1, 2))             # [B, C]
  log_det_share = (jnp.sum(q_gauss, axis=-1) - log_q) / q_gauss.shape[-1]  # = log-det / C
  return q_gauss - log_det_share[:, None] - p_chan


class ResNetVAE(nn.Module):
  """The IAF paper's CIFAR-10 ResNet VAE with `depth` x `num_blocks` rungs (see the module docstring).

  Inputs: likelihood 'logistic': pixel values 0..255 as float [B, H, W, C]; 'bernoulli': {0, 1} float.
  """
  image_shape: tuple[int, int, int] = (32, 32, 3)
  h_size: int = 160
  z_size: int = 32
  depth: int = 2
  num_blocks: int = 2
  iaf: bool = True
  learnt_sigma: bool = True
  likelihood: str = "logistic"
  input_stride: int = 2
  shared_log_scale: bool = True
  mixture_components: int = 0
  # kl_per_group columns: 'rung' = one per rung ([R] Eq. 14); 'channel' = one per latent channel of each rung
  # (openai/iaf tf_train.py's free-bits groups), rung-major. With IAF, a rung's log-det (IAFStep returns only
  # its total) is shared equally among the rung's channels; rows still sum exactly to log_qz - log_pz.
  kl_groups: str = "rung"
  weight_norm: bool = True
  # True: runs of identical rungs are scanned (one compiled rung body each, parameters stacked per run). On
  # XLA:CPU that did not shorten compilation (20 rungs, h_size 32: 36 s scanned, 32 s unrolled) and the scanned
  # backward pass ran ~30x slower (4 rungs, batch 32: 4.4 vs 130 img/s). False: every rung its own module.
  scan_rungs: bool = False

  @property
  def num_rungs(self) -> int:
    return self.depth * self.num_blocks

  def latent_shapes(self) -> list[tuple[int, int, int]]:
    """Shape (h, w, z_size) of each rung's latent map, rungs in bottom-up order."""
    h, w, _ = self.image_shape
    h, w = h // self.input_stride, w // self.input_stride
    shapes = []
    for i in range(self.depth):
      if i > 0:
        h, w = h // 2, w // 2
      shapes += [(h, w, self.z_size)] * self.num_blocks
    return shapes

  def setup(self):
    validate_resnet_vae(self.image_shape, h_size=self.h_size, z_size=self.z_size, depth=self.depth,
                        num_blocks=self.num_blocks, iaf=self.iaf, likelihood=self.likelihood,
                        input_stride=self.input_stride, mixture_components=self.mixture_components,
                        kl_groups=self.kl_groups)
    wn = self.weight_norm
    c = self.image_shape[-1]
    self.x_enc = MaskedConv2D(self.h_size, 5, self.input_stride, weight_norm=wn, init_scale=_INIT_SCALE)
    kw = dict(iaf=self.iaf, learnt_sigma=self.learnt_sigma, weight_norm=wn)
    if self.scan_rungs:
      self.stages = [
          (_scanned_rungs(length) if length > 1 else Rung)(self.h_size, self.z_size, downsample=down, top=top, **kw)
          for _, length, down, top in _rung_segments(self.depth, self.num_blocks)]
    else:
      self.rungs = [Rung(self.h_size, self.z_size, downsample=i > 0 and j == 0,
                         top=(i == self.depth - 1 and j == self.num_blocks - 1), **kw)
                    for i in range(self.depth) for j in range(self.num_blocks)]
    self.h_top = self.param("h_top", nn.initializers.zeros, (self.h_size,))
    if self.likelihood == "bernoulli":
      out_c = c
    elif self.mixture_components:
      out_c = 3 * c * self.mixture_components
    else:
      out_c = c if self.shared_log_scale else 2 * c
    self.x_dec = ConvTranspose2D(out_c, 5, self.input_stride, weight_norm=wn, init_scale=_INIT_SCALE)
    if self._uses_shared_log_scale():
      self.dec_log_stdv = self.param("dec_log_stdv", nn.initializers.zeros, ())

  def _uses_shared_log_scale(self) -> bool:
    return self.likelihood == "logistic" and not self.mixture_components and self.shared_log_scale

  # --- the pieces ---
  def _check_input(self, x):
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f"ResNetVAE: expected images of shape {tuple(self.image_shape)}, got {tuple(x.shape[1:])}")

  def _scale_input(self, x):
    if self.likelihood == "bernoulli":
      return x - 0.5
    return dist.bin_centres(x)  # [H]: (x + 0.5) / 256 - 0.5

  def bottom_up(self, x):
    """x -> per rung (bottom-up order) (qz_mean, qz_logsd, up_context). Depends on x only."""
    self._check_input(x)
    h = self.x_enc(self._scale_input(x))
    ups = []
    for module, (_, length) in self._stage_modules():
      h, up = module.up(h)
      ups += [up] if length == 1 else _unstack(up, length)
    return ups

  def _stage_modules(self):
    """[(module, (first rung, length))]: scanned runs of rungs (length > 1) or single rungs, bottom-up."""
    if not self.scan_rungs:
      return [(rung, (r, 1)) for r, rung in enumerate(self.rungs)]
    return [(m, seg[:2]) for m, seg in zip(self.stages, _rung_segments(self.depth, self.num_blocks))]

  def top_down(self, batch: int, key: Optional[jax.Array] = None, ups=None, zs=None):
    """The generative pass, rungs from the top down, in one of three modes:

    ups given: posterior (z ~ q(z|x) with IAF, per rung); zs given: the latents are fixed; neither: prior.
    Returns (h, zs, log_q, log_p, kl_channels): h the last feature map; zs, log_q [B], log_p [B] and
    kl_channels [B, z_size] lists in bottom-up rung order (log_q / kl_channels None outside posterior mode).
    """
    if zs is not None and len(zs) != self.num_rungs:
      raise ValueError(f"ResNetVAE: expected {self.num_rungs} latent maps (one per rung), got {len(zs)}")
    if zs is None and key is None:
      raise ValueError("ResNetVAE.top_down: a key is needed to sample latents")
    shapes = self.latent_shapes()
    top_h, top_w, _ = shapes[-1]
    h = jnp.broadcast_to(self.h_top, (batch, top_h, top_w, self.h_size))
    n = self.num_rungs
    eps = [None] * n
    if zs is None:
      # One draw for all rungs (one random-bits op to compile, not one per rung), split into the rungs' maps.
      sizes = [int(np.prod(s)) for s in shapes]
      flat = jax.random.normal(key, (batch, sum(sizes)), jnp.float32)
      eps = [a.reshape(batch, *s) for a, s in zip(jnp.split(flat, np.cumsum(sizes)[:-1], axis=1), shapes)]
    outs = [None] * n  # per rung (z, log_q, log_p, kl_channels)
    for module, (first, length) in reversed(self._stage_modules()):
      rungs = range(first, first + length)
      xs = tuple(None if v is None else [v[r] for r in rungs] for v in (eps, ups, zs))
      if length == 1:
        h, out = module.down_step(h, tuple(None if v is None else v[0] for v in xs))
        outs[first] = out
      else:
        h, out = module.down_step(h, tuple(None if v is None else _stack(v) for v in xs))
        outs[first:first + length] = _unstack(out, length)
    out_z, out_q, out_p, out_kl = (list(t) for t in zip(*outs))
    return h, out_z, out_q, out_p, out_kl

  def decode(self, h):
    """Last feature map -> likelihood parameters: Bernoulli logits [B, H, W, C]; logistic (mean, log_scale)
    on the [-0.5, 0.5] scale; mixture (logit_probs, means, log_scales), each [B, H, W, C, K]."""
    out = self.x_dec(nn.elu(h))
    if self.likelihood == "bernoulli":
      return out
    if self.mixture_components:
      k = self.mixture_components
      out = out.reshape(*out.shape[:-1], self.image_shape[-1], 3, k)
      logits, means, log_scales = out[..., 0, :], out[..., 1, :], out[..., 2, :]
      return logits, means, jnp.maximum(log_scales, _MIN_MIXTURE_LOG_SCALE)
    if self.shared_log_scale:
      mean = out
      log_scale = jnp.broadcast_to(self.dec_log_stdv, mean.shape)
    else:
      mean, log_scale = jnp.split(out, 2, axis=-1)
    return mean, log_scale  # unbounded: see distributions.discretized_logistic_log_prob

  def _log_px(self, x, params):
    if self.likelihood == "bernoulli":
      return dist.bernoulli_log_prob(x, params)
    if self.mixture_components:
      return dist.discretized_logistic_mixture_log_prob(x, *params)
    return dist.discretized_logistic_log_prob(x, *params)

  def _mean_image(self, params):
    if self.likelihood == "bernoulli":
      return jax.nn.sigmoid(params)
    if self.mixture_components:
      logits, means, _ = params
      return jnp.clip(jnp.sum(jax.nn.softmax(logits, axis=-1) * means, axis=-1) + 0.5, 0.0, 1.0)
    return jnp.clip(params[0] + 0.5, 0.0, 1.0)

  def _kl_per_group(self, log_q, log_p, kl_channels):
    if self.kl_groups == "channel":
      return jnp.concatenate(kl_channels, axis=-1)
    return jnp.stack([q - p for q, p in zip(log_q, log_p)], axis=-1)

  def rung_flow(self, index: int, z, context):
    """The IAF step of rung `index` (bottom-up order) alone: (z', log-det [B]). For tests and analysis."""
    for module, (first, length) in self._stage_modules():
      if first <= index < first + length:
        break
    else:
      raise ValueError(f"ResNetVAE: rung index {index} out of range 0..{self.num_rungs - 1}")
    if length == 1:
      return module.flow(z, context)
    # A rung inside a scanned run: its slice of the stacked parameters, applied as a lone Rung.
    params = jax.tree_util.tree_map(lambda a: a[index - first], self.variables["params"][module.name])
    rung = Rung(self.h_size, self.z_size, iaf=self.iaf, learnt_sigma=self.learnt_sigma, weight_norm=self.weight_norm,
                parent=None)
    return rung.apply({"params": params}, z, context, method="flow")

  # --- the protocol train_lib / eval_lib use ---
  def __call__(self, x, key):
    """Per-example terms of the single-sample ELBO; kl_per_group has one column per rung (bottom-up order)."""
    ups = self.bottom_up(x)
    h, _, log_q, log_p, kl_c = self.top_down(x.shape[0], key, ups=ups)
    log_px = self._log_px(x, self.decode(h))
    return {"log_px_given_z": log_px, "log_pz": sum(log_p), "log_qz": sum(log_q),
            "kl_per_group": self._kl_per_group(log_q, log_p, kl_c)}

  def log_weights(self, x, key, num_samples):
    """[num_samples, B] log p(x, z_k) - log q(z_k|x): bottom-up once, then all rungs of the K samples jointly."""
    ups = self.bottom_up(x)
    tile = lambda a: jnp.broadcast_to(a, (num_samples,) + a.shape).reshape(-1, *a.shape[1:])
    ups = jax.tree_util.tree_map(tile, ups)
    b = x.shape[0]
    h, _, log_q, log_p, _ = self.top_down(num_samples * b, key, ups=ups)
    log_w = self._log_px(tile(x), self.decode(h)) + sum(log_p) - sum(log_q)
    return log_w.reshape(num_samples, b)

  def sample(self, key, num):
    """[num, H, W, C] mean images in [0, 1], every rung's z drawn from the prior (no IAF)."""
    h, *_ = self.top_down(num, key)
    return self._mean_image(self.decode(h))

  def reconstruct(self, x, key):
    h, *_ = self.top_down(x.shape[0], key, ups=self.bottom_up(x))
    return self._mean_image(self.decode(h))

  def posterior_sample(self, x, key):
    """(list of z per rung in bottom-up order, each [B, h, w, z_size]; log q(z|x) [B])."""
    _, zs, log_q, _, _ = self.top_down(x.shape[0], key, ups=self.bottom_up(x))
    return zs, sum(log_q)

  def log_likelihood(self, x, zs):
    """log p(x | z) [B] for the latents zs of every rung (bottom-up order)."""
    self._check_input(x)
    h, *_ = self.top_down(x.shape[0], zs=list(zs))
    return self._log_px(x, self.decode(h))

  def log_prior(self, zs):
    """log p(z) [B] = sum over rungs of log p(z_r | z_>r)."""
    zs = list(zs)
    _, _, _, log_p, _ = self.top_down(zs[0].shape[0], zs=zs)
    return sum(log_p)


def _field(cfg, name, default):
  if isinstance(cfg, dict):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


def _resnet_vae_kwargs(model_config, image_shape) -> dict:
  """ResNetVAE's arguments from `config.model`; a field older runs' configs lack takes the value they ran with."""
  return dict(
      image_shape=None if image_shape is None else tuple(int(d) for d in image_shape),
      h_size=int(_field(model_config, "h_size", 160)),
      z_size=int(_field(model_config, "z_size", 32)),
      depth=int(_field(model_config, "depth", 2)),
      num_blocks=int(_field(model_config, "num_blocks", 2)),
      iaf=bool(_field(model_config, "iaf", True)),
      learnt_sigma=bool(_field(model_config, "learnt_sigma", True)),
      likelihood=str(_field(model_config, "likelihood", "logistic")),
      input_stride=int(_field(model_config, "input_stride", 2)),
      shared_log_scale=bool(_field(model_config, "shared_log_scale", True)),
      mixture_components=int(_field(model_config, "mixture_components", 0)),
      kl_groups=str(_field(model_config, "kl_groups", "rung")),
      weight_norm=bool(_field(model_config, "weight_norm", True)),
      # Absent from the config.json of runs made before scanning existed: those keep their unrolled layout.
      scan_rungs=bool(_field(model_config, "scan_rungs", False)),
  )


_VALIDATED = ("image_shape", "h_size", "z_size", "depth", "num_blocks", "iaf", "likelihood", "input_stride",
              "mixture_components", "kl_groups")


def validate_config(model_config) -> None:
  """config.model's ResNet VAE settings, checked before the data is loaded (one-line ConfigErrors)."""
  from iaf_jax.config_lib import ConfigError
  kwargs = _resnet_vae_kwargs(model_config, None)
  try:
    validate_resnet_vae(**{k: kwargs[k] for k in _VALIDATED})
  except ValueError as err:
    raise ConfigError(f"config.model: {err}") from None


def build_resnet_vae(model_config, image_shape) -> ResNetVAE:
  """The ResNetVAE `config.model` describes (configs/cifar10.py), for images of shape (H, W, C). Checked here
  with the image shape (a ValueError), before any parameter exists."""
  kwargs = _resnet_vae_kwargs(model_config, image_shape)
  validate_resnet_vae(**{k: kwargs[k] for k in _VALIDATED})
  return ResNetVAE(**kwargs)
