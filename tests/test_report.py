"""iaf_jax.experiments.report (the report's tables from evaluated workdirs) and iaf_jax.experiments.sweep (one process per row).

One module-scoped sweep trains and evaluates a tiny row through train.py / evaluate.py subprocesses next to
a row that fails; the report tests read that real eval JSON."""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, TINY_OVERRIDES, cli_flags
from iaf_jax.experiments import report, sweep

# The tiny model of helpers.py, with each row keeping its own IAF depth; 2 steps, one validation (-> best/).
TINY = {k: v for k, v in TINY_OVERRIDES.items() if k != "model.iaf_depth"}
TINY.update({"data.name": "digits", "train.num_steps": 2, "train.eval_every": 2, "train.log_every": 2, "train.checkpoint_every": 2,
             "eval.num_samples": 4})
SWEEP_FLAGS = ["--config=configs/mnist.py", "--evaluate", "--max_examples=40"]


def tiny_flags(**overrides):
  """helpers.cli_flags without its model.iaf_depth (which would turn the diag row into an IAF model)."""
  return [f for f in cli_flags(**dict(TINY, **overrides)) if not f.startswith("--config.model.iaf_depth=")]


def run_module(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(stderr):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert "Traceback" not in stderr
  return lines[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A sweep of 2 rows: iaf_d2_w320 fails (a bad override for that row only), then diag trains and evaluates."""
  root = str(tmp_path_factory.mktemp("sweep") / "table1")
  r = run_module("iaf_jax.experiments.sweep", *SWEEP_FLAGS, "--rows=iaf_d2_w320,diag", f"--root={root}",
                 "--row_override=iaf_d2_w320:model.no_such_field=1", "--", *tiny_flags())
  return root, r


def _eval(root):
  with open(os.path.join(root, "diag", "eval_test_best_K4_n40.json")) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------ sweep
def test_sweep_runs_every_row_and_reports_the_failing_one(swept):
  root, r = swept
  assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
  out = r.stdout
  assert "[1/2] iaf_d2_w320: training into" in out and "[2/2] diag: training into" in out
  assert "[2/2] diag: evaluating (K=4, test split)" in out
  assert "sweep: 1 of 2 rows done, 1 failed" in out
  assert "FAILED  iaf_d2_w320 (train, exit 2): error: bad --config override: no_such_field" in out
  assert "error: 1 of 2 rows failed: iaf_d2_w320" in r.stderr and "Traceback" not in r.stderr
  # the failing row left no run; the other trained to num_steps in its own workdir and was evaluated
  assert not os.path.exists(os.path.join(root, "iaf_d2_w320", "checkpoints"))
  with open(os.path.join(root, "diag", "metrics.jsonl")) as f:
    end = json.loads(f.readlines()[-1])
  assert end["event"] == "end" and end["step"] == 2 and end["reason"] == "num_steps"
  with open(os.path.join(root, "diag", "config.json")) as f:
    assert json.load(f)["model"]["iaf_depth"] == 0  # the row's own config, the shared overrides applied
  r_eval = _eval(root)
  assert r_eval["num_samples"] == 4 and r_eval["num_examples"] == 40 and r_eval["checkpoint_step"] == 2


def test_sweep_rerun_skips_the_finished_row(swept, capsys):
  root, _ = swept
  metrics = os.path.join(root, "diag", "metrics.jsonl")
  eval_file = os.path.join(root, "diag", "eval_test_best_K4_n40.json")
  before = (open(metrics).read(), os.stat(eval_file).st_mtime_ns)
  assert sweep.main([*SWEEP_FLAGS, "--rows=diag", f"--root={root}", "--", *tiny_flags()]) == 0
  out = capsys.readouterr().out
  assert "[1/1] diag: already trained in" in out and "not re-evaluating" in out and "$ " not in out
  assert (open(metrics).read(), os.stat(eval_file).st_mtime_ns) == before  # nothing clobbered or appended
  # The kept file is the fixed random subset of 40 examples: it covers --max_examples=40, not the whole split or
  # a larger cap; a file of an older evaluate.py (no split_size / subset: it took the first N) covers neither.
  r = _eval(root)
  assert r["max_examples"] == 40 and r["split_size"] > 40
  assert sweep.eval_covers(eval_file, "test", 40)
  assert not sweep.eval_covers(eval_file, "test", 0) and not sweep.eval_covers(eval_file, "test", 41)
  assert not sweep.eval_covers(eval_file, "valid", 40)
  old = os.path.join(root, "old_eval.json")
  with open(old, "w") as f:
    json.dump({k: v for k, v in r.items() if k != "split_size"}, f)
  assert not sweep.eval_covers(old, "test", 40) and not sweep.eval_covers(old, "test", 0)
  # More steps asked for: the same workdir is not finished any more, so train.py would resume it.
  config, why = sweep.effective_config("configs/mnist.py", "diag", tiny_flags(**{"train.num_steps": 3}))
  assert why == "" and config.train.num_steps == 3
  assert sweep.finished_run(os.path.join(root, "diag"), config) is None
  config2, _ = sweep.effective_config("configs/mnist.py", "diag", tiny_flags())
  assert sweep.finished_run(os.path.join(root, "diag"), config2)["step"] == 2


def test_sweep_dry_run_prints_one_command_per_row(capsys):
  assert sweep.main(["--table=1", "--root=runs/t1", "--dry_run", "--", "--config.train.num_steps=7"]) == 0
  lines = capsys.readouterr().out.splitlines()
  rows = report.TABLES["1"][2]
  assert len(lines) == len(rows) == 5
  workdirs = []
  for line, row in zip(lines, rows):
    assert os.path.join(REPO, "train.py") in line and f"configs/mnist.py:{row}" in line
    assert line.endswith("--config.train.num_steps=7")
    workdirs.append(next(a for a in line.split() if a.startswith("--workdir=")))
  assert workdirs == [f"--workdir=runs/t1/{row}" for row in rows]  # distinct, one per row

  assert sweep.main(["--config=configs/cifar10.py", "--rows=rungs4_iaf,rungs8_iaf", "--root=r", "--evaluate",
                     "--dry_run", "--row_override=rungs8_iaf:eval.num_samples=16"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [("train.py" in x, "evaluate.py" in x) for x in lines] == [(True, False), (False, True)] * 2
  assert "--num_samples=128" in lines[1] and "--num_samples=16" in lines[3]  # K from each row's config
  assert lines[2].endswith("--config.eval.num_samples=16")


@pytest.mark.parametrize("args, message", [
    (["--config=configs/mnist.py", "--rows=diag,no_such_row"], "has no config named no_such_row"),
    (["--rows=diag"], "--config=FILE is needed"),
    (["--table=1", "--rows=diag"], "one of them"),
    (["--table=1", "--row_override=nope:train.num_steps=3"], "'nope' is not one of the rows"),
    (["--table=1", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_sweep_bad_flags_are_one_line_and_launch_nothing(tmp_path, capsys, args, message):
  assert sweep.main([*args, f"--root={tmp_path / 'r'}"]) == 2
  assert message in one_error_line(capsys.readouterr().err)
  assert not os.path.exists(tmp_path / "r")


# ------------------------------------------------------------------------------------------ report
def _md_rows(text, config):
  return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
          if line.startswith("| ") and f"`{config}`" in line]


def test_report_table_holds_the_evaluated_numbers(swept, tmp_path, capsys):
  root, _ = swept
  r = _eval(root)
  out = str(tmp_path / "results.md")
  # the sweep root stands for its workdirs; the failed row's directory (no config.json) is not one
  assert report.main(["--workdirs", root, "--out", out]) == 0
  text = open(out).read()
  assert "## Table 1: MNIST models, learnt sigma (nats)" in text
  [cells] = _md_rows(text, "diag")
  vlb, log_px, gap = (float(c) for c in cells[2:5])
  assert (vlb, log_px, gap) == (round(r["neg_elbo_nats"], 2), round(r["nll_nats"], 2), round(r["gap_nats"], 2))
  # the report's sign convention: positive -ELBO and -log p(x), gap = VLB - log p(x) >= 0
  assert vlb > 0 and log_px > 0 and gap >= 0 and abs(vlb - log_px - gap) <= 0.011
  assert cells[0] == "Diagonal covariance" and cells[5:10] == ["4", "40", "digits", "best (2)", "2"]
  assert cells[-1] == "`eval_test_best_K4_n40.json`" and cells[-4:-2] == ["-", "-"] and cells[-2] == f"`{root}/diag`"  # digits: nothing quoted
  assert "wrote" in capsys.readouterr().err

  csv_text, rows, _ = report.build_report([os.path.join(root, "diag")], fmt="csv")
  [row] = list(csv.DictReader(io.StringIO(csv_text)))
  assert float(row["vlb"]) == r["neg_elbo_nats"] and float(row["log_px"]) == r["nll_nats"]
  assert float(row["gap"]) == pytest.approx(float(row["vlb"]) - float(row["log_px"]), abs=1e-4)
  with open(os.path.join(root, "diag", "metrics.jsonl")) as f:
    end = json.loads(f.readlines()[-1])
  assert row["table"] == "1" and row["unit"] == "nats" and row["train_steps"] == "2"
  assert float(row["wall_time_s"]) == end["wall_time"] and row["quoted_source"] == ""


def _copy_run(src, dst, config_edit=None, eval_edit=None):
  os.makedirs(dst)
  for name in ("config.json", "metrics.jsonl", "eval_test_best_K4_n40.json"):
    shutil.copy(os.path.join(src, name), dst)
  for name, edit in (("config.json", config_edit), ("eval_test_best_K4_n40.json", eval_edit)):
    if edit:
      path = os.path.join(dst, name)
      obj = json.load(open(path))
      edit(obj)
      json.dump(obj, open(path, "w"))
  return dst


def test_report_picks_the_largest_k_and_names_it(swept, tmp_path):
  root, _ = swept
  w = _copy_run(os.path.join(root, "diag"), str(tmp_path / "w"))
  base = _eval(root)
  for name, k, nll in (("eval_test_latest_K16.json", 16, 40.0), ("eval_test_best_K16.json", 16, 41.0),
                       ("eval_test_1_K8.json", 8, 42.0), ("eval_valid_best_K99.json", 99, 43.0)):
    json.dump(dict(base, num_samples=k, nll_nats=nll, gap_nats=base["neg_elbo_nats"] - nll,
                   split=name.split("_")[1]), open(os.path.join(w, name), "w"))
  text, [row], _ = report.build_report([w])
  assert row["eval_file"].endswith("eval_test_best_K16.json") and row["log_px"] == 41.0
  assert "used `eval_test_best_K16.json`; also there: `eval_test_latest_K16.json`" in text
  _, [row], _ = report.build_report([w], split="valid")
  assert row["num_samples"] == 99 and row["log_px"] == 43.0


def test_report_groups_units_and_quotes_only_the_reports_setting(swept, tmp_path):
  root, _ = swept
  src = os.path.join(root, "diag")

  def as_paper_diag(c):
    c["data"]["name"] = "binarized_mnist"
  mnist = _copy_run(src, str(tmp_path / "mnist"), as_paper_diag, lambda e: e.update(dataset="binarized_mnist"))

  def as_baseline(c):
    c["name"], c["model"]["likelihood"] = "baseline_diag", "logistic"
  cifar = _copy_run(src, str(tmp_path / "cifar"), as_baseline)

  def other(c):
    c["name"] = "toy_2d"
  toy = _copy_run(src, str(tmp_path / "toy"), other)
  text, rows, _ = report.build_report([mnist, cifar, toy])
  [diag] = _md_rows(text, "diag")
  assert "86.80 / 83.22 / 3.58 (R1)" in diag and "84.08 / 81.08 / 3.00 (P1)" in diag  # [R] and [P] Table 1
  assert "Quoted figures (not measured here)" in text
  [base] = _md_rows(text, "baseline_diag")
  e = _eval(root)
  assert base[2:5] == [f"{e['bits_per_dim_elbo']:.3f}", f"{e['bits_per_dim_nll']:.3f}",
                       f"{e['bits_per_dim_elbo'] - e['bits_per_dim_nll']:.3f}"]
  assert "## Table 3: CIFAR-10 baselines (MNIST architecture, discretized logistic) (bits/dim)" in text
  assert "6.460" not in text  # its dataset is not the report's CIFAR-10: no quoted figures
  assert "## Other runs (nats)" in text and len(_md_rows(text, "toy_2d")) == 1


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not valid JSON"),
    ("missing_key", "missing key(s) nll_nats"),
    ("not_a_number", "nll_nats is 'n/a', not a number"),
    ("no_eval", "no evaluation on the test split"),
])
def test_report_rejects_a_bad_or_missing_eval_in_one_line(swept, tmp_path, capsys, damage, message):
  root, _ = swept
  w = _copy_run(os.path.join(root, "diag"), str(tmp_path / "w"))
  path = os.path.join(w, "eval_test_best_K4_n40.json")
  good = open(path).read()
  if damage == "truncated":
    open(path, "w").write(good[:len(good) // 2])
  elif damage == "missing_key":
    json.dump({k: v for k, v in json.loads(good).items() if k != "nll_nats"}, open(path, "w"))
  elif damage == "not_a_number":
    json.dump(dict(json.loads(good), nll_nats="n/a"), open(path, "w"))
  else:
    os.remove(path)
  with pytest.raises(report.ReportError, match=message.replace("(", r"\(").replace(")", r"\)")):
    report.build_report([w])
  out = str(tmp_path / "results.md")
  assert report.main(["--workdirs", w, "--out", out]) == 2
  line = one_error_line(capsys.readouterr().err)
  assert message in line and (path if damage != "no_eval" else w) in line
  assert not os.path.exists(out)


def test_report_cli_error_and_skip_missing(swept, tmp_path, capsys):
  root, _ = swept
  good = os.path.join(root, "diag")
  bare = str(tmp_path / "bare")
  shutil.copytree(good, bare, ignore=shutil.ignore_patterns("eval_*"))
  r = run_module("iaf_jax.experiments.report", "--workdirs", good, bare)
  assert r.returncode == 2 and bare in one_error_line(r.stderr) and r.stdout == ""
  assert report.main(["--workdirs", good, bare, "--skip_missing", "--format", "csv"]) == 0
  out, err = capsys.readouterr()
  assert err.startswith(f"warning: {bare}: no evaluation on the test split") and "Traceback" not in err
  assert [row["workdir"] for row in csv.DictReader(io.StringIO(out))] == [good]


def expected_label(name: str):
  """The report's label of config `name` at its defaults, from the name's pattern (None when it has none): an
  oracle independent of the configs' fields and the models' labellers."""
  base = name[len("baseline_"):] if name.startswith("baseline_") else name
  m = re.fullmatch(r"iaf_d(\d+)_w(\d+)(_const)?", base)
  if base == "diag":
    return "Diagonal covariance"
  if m:
    return f"IAF (Depth: {m[1]}, Width: {m[2]})" + (", constant sigma" if m[3] else "")
  m = re.fullmatch(r"rungs(\d+)_(gauss|iaf)", name)
  if m:
    return f"{m[1]} rungs {'IAF' if m[2] == 'iaf' else 'Gaussian'}"
  return None


def test_tables_and_quotes_match_the_configs_and_the_sources():
  from iaf_jax import config_lib
  for t, (_, config_file, names, unit, _, qcols) in report.TABLES.items():
    module = config_lib.load_config_module(os.path.join(REPO, config_file))
    for name in names:
      c = config_lib.to_dict(module.get_config(name))
      assert report.model_label(c) == expected_label(name), name
      # The model a row must be to get the row's quoted figures (quoted_for) is the same.
      assert report.table_model_label(t, name) == expected_label(name), name
      assert (c["model"]["likelihood"] == "bernoulli") == (unit == "nats"), name
      keys = [k for _, ks in qcols for k in ks if k in report.QUOTED[name]]
      assert keys, (t, name)  # every row of the report's tables has its quoted figures
  for name, quoted in report.QUOTED.items():
    for source, (vlb, log_px, gap) in quoted.items():
      assert source in report.SOURCES
      assert vlb - log_px == pytest.approx(gap, abs=0.011), (name, source)  # transcription check
