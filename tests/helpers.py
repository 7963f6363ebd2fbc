"""Shared by the end-to-end tests: a tiny MNIST-architecture config on the digits shipped with scikit-learn."""
import os
import subprocess
import sys

import ml_collections

from iaf_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/ is not a package: configs are loaded by path, as config_flags does, through the tools' loader.
mnist = config_lib.load_config_module(os.path.join(REPO, "configs", "mnist.py"))

TINY_OVERRIDES = {
    "data.name": "digits", "model.context_dim": 8, "train.lr_schedule": "constant", "model.channels": (4, 8), "model.strides": (2, 2), "model.hidden_dim": 16, "model.latent_dim": 4,
    "model.iaf_depth": 2, "model.iaf_width": 16, "train.batch_size": 16, "train.num_steps": 12,
    "train.log_every": 4, "train.eval_every": 6, "train.checkpoint_every": 4, "data.validation_size": 64,
    "data.max_train": 256, "eval.valid_examples": 64, "eval.batch_size": 32, "eval.chunk_size": 8,
}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  c = mnist.get_config("demo")
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def cli_flags(**overrides) -> list:
  """The same tiny config as command-line overrides of configs/mnist.py:demo."""
  flags = []
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    if isinstance(value, tuple):
      value = "(" + ",".join(map(str, value)) + ",)"
    flags.append(f"--config.{key}={value}")
  return flags


def run_cli(script: str, *args, env=None, timeout=600) -> subprocess.CompletedProcess:
  full_env = dict(os.environ, PYTHONPATH=REPO, **(env or {}))
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)
