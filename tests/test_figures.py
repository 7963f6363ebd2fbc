"""Figures 4-9, the samples grids and the collapse diagnostic (iaf_jax/experiments/figures.py, iaf_jax/diagnostics.py) on
two tiny trained runs: an MNIST-architecture VAE with a 2-D latent on the scikit-learn digits, and a 4-rung IAF
ResNet VAE on CIFAR-shaped mock data."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import REPO, tiny_config
from iaf_jax import config_lib, data as data_lib, diagnostics, eval_lib, plots, train_lib
from iaf_jax.experiments import figures
from iaf_jax.models.mnist_vae import MnistVAE

cifar10 = config_lib.load_config_module(os.path.join(REPO, "configs", "cifar10.py"))


LATEST = "latest"   # the tiny runs skip validation, so they have no 'best' checkpoint


def _expected_px(figure, num_runs=1, num=None):
  w, h = figures.figure_size(figure, num_runs, num)
  return int(w * figures.DPI), int(h * figures.DPI)


def _check_png(path, size):
  assert os.path.getsize(path) > 1000
  assert plots.png_size(path) == size


@pytest.fixture(scope="module")
def mnist_2d(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mnist2d"))
  # No validation (one compile fewer): the figures read the latest checkpoint.
  train_lib.train_and_evaluate(tiny_config(**{"model.latent_dim": 2, "train.num_steps": 4, "train.log_every": 2,
                                              "train.eval_every": 0, "train.checkpoint_every": 4}), workdir)
  return workdir


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
  root = tmp_path_factory.mktemp("resnet")
  rng = np.random.default_rng(0)
  np.savez(root / "cifar10.npz", x_train=rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8),
           x_test=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
  c = cifar10.get_config("rungs4_iaf")
  c.data.dir, c.data.validation_size = str(root), 8
  c.model.h_size, c.model.z_size, c.model.num_blocks = 8, 2, 1      # 2 rungs: a 4x4 and a 2x2 latent map
  for k, v in dict(batch_size=8, num_steps=2, log_every=1, eval_every=0, checkpoint_every=2).items():
    c.train[k] = v
  c.eval.valid_examples, c.eval.batch_size, c.eval.chunk_size = 8, 8, 4
  workdir = str(root / "run")
  train_lib.train_and_evaluate(c, workdir)
  return workdir


# ----------------------------------------------------------------------------- figures on trained runs

def test_fig4_posteriors_and_fig5_manifold(mnist_2d, tmp_path):
  r = figures.make_figure("fig4", workdirs=[mnist_2d, mnist_2d], out=str(tmp_path / "f4.png"), samples=3000,
                          checkpoint=LATEST)
  assert _expected_px("fig4", 2) == (1300, 425)
  _check_png(r["path"], (1300, 425))
  r = figures.make_figure("fig5", workdir=mnist_2d, num=6, checkpoint=LATEST)   # default path: the workdir
  assert r["path"] == os.path.join(mnist_2d, "fig5_manifold.png")
  _check_png(r["path"], _expected_px("fig5", 1, 6))


def test_fig6_training_curves(mnist_2d, resnet, tmp_path):
  c = figures.training_curves(mnist_2d)
  assert c["step"].tolist() == [2, 4] and np.all(np.isfinite(c["recon"])) and np.all(c["kl"] > 0)
  r = figures.make_figure("fig6", workdirs=[mnist_2d, resnet], out=str(tmp_path / "f6.png"))
  _check_png(r["path"], (1200, 450))


def test_fig7_fig8_fig9_and_samples(mnist_2d, resnet, tmp_path):
  r = figures.make_figure("fig7", workdirs=[mnist_2d, mnist_2d], out=str(tmp_path / "f7.png"), num=5,
                          checkpoint=LATEST)
  _check_png(r["path"], _expected_px("fig7", 2, 5))
  assert all(0 <= e <= 1 for e in r["mean_abs_error"].values())
  for fig in ("fig8", "fig9"):
    r = figures.make_figure(fig, workdir=resnet, out=str(tmp_path / f"{fig}.png"), num=8, checkpoint=LATEST)
    _check_png(r["path"], _expected_px(fig, 1, 8))
  r = figures.make_figure("samples", workdirs=[mnist_2d, resnet], out=str(tmp_path / "s.png"), num=8,
                          checkpoint=LATEST)
  _check_png(r["path"], _expected_px("samples", 2, 8))


def test_collapse_figures_and_json(mnist_2d, resnet, tmp_path):
  r = figures.make_figure("collapse", workdir=mnist_2d, out=str(tmp_path / "m" / "c.png"), max_examples=40,
                          checkpoint=LATEST)
  _check_png(r["path"], _expected_px("collapse"))
  d = json.load(open(tmp_path / "m" / "c.json"))   # named after its PNG
  assert len(d["kl_per_dim"]) == 2 and d["num_latent_units"] == 2 and 0 <= d["active_units"] <= 2
  r = figures.make_figure("collapse", workdir=resnet, out=str(tmp_path / "m" / "r.png"), samples=4,
                          checkpoint=LATEST)
  _check_png(r["path"], _expected_px("collapse"))
  d = r["diagnostics"]
  # a second plot in the same folder keeps its own numbers and leaves the first's
  assert json.load(open(tmp_path / "m" / "r.json"))["kl_per_rung"] == d["kl_per_rung"]
  assert "kl_per_dim" in json.load(open(tmp_path / "m" / "c.json"))
  # 8x8 images, input stride 2: rung 0 is a 4x4x2 map, rung 1 (the second level) 2x2x2
  assert d["latent_units_per_rung"] == [32, 8] and d["num_latent_units"] == 40
  assert d["num_latent_channels"] == 4 and 0 <= d["active_units"] <= 40
  np.testing.assert_allclose(np.sum(d["kl_per_channel"], axis=1), d["kl_per_rung"], rtol=1e-5, atol=1e-5)
  assert sum(d["kl_per_rung"]) == pytest.approx(d["kl_total"])


def test_command_line_and_its_errors(mnist_2d, resnet, tmp_path, capsys):
  out = str(tmp_path / "curves.png")
  assert figures.main(["fig6", "--workdir", mnist_2d, "--out", out]) == 0   # reads metrics.jsonl only
  _check_png(out, (1200, 450))
  assert "wrote" in capsys.readouterr().out
  assert figures.main(["fig5", "--workdir", resnet, "--checkpoint", "latest"]) == 2   # no 2-D latent: status 2
  err = capsys.readouterr().err
  assert "error:" in err and "2-D latent" in err and "Traceback" not in err
  assert figures.main(["fig8", "--workdir", str(tmp_path / "nothing")]) == 2


def test_evaluate_writes_the_diagnostics(mnist_2d, resnet):
  r = eval_lib.evaluate(mnist_2d, num_samples=2, max_examples=24, checkpoint="latest", progress=False)
  saved = json.load(open(os.path.join(mnist_2d, "eval_test_latest_K2_n24.json")))
  for key in ("kl_per_dim", "unit_activity", "active_units", "num_latent_units", "kl_total",
              "active_units_threshold", "diagnostics_num_examples"):
    assert saved[key] == r[key]
  assert len(saved["kl_per_dim"]) == 2 and saved["num_latent_units"] == 2 and saved["diagnostics_num_examples"] == 24
  r = eval_lib.evaluate(resnet, num_samples=2, checkpoint="latest", progress=False, diagnostics_samples=4)
  assert len(r["kl_per_rung"]) == 2 and r["num_latent_units"] == 40 and len(r["active_units_per_rung"]) == 2


# ----------------------------------------------------------------------------- the formulas, known answers

def test_active_units_counts_dims_whose_mean_varies_over_x():
  n = 200
  signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)        # mean 0, population variance exactly 1
  variances = np.array([0.0, 0.005, 0.0099, 0.0101, 0.5, 2.0])
  means = signs[:, None] * np.sqrt(variances)[None, :] + np.array([3.0, -1.0, 0.0, 0.0, 0.2, 0.0])
  count, act = diagnostics.active_units(means)
  np.testing.assert_allclose(act, variances, atol=1e-12)
  assert count == 3                                          # 0.0101, 0.5, 2.0 are above 0.01

  # From S posterior samples, the noise of the sample means must not make a dead unit look active.
  rng = np.random.default_rng(0)
  n, s = 2000, 16
  true_means = np.stack([np.zeros(n), rng.normal(0, 1, n), rng.normal(0, 0.05, n)], -1)  # A = 0, 1, 0.0025
  draws = true_means[:, None, :] + rng.normal(0, 1, (n, s, 3))                           # q's std 1
  m, v = draws.mean(1), draws.var(1, ddof=1)
  naive, _ = diagnostics.active_units(m)
  assert naive == 3                                          # the uncorrected variance is ~A + 1/16
  count, act = diagnostics.active_units(m, within_var=v, num_samples=s)
  assert count == 1
  # The estimate's own noise is ~sqrt(2/n) * A for the active unit, ~1/(16 sqrt(n)) for the others.
  assert abs(act[0]) < 0.005 and abs(act[2] - np.var(true_means[:, 2])) < 0.005
  assert act[1] == pytest.approx(np.var(true_means[:, 1]), abs=0.1)


def _tiny_gaussian_mnist(latent_dim=4):
  model = MnistVAE(image_shape=(8, 8, 1), latent_dim=latent_dim, iaf_depth=0, channels=(4, 8), strides=(2, 2),
                   hidden_dim=16)
  images = np.random.default_rng(1).integers(0, 17, (32, 8, 8, 1)).astype(np.uint8)
  x = jnp.asarray(images / 16.0 > 0.5, jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x, jax.random.PRNGKey(1))["params"]
  return model, params, images, x


def _monte_carlo_kl(model, params, x, n):
  """E_x E_q[log q(z|x) - log p(z)] from the model's own ELBO terms, n samples per example, and its stderr."""
  tiled = jnp.tile(x, (n, 1, 1, 1))
  t = jax.jit(lambda p, xx, k: model.apply({"params": p}, xx, k))(params, tiled, jax.random.PRNGKey(7))
  kl = np.asarray(t["log_qz"] - t["log_pz"]).reshape(n, -1)
  return kl.mean(), kl.mean(1).std() / np.sqrt(n)


