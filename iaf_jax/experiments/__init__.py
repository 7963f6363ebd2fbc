"""Experiment tooling around the core package: the sweep over the report's tables (sweep), the tables
themselves (report), the report's figures (figures) and the throughput benchmark (bench). Each is a command:
`python -m iaf_jax.experiments.<name>`. The core (training, evaluation, models) imports nothing from here."""
import os

# The repository root: the tools run train.py / evaluate.py and read configs/ from it.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
