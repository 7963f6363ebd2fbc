"""Models. Every model is a flax Module with the same protocol, so train_lib and eval_lib know nothing of
its insides:

  __call__(x, key)              -> per-example terms {'log_px_given_z', 'log_pz', 'log_qz': [B],
                                   'kl_per_group': [B, G]} of the single-sample ELBO (init runs this too)
  log_weights(x, key, n)        -> [n, B] importance log weights log p(x, z_k) - log q(z_k|x), z_k ~ q
  sample(key, n)                -> [n, H, W, C] images in [0, 1] from the prior
  reconstruct(x, key)           -> [B, H, W, C] images in [0, 1] decoded from a posterior sample
  posterior_sample(x, key)      -> (z, log q(z|x)); log_likelihood(x, z) -> log p(x|z); log_prior(z) -> log p(z)

x is float [B, H, W, C]: {0, 1} for a Bernoulli likelihood, pixel values 0..255 for the discretized logistic.
"""

from __future__ import annotations

MODEL_KINDS = ("mnist_vae", "resnet_vae")


def build_model(model_config, image_shape):
  """The model a config describes, for images of shape (H, W, C) (taken from the data)."""
  kind = model_config.kind
  if kind == "mnist_vae":
    from iaf_jax.models.mnist_vae import MnistVAE, model_field
    return MnistVAE(image_shape=tuple(image_shape), latent_dim=model_config.latent_dim,
                    iaf_depth=model_config.iaf_depth, iaf_width=model_config.iaf_width,
                    learnt_sigma=model_config.learnt_sigma, likelihood=model_config.likelihood,
                    channels=tuple(model_config.channels), strides=tuple(model_config.strides),
                    hidden_dim=model_config.hidden_dim, weight_norm=model_config.weight_norm,
                    block=model_field(model_config, "block"), context_dim=model_field(model_config, "context_dim"),
                    initial_log_std=model_field(model_config, "initial_log_std"))
  if kind == "resnet_vae":
    from iaf_jax.models.resnet_vae import build_resnet_vae
    return build_resnet_vae(model_config, tuple(image_shape))
  raise ValueError(f"config.model.kind must be one of {MODEL_KINDS}, got {kind!r}")
