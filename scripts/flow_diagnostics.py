"""What a trained MNIST model's IAF does, on a fixed random subset of test images (data.fixed_subset):

  python scripts/flow_diagnostics.py --workdir=runs/X [--num=256] [--seed=0]

At one posterior draw z0 ~ q(z0|x) per image it computes J = dz_T/dz0 of the flow with jax.jacfwd and prints
JSON: the mean diagonal of J, the off-diagonal Frobenius norm relative to the diagonal's, the log-det per latent
dimension (also checked against slogdet(J)), |z_T - z0| in units of the posterior std, and the posterior std.
A flow near a diagonal rescaling (off-diagonal share ~0) is not using its autoregressive part.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from iaf_jax import data as data_lib, distributions as dist, eval_lib  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint", default="best")
  args = p.parse_args()
  run = eval_lib.load_run(args.workdir, args.checkpoint)
  c = run.config
  ds = data_lib.load_for_config(c)  # only its test split is used
  images = data_lib.fixed_subset(ds.test, args.num, seed=args.seed)
  key = jax.random.PRNGKey(args.seed)
  x = data_lib.model_inputs(key, jnp.asarray(images), c.model.likelihood, run.max_value)
  v = {"params": run.params}
  mean, log_std, h = run.model.apply(v, x, method="encode")
  z0 = dist.diag_gaussian_sample(jax.random.fold_in(key, 1), mean, log_std)
  flow = lambda z, ctx: run.model.apply(v, z[None], ctx[None], method="iaf")
  jac = jax.jit(jax.vmap(jax.jacfwd(lambda z, ctx: flow(z, ctx)[0][0])))(z0, h)   # [B, k, k]
  zt, log_det = run.model.apply(v, z0, h, method="iaf")
  jac, k = np.asarray(jac, np.float64), z0.shape[-1]
  diag = np.diagonal(jac, axis1=1, axis2=2)
  off = jac - np.einsum("bi,ij->bij", diag, np.eye(k))
  sign, slog = np.linalg.slogdet(jac)
  std = np.exp(np.asarray(log_std))
  out = {
      "workdir": os.path.abspath(args.workdir), "config": c.name, "iaf_depth": int(c.model.iaf_depth),
      "num_images": int(len(images)), "subset": f"data.fixed_subset(test, {args.num}, seed={args.seed})",
      "jacobian_diag_mean": float(diag.mean()),
      "offdiag_frobenius_over_diag_frobenius": float(np.mean(np.linalg.norm(off, axis=(1, 2))
                                                             / np.linalg.norm(diag, axis=1))),
      "log_det_per_dim": float(np.mean(np.asarray(log_det)) / k),
      "log_det_matches_slogdet_max_abs_diff": float(np.max(np.abs(slog - np.asarray(log_det)))),
      "z_shift_in_posterior_std": float(np.mean(np.abs(np.asarray(zt) - np.asarray(z0)) / std)),
      "posterior_std_mean": float(std.mean()),
  }
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
