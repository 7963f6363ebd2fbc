"""The MNIST conv ResNet VAE of the report's Appendix 6.1, with 0..8 IAF steps in its posterior.

Encoder: ResNet blocks (3x3, strides 2,1,2,1,2; 16,16,32,32,32 channels; 1x1 projection shortcuts where the
shape changes) -> flatten -> dense 450 -> mean, log-std of q(z0|x); the IAF context h is the 450-unit layer
itself or (`context_dim` > 0, as the report's code: 200) a dense layer of its own on it. Posterior:
z0 ~ N(mean, std), z_T = IAFFlow(z0; h), log q(z_T|x) = log q(z0|x) - sum log-det (Equation 10). Prior N(0, I).
Two block forms (`block`): "report", the report's Appendix 6.1 and its code, ONE 3x3 conv per block,
elu(conv(x)) + x (identity, or a 1x1 conv where the shape changes); "two_conv", elu -> conv -> elu -> conv
(+ shortcut), about twice the arithmetic.
Decoder: the mirror image with transposed convs, to Bernoulli logits (or discretized logistic parameters
for 8-bit data, the report's CIFAR-10 baseline of Table 3). Weight norm with data-dependent init and ELU
everywhere. Feature-map sizes follow the input, so any HxWxC works.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iaf_jax import config_lib, distributions as dist, objectives
from iaf_jax.flows import IAFFlow
from iaf_jax.layers import Conv2D, ConvTranspose2D, MaskedDense, nearest_upsample

# Where the encoder's log-std starts (its layer's outputs start with std 0.1 about this offset). The report's
# code (IAF_VAE_mnist/Encoder.py: log_std = linear(x) / 10) starts near 0, std ~1: the "initially low variance"
# of Appendix 6.1 is the log-std's spread. An offset of -2 (std 0.14), once the default here, costs
# 0.5 (s^2 - 1) - log s = 1.5 nats of KL per latent at the first step, 48 nats for 32 latents: on small images
# that is more than the whole reconstruction term, and the first updates push q(z|x) onto the prior before the
# decoder has learnt to use z (posterior collapse: the 8x8 digits demo ended with KL 0.2 nats; docs/demo.md).
INITIAL_LOG_STD = 0.0
BLOCKS = ("report", "two_conv")
# What runs saved before these config fields existed (2026-12-01) were trained with: one home for the
# fallbacks of build_model, the config checks and the bench's FLOP count.
FIELDS_OF_OLDER_RUNS = {"block": "two_conv", "context_dim": 0, "initial_log_std": -2.0}


def model_field(model_config, name: str):
  """config.model.<name>, or the value runs saved without the field were trained with."""
  return model_config.get(name, FIELDS_OF_OLDER_RUNS[name])


def _shortcut(x, features, strides, weight_norm):
  """The input where the block keeps its shape, else the report's "same convolution ... with a 1 kernel-size"."""
  if strides == 1 and x.shape[-1] == features:
    return x
  return Conv2D(features, 1, strides, weight_norm=weight_norm)(x)


def _upsampled_shortcut(x, features, out_hw, weight_norm):
  """The decoder's strided shortcut: x upsampled (nearest neighbour, x2), a 1x1 conv, cropped to out_hw.

  A 1x1 conv commutes with nearest-neighbour upsampling (every output pixel is the projection of one input
  pixel), so it runs on the small map and its output is upsampled: the same values with a quarter of the
  arithmetic and memory traffic. Data-dependent init sees the same statistics (each pixel repeated 4 times)."""
  y = nearest_upsample(Conv2D(features, 1, weight_norm=weight_norm)(x))
  return y[:, :out_hw[0], :out_hw[1], :]


