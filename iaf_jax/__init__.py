"""iaf-jax: VAEs with Inverse Autoregressive Flow (Kingma et al. 2016) in JAX/Flax."""
__version__ = "0.1.0"


def load_trained(workdir: str, checkpoint: str = "best"):
  """See iaf_jax.api.load_trained (imported lazily: `import iaf_jax` stays cheap)."""
  from iaf_jax.api import load_trained as _load
  return _load(workdir, checkpoint)
