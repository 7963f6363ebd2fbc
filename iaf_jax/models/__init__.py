"""Models. Every model is a flax Module with the same protocol, so train_lib and eval_lib know nothing of
its insides:

  __call__(x, key)              -> per-example terms {'log_px_given_z', 'log_pz', 'log_qz': [B],
                                   'kl_per_group': [B, G]} of the single-sample ELBO (init runs this too)
  log_weights(x, key, n)        -> [n, B] importance log weights log p(x, z_k) - log q(z_k|x), z_k ~ q
  sample(key, n)                -> [n, H, W, C] images in [0, 1] from the prior
  reconstruct(x, key)           -> [B, H, W, C] images in [0, 1] decoded from a posterior sample
  posterior_sample(x, key)      -> (z, log q(z|x)); log_likelihood(x, z) -> log p(x|z); log_prior(z) -> log p(z)
  latent_statistics(x, key, S)  -> what iaf_jax/diagnostics.py needs of q(z|x), per example, one list entry per
                                   latent group (MNIST VAE: one, z [B, D]; ResNet VAE: one per rung, its map
                                   [B, h, w, C], bottom-up): 'mean' E_q[z] per unit and either 'log_std' (q an
                                   exact diagonal Gaussian: 'mean' exact too) or, from S samples, 'var' (unbiased)
                                   and 'kl' [B, G] (Monte Carlo log q - log p per group); optionally
                                   'kl_per_channel' [B, G, C]. Latent vectors get the per-dimension report, latent
                                   maps the per-group one.

Optional, read by the tools where present: `latent_dim` (the size of a model's one latent vector; the 2-D
latent figures need 2) and `analytic_flops()` -> forward multiply-adds x 2 per image {'encoder', 'flow',
'decoder', 'forward', 'train'} (the bench reports it beside XLA's cost analysis, which every model gets).

x is float [B, H, W, C]: {0, 1} for a Bernoulli likelihood, pixel values 0..255 for the discretized logistic.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """A value of config.model.kind: its module (imported on first use, so `import iaf_jax.models` needs no flax)
  and the names there of its builder, (model_config, image_shape) -> Module, and of its config check,
  (model_config) -> None or a one-line ConfigError, and of its labeller, (model_config) -> the tools' name for
  the model (report rows: "IAF (Depth: 2, Width: 320)"). `init_only_fields`: config.model fields that only set
  the initialisation, so a checkpoint resumes whatever they say (and runs saved before they existed lack them).
  `layout_fields`: (field, value when absent) of config.model fields that change only how the parameters are laid
  out, not what the model computes: a resumed run takes the workdir's saved values (config_lib.adopt_saved_layout)."""
  module: str
  builder: str
  validator: str = "validate_config"
  labeller: str = "model_label"
  init_only_fields: tuple[str, ...] = ()
  layout_fields: tuple[tuple[str, Any], ...] = ()

  def function(self, name: str):
    return getattr(importlib.import_module(self.module), name)


# The one list of model kinds: config checks, build_model and the tools read it.
MODEL_KINDS = {
    "mnist_vae": ModelKind("iaf_jax.models.mnist_vae", "build_mnist_vae"),
    "resnet_vae": ModelKind("iaf_jax.models.resnet_vae", "build_resnet_vae", init_only_fields=("head_data_init",),
                            layout_fields=(("scan_rungs", False),)),
}


def _kind(model_config) -> ModelKind:
  kind = model_config.get("kind")  # get: a config.json without the field is refused by name, not AttributeError
  if kind not in MODEL_KINDS:
    raise ValueError(f"config.model.kind must be one of {tuple(MODEL_KINDS)}, got {kind!r}")
  return MODEL_KINDS[kind]


def validate_model_config(model_config) -> None:
  """The checks of config.model's kind on its fields (before any data is loaded)."""
  kind = _kind(model_config)
  kind.function(kind.validator)(model_config)


def build_model(model_config, image_shape):
  """The model a config describes, for images of shape (H, W, C) (taken from the data)."""
  kind = _kind(model_config)
  return kind.function(kind.builder)(model_config, tuple(image_shape))


def model_label(model_config) -> str:
  """The tools' name for the model config.model describes, from its fields (not the config's name), by its
  kind's own labeller: the report names rows with it and matches them to the report's models."""
  kind = _kind(model_config)
  return kind.function(kind.labeller)(model_config)
