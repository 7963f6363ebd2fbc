"""Minor page faults and wall time per update step, in the environment this process was started with (so that
malloc settings can be compared; it does not restart itself as train.py does).

  python scripts/step_page_faults.py [--config configs/mnist.py:iaf_d8_w1920] [--batch 64] [--steps 10] [--rounds 3]
                                     [--override model.hidden_dim=16 ...]
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python scripts/step_page_faults.py ...     # what train.py runs with
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python scripts/step_page_faults.py ...

XLA:CPU allocates an executable's temporary buffers at every call; when the allocator hands back pages the kernel
has to map afresh, each 4 KiB page written costs a fault (iaf_jax.hostenv.hugepages_env). Prints, per round of
--steps steps on the bench's synthetic batch, ms per step and the process's minor faults per step
(getrusage), after three warm-up steps.
"""
import argparse
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py:iaf_d8_w1920")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--override", action="append", default=[], help="section.field=value")
  args = p.parse_args()

  from iaf_jax import train_lib
  from profile_step import run_steps, setup

  config, model, optimizer, state, batch, max_value = setup(args.config, args.override, args.batch)
  step = train_lib.make_update_step(model, optimizer, config, max_value)
  state, _ = run_steps(step, state, batch, 3)  # compile and warm up
  env = {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ}
  rows = []
  for r in range(args.rounds):
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, ms = run_steps(step, state, batch, args.steps)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / args.steps
    rows.append({"round": r + 1, "ms_per_step": ms, "minor_faults_per_step": faults})
    print(f"{args.config} batch {args.batch} round {r + 1}: {ms:.1f} ms/step, {faults:.0f} minor faults/step  "
          f"{env or '(default malloc)'}", flush=True)
  return rows


if __name__ == "__main__":
  main()
