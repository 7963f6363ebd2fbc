"""iaf-jax: VAEs with Inverse Autoregressive Flow (Kingma et al. 2016) in JAX/Flax."""
__version__ = "0.1.0"
