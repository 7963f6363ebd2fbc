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

import functools
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iaf_jax import distributions as dist
from iaf_jax import objectives
from iaf_jax.flows import IAFStep
from iaf_jax.layers import Conv2D, ConvTranspose2D, nearest_upsample

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


class RungOutput(NamedTuple):
  """What a rung's top-down half reports (the mode names which fields are filled):

  z: its latent map [B, h, w, z_size] (after any IAF); log_p: log p(z | z_>r) [B];
  log_q: log q(z | z_>r, x) [B] and kl_channels: log q - log p per latent channel [B, z_size], whose rows sum
  to log_q - log_p: posterior mode only, else None.
  """
  z: jax.Array
  log_q: Optional[jax.Array]
  log_p: jax.Array
  kl_channels: Optional[jax.Array]


def _map_sum(a: jax.Array) -> jax.Array:
  """[B, h, w, c] -> [B]: a rung's elementwise log densities summed over its latent map."""
  return jnp.sum(a, axis=(1, 2, 3))


class Rung(nn.Module):
  """One stochastic layer: its bottom-up half (`up`) and its top-down half, in one of three modes
  (`down_posterior`, `down_prior`, `down_fixed`). Each half maps the carried feature map x to (x', per-rung
  output), the form nn.scan wants (see `_scanned_stages`)."""
  h_size: int
  z_size: int
  downsample: bool = False
  iaf: bool = True
  learnt_sigma: bool = True
  weight_norm: bool = True
  top: bool = False  # the top rung (its own scanned segment; kept so scanned parameter layouts stay as saved)
  head_data_init: bool = False  # True: the prior/posterior head's data-dependent init of before issue #15's fix
  # True inside a scanned run: the stride-1 convolutions' gradients as conv2d_explicit_grads computes them
  # (40x faster inside lax.scan on XLA:CPU). Changes no parameter and no value.
  explicit_conv_grads: bool = False

  def setup(self):
    h, z, wn = self.h_size, self.z_size, self.weight_norm
    stride = 2 if self.downsample else 1
    conv = functools.partial(Conv2D, weight_norm=wn, init_scale=_INIT_SCALE, explicit_grads=self.explicit_conv_grads)
    self.up_conv1 = conv(2 * z + 2 * h, 3, stride)
    self.up_conv2 = conv(h, 3)
    # The prior / posterior head starts as a plain weight-normed layer (g = 0.1), without data-dependent init.
    # Its input, the top-down stream, barely varies over the batch at init (it grows from the constant h_top by
    # 0.1-weighted residuals), so data-dependent init gave it gains of 6-12 (other layers: ~1), and then the first
    # Adamax steps, which move every kernel entry by about the learning rate, turned ~20% of the normalised
    # kernel per step at lr 0.01 and moved the log-std outputs by several units: on CIFAR-10 at the paper's size
    # the KL reached 1.9e6 nats and 5 of the first 20 steps were non-finite. Measured in docs/cifar10.md (scripts/early_kl_probe.py, with
    # head_data_init=True for the old init; its top rung never had it: h_top is constant over the batch at init).
    self.down_conv1 = conv(4 * z + 2 * h, 3, data_init=self.head_data_init and not self.top)
    if self.downsample:
      self.down_conv2 = ConvTranspose2D(h, 3, 2, weight_norm=wn, init_scale=_INIT_SCALE)
    else:
      self.down_conv2 = conv(h, 3)
    if self.iaf:
      self.iaf_step = IAFStep("pixelcnn", (h, h), self.learnt_sigma, weight_norm=wn,
                              explicit_grads=self.explicit_conv_grads)

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

  # --- the top-down half; eps is standard normal noise of the latent map's shape ---
  def down_posterior(self, x: jax.Array, eps: jax.Array, up) -> tuple[jax.Array, RungOutput]:
    """z0 = q's mean + q's std * eps with q's parameters from both passes (`up` = this rung's bottom-up output),
    z = IAF(z0); every field of the RungOutput is filled."""
    pz_mean, pz_logsd, rz_mean, rz_logsd, down_context, h_det = self._head(x)
    qz_mean, qz_logsd, up_context = up
    post_mean, post_logsd = rz_mean + qz_mean, rz_logsd + qz_logsd
    z0 = post_mean + jnp.exp(post_logsd) * eps
    log_q_el = _gaussian_log_density(z0, post_mean, post_logsd)
    z, log_det = self.flow(z0, up_context + down_context)
    log_q = _map_sum(log_q_el) - log_det
    log_p_el = _gaussian_log_density(z, pz_mean, pz_logsd)
    # Per-channel KL, the free-bits groups of openai/iaf's tf_train.py (kl_groups='channel').
    kl_channels = _per_channel_kl(log_q, log_q_el, log_p_el)
    return self._output(x, z, h_det), RungOutput(z, log_q, _map_sum(log_p_el), kl_channels)

  def down_prior(self, x: jax.Array, eps: jax.Array) -> tuple[jax.Array, RungOutput]:
    """z = p's mean + p's std * eps (no IAF); log_q and kl_channels are None."""
    pz_mean, pz_logsd, _, _, _, h_det = self._head(x)
    z = pz_mean + jnp.exp(pz_logsd) * eps
    return self._output(x, z, h_det), self._prior_output(z, pz_mean, pz_logsd)

  def down_fixed(self, x: jax.Array, z: jax.Array) -> tuple[jax.Array, RungOutput]:
    """z given (a latent of this rung, after any IAF); log_q and kl_channels are None."""
    pz_mean, pz_logsd, _, _, _, h_det = self._head(x)
    return self._output(x, z, h_det), self._prior_output(z, pz_mean, pz_logsd)

  def _head(self, x):
    """x -> (pz_mean, pz_logsd, rz_mean, rz_logsd, down_context, h_det)."""
    z, h = self.z_size, self.h_size
    t = self.down_conv1(nn.elu(x))
    return jnp.split(t, [z, 2 * z, 3 * z, 4 * z, 4 * z + h], axis=-1)

  def _output(self, x, z, h_det):
    # The top rung's x (and so its head) has batch 1 (ResNetVAE._top_down); z has the pass's batch.
    h_det = jnp.broadcast_to(h_det, z.shape[:1] + h_det.shape[1:])
    hid = self.down_conv2(nn.elu(jnp.concatenate([z, h_det], axis=-1)))
    if self.downsample:
      x = nearest_upsample(x)
    return x + _RESIDUAL_WEIGHT * hid

  @staticmethod
  def _prior_output(z, pz_mean, pz_logsd) -> RungOutput:
    return RungOutput(z, None, _map_sum(_gaussian_log_density(z, pz_mean, pz_logsd)), None)


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
  # True: runs of identical rungs are scanned (one compiled rung body each, parameters stacked per run; the
  # configs' default). Its convolutions then use hand-written gradients (Rung.explicit_conv_grads), without
  # which XLA:CPU ran the scanned backward pass ~30x slower. False: every rung its own module (the layout of
  # runs saved before scanning existed).
  scan_rungs: bool = False
  # True: the prior/posterior heads get data-dependent init, as before issue #15's fix (Rung.setup says why not).
  head_data_init: bool = False

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
    self.x_enc = Conv2D(self.h_size, 5, self.input_stride, weight_norm=wn, init_scale=_INIT_SCALE)
    kw = dict(iaf=self.iaf, learnt_sigma=self.learnt_sigma, weight_norm=wn, head_data_init=self.head_data_init)
    if self.scan_rungs:
      self.stages = _scanned_stages(self.h_size, self.z_size, self.depth, self.num_blocks, **kw)
    else:
      self.rungs = [Rung(self.h_size, self.z_size, downsample=down, top=top, **kw)
                    for down, top in _rung_flags(self.depth, self.num_blocks)]
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

  def _rung_pass(self, method: str, h, per_rung=(), reverse: bool = False):
    """h carried through Rung.<method>(h, *rung r's entries of per_rung) rung by rung: bottom-up, or top-down
    with reverse. per_rung: lists in bottom-up order. Returns (last h, per-rung outputs in bottom-up order)."""
    if self.scan_rungs:
      return _scanned_pass(self.stages, _rung_segments(self.depth, self.num_blocks), method, h, per_rung, reverse)
    order = range(self.num_rungs)
    outs = [None] * self.num_rungs
    for r in reversed(order) if reverse else order:
      h, outs[r] = getattr(self.rungs[r], method)(h, *(v[r] for v in per_rung))
    return h, outs

  def bottom_up(self, x):
    """x -> per rung (bottom-up order) (qz_mean, qz_logsd, up_context). Depends on x only."""
    self._check_input(x)
    _, ups = self._rung_pass("up", self.x_enc(self._scale_input(x)))
    return ups

  def _noise(self, batch: int, key: jax.Array) -> list[jax.Array]:
    """Standard normal noise of every rung's latent map shape, bottom-up order."""
    # One draw for all rungs (one random-bits op to compile, not one per rung), split into the rungs' maps.
    shapes = self.latent_shapes()
    sizes = [int(np.prod(s)) for s in shapes]
    flat = jax.random.normal(key, (batch, sum(sizes)), jnp.float32)
    return [a.reshape(batch, *s) for a, s in zip(jnp.split(flat, np.cumsum(sizes)[:-1], axis=1), shapes)]

  def _top_down(self, method: str, *per_rung):
    """The generative pass from the learned top vector down: (last feature map, [RungOutput] bottom-up)."""
    top_h, top_w, _ = self.latent_shapes()[-1]
    # h_top is the same for every row, and so is the top rung's head conv of it: it enters at batch 1 and
    # meets the pass's batch only where per-row values (noise, the bottom-up pass) come in, so that conv runs
    # once per pass, not once per row (forward and backward).
    h = jnp.broadcast_to(self.h_top, (1, top_h, top_w, self.h_size))
    return self._rung_pass(method, h, per_rung, reverse=True)

  def top_down_posterior(self, ups, key: jax.Array):
    """z ~ q(z|x) rung by rung (with IAF), `ups` = bottom_up's output (its batch size is the pass's)."""
    return self._top_down("down_posterior", self._noise(ups[0][0].shape[0], key), ups)

  def top_down_prior(self, batch: int, key: jax.Array):
    """z ~ p(z) rung by rung (no IAF)."""
    return self._top_down("down_prior", self._noise(batch, key))

  def top_down_fixed(self, zs):
    """The latents of every rung given (bottom-up order, each [B, h, w, z_size])."""
    zs = list(zs)
    if len(zs) != self.num_rungs:
      raise ValueError(f"ResNetVAE: expected {self.num_rungs} latent maps (one per rung), got {len(zs)}")
    return self._top_down("down_fixed", zs)

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

  def _kl_per_group(self, rungs: Sequence[RungOutput]):
    if self.kl_groups == "channel":
      return jnp.concatenate([o.kl_channels for o in rungs], axis=-1)
    return jnp.stack([o.log_q - o.log_p for o in rungs], axis=-1)

  def rung_flow(self, index: int, z, context):
    """The IAF step of rung `index` (bottom-up order) alone: (z', log-det [B]). For tests and analysis."""
    if not 0 <= index < self.num_rungs:
      raise ValueError(f"ResNetVAE: rung index {index} out of range 0..{self.num_rungs - 1}")
    if not self.scan_rungs:
      return self.rungs[index].flow(z, context)
    rung = Rung(self.h_size, self.z_size, iaf=self.iaf, learnt_sigma=self.learnt_sigma, weight_norm=self.weight_norm,
                parent=None)
    return _scanned_rung_flow(self, rung, index, z, context)

  # --- the protocol train_lib / eval_lib use ---
  def __call__(self, x, key):
    """Per-example terms of the single-sample ELBO; kl_per_group has one column per rung (bottom-up order)."""
    h, rungs = self.top_down_posterior(self.bottom_up(x), key)
    log_px = self._log_px(x, self.decode(h))
    return {"log_px_given_z": log_px, "log_pz": _total(rungs, "log_p"), "log_qz": _total(rungs, "log_q"),
            "kl_per_group": self._kl_per_group(rungs)}

  def _tiled_posterior(self, x, key, num_samples):
    """top_down_posterior for num_samples samples per example (rows sample-major, objectives.tile_samples):
    bottom-up once, then all rungs of the samples jointly."""
    tile = functools.partial(objectives.tile_samples, num_samples=num_samples)
    return self.top_down_posterior(jax.tree_util.tree_map(tile, self.bottom_up(x)), key)

  def log_weights(self, x, key, num_samples):
    """[num_samples, B] log p(x, z_k) - log q(z_k|x)."""
    h, rungs = self._tiled_posterior(x, key, num_samples)
    log_w = (self._log_px(objectives.tile_samples(x, num_samples), self.decode(h)) + _total(rungs, "log_p")
             - _total(rungs, "log_q"))
    return log_w.reshape(num_samples, x.shape[0])

  def sample(self, key, num):
    """[num, H, W, C] mean images in [0, 1], every rung's z drawn from the prior (no IAF)."""
    h, _ = self.top_down_prior(num, key)
    return self._mean_image(self.decode(h))

  def reconstruct(self, x, key):
    h, _ = self.top_down_posterior(self.bottom_up(x), key)
    return self._mean_image(self.decode(h))

  def posterior_sample(self, x, key):
    """(list of z per rung in bottom-up order, each [B, h, w, z_size]; log q(z|x) [B])."""
    _, rungs = self.top_down_posterior(self.bottom_up(x), key)
    return [o.z for o in rungs], _total(rungs, "log_q")

  def log_likelihood(self, x, zs):
    """log p(x | z) [B] for the latents zs of every rung (bottom-up order)."""
    self._check_input(x)
    h, _ = self.top_down_fixed(zs)
    return self._log_px(x, self.decode(h))

  def log_prior(self, zs):
    """log p(z) [B] = sum over rungs of log p(z_r | z_>r)."""
    _, rungs = self.top_down_fixed(zs)
    return _total(rungs, "log_p")

  def latent_statistics(self, x, key, num_samples):
    """q(z|x)'s statistics for the collapse diagnostics (models/__init__.py) from num_samples joint samples of
    all rungs: one latent group per rung (bottom-up), its units the elements of the rung's map [B, h, w, C];
    'kl' [B, R] the Monte Carlo KL per rung and 'kl_per_channel' [B, R, C] its per-channel split."""
    _, rungs = self._tiled_posterior(x, key, num_samples)
    moments = [objectives.sample_moments(o.z, num_samples) for o in rungs]
    per_example = lambda a: jnp.mean(objectives.untile_samples(a, num_samples), 0)
    return {"mean": [m for m, _ in moments], "var": [v for _, v in moments],
            "kl": jnp.stack([per_example(o.log_q - o.log_p) for o in rungs], -1),
            "kl_per_channel": jnp.stack([per_example(o.kl_channels) for o in rungs], 1)}


