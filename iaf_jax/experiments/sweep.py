"""Launch the rows of a table one after another, one train.py (and evaluate.py) process per row:

  python -m iaf_jax.experiments.sweep --config=configs/mnist.py --rows=diag,iaf_d2_w320 --root=runs/table1 \\
      [--evaluate] \\
      [--dry_run] [-- --config.train.num_steps=1000 ...]
  python -m iaf_jax.experiments.sweep --table=1 --root=runs/table1 --evaluate

Each row trains into ROOT/ROW with `train.py --config=CONFIG:ROW --workdir=ROOT/ROW EXTRA...`, then (with
--evaluate) `evaluate.py --workdir=ROOT/ROW --num_samples=K --split=SPLIT`, K being the row's
config.eval.num_samples after the overrides. Arguments after `--` go to every train.py; `--row_override
ROW:FIELD=VALUE` to one row's only. `--dry_run` prints the commands, one per line, for a job scheduler.

Rerunning the sweep does not clobber anything: a row whose metrics.jsonl ends with the 'end' record of a run
that reached config.train.num_steps (or stopped early) is skipped, as is its evaluation when the eval file
exists; any other row is handed to train.py, which resumes from the workdir's latest checkpoint. A failing row
does not stop the others; failures are listed at the end and the exit status is 1. Ctrl-C / SIGTERM stop the
current row (train.py saves a checkpoint) and the sweep; rerun the same command to continue.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from typing import Optional

from iaf_jax import config_lib, workdir as workdir_lib
from iaf_jax.experiments import REPO, config_tables, report

TAIL_BYTES = 8192


class SweepError(config_lib.ConfigError):
  """A bad sweep flag (exit status 2, one line): nothing has been launched."""


# ------------------------------------------------------------------------------------------ configs
def _display_path(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith("..") else rel


def default_config_path(table: str) -> str:
  return _display_path(os.path.join(REPO, config_tables()[table][1]))


def known_names(config_path: str) -> Optional[tuple]:
  """NAMES of a config file (configs/mnist.py and configs/cifar10.py define it), None if it has none."""
  if not os.path.isfile(config_path):
    raise SweepError(f"--config={config_path}: no such file")
  try:
    module = config_lib.load_config_module(config_path)
  except config_lib.ConfigError as e:  # a config file that does not even import
    raise SweepError(f"--config={e}") from None
  names = getattr(module, "NAMES", None)
  return tuple(names) if names is not None else None


def effective_config(config_path: str, row: str, overrides: list[str]):
  """The config train.py will build for this row (config file + --config.* overrides), or None with the
  reason when it does not load (train.py then reports the error itself)."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["sweep", f"--config={config_path}:{row}", *[a for a in overrides if a.startswith("--config.")]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)  # ml_collections loads config files with load_module
      fv(argv)
    return fv.config, ""
  except (AttributeError, KeyError) as e:  # an override naming no field, worded as iaf_jax.cli words it
    return None, f"bad --config override: {str(e).strip(chr(34) + chr(39))} is not a config field"
  except Exception as e:  # noqa: BLE001 - absl's flags.Error and whatever a config file raises
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return None, lines[-1] if lines else type(e).__name__


def row_overrides(specs: list[str], rows: list[str]) -> dict[str, list[str]]:
  """--row_override ROW:FIELD=VALUE (or ROW:--config.FIELD=VALUE) -> {row: ['--config.FIELD=VALUE', ...]}."""
  out: dict[str, list[str]] = {}
  for spec in specs:
    row, sep, override = spec.partition(":")
    if not sep or "=" not in override:
      raise SweepError(f"--row_override={spec!r}: expected ROW:FIELD=VALUE, e.g. diag:train.num_steps=100")
    if row not in rows:
      raise SweepError(f"--row_override={spec!r}: {row!r} is not one of the rows ({', '.join(rows)})")
    override = override if override.startswith("--") else "--config." + override.removeprefix("config.")
    out.setdefault(row, []).append(override)
  return out


