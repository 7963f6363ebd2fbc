"""Evaluate a trained run:
  python evaluate.py --workdir=DIR [--num_samples=128] [--split=test] [--checkpoint=best|latest|STEP]
  python evaluate.py --workdir=DIR --mode=sample [--num=64]"""
import sys

from iaf_jax import hostenv

if __name__ == "__main__":
  # Before JAX loads: glibc reads its malloc tunables, XLA its flags, only at process start. On a CPU host the
  # evaluation runs on one XLA device per core (hostenv.cpu_devices_env; IAF_JAX_CPU_DEVICES=1: one device).
  hostenv.reexec_with_host_env(cpu_devices=True)

from absl import flags  # noqa: E402

from iaf_jax import cli

WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
MODE = flags.DEFINE_enum("mode", "eval", ["eval", "sample"], "eval: importance-sampled log p(x); sample: prior "
                         "samples, reconstructions and sampling time.")
NUM_SAMPLES = flags.DEFINE_integer("num_samples", 128, "K, importance samples per example.")
SPLIT = flags.DEFINE_string("split", "test", "test | valid | train.")
CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "best | latest | a step number.")
MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Evaluate only a fixed random subset of N examples (data.fixed_subset, seed 0; 0 = all).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Examples per importance-sampling pass (0 = "
                                  "config.eval.importance_batch_size, or config.eval.batch_size where that is 0).")
CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 0, "Importance samples per pass (0 = config.eval.chunk_size).")
NUM = flags.DEFINE_integer("num", 64, "Images to sample in --mode=sample.")
DIAG_EXAMPLES = flags.DEFINE_integer("diagnostics_examples", 1000, "Examples for the collapse diagnostics in the "
                                     "eval JSON (KL per latent unit, active units); 0 = skip them.")
DIAG_SAMPLES = flags.DEFINE_integer("diagnostics_samples", 16, "Posterior samples per example for those diagnostics.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of the evaluation's random draws.")
TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of a user error.")


def main(argv):
  del argv
  from iaf_jax import eval_lib  # after flag parsing: importing jax is slow

  def job():
    if MODE.value == "sample":
      return eval_lib.sample(WORKDIR.value, num=NUM.value, checkpoint=CHECKPOINT.value, seed=SEED.value)
    return eval_lib.evaluate(WORKDIR.value, num_samples=NUM_SAMPLES.value, split=SPLIT.value,
                             checkpoint=CHECKPOINT.value, max_examples=MAX_EXAMPLES.value,
                             batch_size=BATCH_SIZE.value, chunk_size=CHUNK_SIZE.value, seed=SEED.value,
                             diagnostics_examples=DIAG_EXAMPLES.value, diagnostics_samples=DIAG_SAMPLES.value)

  sys.exit(cli.run(job, TRACEBACK.value))


if __name__ == "__main__":
  cli.run_app(main)