def test_kl_per_dim_sums_to_the_kl_of_the_diagonal_gaussian():
  model, params, images, x = _tiny_gaussian_mnist()
  d = diagnostics.collapse_diagnostics(model, params, images, likelihood="bernoulli", max_value=16, seed=3)
  # The dims' KLs sum to the analytic KL ...
  assert d["kl_total_method"] == "analytic" and sum(d["kl_per_dim"]) == pytest.approx(d["kl_total"])
  # ... which is what the model's own single-sample terms estimate (same binarisation: keys from seed 3).
  k_bin, _ = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(3), 0))
  xb = data_lib.model_inputs(k_bin, jnp.asarray(images), "bernoulli", 16)
  mc, se = _monte_carlo_kl(model, params, xb, 100)
  assert abs(mc - d["kl_total"]) < 5 * se + 1e-3, (mc, se, d["kl_total"])
  assert d["num_latent_units"] == 4 and len(d["unit_activity"]) == 4


def test_iaf_kl_per_dim_is_at_most_the_total_kl(mnist_2d):
  run = eval_lib.load_run(mnist_2d, LATEST)
  assert run.model.iaf_depth == 2
  images = np.random.default_rng(1).integers(0, 17, (32, 8, 8, 1)).astype(np.uint8)
  d = diagnostics.collapse_diagnostics(run.model, run.params, images, likelihood="bernoulli", max_value=16,
                                       num_samples=64)
  assert d["kl_total_method"] == "monte_carlo" and len(d["kl_per_dim"]) == 2
  assert d["kl_remainder"] > -0.25 and all(k > 0 for k in d["kl_per_dim"])