def _total(rungs: Sequence[RungOutput], field: str) -> jax.Array:
  """[B]: a RungOutput field summed over the rungs, in bottom-up order."""
  return sum(getattr(o, field) for o in rungs)


def _rung_flags(depth: int, num_blocks: int) -> list[tuple[bool, bool]]:
  """(downsample, top) of every rung, bottom-up: the first rung of every level but the first halves the
  resolution; the last is the top rung."""
  return [(i > 0 and j == 0, i == depth - 1 and j == num_blocks - 1) for i in range(depth) for j in range(num_blocks)]


# --- scanned rungs (scan_rungs=True): runs of identical rungs as one module with stacked parameters ---
_TOP_DOWN_METHODS = ("down_posterior", "down_prior", "down_fixed")


def _scanned_rungs(length: int):
  """`length` identical rungs as ONE module whose parameters carry a leading rung axis: `up` scans bottom-up,
  the top-down modes in reverse. XLA then compiles one rung body per run of identical rungs instead of
  unrolling all of them."""
  common = dict(variable_axes={"params": 0}, split_rngs={"params": True}, length=length)
  methods = {"up": dict(common), **{m: dict(common, reverse=True) for m in _TOP_DOWN_METHODS}}
  return functools.partial(nn.scan(Rung, methods=methods), explicit_conv_grads=True)


