"""Checkpoints of a workdir: orbax managers for the latest N steps (workdir/checkpoints) and for the best
validation step (workdir/best). Orbax writes each step to a temporary directory and renames it when complete,
so a crash mid-write never leaves a checkpoint that looks finished; a step that fails to restore anyway
(corrupted or truncated on disk) is reported and the previous one is used."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
import uuid
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from iaf_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 << 20  # refuse to start a run that could not write a single checkpoint


class CheckpointError(RuntimeError):
  """No usable checkpoint where one is needed: one line for the user."""


def check_workdir_writable(workdir: str) -> None:
  """Fail before training starts, not hours later, if the workdir cannot take checkpoints."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{uuid.uuid4().hex}")
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"{workdir}: workdir is not writable ({e.strerror or e})") from None
  free = shutil.disk_usage(workdir).free
  if free < MIN_FREE_BYTES:
    raise CheckpointError(f"{workdir}: only {free >> 20} MiB free on its disk; need at least "
                          f"{MIN_FREE_BYTES >> 20} MiB for checkpoints")


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _abstract(tree: Any, sharding) -> Any:
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


class CheckpointManager:
  """Latest-N and best checkpoints of one workdir; each holds the train state and a small JSON `meta`."""

  def __init__(self, workdir: str, keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self._latest = _manager(workdir_lib.path(self.workdir, workdir_lib.CHECKPOINTS_DIR), keep)
    self._best = _manager(workdir_lib.path(self.workdir, workdir_lib.BEST_DIR), 1)
    self._unreadable: set[int] = set()  # steps restore_latest skipped as damaged; deleted at the next save

  def steps(self) -> list[int]:
    return list(self._latest.all_steps())

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    args = lambda: ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    # Damaged steps restore_latest skipped, all newer than the resumed one: left on disk, they would stop this run
    # from saving those steps again (orbax skips a step that exists or is older than its latest) and stay "latest".
    for bad in sorted(self._unreadable):
      self._latest.delete(bad)
    self._unreadable.clear()
    if step not in self._latest.all_steps():
      self._latest.save(step, args=args())
    if best:
      self._best.save(step, args=args(), force=True)

  def wait(self) -> None:
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def _restore(self, manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    _quiet_reads_after_a_failed_restore()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_latest(self, make_state: Callable[[], Any], sharding=None) -> tuple[Optional[Any], Optional[dict]]:
    """The newest step that restores cleanly, or (None, None) in an empty workdir.

    make_state builds a fresh state; only its shapes are used (jax.eval_shape), to check compatibility.
    """
    steps = sorted(self._latest.all_steps(), reverse=True)
    if not steps:
      return None, None
    abstract = _abstract(jax.eval_shape(make_state), sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    failures = []
    for step in steps:
      try:
        restored = self._restore(self._latest, step, abstract)
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        failures.append((step, e))
        continue
      # An older step restored, so the newer ones are damaged, not another model's (that fails every step;
      # the error text alone cannot tell: a missing data file's error quotes the array's "shape" too).
      for bad, e in failures:
        log.warning("checkpoint %s/checkpoints/%d is unreadable (%s); falling back to the previous one",
                    self.workdir, bad, _first_line(e))
        self._unreadable.add(bad)
      return restored
    if all(_is_incompatible(e) for _, e in failures):
      raise CheckpointError(f"{self.workdir}: checkpoint {steps[0]} does not match this config's model "
                            f"({_first_line(failures[0][1])})")
    raise CheckpointError(f"{self.workdir}: none of the checkpoints {steps} could be restored "
                          f"(newest: {_first_line(failures[0][1])})")

  def restore(self, which: str, abstract_state: Any) -> tuple[Any, dict, int]:
    """which = 'best' | 'latest' | a step number; returns (state, meta, step)."""
    if which == "best":
      manager = self._best
      steps = list(manager.all_steps())
      if not steps:  # no validation ran: the latest is the only candidate
        manager, steps = self._latest, list(self._latest.all_steps())
      step = max(steps) if steps else None
    else:
      manager, steps = self._latest, list(self._latest.all_steps())
      if which == "latest":
        step = max(steps) if steps else None
      else:
        try:
          step = int(which)
        except ValueError:
          raise CheckpointError(f"--checkpoint={which!r}: must be best, latest or a step number") from None
        if step not in steps:
          raise CheckpointError(f"{self.workdir}: no checkpoint at step {step}; have {sorted(steps)}")
    if step is None:
      raise CheckpointError(f"{self.workdir}: holds no checkpoint (train into it first)")
    try:
      state, meta = self._restore(manager, step, abstract_state)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{self.workdir}: checkpoint {step} could not be restored for this config "
                            f"({_first_line(e)})") from None
    return state, meta, step


def _quiet_reads_after_a_failed_restore() -> None:
  """When one array of a damaged checkpoint fails to read, orbax's restore raises and closes its asyncio loop while
  TensorStore still completes the other reads. What is left over then reports itself, with a traceback each, after
  our one-line error: callbacks into the closed loop ("RuntimeError: Event loop is closed") and orbax read
  coroutines that raise as they are closed, both through sys.unraisablehook, and the reads' own failures, never
  awaited, logged by asyncio when collected ("Task/Future exception was never retrieved"). Drop exactly those."""
  asyncio_log = logging.getLogger("asyncio")
  if _is_abandoned_read_log not in asyncio_log.filters:
    asyncio_log.addFilter(_is_abandoned_read_log)
  previous = sys.unraisablehook
  if getattr(previous, "_drops_abandoned_reads", False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine being closed
    if ((unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed")
        or (code is not None and f"orbax{os.sep}checkpoint" in code.co_filename)):
      return
    previous(unraisable)

  hook._drops_abandoned_reads = True
  sys.unraisablehook = hook


def _is_abandoned_read_log(record: logging.LogRecord) -> bool:
  """A logging filter: False (drop) for asyncio's report of a checkpoint read nobody awaited."""
  if "exception was never retrieved" not in str(record.msg):  # Task / Future / _GatheringFuture
    return True
  text = record.getMessage()
  if record.exc_info and record.exc_info[1] is not None:  # a _GatheringFuture names orbax only in its traceback
    text += "".join(traceback.format_exception(*record.exc_info))
  text = text.lower()
  return not any(s in text for s in ("async_deserialize", "tensorstore", f"orbax{os.sep}checkpoint"))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _is_incompatible(e: BaseException) -> bool:
  """A shape/structure mismatch (a different model), as opposed to a damaged file."""
  text = str(e).lower()
  return any(s in text for s in ("shape", "structure", "mismatch", "missing key", "unexpected key"))
