"""Time the k-sample (k=4) update step of the 4-rung IAF ResNet VAE (h32 z8, batch 32) on 1 and 2 devices, as
train_lib builds it, from the root of the checkout on PYTHONPATH (it also runs on checkouts from before the mesh fix):
  PYTHONPATH=CHECKOUT XLA_FLAGS=--xla_force_host_platform_device_count=2 python scripts/k_step_time.py LABEL"""
import inspect, sys, time
import jax, numpy as np
from iaf_jax import config_lib, optim, sharding, train_lib
from iaf_jax.experiments.bench import cost_flops
from iaf_jax.models import build_model
c = config_lib.load_config_file("configs/cifar10.py:rungs4_iaf")
c.model.h_size, c.model.z_size, c.train.batch_size = 32, 8, 32
c.train.num_importance_samples, c.train.free_bits = 4, 0.0
model, opt = build_model(c.model, (32, 32, 3)), optim.make_optimizer(c.train)
images = np.random.default_rng(0).integers(0, 256, size=(32, 32, 32, 3), dtype=np.uint8)
state0 = train_lib.init_state(model, opt, images, 0, likelihood=c.model.likelihood, max_value=255)
for n in (1, 2):
  mesh = sharding.make_mesh(n)
  kw = dict(likelihood=c.model.likelihood, max_value=255, free_bits=0.0, ema_decay=c.train.ema_decay,
            fused_adamax=optim.fused_adamax(c.train), num_importance_samples=4)
  if "batch_sharding" in inspect.signature(train_lib.make_train_step).parameters and n > 1:
    kw["batch_sharding"] = sharding.batch_sharded(mesh)
  step = jax.jit(train_lib.make_train_step(model, opt, **kw), donate_argnums=0)
  st = jax.device_put(jax.tree_util.tree_map(lambda x: x.copy(), state0), sharding.replicated(mesh))
  b = jax.device_put(images, sharding.batch_sharded(mesh))
  flops = cost_flops(step.lower(st, b).compile())
  for _ in range(2):
    st, m = step(st, b)
  jax.block_until_ready(m)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(5):
      st, m = step(st, b)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / 5)
  ms = 1000 * float(np.median(times))
  print(f"{sys.argv[1]} devices {n}: {ms:.1f} ms/step, {32 / ms * 1000:.1f} img/s, per-device flops {flops:.4g}, loss {float(m['loss']):.2f}", flush=True)