def _rung_segments(depth: int, num_blocks: int) -> list[tuple[int, int, bool, bool]]:
  """Runs of consecutive rungs with the same structure, bottom-up: [(first rung, length, downsample, top)]."""
  segments = []
  for r, f in enumerate(_rung_flags(depth, num_blocks)):
    if segments and segments[-1][2:] == f:
      first, length = segments[-1][:2]
      segments[-1] = (first, length + 1) + f
    else:
      segments.append((r, 1) + f)
  return segments


def _scanned_stages(h_size: int, z_size: int, depth: int, num_blocks: int, **kw) -> list[nn.Module]:
  """One module per segment: a scanned run of rungs, or a lone Rung (a run of one)."""
  return [(_scanned_rungs(length) if length > 1 else Rung)(h_size, z_size, downsample=down, top=top, **kw)
          for _, length, down, top in _rung_segments(depth, num_blocks)]


def _scanned_pass(stages, segments, method: str, h, per_rung, reverse: bool):
  """ResNetVAE._rung_pass over the scanned stages: each run's per-rung inputs stacked on a leading axis, its
  outputs unstacked back into the per-rung list."""
  outs = [None] * sum(length for _, length, _, _ in segments)
  pairs = list(zip(stages, segments))
  for stage, (first, length, _, _) in reversed(pairs) if reverse else pairs:
    inputs = [v[first:first + length] for v in per_rung]
    if length == 1:
      h, outs[first] = getattr(stage, method)(h, *(v[0] for v in inputs))
    else:
      h, out = getattr(stage, method)(h, *(_stack(v) for v in inputs))
      outs[first:first + length] = _unstack(out, length)
  return h, outs