class ReportResBlock(nn.Module):
  """[R] Appendix 6.1 and its code: elu(conv3x3(x, stride)) + shortcut(x). `final`: no elu (the decoder's last
  block outputs likelihood parameters, which an elu would bound below by -1)."""
  features: int
  strides: int = 1
  weight_norm: bool = True
  final: bool = False

  @nn.compact
  def __call__(self, x):
    h = Conv2D(self.features, 3, self.strides, weight_norm=self.weight_norm)(x)
    return _shortcut(x, self.features, self.strides, self.weight_norm) + (h if self.final else nn.elu(h))


class ReportUpResBlock(nn.Module):
  """The decoder's strided report block: elu(transposed conv3x3 x2) + 1x1 conv of the nearest-neighbour
  upsampled input, cropped to the encoder's size."""
  features: int
  out_hw: tuple[int, int]
  weight_norm: bool = True
  final: bool = False

  @nn.compact
  def __call__(self, x):
    crop = lambda a: a[:, :self.out_hw[0], :self.out_hw[1], :]
    h = crop(ConvTranspose2D(self.features, 3, 2, weight_norm=self.weight_norm)(x))
    return _upsampled_shortcut(x, self.features, self.out_hw, self.weight_norm) + (h if self.final else nn.elu(h))


class ResBlock(nn.Module):
  """elu -> conv(stride) -> elu -> conv, plus the input (a 1x1 projection where the shape changes)."""
  features: int
  strides: int = 1
  weight_norm: bool = True

  @nn.compact
  def __call__(self, x):
    h = Conv2D(self.features, 3, self.strides, weight_norm=self.weight_norm)(nn.elu(x))
    h = Conv2D(self.features, 3, weight_norm=self.weight_norm, init_scale=0.1)(nn.elu(h))
    return _shortcut(x, self.features, self.strides, self.weight_norm) + h


class UpResBlock(nn.Module):
  """The decoder's mirror of a strided ResBlock: transposed conv x2, cropped to the encoder's size."""
  features: int
  out_hw: tuple[int, int]
  weight_norm: bool = True
  final: bool = False  # the last block outputs likelihood parameters: no activation scale-down there

  @nn.compact
  def __call__(self, x):
    crop = lambda a: a[:, :self.out_hw[0], :self.out_hw[1], :]
    h = crop(ConvTranspose2D(self.features, 3, 2, weight_norm=self.weight_norm)(nn.elu(x)))
    h = Conv2D(self.features, 3, weight_norm=self.weight_norm, init_scale=1.0 if self.final else 0.1)(nn.elu(h))
    return _upsampled_shortcut(x, self.features, self.out_hw, self.weight_norm) + h


