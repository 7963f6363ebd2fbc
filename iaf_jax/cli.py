"""What the front ends share: logging set-up and turning a known failure into one line on stderr."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from iaf_jax import checkpoints, config_lib, data as data_lib

# Errors a user can cause and fix: printed as one line, exit status 2, no traceback (--traceback shows it).
USER_ERRORS = (config_lib.ConfigError, data_lib.DataError, checkpoints.CheckpointError)


def run(main: Callable[[], object], show_traceback: bool) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
  for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    main()
  except USER_ERRORS as e:
    if show_traceback:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - the training loop's own failures (TrainingError) and the unexpected
    if show_traceback or type(e).__name__ not in ("TrainingError",):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 3
  return 0


def _parse_flags(argv):
  """absl flag parsing with every failure as one line: ml_collections puts a whole traceback inside its
  flag errors, and raises AttributeError/KeyError for an override that names no config field."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: {lines[-1] if lines else e}", file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    print(f"error: bad --config override: {str(e).strip(chr(34) + chr(39))} is not a config field or value",
          file=sys.stderr)
  sys.exit(2)


def run_app(main: Callable) -> None:
  from absl import app

  app.run(main, flags_parser=_parse_flags)