# ------------------------------------------------------------------------------------------ commands
def train_command(config_path: str, row: str, workdir: str, extra: list[str]) -> list[str]:
  return [sys.executable, os.path.join(REPO, "train.py"), f"--config={config_path}:{row}", f"--workdir={workdir}",
          *extra]


def eval_command(workdir: str, num_samples: int, split: str, max_examples: int) -> list[str]:
  cmd = [sys.executable, os.path.join(REPO, "evaluate.py"), f"--workdir={workdir}", f"--num_samples={num_samples}",
         f"--split={split}"]
  return cmd + ([f"--max_examples={max_examples}"] if max_examples else [])


def finished_run(workdir: str, config) -> Optional[dict]:
  """The 'end' record if the workdir holds a finished run of this config: metrics.jsonl's last record is an
  'end' whose step reached config.train.num_steps, or that stopped early. None otherwise (train.py resumes)."""
  if config is None:
    return None
  records = workdir_lib.read_metrics_records(workdir)
  last = records[-1] if records else None
  if not isinstance(last, dict) or last.get("event") != "end":
    return None
  reason = str(last.get("reason", ""))
  if reason.startswith("early stopping") or int(last.get("step", -1)) >= int(config.train.num_steps):
    return last
  return None


# ------------------------------------------------------------------------------------------ running
class _Stop:
  """SIGINT / SIGTERM: passed on to the running row (train.py saves and exits), then the sweep stops."""

  def __init__(self):
    self.signal = None
    self.child: Optional[subprocess.Popen] = None

  def __call__(self, signum, frame):
    self.signal = signum
    if self.child is not None and self.child.poll() is None:
      try:
        self.child.send_signal(signum)
      except OSError:
        pass


def run_command(cmd: list[str], stop: _Stop) -> tuple[int, str]:
  """Run cmd with its stdout and stderr passed through; (exit status, its last error line)."""
  sys.stdout.flush()
  sys.stderr.flush()
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
  stop.child = proc
  tail = b""
  try:
    while True:
      chunk = os.read(proc.stderr.fileno(), 4096)
      if not chunk:
        break
      if hasattr(sys.stderr, "buffer"):
        sys.stderr.buffer.write(chunk)
      else:  # a text-only stream (a test's captured stderr)
        sys.stderr.write(chunk.decode("utf-8", "replace"))
      sys.stderr.flush()
      tail = (tail + chunk)[-TAIL_BYTES:]
    rc = proc.wait()
  finally:
    stop.child = None
    proc.stderr.close()
  return rc, last_error_line(tail.decode("utf-8", "replace"))


def last_error_line(text: str) -> str:
  segments = [s.strip() for s in text.replace("\r", "\n").split("\n") if s.strip()]
  errors = [s for s in segments if s.startswith("error:")]
  return errors[-1] if errors else (segments[-1] if segments else "")


