"""The replication report's Figures 4-9 and a posterior-collapse diagnostic, as PNGs, from trained workdirs:

  python -m iaf_jax.experiments.figures fig4 --workdirs GAUSS_DIR,IAF_DIR # 2-D toy: prior and posteriors q(z|x)
  python -m iaf_jax.experiments.figures fig5 --workdirs GAUSS_DIR,IAF_DIR # 2-D latent manifold of decoded images
  python -m iaf_jax.experiments.figures fig6 --workdirs A,B,C             # training curves: reconstruction and KL terms
  python -m iaf_jax.experiments.figures fig7 --workdirs GAUSS_DIR,IAF_DIR # originals, reconstructions, pixel errors
  python -m iaf_jax.experiments.figures fig8 --workdir DIR                # originals vs reconstructions (fig9: the same)
  python -m iaf_jax.experiments.figures samples --workdirs A,B            # one grid of prior samples per run
  python -m iaf_jax.experiments.figures collapse --workdir DIR            # KL per latent unit / rung, active units

The PNG goes to --out, else to <--workdir, or the first of --workdirs>/<DEFAULT_NAMES[figure]>. Every figure
is saved at exactly `figure_size(...)` inches times --dpi (default 100) pixels. docs/figures.md lists the
commands; the functions below say what each figure shows and how it is computed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Optional, Sequence

import numpy as np

from iaf_jax import workdir as workdir_lib

DPI = 100
DEFAULT_NAMES = {
    "fig4": "fig4_posteriors.png", "fig5": "fig5_manifold.png", "fig6": "fig6_training_curves.png",
    "fig7": "fig7_reconstruction_errors.png", "fig8": "fig8_reconstructions.png",
    "fig9": "fig9_reconstructions.png", "samples": "samples_by_model.png", "collapse": "collapse.png",
    "wallclock": "valid_vs_wallclock.png",
}
DEFAULT_NUM = {"fig4": 4, "fig5": 20, "fig7": 10, "fig8": 32, "fig9": 32, "samples": 64}
HDR_MASSES = (0.95, 0.8, 0.5)   # fig4: contours enclosing these probability masses (highest-density regions)
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan", "tab:gray")
_ROWS_PER_CALL = 2048


def figure_size(figure: str, num_runs: int = 1, num: Optional[int] = None) -> tuple[float, float]:
  """The figure's size in inches (multiples of 0.25, so size * dpi is a whole number of pixels)."""
  k = max(1, num_runs)
  num = DEFAULT_NUM.get(figure, 0) if num is None else num
  if figure == "fig4":
    return 3.75 * (1 + k) + 1.75, 4.25
  if figure == "fig5":
    return 5.0 * k, 5.5
  if figure == "fig6":
    return 12.0, 4.5
  if figure == "wallclock":
    return 7.0, 4.5
  if figure == "fig7":
    return 1.5 + 0.75 * num, 0.75 * (1 + 2 * k) + 0.5
  if figure in ("fig8", "fig9"):   # per run: a title line and ceil(num / 8) rows of ~0.54 in images
    return 9.0, k * 0.25 * np.ceil((0.54 * -(-num // 8) + 0.45) / 0.25)
  if figure == "samples":
    return 4.5 * k, 5.0
  if figure == "collapse":
    return 12.0, 4.5
  raise ValueError(f"unknown figure {figure!r}")


# ----------------------------------------------------------------------------- loading

def _config_error(msg):
  from iaf_jax import config_lib
  return config_lib.ConfigError(msg)


def load_runs(workdirs: Sequence[str], checkpoint: str = "best"):
  from iaf_jax import eval_lib
  if not workdirs:
    raise _config_error("no workdir given (--workdir or --workdirs)")
  return [eval_lib.load_run(w, checkpoint) for w in workdirs]


def run_labels(runs) -> list[str]:
  """Config names, with the workdir's name added where two runs share one."""
  names = [r.config.name or os.path.basename(os.path.normpath(r.workdir)) for r in runs]
  return [f"{n} ({os.path.basename(os.path.normpath(r.workdir))})" if names.count(n) > 1 else n
          for n, r in zip(names, runs)]


_DATASETS: dict = {}


def load_run_dataset(run):
  """The run's dataset as its config describes it (cached by the data settings)."""
  from iaf_jax import data as data_lib
  c = run.config
  key = (c.data.name, c.data.dir, c.data.validation_size, c.seed, c.model.likelihood, c.data.max_train)
  if key not in _DATASETS:
    _DATASETS[key] = data_lib.load_for_config(c)
  return _DATASETS[key]


def _split(ds, split: str, num: int) -> np.ndarray:
  if split not in ("test", "valid", "train"):
    raise _config_error(f"--split={split!r}: must be test, valid or train")
  images = getattr(ds, split)
  if not len(images):
    raise _config_error(f"{ds.name}: the {split} split is empty")
  from iaf_jax import data as data_lib
  return data_lib.fixed_subset(images, num)  # not the first num: binarized MNIST's test split is grouped by digit


def _inputs(run, images, seed: int):
  """The model's x for uint8 images (binarised with a key from `seed` for a Bernoulli model) and the same
  x as a picture in [0, 1]."""
  import jax
  from iaf_jax import data as data_lib
  lik = run.config.model.likelihood
  x = np.asarray(data_lib.model_inputs(jax.random.PRNGKey(seed), np.asarray(images), lik, run.max_value))
  return x, (x if lik == "bernoulli" else x / run.max_value)


def _require_2d_mnist(run, figure):
  # latent_dim: the protocol's size of a model's one latent vector (models/__init__.py); latent maps have none.
  dim = getattr(run.model, "latent_dim", None)
  if dim != 2:
    raise _config_error(f"{run.workdir}: {figure} needs the MNIST model with a 2-D latent (configs/mnist.py:toy_2d"
                        f" or --config.model.latent_dim=2); this run has {type(run.model).__name__}"
                        + (f" with latent_dim={dim}" if dim is not None else ""))


def _posterior_kind(run) -> str:
  depth = getattr(run.model, "iaf_depth", 0)
  return "Gaussian" if depth == 0 else f"IAF, {depth} steps"


# ----------------------------------------------------------------------------- Figure 4

def posterior_samples(model, x_one, num_samples: int, key, rows: int = _ROWS_PER_CALL):
  """num_samples draws z ~ q(z|x) for ONE example x [1, H, W, C] with their exact log q(z|x), through
  `model.posterior_sample` (api.TrainedModel) on batches of `rows` copies of x (one compiled shape)."""
  import jax
  rows = min(rows, num_samples)
  tiled = np.repeat(np.asarray(x_one), rows, axis=0)
  zs, lqs = [], []
  for i in range(-(-num_samples // rows)):
    z, lq = model.posterior_sample(tiled, jax.random.fold_in(key, i))
    zs.append(np.asarray(z)), lqs.append(np.asarray(lq))
  return np.concatenate(zs)[:num_samples], np.concatenate(lqs)[:num_samples]


def density_from_samples(z: np.ndarray, log_q: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                         max_edge_factor: float = 10.0) -> np.ndarray:
  """q on the grid (xs x ys) from samples z [S, 2] ~ q and their EXACT log q(z) [S].

  The IAF posterior's density is known exactly only at points produced by the flow (the change of variables
  runs forward), so: log q is interpolated linearly over the Delaunay triangulation of the samples (exact at
  every sample, no bandwidth), and is 0 outside it and inside triangles with an edge longer than
  `max_edge_factor` times the median longest edge (regions without samples, e.g. between two modes, where
  interpolating would bridge them). Returns [len(ys), len(xs)].
  """
  import matplotlib.tri as mtri
  z = np.asarray(z, np.float64)
  log_q = np.asarray(log_q, np.float64)
  z, idx = np.unique(z, axis=0, return_index=True)
  log_q = log_q[idx]
  tri = mtri.Triangulation(z[:, 0], z[:, 1])
  corners = z[tri.triangles]                                            # [T, 3, 2]
  edges = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=-1).max(axis=1)
  tri.set_mask(edges > max_edge_factor * np.median(edges))
  gx, gy = np.meshgrid(xs, ys)
  v = mtri.LinearTriInterpolator(tri, log_q)(gx, gy)
  return np.where(np.ma.getmaskarray(v), 0.0, np.exp(np.ma.filled(v, -np.inf)))


def hdr_levels(log_q_samples: np.ndarray, masses: Sequence[float] = HDR_MASSES) -> np.ndarray:
  """Density levels whose super-level sets {q > t} hold the given probability masses, from the exact densities
  of samples of q (P(q(z) > t) for z ~ q is the mass of {q > t}). Increasing, as contour() wants them."""
  q = np.exp(np.asarray(log_q_samples, np.float64))
  return np.sort(np.quantile(q, 1.0 - np.asarray(masses)))


def fig4(runs, out: str, *, num: int = 4, samples: int = 20000, grid: int = 160, seed: int = 0,
         dpi: int = DPI) -> dict:
  """Report Figure 4 (IAF paper Figure 3): (a) the prior p(z) and, for each run, q(z|x) of each of the first
  `num` training images (toy_2d: the 4 images it was trained on), as highest-density contours holding 50%,
  80% and 95% of the mass, every panel on one shared grid.

  Densities: the prior exactly on the grid (model.log_prior); each posterior from `samples` draws of
  model.posterior_sample with their exact log q(z|x), interpolated by `density_from_samples` (exact at the
  samples, no smoothing); contour levels from the samples' exact densities (`hdr_levels`).
  """
  import jax
  from iaf_jax import api, plots
  for r in runs:
    _require_2d_mnist(r, "fig4")
  if not 1 <= num <= len(_COLORS):
    raise _config_error(f"fig4: --num={num} images; must be 1..{len(_COLORS)}")
  images = load_run_dataset(runs[0]).train[:num]
  for r in runs[1:]:
    other = load_run_dataset(r).train[:num]
    if other.shape != images.shape or not np.array_equal(other, images):
      raise _config_error(f"fig4: {r.workdir} was trained on other images than {runs[0].workdir}")
  labels = run_labels(runs)
  key = jax.random.PRNGKey(seed)
  post = []   # per run: list of (z [S, 2], log q [S]) per image
  for ri, run in enumerate(runs):
    m = api.TrainedModel(run)
    x, _ = _inputs(run, images, seed)
    post.append([posterior_samples(m, x[i:i + 1], samples, jax.random.fold_in(key, 1000 * ri + i))
                 for i in range(num)])
  all_z = np.concatenate([z for p in post for z, _ in p])
  lim = float(np.ceil(2.0 * max(3.0, np.quantile(np.abs(all_z), 0.995) * 1.1)) / 2.0)
  xs = ys = np.linspace(-lim, lim, grid)
  gx, gy = np.meshgrid(xs, ys)
  m0 = api.TrainedModel(runs[0])
  prior = np.exp(np.asarray(m0.log_prior(np.stack([gx.ravel(), gy.ravel()], -1).astype(np.float32))))
  prior = prior.reshape(gx.shape)
  prior_samples = np.random.default_rng(seed).standard_normal((samples, 2)).astype(np.float32)
  prior_levels = hdr_levels(np.asarray(m0.log_prior(prior_samples)))

  plt = plots.pyplot()
  k = len(runs)
  fig = plt.figure(figsize=figure_size("fig4", k, num))
  thumb_rows = -(-num // 2)
  gs = fig.add_gridspec(thumb_rows, 3 + k, width_ratios=[1.0] * (1 + k) + [0.22, 0.22],
                        left=0.04, right=0.99, bottom=0.1, top=0.9, wspace=0.25)
  ax = fig.add_subplot(gs[:, 0])
  ax.contourf(gx, gy, prior, levels=20, cmap="Greys")
  ax.contour(gx, gy, prior, levels=prior_levels, colors="k", linewidths=0.8)
  ax.set_title("(a) prior p(z)", fontsize=10)
  for ri, (run, label) in enumerate(zip(runs, labels)):
    ax = fig.add_subplot(gs[:, 1 + ri])
    ax.contour(gx, gy, prior, levels=prior_levels, colors="0.75", linewidths=0.6, linestyles="dashed")
    for i, (z, lq) in enumerate(post[ri]):
      dens = density_from_samples(z, lq, xs, ys)
      levels = hdr_levels(lq)
      if dens.max() > levels[0]:
        ax.contourf(gx, gy, dens, levels=[levels[0], max(dens.max(), levels[-1]) * 1.001],
                    colors=[_COLORS[i]], alpha=0.2)
      if dens.max() > levels[-1]:
        ax.contour(gx, gy, dens, levels=levels, colors=[_COLORS[i]], linewidths=1.0)
    ax.set_title(f"({chr(ord('b') + ri)}) q(z|x): {label}\n({_posterior_kind(run)})", fontsize=10)
  for a in fig.axes:
    a.set_xlim(-lim, lim), a.set_ylim(-lim, lim), a.set_aspect("equal")
    a.set_xlabel("z1", fontsize=9)
  fig.axes[0].set_ylabel("z2", fontsize=9)
  _, shown = _inputs(runs[0], images, seed)
  for i in range(num):
    ax = fig.add_subplot(gs[i // 2, 1 + k + i % 2])
    plots.show_grid(ax, shown[i:i + 1], 1, pad=0)
    for side in ax.spines.values():
      side.set_edgecolor(_COLORS[i]), side.set_linewidth(3)
  fig.text(0.99, 0.95, "training images", ha="right", fontsize=9)
  return _save(fig, out, dpi, "fig4", {"grid_limit": lim, "samples_per_image": samples})


# ----------------------------------------------------------------------------- Figure 5

def manifold_grid(n: int) -> np.ndarray:
  """[n] latent coordinates Phi^-1((i + 0.5) / n): a linear grid on the unit square through the inverse
  Gaussian CDF (Kingma & Welling 2014, Figure 4), so every cell holds the same prior mass."""
  nd = statistics.NormalDist()
  return np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)], np.float32)


def fig5(runs, out: str, *, num: int = 20, dpi: int = DPI) -> dict:
  """Report Figure 5: for each run with a 2-D latent, the decoder's mean image at z = (z1, z2) on the
  num x num `manifold_grid` (z1 left to right, z2 bottom to top), one panel per run."""
  import jax
  from iaf_jax import plots
  if num < 2:
    raise _config_error(f"fig5: --num={num}: the grid needs >= 2 points per axis")
  for r in runs:
    _require_2d_mnist(r, "fig5")
  g = manifold_grid(num)
  z1, z2 = np.meshgrid(g, g[::-1])                     # row 0 = largest z2 (top of the picture)
  z = np.stack([z1.ravel(), z2.ravel()], -1)
  plt = plots.pyplot()
  k = len(runs)
  fig, axes = plt.subplots(1, k, figsize=figure_size("fig5", k, num), squeeze=False)
  fig.subplots_adjust(left=0.7 / (5.0 * k), right=1 - 0.1 / (5.0 * k), bottom=0.1, top=0.9, wspace=0.2)
  for ax, run, label in zip(axes[0], runs, run_labels(runs)):
    images = jax.jit(lambda p, zz: run.model.apply({"params": p}, zz, method="mean_image"))(run.params, z)
    plots.show_grid(ax, np.asarray(images), num, f"{label} ({_posterior_kind(run)})", pad=0)
    h, w = run.image_shape[:2]
    ticks = sorted({0, (num - 1) // 2, num - 1})
    ax.set_xticks([(t + 0.5) * w for t in ticks], [f"{g[t]:.2f}" for t in ticks], fontsize=8)
    ax.set_yticks([(t + 0.5) * h for t in ticks], [f"{g[::-1][t]:.2f}" for t in ticks], fontsize=8)
    ax.set_xlabel("z1", fontsize=9)
    ax.set_ylabel("z2", fontsize=9)
  return _save(fig, out, dpi, "fig5", {"grid": g.tolist()})


# ----------------------------------------------------------------------------- Figure 6

CURVE_KEYS = ("recon", "kl")   # metrics.jsonl: -E log p(x|z) and E[log q(z|x) - log p(z)] of the training batches


def training_curves(workdir: str) -> dict:
  """{'step', 'recon', 'kl'} arrays from workdir/metrics.jsonl: the training records (averages over each
  logging interval of the minibatch terms; the last record wins where a resumed run repeats a step)."""
  from iaf_jax import config_lib
  records = workdir_lib.read_metrics_records(workdir)
  if records is None:
    raise _config_error(f"{workdir}: no {workdir_lib.METRICS_FILE} (not a training workdir)")
  by_step = {int(r["step"]): r for r in records if "step" in r and all(k in r for k in CURVE_KEYS)}
  steps = sorted(by_step)
  return {"step": np.array(steps), **{k: np.array([by_step[s][k] for s in steps], np.float64) for k in CURVE_KEYS}}


def fig6(workdirs: Sequence[str], out: str, *, dpi: int = DPI) -> dict:
  """Report Figure 6: (a) the reconstruction term -E_q log p(x|z) and (b) the KL term E_q[log q(z|x) -
  log p(z)] of the ELBO against the training step, one line per run (train_lib's `recon` and `kl`, nats per
  example, the true KL also when the loss uses free bits)."""
  from iaf_jax import config_lib, plots
  curves, labels = [], []
  for w in workdirs:
    c = training_curves(w)
    if not len(c["step"]):
      raise _config_error(f"{w}: metrics.jsonl holds no record with {' and '.join(CURVE_KEYS)}")
    curves.append(c)
    try:
      name = config_lib.load_config(w).name
    except Exception:  # noqa: BLE001 - a label only
      name = ""
    labels.append(name or os.path.basename(os.path.normpath(w)))
  labels = [f"{n} ({os.path.basename(os.path.normpath(w))})" if labels.count(n) > 1 else n
            for n, w in zip(labels, workdirs)]
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=figure_size("fig6", len(workdirs)))
  fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.22)
  for i, (c, label) in enumerate(zip(curves, labels)):
    for ax, k in zip(axes, CURVE_KEYS):
      ax.plot(c["step"], c[k], color=_COLORS[i % len(_COLORS)], label=label, linewidth=1.2)
  axes[0].set_title("(a) reconstruction term  -E_q log p(x|z)", fontsize=10)
  axes[1].set_title("(b) KL term  E_q[log q(z|x) - log p(z)]", fontsize=10)
  for ax in axes:
    ax.set_xlabel("training step")
    ax.set_ylabel("nats per example")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  return _save(fig, out, dpi, "fig6", {"num_points": [int(len(c["step"])) for c in curves]})


# ----------------------------------------------------------------------------- Figures 7-9, samples

def _test_images(runs, split: str, num: int):
  images = _split(load_run_dataset(runs[0]), split, num)
  for r in runs[1:]:
    if tuple(r.image_shape) != tuple(runs[0].image_shape):
      raise _config_error(f"{r.workdir}: images of shape {r.image_shape}, {runs[0].workdir}'s are "
                          f"{runs[0].image_shape}; compare runs on the same data")
  return images


def reconstructions(run, images, seed: int):
  """(x as a picture in [0, 1], the mean image decoded from one z ~ q(z|x)) for uint8 images."""
  import jax
  from iaf_jax import api
  x, shown = _inputs(run, images, seed)
  rec = api.TrainedModel(run).reconstruct(x, jax.random.PRNGKey(seed + 1))
  return shown, np.asarray(rec)


def fig7(runs, out: str, *, num: int = 10, split: str = "test", seed: int = 0, dpi: int = DPI) -> dict:
  """Report Figure 7: rows (1) the first `num` test images, then the reconstruction by each run, then each
  run's pixel-wise absolute error |x - x_hat| (x as the model sees it: binarised for a Bernoulli model)."""
  from iaf_jax import plots
  images = _test_images(runs, split, num)
  labels = run_labels(runs)
  recs = [reconstructions(r, images, seed) for r in runs]
  rows = [("original", recs[0][0])]
  rows += [(f"reconstruction\n{label}", rec) for label, (_, rec) in zip(labels, recs)]
  rows += [(f"|error|\n{label}", np.abs(shown - rec)) for label, (shown, rec) in zip(labels, recs)]
  plt = plots.pyplot()
  fig, axes = plt.subplots(len(rows), 1, figsize=figure_size("fig7", len(runs), len(images)), squeeze=False)
  fig.subplots_adjust(left=1.3 / fig.get_size_inches()[0], right=0.99, bottom=0.02, top=0.98, hspace=0.08)
  for ax, (label, imgs) in zip(axes[:, 0], rows):
    plots.show_grid(ax, imgs, len(imgs))
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    for side in ax.spines.values():
      side.set_visible(False)
  errors = {label: float(np.mean(np.abs(s - r))) for label, (s, r) in zip(labels, recs)}
  return _save(fig, out, dpi, "fig7", {"mean_abs_error": errors})


def fig8(runs, out: str, *, num: int = 32, split: str = "test", seed: int = 0, dpi: int = DPI,
         figure: str = "fig8") -> dict:
  """Report Figures 8 and 9: the first `num` test images (left) and their reconstructions (right: mean image
  decoded from one z ~ q(z|x)), one row per run (Figure 8: the MNIST-architecture baseline on CIFAR-10;
  Figure 9: the ResNet VAE)."""
  from iaf_jax import plots
  images = _test_images(runs, split, num)
  plt = plots.pyplot()
  fig, axes = plt.subplots(len(runs), 2, figsize=figure_size(figure, len(runs), len(images)), squeeze=False)
  height = fig.get_size_inches()[1]
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.05 / height, top=1 - 0.35 / height, wspace=0.05,
                      hspace=0.4 * len(runs) / height)
  for (a0, a1), run, label in zip(axes, runs, run_labels(runs)):
    shown, rec = reconstructions(run, images, seed)
    plots.show_grid(a0, shown, 8, f"{split} images")
    plots.show_grid(a1, rec, 8, f"reconstructions: {label}")
  return _save(fig, out, dpi, figure, {})


def fig_samples(runs, out: str, *, num: int = 64, seed: int = 0, dpi: int = DPI) -> dict:
  """One grid of `num` samples from the prior per run (mean images), titled by config name."""
  import jax
  from iaf_jax import api, plots
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, len(runs), figsize=figure_size("samples", len(runs), num), squeeze=False)
  fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92, wspace=0.08)
  for ax, run, label in zip(axes[0], runs, run_labels(runs)):
    s = np.asarray(api.TrainedModel(run).sample(jax.random.PRNGKey(seed), num))
    plots.show_grid(ax, s, 8, f"{label}: samples")
  return _save(fig, out, dpi, "samples", {})


# ----------------------------------------------------------------------------- collapse diagnostic

def fig_collapse(run, out: str, *, max_examples: int = 1000, samples: int = 16, split: str = "test",
                 seed: int = 0, dpi: int = DPI) -> dict:
  """KL per latent unit and active units (iaf_jax/diagnostics.py) on a fixed random subset (data.fixed_subset)
  of `max_examples` examples of `split`, as bars; the numbers also go to a JSON file named after the PNG (c.png ->
  c.json), so that two plots in one folder keep their own.

  MNIST model: (a) KL per latent dimension, active units coloured; (b) the activity A_u with the 0.01 line.
  ResNet VAE: (a) KL per rung; (b) KL per rung and channel; (c) active fraction of each rung's latent units.
  """
  from matplotlib.ticker import MaxNLocator
  from iaf_jax import config_lib, diagnostics, plots
  images = _split(load_run_dataset(run), split, max_examples)
  d = diagnostics.collapse_diagnostics(run.model, run.params, images, likelihood=run.config.model.likelihood,
                                       max_value=run.max_value, num_samples=samples, seed=seed)
  d.update(workdir=os.path.abspath(run.workdir), split=split, checkpoint_step=run.step)
  json_path = os.path.splitext(os.path.abspath(out))[0] + ".json"
  config_lib.write_json_atomic(json_path, d)
  label = run_labels([run])[0]
  thr = d["active_units_threshold"]
  plt = plots.pyplot()
  head = (f"{label}: {d['active_units']} of {d['num_latent_units']} latent units active "
          f"(Cov_x E_q[z_u] > {thr}); KL {d['kl_total']:.2f} nats; {d['diagnostics_num_examples']} {split} images")
  if "kl_per_dim" in d:
    fig, axes = plt.subplots(1, 2, figsize=figure_size("collapse"))
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.86, wspace=0.22)
    act = np.asarray(d["unit_activity"])
    units = np.arange(len(act))
    colors = ["tab:blue" if a > thr else "tab:gray" for a in act]
    axes[0].bar(units, d["kl_per_dim"], color=colors)
    axes[0].set_title("(a) KL per latent dimension (blue: active)", fontsize=10)
    axes[0].set_ylabel("nats")
    axes[1].bar(units, np.maximum(act, 1e-6), color=colors)
    axes[1].axhline(thr, color="tab:red", linestyle="--", linewidth=1)
    axes[1].set_yscale("log")
    axes[1].set_title("(b) activity A_u = Cov_x(E_q[z_u])", fontsize=10)
    for ax in axes:
      ax.set_xlabel("latent dimension u")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  else:
    fig, axes = plt.subplots(1, 3, figsize=figure_size("collapse"))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.86, wspace=0.3)
    rungs = np.arange(len(d["kl_per_rung"]))
    axes[0].bar(rungs, d["kl_per_rung"], color="tab:blue")
    axes[0].set_title("(a) KL per rung", fontsize=10)
    axes[0].set_ylabel("nats")
    im = axes[1].imshow(np.asarray(d["kl_per_channel"]).T, aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(im, ax=axes[1], label="nats")
    axes[1].set_title("(b) KL per rung and channel", fontsize=10)
    axes[1].set_ylabel("latent channel")
    frac = np.asarray(d["active_units_per_rung"]) / np.asarray(d["latent_units_per_rung"])
    axes[2].bar(rungs, frac, color="tab:green")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("(c) active fraction of latent units", fontsize=10)
    for ax in axes:
      ax.set_xlabel("rung (0 = nearest the data)")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].yaxis.set_major_locator(MaxNLocator(integer=True))
  fig.suptitle(head, fontsize=10)
  return _save(fig, out, dpi, "collapse", {"json": json_path, "diagnostics": d})


