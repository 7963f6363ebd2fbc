"""The importance-sampling evaluator (nats and bits/dim), sampling and its timing. Re-enters the data flow at
the checkpoint: workdir -> config + EMA params -> model -> estimator."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iaf_jax import checkpoints, config_lib, data as data_lib, diagnostics, objectives, optim, plots, sharding
from iaf_jax import train_lib, workdir as workdir_lib
from iaf_jax.models import build_model


@dataclasses.dataclass
class Run:
  """A trained run restored from its workdir."""
  workdir: str
  config: ml_collections.ConfigDict
  model: Any
  params: Any           # the EMA (Polyak-averaged) parameters
  step: int
  image_shape: tuple
  max_value: int


def load_run(workdir: str, checkpoint: str = "best", config: Optional[ml_collections.ConfigDict] = None) -> Run:
  """Restore config and EMA params. `config`, if given, must describe the same model as the workdir's."""
  saved = config_lib.load_config(workdir)
  if config is not None:
    _check_same_model(saved, config, workdir)
  config = saved
  info = config_lib.load_data_info(workdir)
  shape, max_value = tuple(info["image_shape"]), int(info["max_value"])
  model = build_model(config.model, shape)
  optimizer = optim.make_optimizer(config.train)
  dummy = np.zeros((1, *shape), np.uint8)
  abstract = jax.eval_shape(lambda: train_lib.init_state(model, optimizer, dummy, config.seed,
                                                         likelihood=config.model.likelihood, max_value=max_value))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
      abstract)
  state, _, step = checkpoints.CheckpointManager(workdir).restore(checkpoint, abstract)
  return Run(workdir, config, model, state.ema_params, step, shape, max_value)


def _check_same_model(saved, config, workdir):
  a, b = config_lib.to_dict(saved)["model"], config_lib.to_dict(config)["model"]
  diffs = config_lib.config_diff(a, b, "model.")
  if diffs:
    raise config_lib.ConfigError(f"{workdir}: its checkpoints hold another model ({'; '.join(diffs[:3])})")


def make_importance_eval(model, *, likelihood: str, max_value: int, num_samples: int, chunk_size: int):
  """(params, uint8 images, key) -> (ELBO [B], log p(x) [B]) from the same K importance samples.

  The ELBO is the mean of the K log weights (the K-sample average of the single-sample bound), log p(x) their
  log-mean-exp; the model's log_weights encodes each example once and batches the K samples.
  """
  def f(params, images, key):
    k_bin, k_is = jax.random.split(key)
    x = data_lib.model_inputs(k_bin, images, likelihood, max_value)
    lw_fn = lambda k, n: model.apply({"params": params}, x, k, n, method="log_weights")
    log_w = objectives.importance_log_weights(lw_fn, k_is, num_samples, chunk_size)
    return jnp.mean(log_w, axis=0), objectives.log_mean_exp(log_w)
  return f


def _split_images(ds: data_lib.Dataset, split: str) -> np.ndarray:
  if split not in ("test", "valid", "train"):
    raise config_lib.ConfigError(f"--split={split!r}: must be test, valid or train")
  images = getattr(ds, split)
  if not len(images):
    raise data_lib.DataError(f"{ds.name}: the {split} split is empty")
  return images