def _scanned_rung_flow(model, rung: Rung, index: int, z, context):
  """ResNetVAE.rung_flow with scanned stages: the rung's slice of its run's stacked parameters, applied by
  `rung`, a lone Rung of the same settings."""
  for stage, (first, length, _, _) in zip(model.stages, _rung_segments(model.depth, model.num_blocks)):
    if first <= index < first + length:
      break
  if length == 1:
    return stage.flow(z, context)
  params = jax.tree_util.tree_map(lambda a: a[index - first], model.variables["params"][stage.name])
  return rung.apply({"params": params}, z, context, method="flow")


def _stack(trees):
  return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree, length: int) -> list:
  """A pytree with a leading axis of `length` -> a list of `length` pytrees (None leaves stay None)."""
  return [jax.tree_util.tree_map(lambda a, i=i: a[i], tree) for i in range(length)]


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
      # Only the initialisation depends on it, so runs saved before it existed resume unchanged.
      head_data_init=bool(_field(model_config, "head_data_init", False)),
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


def model_label(model_config) -> str:
  """The report's name for this model (models.model_label): its rungs and their posterior, from the same
  fields (and fallbacks for older runs) the builder reads."""
  kwargs = _resnet_vae_kwargs(model_config, None)
  return f"{kwargs['depth'] * kwargs['num_blocks']} rungs {'IAF' if kwargs['iaf'] else 'Gaussian'}"


def build_resnet_vae(model_config, image_shape) -> ResNetVAE:
  """The ResNetVAE `config.model` describes (configs/cifar10.py), for images of shape (H, W, C). Checked here
  with the image shape (a ValueError), before any parameter exists."""
  kwargs = _resnet_vae_kwargs(model_config, image_shape)
  validate_resnet_vae(**{k: kwargs[k] for k in _VALIDATED})
  return ResNetVAE(**kwargs)
