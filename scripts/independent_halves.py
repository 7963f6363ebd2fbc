"""The update step's gradient in two halves that share nothing, one per core: how much of a second core this
model's own ops get when no scheduling stands between them (issue #13).

In one process with one XLA:CPU device per core (it restarts itself with them, as evaluate.py does), timed in
interleaved rounds on the bench's synthetic batch:
  half alone    the loss and gradients of half the batch (every other image: a micro-batch) on device 0 alone;
  both halves   the two halves at once, one per device, each its own program with no collective between them
                (what two processes pinned one per core would run);
  update        the step's update alone (train_lib.apply_gradients: norm, finite check, Adamax, EMA) from the
                halves' mean gradients, not donated;
  library step  train_lib.make_update_step on device 0 (donated), the step train.py runs.
2 x 'half alone' / 'both halves' is how much faster the two halves finish at once than one after the other
(2.0: as if each had a core to itself; a half alone may already use the idle core for its multi-threaded ops),
and 'both halves' + 'update' the time of a step whose halves never wait for each other and whose update
overlaps nothing, to set beside the library step's. Medians over the rounds; --json writes every round.

  python scripts/independent_halves.py --config configs/mnist.py:diag [--batch 64] [--rounds 5] [--steps 20]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/mnist.py:diag")
  p.add_argument("--override", action="append", default=[], help="section.field=value")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.rounds < 1 or args.steps < 1 or args.batch < 2 or args.batch % 2:
    raise SystemExit("error: --rounds and --steps must be >= 1 and --batch an even number >= 2")

  import jax
  import numpy as np

  import profile_step
  from iaf_jax import optim, train_lib

  devices = jax.devices()
  if len(devices) < 2:
    raise SystemExit(f"error: independent halves need 2 XLA:CPU devices, this process has {len(devices)}: run it on "
                     "a machine with 2 or more usable cores, or set XLA_FLAGS=--xla_force_host_platform_device_count=2")
  config, model, optimizer, state, batch, max_value = profile_step.setup(args.config, args.override, args.batch)
  tc = config.train
  loss_and_grads = jax.jit(train_lib.make_loss_and_grads(
      model, likelihood=config.model.likelihood, max_value=max_value, free_bits=tc.free_bits,
      num_importance_samples=tc.get("num_importance_samples", 1)))

  def update(state, parts):
    (loss, metrics), grads = jax.tree_util.tree_map(lambda *a: sum(a) / len(a), *parts)
    return train_lib.apply_gradients(state, loss, metrics, grads, optimizer=optimizer, ema_decay=tc.ema_decay,
                                     fused_adamax=optim.fused_adamax(tc))
  update = jax.jit(update)

  images = np.asarray(batch)
  key = jax.random.fold_in(state.rng, state.step)
  halves = [jax.device_put((state.params, images[i::2], jax.random.fold_in(key, i)), devices[i]) for i in range(2)]
  parts = [jax.device_put(loss_and_grads(*h), devices[0]) for h in halves]
  library_step = train_lib.make_update_step(model, optimizer, config, max_value)
  lib_state = jax.tree_util.tree_map(lambda a: a.copy(), state)

  def half_alone():
    return [loss_and_grads(*halves[0]) for _ in range(args.steps)]

  def both_halves():
    return [loss_and_grads(*h) for _ in range(args.steps) for h in halves]

  def update_alone():
    return [update(state, parts) for _ in range(args.steps)]

  def library():
    nonlocal lib_state
    for _ in range(args.steps):
      lib_state, m = library_step(lib_state, batch)
    return m

  forms = {"half alone": half_alone, "both halves": both_halves, "update": update_alone, "library step": library}
  for f in forms.values():  # compile and warm up
    jax.block_until_ready(f())
  ms = {name: [] for name in forms}
  for _ in range(args.rounds):
    for name, f in forms.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ms[name].append(1e3 * (time.perf_counter() - t0) / args.steps)
  med = {name: statistics.median(v) for name, v in ms.items()}
  gain = 2 * med["half alone"] / med["both halves"]
  floor = med["both halves"] + med["update"]
  rate = lambda t: args.batch / t * 1e3
  print(f"{args.config} batch {args.batch} ({args.batch // 2} per half), medians of {args.rounds} rounds x "
        f"{args.steps} calls, jax {jax.__version__}:")
  for name in forms:
    print(f"  {name:13s} {med[name]:8.2f} ms  (rounds {', '.join(f'{t:.2f}' for t in ms[name])})")
  print(f"  both halves at once, against one after the other: {gain:.2f}x faster (2.00: a core each)")
  print(f"  both halves + update: {floor:.2f} ms = {rate(floor):.0f} img/s; the library step: "
        f"{med['library step']:.2f} ms = {rate(med['library step']):.0f} img/s")
  out = {"config": args.config, "overrides": args.override, "batch": args.batch, "rounds": args.rounds,
         "steps": args.steps, "jax": jax.__version__, "ms": ms, "median_ms": med, "halves_at_once_speedup": gain,
         "halves_plus_update_ms": floor, "halves_plus_update_img_per_s": rate(floor),
         "library_img_per_s": rate(med["library step"])}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  from iaf_jax import hostenv
  hostenv.reexec_with_host_env(cpu_devices=True)  # one device per core, and train.py's malloc
  main()