def evaluate(workdir: str, *, num_samples: int = 128, split: str = "test", checkpoint: str = "best",
             max_examples: int = 0, batch_size: int = 0, chunk_size: int = 0, seed: int = 0,
             progress: bool = True, diagnostics_examples: int = 1000,
             diagnostics_samples: int = diagnostics.DEFAULT_NUM_SAMPLES) -> dict:
  """Importance-sampled log p(x) and ELBO of a trained run; prints a table row, writes workdir/eval_*.json.

  The JSON also holds the collapse diagnostics of iaf_jax/diagnostics.py (KL per latent unit, active units)
  on a fixed random subset (data.fixed_subset) of `diagnostics_examples` examples (0 = skip them)."""
  for flag, value, low in (("num_samples", num_samples, 1), ("max_examples", max_examples, 0),
                           ("batch_size", batch_size, 0), ("chunk_size", chunk_size, 0),
                           ("diagnostics_examples", diagnostics_examples, 0),
                           ("diagnostics_samples", diagnostics_samples, 1)):
    if value < low:
      what = "K" if flag == "num_samples" else "it"
      raise config_lib.ConfigError(f"--{flag}={value}: {what} must be >= {low}")
  run = load_run(workdir, checkpoint)
  c = run.config
  ds = data_lib.load_for_config(c)
  if tuple(ds.image_shape) != run.image_shape:
    raise data_lib.DataError(f"{ds.name}: images are {ds.image_shape}, the checkpoint's model expects {run.image_shape}")
  images = _split_images(ds, split)
  split_size = len(images)
  subset = max_examples if 0 < max_examples < split_size else 0
  if max_examples:
    # A fixed random subset (data.fixed_subset, seed 0), the same for every run: binarized MNIST's test split
    # is grouped by digit, so its first N images are not a sample of it.
    images = data_lib.fixed_subset(images, max_examples)
  mesh = sharding.make_mesh()
  n_dev = mesh.devices.size
  # (Runs saved before eval.importance_batch_size existed: eval.batch_size, as they were evaluated then.)
  bs = sharding.per_device_multiple(mesh, batch_size or c.eval.get("importance_batch_size", 0)
                                    or c.eval.batch_size)
  fn = jax.jit(sharding.shard_examples(make_importance_eval(
      run.model, likelihood=c.model.likelihood, max_value=run.max_value, num_samples=num_samples,
      chunk_size=chunk_size or c.eval.chunk_size), mesh))
  params = jax.device_put(run.params, sharding.replicated(mesh))
  elbos, log_pxs = [], []
  t0 = time.time()
  for b, (start, padded, n) in enumerate(data_lib.padded_batches(images, bs)):
    # The key depends only on (seed, batch): a binarised test set is the same for every checkpoint compared.
    e, l = fn(params, jax.device_put(padded, sharding.batch_sharded(mesh)),
              jax.random.fold_in(jax.random.PRNGKey(seed), b))
    elbos.append(np.asarray(e)[:n])
    log_pxs.append(np.asarray(l)[:n])
    if progress:
      done = start + n
      sys.stderr.write(f"\revaluating {done}/{len(images)} examples, K={num_samples}  "
                       f"{done / max(time.time() - t0, 1e-9):.1f} examples/s")
  if progress:
    sys.stderr.write("\n")
  elbo, log_px = np.concatenate(elbos), np.concatenate(log_pxs)
  d = int(np.prod(run.image_shape))
  neg_elbo, nll = float(-elbo.mean()), float(-log_px.mean())
  result = {
      "workdir": os.path.abspath(workdir), "config": c.name, "split": split, "checkpoint": checkpoint,
      "checkpoint_step": run.step, "num_examples": int(len(images)), "num_samples": num_samples,
      # A partial evaluation (--max_examples) says so: the split's size and the cap asked for.
      "split_size": int(split_size), "max_examples": int(max_examples),
      "subset": "data.fixed_subset(seed=0)" if subset else "all",
      "neg_elbo_nats": neg_elbo, "nll_nats": nll, "gap_nats": neg_elbo - nll,
      "bits_per_dim_elbo": objectives.nats_to_bits_per_dim(neg_elbo, d),
      "bits_per_dim_nll": objectives.nats_to_bits_per_dim(nll, d),
      "nll_stderr_nats": float(log_px.std(ddof=1) / np.sqrt(len(log_px))) if len(log_px) > 1 else 0.0,
      "num_dims": d, "dataset": ds.name, "likelihood": c.model.likelihood, "seconds": time.time() - t0,
      "devices": n_dev,
  }
  if diagnostics_examples and len(images) >= 2:
    t1 = time.time()
    result.update(diagnostics.collapse_diagnostics(
        run.model, run.params, data_lib.fixed_subset(images, diagnostics_examples), likelihood=c.model.likelihood,
        max_value=run.max_value, num_samples=diagnostics_samples, seed=seed))
    result["diagnostics_seconds"] = time.time() - t1
  config_lib.write_json_atomic(workdir_lib.eval_path(workdir, split, checkpoint, num_samples, subset), result)
  print(format_row(result))
  return result


