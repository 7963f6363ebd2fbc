"""Train a VAE with IAF:  python train.py --config=configs/mnist.py:iaf_d2_w320 --workdir=runs/x
Rerunning the same command resumes the run in --workdir from its latest checkpoint."""
import sys

from iaf_jax import hostenv

if __name__ == "__main__":
  hostenv.reexec_with_host_env()  # before JAX loads: LD_PRELOAD and glibc tunables are read only at process start

from absl import flags  # noqa: E402
from ml_collections import config_flags

from iaf_jax import cli

FLAGS = flags.DEFINE_string("workdir", None, "Directory for checkpoints, config.json and metrics.jsonl.",
                            required=True)
TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of a user error.")
config_flags.DEFINE_config_file("config", None, "Config file and name, e.g. configs/mnist.py:iaf_d2_w320.",
                                lock_config=True)


def main(argv):
  del argv
  from iaf_jax import train_lib  # after flag parsing: importing jax is slow
  sys.exit(cli.run(lambda: train_lib.train_and_evaluate(flags.FLAGS.config, FLAGS.value), TRACEBACK.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run_app(main)