# ----------------------------------------------------------------------------- command line

def _save(fig, out, dpi, figure, extra):
  from iaf_jax import plots
  size = tuple(float(s) for s in fig.get_size_inches())
  plots.save_figure(fig, out, dpi)
  return {"figure": figure, "path": out, "size_inches": size, "dpi": dpi, **extra}


def fig_wallclock(workdirs: Sequence[str], out: str, *, dpi: int = DPI) -> dict:
  """Validation -ELBO (train_lib's single-sample ELBO of the EMA params on the validation examples) against
  training wall-clock minutes, one line per run: what a run buys in the time spent (issue #14's protocol).
  The wall-clock of a validation record is that of the training record of the same step, or its own (a run's
  closing validation can fall between logging steps)."""
  from iaf_jax import config_lib, plots
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=figure_size("wallclock", len(workdirs)))
  fig.subplots_adjust(left=0.1, right=0.98, bottom=0.12, top=0.93)
  finals = {}
  for i, w in enumerate(workdirs):
    recs = workdir_lib.read_metrics_records(w) or []
    wall = {r["step"]: r["wall_time"] for r in recs if "wall_time" in r and "neg_elbo" in r}
    pts = [(wall.get(r["step"], r.get("wall_time")) / 60.0, r["valid_neg_elbo"]) for r in recs
           if "valid_neg_elbo" in r and (r["step"] in wall or "wall_time" in r)]
    if not pts:
      raise _config_error(f"{w}: metrics.jsonl holds no validation record with a wall time")
    label = os.path.basename(os.path.normpath(w))
    ax.plot(*zip(*pts), color=_COLORS[i % len(_COLORS)], label=label, linewidth=1.2, marker=".", markersize=3)
    finals[label] = pts[-1][1]
  ax.set_xlabel("training wall-clock (minutes)")
  ax.set_ylabel("validation -ELBO (nats)")
  lo = min(finals.values())
  ax.set_ylim(lo - 1.0, lo + 12.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.savefig(out, dpi=dpi)
  plt.close(fig)
  return {"path": out, "size_inches": figure_size("wallclock", len(workdirs)), "dpi": dpi,
          "final_valid_neg_elbo": finals}


def make_figure(figure: str, *, workdir: Optional[str] = None, workdirs: Sequence[str] = (), out: str = "",
                checkpoint: str = "best", num: Optional[int] = None, samples: Optional[int] = None,
                max_examples: int = 1000, split: str = "test", seed: int = 0, dpi: int = DPI) -> dict:
  """Write one figure; returns {'path', 'size_inches', 'dpi', ...}. `workdirs` are the runs drawn (default:
  [workdir]); the PNG goes to `out`, else to workdir (or workdirs[0]) / DEFAULT_NAMES[figure]."""
  if figure not in DEFAULT_NAMES:
    raise _config_error(f"unknown figure {figure!r}; one of {', '.join(DEFAULT_NAMES)}")
  dirs = list(workdirs) or ([workdir] if workdir else [])
  if not dirs:
    raise _config_error("no workdir given (--workdir or --workdirs)")
  if not out:
    out = os.path.join(workdir or dirs[0], DEFAULT_NAMES[figure])
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  num = DEFAULT_NUM.get(figure, 0) if num is None else num
  if figure in DEFAULT_NUM and num < 1:
    raise _config_error(f"--num={num}: must be >= 1")
  if figure == "fig6":
    return fig6(dirs, out, dpi=dpi)
  if figure == "wallclock":
    return fig_wallclock(dirs, out, dpi=dpi)
  runs = load_runs(dirs, checkpoint)
  if figure == "fig4":
    return fig4(runs, out, num=num, samples=samples or 20000, seed=seed, dpi=dpi)
  if figure == "fig5":
    return fig5(runs, out, num=num, dpi=dpi)
  if figure == "fig7":
    return fig7(runs, out, num=num, split=split, seed=seed, dpi=dpi)
  if figure in ("fig8", "fig9"):
    return fig8(runs, out, num=num, split=split, seed=seed, dpi=dpi, figure=figure)
  if figure == "samples":
    return fig_samples(runs, out, num=num, seed=seed, dpi=dpi)
  if len(runs) != 1:
    raise _config_error("collapse: give one workdir")
  return fig_collapse(runs[0], out, max_examples=max_examples, samples=samples or 16, split=split, seed=seed,
                      dpi=dpi)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m iaf_jax.experiments.figures", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("figure", choices=sorted(DEFAULT_NAMES))
  p.add_argument("--workdir", default=None, help="a training workdir; also where the PNG goes by default")
  p.add_argument("--workdirs", default="", help="comma-separated workdirs to draw (default: --workdir)")
  p.add_argument("--out", default="", help="PNG path (default: <workdir>/<figure's default name>)")
  p.add_argument("--checkpoint", default="best", help="best | latest | a step number")
  p.add_argument("--num", type=int, default=None, help="images (fig4 training images, fig5 grid side, "
                 "fig7-9 test images, samples per grid)")
  p.add_argument("--samples", type=int, default=None, help="fig4: posterior samples per image (20000); "
                 "collapse: samples per example where E_q[z] needs sampling (16)")
  p.add_argument("--max_examples", type=int, default=1000, help="collapse: examples of --split used")
  p.add_argument("--split", default="test", help="test | valid | train (fig7-9, collapse)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--dpi", type=int, default=DPI)
  p.add_argument("--traceback", action="store_true", help="show the full traceback of a user error")
  a = p.parse_args(argv)
  from iaf_jax import cli

  def job():
    r = make_figure(a.figure, workdir=a.workdir, workdirs=[w for w in a.workdirs.split(",") if w], out=a.out,
                    checkpoint=a.checkpoint, num=a.num, samples=a.samples, max_examples=a.max_examples,
                    split=a.split, seed=a.seed, dpi=a.dpi)
    w, h = r["size_inches"]
    print(f"wrote {r['path']} ({int(w * r['dpi'])}x{int(h * r['dpi'])} px)")
    return r

  return cli.run(job, a.traceback)


if __name__ == "__main__":
  sys.exit(main())
