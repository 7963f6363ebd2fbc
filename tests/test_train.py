"""End to end: train_and_evaluate, resuming, determinism, skipped non-finite steps, evaluation, the API."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_config
from iaf_jax import api, checkpoints, config_lib, eval_lib, optim, train_lib
from iaf_jax import workdir as workdir_lib
from iaf_jax.models import build_model


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  summary = train_lib.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_train_writes_checkpoints_metrics_and_config(trained):
  workdir, summary = trained
  assert summary["step"] == 12 and summary["skipped_steps"] == 0
  # every 4 steps, at the best validation (6) and at the end; the newest 3 kept
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [6, 8, 12]
  assert os.listdir(os.path.join(workdir, "best"))  # validation ran at steps 6 and 12
  recs = _records(workdir)
  train_recs = [r for r in recs if "neg_elbo" in r]
  assert [r["step"] for r in train_recs] == [4, 8, 12]
  assert all(np.isfinite(r["neg_elbo"]) and r["lr"] > 0 for r in train_recs)
  assert any("valid_neg_elbo" in r for r in recs)
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["iaf_depth"] == 2


def test_resume_continues_and_matches_uninterrupted_run(tmp_path):
  """Stopping at step 8 and rerunning to 12 gives exactly the parameters of a straight run to 12."""
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  cfg = tiny_config(**{"train.eval_every": 0})
  train_lib.train_and_evaluate(cfg, straight)
  train_lib.train_and_evaluate(tiny_config(**{"train.eval_every": 0, "train.num_steps": 8}), resumed)
  train_lib.train_and_evaluate(cfg, resumed)
  steps = [r["step"] for r in _records(resumed) if "neg_elbo" in r]
  assert steps == [4, 8, 12]  # the second run picked up at 8, it did not start over
  a = eval_lib.load_run(straight, "latest").params
  b = eval_lib.load_run(resumed, "latest").params
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_refuses_incompatible_config(trained):
  workdir, _ = trained
  with pytest.raises(config_lib.ConfigError, match="model.latent_dim"):
    train_lib.train_and_evaluate(tiny_config(**{"model.latent_dim": 6}), workdir)


def test_nonfinite_steps_are_skipped_and_counted():
  cfg = tiny_config(**{"model.likelihood": "logistic"})
  model = build_model(cfg.model, (8, 8, 1))
  opt = optim.make_optimizer(cfg.train)
  images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.float32)
  state = train_lib.init_state(model, opt, images, 0, likelihood="logistic", max_value=255)
  step = jax.jit(train_lib.make_train_step(model, opt, likelihood="logistic", max_value=255, free_bits=0.0,
                                           ema_decay=0.99))
  good, _ = step(state, jnp.asarray(images))
  bad_images = images.copy()
  bad_images[3, 2, 2, 0] = np.nan
  bad, metrics = step(good, jnp.asarray(bad_images))
  assert float(metrics["finite"]) == 0.0
  assert int(bad.num_nonfinite) == 1 and int(bad.consecutive_nonfinite) == 1 and int(bad.step) == 2
  for x, y in zip(jax.tree_util.tree_leaves((good.params, good.ema_params, good.opt_state)),
                  jax.tree_util.tree_leaves((bad.params, bad.ema_params, bad.opt_state))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # nothing applied
  again, _ = step(bad, jnp.asarray(images))
  assert int(again.consecutive_nonfinite) == 0 and int(again.num_nonfinite) == 1
  assert not np.array_equal(np.asarray(jax.tree_util.tree_leaves(again.params)[0]),
                            np.asarray(jax.tree_util.tree_leaves(bad.params)[0]))


def test_training_lowers_the_loss(tmp_path):
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(tiny_config(**{"train.num_steps": 120, "train.log_every": 20,
                                              "train.eval_every": 0, "train.checkpoint_every": 120}), workdir)
  recs = [r["neg_elbo"] for r in _records(workdir) if "neg_elbo" in r]
  assert recs[-1] < 0.8 * recs[0], recs


def test_evaluate_is_bound_and_json(trained):
  workdir, _ = trained
  r = eval_lib.evaluate(workdir, num_samples=16, split="test", checkpoint="latest", max_examples=40, progress=False)
  assert r["num_examples"] == 40 and r["num_samples"] == 16 and r["checkpoint_step"] == 12
  # log p(x) >= ELBO per example in expectation: the IS estimate of the mean NLL is below the mean -ELBO.
  assert r["nll_nats"] <= r["neg_elbo_nats"] and r["gap_nats"] >= 0
  assert r["bits_per_dim_nll"] == pytest.approx(r["nll_nats"] / (64 * np.log(2)))
  saved = json.load(open(os.path.join(workdir, "eval_test_latest_K16_n40.json")))
  for key in ("neg_elbo_nats", "nll_nats", "gap_nats", "bits_per_dim_elbo", "bits_per_dim_nll", "num_examples",
              "num_samples", "checkpoint_step"):
    assert saved[key] == r[key]
  # The whole split with the same K gets its own file: a partial evaluation never replaces a full one (nor the
  # reverse), and the report prefers the full one.
  full = eval_lib.evaluate(workdir, num_samples=16, split="test", checkpoint="latest", progress=False)
  assert full["num_examples"] == full["split_size"] > 40 and full["subset"] == "all"
  assert json.load(open(os.path.join(workdir, "eval_test_latest_K16_n40.json"))) == saved
  assert json.load(open(os.path.join(workdir, "eval_test_latest_K16.json")))["num_examples"] == full["split_size"]
  from iaf_jax.experiments import report
  same_k = [p for p, ckpt, k in report.find_eval_files(workdir, "test") if (ckpt, k) == ("latest", 16)]
  assert same_k == [os.path.join(workdir, n) for n in ("eval_test_latest_K16.json", "eval_test_latest_K16_n40.json")]
  assert workdir_lib.parse_eval_file("eval_test_best_K128_n1000.json") == ("test", "best", 128, 1000)
  assert workdir_lib.parse_eval_file("eval_test_4000_K128.json") == ("test", "4000", 128, 0)


def test_evaluate_is_estimate_grows_with_k(trained):
  """E[log p_K] increases with K (Burda et al.): K=64 above K=1 on the same examples."""
  workdir, _ = trained
  r1 = eval_lib.evaluate(workdir, num_samples=1, max_examples=64, progress=False)
  r64 = eval_lib.evaluate(workdir, num_samples=64, max_examples=64, progress=False)
  assert r64["nll_nats"] < r1["nll_nats"]
  assert r1["gap_nats"] == pytest.approx(0.0, abs=1e-4)  # with K=1 the estimate is the ELBO itself


def test_load_trained_api(trained):
  workdir, _ = trained
  m = api.load_trained(workdir)
  images = np.random.default_rng(1).integers(0, 17, (5, 8, 8, 1)).astype(np.uint8)
  x = m.inputs(jax.random.PRNGKey(0), images)
  assert set(np.unique(np.asarray(x))) <= {0.0, 1.0}
  z, log_q = m.posterior_sample(x, jax.random.PRNGKey(1))
  assert z.shape == (5, 4) and log_q.shape == (5,)
  ll, lp = m.log_likelihood(x, z), m.log_prior(z)
  assert ll.shape == lp.shape == (5,) and bool(jnp.all(ll <= 0))
  np.testing.assert_allclose(lp, -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi), axis=-1), rtol=1e-5)
  log_px = m.log_px(x, jax.random.PRNGKey(2), num_samples=32)
  assert log_px.shape == (5,) and bool(jnp.all(log_px <= 0))
  s = m.sample(jax.random.PRNGKey(3), 7)
  assert s.shape == (7, 8, 8, 1) and float(s.min()) >= 0 and float(s.max()) <= 1
  assert m.reconstruct(x, jax.random.PRNGKey(4)).shape == (5, 8, 8, 1)


def test_evaluate_empty_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="no config.json"):
    eval_lib.evaluate(str(tmp_path))


def test_bad_config_values_are_rejected(tmp_path):
  for field, value, match in [("model.iaf_width", -3, "iaf_width"), ("train.free_bits", -0.1, "free_bits"),
                              ("eval.num_samples", 0, "num_samples"), ("model.likelihood", "gauss", "likelihood")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      train_lib.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unwritable_workdir_fails_before_training(tmp_path):
  target = tmp_path / "file"
  target.write_text("not a directory")
  with pytest.raises(checkpoints.CheckpointError, match="not writable"):
    train_lib.train_and_evaluate(tiny_config(), str(target / "run"))


def test_importance_weighted_training_step_bound_is_tighter(tmp_path):
  """train.num_importance_samples = k > 1 trains on the k-sample bound: per step it is at least the average
  single-sample ELBO of the same samples (log-mean-exp >= mean), so the logged loss <= neg_elbo."""
  workdir = str(tmp_path / "iw")
  train_lib.train_and_evaluate(tiny_config(**{"train.num_importance_samples": 4, "train.eval_every": 0}), workdir)
  recs = [r for r in _records(workdir) if "neg_elbo" in r]
  assert recs and all(np.isfinite(r["loss"]) and r["loss"] <= r["neg_elbo"] + 1e-4 for r in recs)
  assert all(r["loss"] < r["neg_elbo"] - 1e-3 for r in recs)  # a real difference, not k = 1 in disguise
  with pytest.raises(config_lib.ConfigError, match="free_bits"):
    train_lib.train_and_evaluate(tiny_config(**{"train.num_importance_samples": 4, "train.free_bits": 0.5}),
                                 str(tmp_path / "bad"))


def test_micro_batches_average_the_whole_batch_and_bad_values_are_refused():
  """train.micro_batches = S splits the batch into S strided micro-batches whose losses are averaged: with the
  micro-batches' own posterior draws, the step's loss and gradient estimate the whole batch's. The decoder is
  set to predict blank images and the batch is half blank, half dense, so an example dropped, duplicated or
  summed shows."""
  c = tiny_config(**{"train.free_bits": 0.0})
  model, opt = build_model(c.model, (8, 8, 1)), optim.make_optimizer(c.train)
  rng = np.random.default_rng(0)
  images = jnp.asarray(np.concatenate([np.zeros((32, 8, 8, 1), np.uint8),
                                       (rng.random((32, 8, 8, 1)) < 0.7).astype(np.uint8)]))
  state0 = train_lib.init_state(model, opt, np.asarray(images), 0, likelihood=c.model.likelihood, max_value=1)
  params = jax.tree_util.tree_map(lambda a: a, state0.params)
  last = max((k for k in params if k.startswith("dec_blocks")), key=lambda k: int(k.rsplit("_", 1)[-1]))
  params[last]["ConvTranspose2D_0"]["bias"] = params[last]["ConvTranspose2D_0"]["bias"] - 4.0
  state0 = state0.replace(params=params)

  def estimate(s, batch):
    step = jax.jit(train_lib.make_train_step(model, opt, likelihood="bernoulli", max_value=1, free_bits=0.0,
                                             ema_decay=0.999, micro_batches=s))
    grad_of = jax.jit(jax.grad(lambda p, key: step(state0.replace(params=p, rng=key), batch)[1]["loss"]))
    keys = [jax.random.PRNGKey(i) for i in range(8)]
    neg_elbo = np.mean([float(step(state0.replace(rng=key), batch)[1]["neg_elbo"]) for key in keys])
    grads = [np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad_of(state0.params, key))])
             for key in keys]
    return neg_elbo, np.mean(grads, axis=0)

  (whole, g1), (halves, g2) = estimate(1, images), estimate(2, images)
  blank_only, _ = estimate(1, images[:32])
  assert abs(blank_only - whole) > 0.3 * whole, (blank_only, whole)  # the halves differ: a lost one would show
  assert abs(halves - whole) < 0.02 * whole, (halves, whole)
  cos = g2 @ g1 / np.linalg.norm(g2) / np.linalg.norm(g1)
  assert cos > 0.9, cos
  for value, match in [(3, "divide train.batch_size"), (0, "integer >= 1")]:
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate_config(tiny_config(**{"train.micro_batches": value}))
  with pytest.raises(config_lib.ConfigError, match="micro_batches"):
    config_lib.validate_config(tiny_config(**{"train.micro_batches": 2, "train.free_bits": 0.5}))


def test_time_budget_stops_the_run_and_a_rerun_stays_stopped(tmp_path):
  workdir = str(tmp_path / "budget")
  cfg = tiny_config(**{"train.num_steps": 100_000, "train.time_budget_minutes": 0.05, "train.eval_every": 0,
                       "train.checkpoint_every": 1000})
  summary = train_lib.train_and_evaluate(cfg, workdir)
  assert summary["reason"].startswith("time budget") and 0 < summary["step"] < 100_000
  assert summary["wall_time"] >= 3.0
  again = train_lib.train_and_evaluate(cfg, workdir)
  assert again["step"] == summary["step"]  # spent: nothing more is trained, the checkpoint is the same


def _validations(workdir):
  return [r for r in _records(workdir) if "valid_neg_elbo" in r]


def test_a_run_ending_between_evaluations_validates_its_last_step_first(tmp_path):
  """num_steps 10 with evaluations every 4: the last 2 steps are validated before the run ends, the best
  checkpoint is the lowest of all its validations, and a run extended to 12 goes on from that best value."""
  workdir = str(tmp_path / "ends")
  overrides = {"train.eval_every": 4, "train.checkpoint_every": 4}
  train_lib.train_and_evaluate(tiny_config(**overrides, **{"train.num_steps": 10}), workdir)
  vals = _validations(workdir)
  assert [r["step"] for r in vals] == [4, 8, 10] and vals[-1].get("closing") and not vals[0].get("closing")
  best_step = min(vals, key=lambda r: r["valid_neg_elbo"])["step"]
  assert eval_lib.load_run(workdir, "best").step == best_step
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))[-1] == 10
  train_lib.train_and_evaluate(tiny_config(**overrides, **{"train.num_steps": 12}), workdir)
  vals = _validations(workdir)
  assert [r["step"] for r in vals] == [4, 8, 10, 12] and not vals[-1].get("closing")  # 12: a regular one
  assert vals[-1]["best_valid_neg_elbo"] == min(r["valid_neg_elbo"] for r in vals)


def test_a_run_ending_on_its_time_budget_validates_its_last_step_once(tmp_path):
  workdir = str(tmp_path / "budget")
  cfg = tiny_config(**{"train.num_steps": 100_000, "train.time_budget_minutes": 0.05, "train.eval_every": 50_000,
                       "train.checkpoint_every": 1000})
  summary = train_lib.train_and_evaluate(cfg, workdir)
  assert summary["reason"].startswith("time budget")
  vals = _validations(workdir)
  assert [(r["step"], r.get("closing")) for r in vals] == [(summary["step"], True)]
  assert summary["best_valid_neg_elbo"] == vals[0]["valid_neg_elbo"]
  assert eval_lib.load_run(workdir, "best").step == summary["step"]
  again = train_lib.train_and_evaluate(cfg, workdir)   # spent: no step, and no second evaluation of the last
  assert again["step"] == summary["step"] and len(_validations(workdir)) == 1


def test_cosine_schedule_decays_from_base_to_min():
  lrs = [optim.scheduled_learning_rate("cosine", 0.004, p, 1e-5) for p in np.linspace(0, 1, 11)]
  assert lrs[0] == pytest.approx(0.004) and lrs[-1] == pytest.approx(1e-5)
  assert all(a > b for a, b in zip(lrs, lrs[1:]))
  assert optim.scheduled_learning_rate("constant", 0.004, 0.7, 1e-5) == 0.004
  with pytest.raises(config_lib.ConfigError, match="lr_schedule"):
    config_lib.validate_config(tiny_config(**{"train.lr_schedule": "linear"}))
