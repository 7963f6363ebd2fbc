"""Experiment tooling around the core package: the sweep over the report's tables (sweep), the tables
themselves (report), the report's figures (figures) and the throughput benchmark (bench). Each is a command:
`python -m iaf_jax.experiments.<name>`. The core (training, evaluation, models) imports nothing from here."""
import glob
import os

# The repository root: the tools run train.py / evaluate.py and read configs/ from it.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_tables() -> dict[str, tuple[str, str, tuple[str, ...]]]:
  """The report's tables as the config files define them (their TABLES: id -> (title, config names)):
  id -> (title, config file relative to the repository, config names in row order), in table order. The
  config files are their one home, so a new table needs no edit here, in report or in sweep."""
  from iaf_jax import config_lib

  found: dict[str, tuple[str, str, tuple[str, ...]]] = {}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    rel = os.path.relpath(path, REPO)
    for t, (title, names) in getattr(config_lib.load_config_module(path), "TABLES", {}).items():
      if t in found:
        raise config_lib.ConfigError(f"{rel}: table {t!r} is defined in {found[t][1]} too")
      found[t] = (title, rel, tuple(names))
  # Numbered tables in numeric order (10 after 9), then any others by name.
  order = lambda t: (0, int(t), "") if t.isdigit() else (1, 0, t)
  return {t: found[t] for t in sorted(found, key=order)}