def format_row(r: dict) -> str:
  """A row like the report's tables: VLB, ~log p(x) and the gap in nats, and bits/dim."""
  return (f"{r['config'] or '?':<16} VLB {r['neg_elbo_nats']:9.3f}  ~-log p(x) {r['nll_nats']:9.3f}  "
          f"gap {r['gap_nats']:6.3f} nats | {r['bits_per_dim_elbo']:.4f} / {r['bits_per_dim_nll']:.4f} bits/dim  "
          f"(K={r['num_samples']}, {r['num_examples']} {r['split']} examples, step {r['checkpoint_step']})")


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of fn() (blocked until its results are ready) after `warmup` untimed calls (compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def sample(workdir: str, *, num: int = 64, checkpoint: str = "best", seed: int = 0) -> dict:
  """Prior samples to workdir/samples.png, test reconstructions to workdir/reconstructions.png, and the time
  per image (batched and batch 1) and of one forward pass, measured after compilation."""
  if num < 1:
    raise config_lib.ConfigError(f"--num={num}: must be >= 1")
  run = load_run(workdir, checkpoint)
  c, model, params = run.config, run.model, run.params
  key = jax.random.PRNGKey(seed)
  sample_fn = jax.jit(lambda p, k, n: model.apply({"params": p}, k, n, method="sample"), static_argnums=2)
  samples = np.asarray(sample_fn(params, key, num))
  samples_png, reconstructions_png = (workdir_lib.path(workdir, f) for f in (workdir_lib.SAMPLES_PNG,
                                                                               workdir_lib.RECONSTRUCTIONS_PNG))
  plots.save_image_grid(samples_png, samples)
  t_batched = median_seconds(lambda: sample_fn(params, key, num))
  t_single = median_seconds(lambda: sample_fn(params, key, 1))

  ds = data_lib.load_for_config(c)
  # A fixed random subset, not the first images: binarized MNIST's test split is grouped by digit.
  originals = data_lib.fixed_subset(ds.test, min(num, len(ds.test)))
  lik = c.model.likelihood

  def recon(p, k, imgs):
    x = data_lib.model_inputs(k, imgs, lik, run.max_value)
    return x, model.apply({"params": p}, x, k, method="reconstruct")

  x, rec = jax.jit(recon)(params, key, originals)
  shown = np.asarray(x) if lik == "bernoulli" else np.asarray(x) / 255.0
  plots.save_image_grid(reconstructions_png, np.concatenate([shown, np.asarray(rec)]),
                        ncols=min(len(originals), 16))
  forward = jax.jit(lambda p, xx, k: model.apply({"params": p}, xx, k))
  x1 = x[:1]
  t_forward = median_seconds(lambda: forward(params, x1, key))
  result = {"workdir": os.path.abspath(workdir), "checkpoint_step": run.step, "num": num,
            "ms_per_image_batched": 1000 * t_batched / num, "ms_per_image_single": 1000 * t_single,
            "ms_forward": 1000 * t_forward, "device": str(jax.devices()[0].platform),
            "samples_png": samples_png, "reconstructions_png": reconstructions_png}
  config_lib.write_json_atomic(workdir_lib.path(workdir, workdir_lib.SAMPLES_FILE), result)
  print(f"sampling: {result['ms_per_image_batched']:.3f} ms/image batched ({num}), "
        f"{result['ms_per_image_single']:.3f} ms/image single; forward pass {result['ms_forward']:.3f} ms "
        f"({result['device']}); wrote {result['samples_png']} and {result['reconstructions_png']}")
  return result