def _encoder_sizes(hw: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
  sizes = [tuple(hw)]
  for s in strides:
    sizes.append(tuple(-(-d // s) for d in sizes[-1]))  # SAME padding: ceil(d / s)
  return sizes


def _conv_macs(out_hw, kernel_hw, c_in, c_out) -> int:
  return int(np.prod(out_hw)) * int(np.prod(kernel_hw)) * c_in * c_out


class MnistVAE(nn.Module):
  """Appendix 6.1 VAE. Inputs: Bernoulli: x in {0,1} float [B,H,W,C]; logistic: pixel values 0..255 float."""
  image_shape: tuple[int, int, int] = (28, 28, 1)
  latent_dim: int = 32
  iaf_depth: int = 0
  iaf_width: int = 320
  learnt_sigma: bool = True
  likelihood: str = "bernoulli"
  channels: Sequence[int] = (16, 16, 32, 32, 32)
  strides: Sequence[int] = (2, 1, 2, 1, 2)
  hidden_dim: int = 450
  weight_norm: bool = True
  block: str = "two_conv"
  context_dim: int = 0   # 0: the IAF context h is the hidden layer itself; else a dense layer of this width
  initial_log_std: float = INITIAL_LOG_STD

  def setup(self):
    if self.block not in BLOCKS:
      raise ValueError(f"MnistVAE: block must be one of {BLOCKS}, got {self.block!r}")
    wn = self.weight_norm
    h, w, c = self.image_shape
    sizes = _encoder_sizes((h, w), self.strides)
    report = self.block == "report"
    self.enc_blocks = [(ReportResBlock if report else ResBlock)(ch, s, wn) for ch, s in zip(self.channels, self.strides)]
    self.enc_dense = MaskedDense(self.hidden_dim, weight_norm=wn)
    self.enc_out = MaskedDense(2 * self.latent_dim, weight_norm=wn, init_scale=0.1)
    self.enc_context = MaskedDense(self.context_dim, weight_norm=wn) if self.context_dim else None
    self.flow = IAFFlow(self.iaf_depth, "made", (self.iaf_width, self.iaf_width), self.learnt_sigma, weight_norm=wn)
    self.top_shape = (*sizes[-1], self.channels[-1])
    self.dec_dense1 = MaskedDense(self.hidden_dim, weight_norm=wn)
    self.dec_dense2 = MaskedDense(int(np.prod(self.top_shape)), weight_norm=wn)
    # Mirror of the encoder, walked backwards: block i maps sizes[i+1] -> sizes[i] and back to block i's input
    # channels; a strided block becomes an UpResBlock. The last one outputs the likelihood's parameters.
    out_c = c if self.likelihood == "bernoulli" else 2 * c
    in_channels = [out_c] + list(self.channels[:-1])
    dec = []
    for i in reversed(range(len(self.channels))):
      final = i == 0
      if report:
        dec.append(ReportResBlock(in_channels[i], 1, wn, final=final) if self.strides[i] == 1
                   else ReportUpResBlock(in_channels[i], sizes[i], wn, final=final))
      elif self.strides[i] == 1:
        dec.append(ResBlock(in_channels[i], 1, wn))
      else:
        dec.append(UpResBlock(in_channels[i], sizes[i], wn, final=final))
    self.dec_blocks = dec

  # --- the pieces, each usable alone (api.py exposes them) ---
  def _encoder_input(self, x):
    if self.likelihood == "bernoulli":
      return 2.0 * x - 1.0
    return dist.bin_centres(x) * 2.0  # 8-bit pixels -> [-1, 1]

  def encode(self, x):
    """x -> (mean, log_std, context h) of q(z0|x)."""
    if tuple(x.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f"MnistVAE: expected images of shape {tuple(self.image_shape)}, got {tuple(x.shape[1:])}")
    h = self._encoder_input(x)
    for block in self.enc_blocks:
      h = block(h)
    h = nn.elu(self.enc_dense(nn.elu(h.reshape(h.shape[0], -1))))
    mean, raw_log_std = jnp.split(self.enc_out(h), 2, axis=-1)
    context = h if self.enc_context is None else nn.elu(self.enc_context(h))
    return mean, raw_log_std + self.initial_log_std, context

  def posterior_sample_from_encoding(self, encoding, key, context_repeats: int = 1):
    """z_T ~ q(z|x) and log q(z_T|x) (Equation 10). `context_repeats` r: mean and log_std have r sample-major
    copies of h's rows (objectives.tile_samples), and the flow multiplies each h once."""
    mean, log_std, h = encoding
    z0 = dist.diag_gaussian_sample(key, mean, log_std)
    log_q0 = dist.diag_gaussian_log_prob(z0, mean, log_std)
    z, log_det = self.flow(z0, h, context_repeats)
    return z, log_q0 - log_det

  def posterior_sample(self, x, key):
    return self.posterior_sample_from_encoding(self.encode(x), key)

  def iaf(self, z0, context):
    """(z_T, log-det) of the posterior's flow (Equation 10's transform alone), for diagnostics of its Jacobian."""
    return self.flow(z0, context)

  def log_prior(self, z):
    return dist.standard_normal_log_prob(z)

  def decode(self, z):
    """z -> Bernoulli logits [B, H, W, C], or (mean, log_scale) of the discretized logistic."""
    h = nn.elu(self.dec_dense1(z))
    h = nn.elu(self.dec_dense2(h)).reshape(z.shape[0], *self.top_shape)
    for block in self.dec_blocks:
      h = block(h)
    if self.likelihood == "bernoulli":
      return h
    mean, log_scale = jnp.split(h, 2, axis=-1)
    return 0.5 * mean, log_scale - 2.0  # mean unbounded: see dist.discretized_logistic_log_prob

  def log_likelihood(self, x, z):
    params = self.decode(z)
    if self.likelihood == "bernoulli":
      return dist.bernoulli_log_prob(x, params)
    return dist.discretized_logistic_log_prob(x, *params)

  def mean_image(self, z):
    """Decoded images in [0, 1] for display: Bernoulli means or logistic means."""
    params = self.decode(z)
    if self.likelihood == "bernoulli":
      return jax.nn.sigmoid(params)
    return jnp.clip(params[0] + 0.5, 0.0, 1.0)

  # --- the protocol train_lib / eval_lib use ---
  def __call__(self, x, key):
    """Per-example terms of the single-sample ELBO (one latent group: the whole z)."""
    z, log_q = self.posterior_sample(x, key)
    log_p = self.log_prior(z)
    return {"log_px_given_z": self.log_likelihood(x, z), "log_pz": log_p, "log_qz": log_q,
            "kl_per_group": (log_q - log_p)[:, None]}

  def log_weights(self, x, key, num_samples):
    """[num_samples, B] importance log weights; the encoder runs once, the K samples go through as one batch."""
    mean, log_std, h = self.encode(x)
    tile = lambda a: objectives.tile_samples(a, num_samples)
    z, log_q = self.posterior_sample_from_encoding((tile(mean), tile(log_std), h), key, num_samples)
    log_w = self.log_likelihood(tile(x), z) + self.log_prior(z) - log_q
    return log_w.reshape(num_samples, x.shape[0])

  def sample(self, key, num):
    return self.mean_image(jax.random.normal(key, (num, self.latent_dim)))

  def reconstruct(self, x, key):
    z, _ = self.posterior_sample(x, key)
    return self.mean_image(z)

  def latent_statistics(self, x, key, num_samples):
    """q(z|x)'s statistics for the collapse diagnostics (models/__init__.py): one latent group, z [B, D]. A
    diagonal Gaussian posterior (iaf_depth 0) gives its exact means and log-stds; an IAF posterior the moments
    of num_samples samples of z_T and the Monte Carlo KL over them."""
    if self.iaf_depth == 0:
      mean, log_std, _ = self.encode(x)
      return {"mean": [mean], "log_std": [log_std]}
    z, log_q = self.posterior_sample(objectives.tile_samples(x, num_samples), key)
    mean, var = objectives.sample_moments(z, num_samples)
    kl = jnp.mean(objectives.untile_samples(log_q - self.log_prior(z), num_samples), 0)
    return {"mean": [mean], "var": [var], "kl": kl[:, None]}


  def analytic_flops(self) -> dict:
    """Forward multiply-adds x 2 per image of this architecture (report Appendix 6.1 as setup builds it):
    convolutions and dense layers only (activations, weight norm and the optimizer are not counted). Transposed
    convolutions are counted at their useful cost (input pixels x kernel taps), not with the zero blocks of the
    sub-pixel kernel layers.conv2d_transpose multiplies by. {'encoder', 'flow', 'decoder', 'forward', 'train'}:
    'train' = 3 x forward (forward, input gradients, weight gradients)."""
    h, w, c = self.image_shape
    sizes = _encoder_sizes((h, w), self.strides)
    two_conv = self.block == "two_conv"  # "report": one 3x3 conv per block
    enc = dec = 0
    c_in = c
    for i, (ch, s) in enumerate(zip(self.channels, self.strides)):
      out = sizes[i + 1]
      enc += _conv_macs(out, (3, 3), c_in, ch) + (_conv_macs(out, (3, 3), ch, ch) if two_conv else 0)
      if s != 1 or c_in != ch:
        enc += _conv_macs(out, (1, 1), c_in, ch)
      c_in = ch
    top = int(np.prod(sizes[-1])) * self.channels[-1]
    k, hd, context = self.latent_dim, self.hidden_dim, self.context_dim
    enc += top * hd + hd * 2 * k + hd * context
    out_c = c if self.likelihood == "bernoulli" else 2 * c
    in_channels = [out_c] + list(self.channels[:-1])
    dec += k * hd + hd * top
    for i in reversed(range(len(self.channels))):
      src, dst, ch_in, ch = sizes[i + 1], sizes[i], self.channels[i], in_channels[i]
      if self.strides[i] == 1:
        dec += _conv_macs(dst, (3, 3), ch_in, ch) + (_conv_macs(dst, (3, 3), ch, ch) if two_conv else 0) + (
            _conv_macs(dst, (1, 1), ch_in, ch) if ch_in != ch else 0)
      else:  # transposed conv (useful taps), [two_conv: 3x3 conv], 1x1 projection + nearest upsample
        dec += (_conv_macs(src, (3, 3), ch_in, ch) + (_conv_macs(dst, (3, 3), ch, ch) if two_conv else 0)
                + _conv_macs(src, (1, 1), ch_in, ch))  # the shortcut's 1x1 conv runs before upsampling
    width = self.iaf_width
    flow = self.iaf_depth * ((k + (context or hd)) * width + width * width
                             + width * k * (2 if self.learnt_sigma else 1))
    fwd = {"encoder": 2 * enc, "flow": 2 * flow, "decoder": 2 * dec}
    fwd["forward"] = sum(fwd.values())
    fwd["train"] = 3 * fwd["forward"]
    return fwd


def validate_config(m) -> None:
  """config.model's MnistVAE fields, checked before any work (one-line ConfigErrors naming the field)."""
  need = config_lib.need
  need(m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "must be >= 1")
  need(0 <= m.iaf_depth, "model.iaf_depth", m.iaf_depth, "must be >= 0")
  need(m.iaf_width >= 1, "model.iaf_width", m.iaf_width, "must be >= 1")
  need(m.hidden_dim >= 1, "model.hidden_dim", m.hidden_dim, "must be >= 1")
  need(len(m.channels) == len(m.strides) and len(m.channels) > 0, "model.channels", m.channels,
       "needs one entry per entry of model.strides")
  need(all(ch >= 1 for ch in m.channels), "model.channels", m.channels, "widths must be >= 1")
  need(all(s in (1, 2) for s in m.strides), "model.strides", m.strides, "strides must be 1 or 2")
  need(model_field(m, "block") in BLOCKS, "model.block", model_field(m, "block"), f"must be one of {', '.join(BLOCKS)}")
  need(model_field(m, "context_dim") >= 0, "model.context_dim", model_field(m, "context_dim"),
       "must be >= 0 (0 = the hidden layer is the IAF context)")


def model_label(m) -> str:
  """The report's name for this model (models.model_label); runs saved before learnt_sigma existed learnt it."""
  if not m.iaf_depth:
    return "Diagonal covariance"
  label = f"IAF (Depth: {m.iaf_depth}, Width: {m.iaf_width})"
  return label if m.get("learnt_sigma", True) else label + ", constant sigma"


def build_mnist_vae(model_config, image_shape) -> MnistVAE:
  """The MnistVAE `config.model` describes, for images of shape (H, W, C): each field of the module from the
  config field of the same name (model_field for those older runs' configs lack), sequences as tuples (a flax
  module's fields must be hashable)."""
  names = [f.name for f in dataclasses.fields(MnistVAE) if f.name not in ("parent", "name", "image_shape")]
  value = lambda n: model_field(model_config, n) if n in FIELDS_OF_OLDER_RUNS else model_config[n]
  kwargs = {n: tuple(v) if isinstance(v, (list, tuple)) else v for n, v in ((n, value(n)) for n in names)}
  return MnistVAE(image_shape=tuple(image_shape), **kwargs)
