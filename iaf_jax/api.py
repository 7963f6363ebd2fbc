"""A trained model for notebooks:

  m = iaf_jax.load_trained("runs/iaf_d2_w320")
  z, log_q = m.posterior_sample(x, key)      # batched arrays in, per-example arrays out
  m.log_px(x, key, num_samples=128)

x is what the model's likelihood scores: float {0, 1} images for a Bernoulli model (binarise with
`m.inputs(key, uint8_images)`), pixel values 0..255 for the discretized logistic. Each method is jit-compiled
once per input shape.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from iaf_jax import data as data_lib, eval_lib, objectives


class TrainedModel:
  def __init__(self, run: eval_lib.Run):
    self.run, self.config, self.params = run, run.config, run.params
    model = run.model
    apply = lambda method: jax.jit(functools.partial(model.apply, {"params": self.params}, method=method))
    self._posterior_sample = apply("posterior_sample")
    self._log_likelihood = apply("log_likelihood")
    self._log_prior = apply("log_prior")
    self._reconstruct = apply("reconstruct")
    self._sample = jax.jit(lambda key, num: model.apply({"params": self.params}, key, num, method="sample"),
                           static_argnums=1)
    self._log_px = jax.jit(
        lambda x, key, num_samples: objectives.importance_sampled_log_px(
            lambda k, n: model.apply({"params": self.params}, x, k, n, method="log_weights"), key, num_samples,
            min(num_samples, run.config.eval.chunk_size)),
        static_argnums=2)

  @property
  def step(self) -> int:
    return self.run.step

  def inputs(self, key, images):
    """uint8 images [B, H, W, C] -> the model's x (binarised for a Bernoulli model)."""
    return data_lib.model_inputs(key, jnp.asarray(images), self.config.model.likelihood, self.run.max_value)

  def posterior_sample(self, x, key):
    """(z ~ q(z|x), log q(z|x) [B])."""
    return self._posterior_sample(x, key)

  def log_likelihood(self, x, z):
    """log p(x|z) [B]."""
    return self._log_likelihood(x, z)

  def log_prior(self, z):
    """log p(z) [B]."""
    return self._log_prior(z)

  def log_px(self, x, key, num_samples: int = 128):
    """Importance-sampled log p(x) [B] with K = num_samples."""
    return self._log_px(x, key, int(num_samples))

  def sample(self, key, n: int):
    """[n, H, W, C] images in [0, 1] from the prior."""
    return self._sample(key, int(n))

  def reconstruct(self, x, key):
    """[B, H, W, C] images in [0, 1] decoded from one posterior sample."""
    return self._reconstruct(x, key)


def load_trained(workdir: str, checkpoint: str = "best") -> TrainedModel:
  """The EMA parameters of a training workdir's best (or 'latest', or step N) checkpoint."""
  return TrainedModel(eval_lib.load_run(workdir, checkpoint))