def sweep(*, config_path: str, rows: list[str], root: str, extra: list[str], per_row: dict[str, list[str]],
          evaluate: bool, split: str, max_examples: int, dry_run: bool) -> int:
  n = len(rows)
  plans = []
  for row in rows:
    workdir = os.path.join(root, row)
    overrides = extra + per_row.get(row, [])
    config, why = effective_config(config_path, row, overrides)
    plans.append((row, workdir, overrides, config, why))

  if dry_run:
    bad = 0
    for row, workdir, overrides, config, why in plans:
      print(shlex.join(train_command(config_path, row, workdir, overrides)))
      if evaluate and config is not None:
        print(shlex.join(eval_command(workdir, int(config.eval.num_samples), split, max_examples)))
      if config is None:
        bad += 1
        print(f"warning: row {row}: its config does not load ({why}); train.py will fail", file=sys.stderr)
    return 1 if bad else 0

  stop = _Stop()
  old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
  done, failed = [], []

  def launch(row, prefix, stage, noun, cmd) -> bool:
    """Runs one child process of a row (echoing its command); False, and the failure recorded, if it failed."""
    print(f"  $ {shlex.join(cmd)}", flush=True)
    rc, line = run_command(cmd, stop)
    if rc != 0 and stop.signal is None:
      failed.append((row, stage, rc, line))
      print(f"{prefix}: FAILED {noun} (exit {rc}): {line}", flush=True)
    return rc == 0

  t_start = time.time()
  try:
    for i, (row, workdir, overrides, config, why) in enumerate(plans, 1):
      if stop.signal is not None:
        break
      prefix = f"[{i}/{n}] {row}"
      end = finished_run(workdir, config)
      if end is not None:
        print(f"{prefix}: already trained in {workdir} (step {end.get('step')}, {end.get('reason')}); "
              f"not retraining", flush=True)
        trained = "already trained"
      else:
        print(f"{prefix}: training into {workdir}", flush=True)
        t0 = time.time()
        ok = launch(row, prefix, "train", "training", train_command(config_path, row, workdir, overrides))
        if stop.signal is not None:
          break
        if not ok:
          continue
        if config is not None and finished_run(workdir, config) is None:
          # train.py exited cleanly without reaching num_steps: it was stopped (a signal it saw) - rerun resumes.
          failed.append((row, "train", 0, "the run did not finish (stopped early); rerun the sweep to resume"))
          print(f"{prefix}: training stopped before num_steps; rerun to resume", flush=True)
          continue
        trained = f"trained in {time.time() - t0:.0f}s"
      evaluated = ""
      if evaluate and config is None:
        failed.append((row, "evaluate", 2, f"its config does not load here ({why})"))
        print(f"{prefix}: FAILED: cannot evaluate, its config does not load ({why})", flush=True)
        continue
      if evaluate:
        k = int(config.eval.num_samples)
        # A subset's evaluation is named by its N, unless N covers the whole split: then by the split alone.
        path, whole = (workdir_lib.eval_path(workdir, split, "best", k, n) for n in (max_examples, 0))
        if not os.path.exists(path) and os.path.exists(whole):
          path = whole
        if end is not None and os.path.exists(path) and eval_covers(path, split, max_examples):
          print(f"{prefix}: {os.path.basename(path)} exists; not re-evaluating", flush=True)
          evaluated = f", {os.path.basename(path)} kept"
        else:
          if end is not None and os.path.exists(path):
            print(f"{prefix}: {os.path.basename(path)} does not cover the examples asked for; re-evaluating",
                  flush=True)
          print(f"{prefix}: evaluating (K={k}, {split} split)", flush=True)
          ok = launch(row, prefix, "evaluate", "evaluation", eval_command(workdir, k, split, max_examples))
          if stop.signal is not None:
            break
          if not ok:
            continue
          evaluated = f", wrote {os.path.basename(path)}"
      done.append((row, trained + evaluated))
  finally:
    for s, h in old.items():
      signal.signal(s, h)

  print(f"sweep: {len(done)} of {n} rows done, {len(failed)} failed ({time.time() - t_start:.0f}s)", flush=True)
  for row, what in done:
    print(f"  ok      {row}: {what}")
  for row, stage, rc, line in failed:
    print(f"  FAILED  {row} ({stage}, exit {rc}): {line}")
  if stop.signal is not None:
    name = signal.Signals(stop.signal).name
    print(f"sweep: stopped by {name}; rerun the same command to resume", flush=True)
    return 128 + stop.signal
  if failed:
    print(f"error: {len(failed)} of {n} rows failed: {', '.join(r for r, *_ in failed)}", file=sys.stderr)
    return 1
  return 0


def eval_covers(path: str, split: str, max_examples: int) -> bool:
  """Whether an existing eval JSON is a valid evaluation of what this sweep asks for: the whole split
  (max_examples 0) or the fixed random subset of max_examples examples evaluate.py takes. A file without
  `split_size` or `subset` (written by an older evaluate.py, which took the first N) does not cover either."""
  try:
    r = report.load_eval(path, split)
  except report.ReportError:
    return False
  n, size = int(r.get("num_examples", -1)), r.get("split_size")
  if size is None:
    return False
  if max_examples and max_examples < int(size):
    # Partial evaluations are of data.fixed_subset's examples; older files (the first N) are not that subset.
    return n == max_examples and r.get("subset") == "data.fixed_subset(seed=0)"
  return n == int(size)