def test_density_from_samples_matches_an_exact_banana_density():
  """A non-elliptical q (z2 = y2 + 0.5 y1^2, y ~ N(0, I)) from its samples and exact log q."""
  rng = np.random.default_rng(0)
  y = rng.standard_normal((20000, 2))
  z = np.stack([y[:, 0], y[:, 1] + 0.5 * y[:, 0] ** 2], -1)
  log_q = -0.5 * np.sum(y ** 2, -1) - np.log(2 * np.pi)     # unit Jacobian
  xs, ys = np.linspace(-4, 4, 81), np.linspace(-3, 6, 91)
  est = figures.density_from_samples(z, log_q, xs, ys)
  gx, gy = np.meshgrid(xs, ys)
  exact = np.exp(-0.5 * (gx ** 2 + (gy - 0.5 * gx ** 2) ** 2)) / (2 * np.pi)
  core = exact > 0.05 * exact.max()
  assert np.max(np.abs(est - exact)[core]) < 0.02 * exact.max()
  assert est.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]) == pytest.approx(1.0, abs=0.03)
  assert est[0, 0] == 0.0 and est[-1, 0] == 0.0               # no samples there


def test_hdr_levels_of_the_standard_normal():
  """For N(0, I) in 2-D the region holding mass p is bounded by the density level (1 - p) / (2 pi)."""
  z = np.random.default_rng(1).standard_normal((50000, 2))
  levels = figures.hdr_levels(-0.5 * np.sum(z ** 2, -1) - np.log(2 * np.pi), (0.95, 0.8, 0.5))
  np.testing.assert_allclose(levels, np.array([0.05, 0.2, 0.5]) / (2 * np.pi), rtol=0.03)


def test_manifold_grid_is_the_inverse_normal_cdf():
  g = figures.manifold_grid(4)
  np.testing.assert_allclose(g, [-1.1503494, -0.3186394, 0.3186394, 1.1503494], rtol=1e-6)


def test_wallclock_curve_reads_validation_records_at_their_training_wall_time(tmp_path):
  runs = []
  for name, offset in (("a", 0.0), ("b", 2.0)):
    w = tmp_path / name
    w.mkdir()
    recs = []
    for step in (100, 200, 300):
      recs.append({"step": step, "neg_elbo": 100.0, "wall_time": 60.0 * step / 100})
      recs.append({"step": step, "valid_neg_elbo": 95.0 - step / 100 + offset})
    if name == "a":   # a closing validation between logging steps: placed at its own wall time
      recs.append({"step": 350, "valid_neg_elbo": 91.5, "wall_time": 215.0, "closing": True})
    (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    runs.append(str(w))
  r = figures.make_figure("wallclock", workdirs=runs, out=str(tmp_path / "wc.png"))
  _check_png(r["path"], _expected_px("wallclock", 2))
  assert r["final_valid_neg_elbo"] == {"a": 91.5, "b": 94.0}
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "neg_elbo": 1.0, "wall_time": 1.0}) + "\n")
  with pytest.raises(Exception, match="no validation record"):
    figures.make_figure("wallclock", workdirs=[str(empty)], out=str(tmp_path / "x.png"))
