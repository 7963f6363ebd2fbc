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