# ------------------------------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2, like the absl front ends (iaf_jax.cli)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]):
  if "--" in argv:
    cut = argv.index("--")
    argv, extra = argv[:cut], argv[cut + 1:]
  else:
    extra = []
  p = _Parser(prog="python -m iaf_jax.experiments.sweep", description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="", help="Config file, e.g. configs/mnist.py (default: the --table's).")
  p.add_argument("--rows", default="", help="Comma-separated config names of the config file.")
  p.add_argument("--table", default="", choices=("",) + tuple(config_tables()),
                 help="The rows of the report's table N, as the config files' TABLES list them (1, 2: "
                 "configs/mnist.py; 3, 4: configs/cifar10.py).")
  p.add_argument("--root", required=True, help="Each row trains into ROOT/ROW.")
  p.add_argument("--evaluate", action="store_true", help="Run evaluate.py after each row's training.")
  p.add_argument("--split", default="test", choices=("test", "valid", "train"), help="Split --evaluate uses.")
  p.add_argument("--max_examples", type=int, default=0, help="evaluate.py --max_examples (0 = all).")
  p.add_argument("--row_override", action="append", default=[], metavar="ROW:FIELD=VALUE",
                 help="A config override for one row only (repeatable), e.g. diag:train.num_steps=100.")
  p.add_argument("--dry_run", action="store_true", help="Print the commands, one per line; run nothing.")
  p.add_argument("--traceback", action="store_true", help="Show the full traceback of a user error.")
  args, unknown = p.parse_known_args(argv)
  not_overrides = [a for a in unknown if not a.startswith("--config.")]
  if not_overrides:
    p.error(f"unrecognized arguments: {' '.join(not_overrides)} (train.py flags go after --)")
  args.extra = unknown + extra
  return args


def resolve(args) -> dict:
  """Flags -> sweep() arguments; SweepError (nothing launched) on any inconsistency."""
  if bool(args.rows) == bool(args.table):
    raise SweepError("give --rows=NAME,NAME,... or --table=1|2|3|4 (one of them)")
  config_path = args.config or (default_config_path(args.table) if args.table else "")
  if not config_path:
    raise SweepError("--config=FILE is needed with --rows")
  rows = list(config_tables()[args.table][2]) if args.table else [r.strip() for r in args.rows.split(",") if r.strip()]
  if not rows:
    raise SweepError(f"--rows={args.rows!r}: no row names")
  dupes = sorted({r for r in rows if rows.count(r) > 1})
  if dupes:
    raise SweepError(f"--rows: {', '.join(dupes)} given twice (each row has one workdir)")
  names = known_names(config_path)
  if names is not None:
    unknown = [r for r in rows if r not in names]
    if unknown:
      raise SweepError(f"{config_path} has no config named {', '.join(unknown)}; known: {', '.join(names)}")
  if args.max_examples < 0:
    raise SweepError(f"--max_examples={args.max_examples}: must be >= 0")
  return dict(config_path=config_path, rows=rows, root=args.root, extra=args.extra,
              per_row=row_overrides(args.row_override, rows), evaluate=args.evaluate, split=args.split,
              max_examples=args.max_examples, dry_run=args.dry_run)


def main(argv=None) -> int:
  try:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
  except SystemExit as e:  # a flag error (one line printed) or --help
    return e.code
  status = {"rc": 0}

  def job():
    status["rc"] = sweep(**resolve(args))

  from iaf_jax import cli  # the shared error convention: one 'error: ...' line, exit status 2
  rc = cli.run(job, args.traceback)
  return rc or status["rc"]


if __name__ == "__main__":
  sys.exit(main())
