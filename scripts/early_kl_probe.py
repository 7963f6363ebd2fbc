"""The first training steps of a config from its initialisation, step by step (issue #15's warning sign):

  python scripts/early_kl_probe.py --config=configs/cifar10.py:rungs4_iaf --data_dir=../shared/data \
      [--config.train.batch_size=16] [--config.model.head_data_init=True] [--steps=20]

Initialises the model as train.py does (data-dependent init on the first batch), takes --steps update steps of
the config's optimizer on random training batches and prints the KL, the loss and the gradient norm of every
step, then one JSON line: the mean and peak KL of the steps and the mean loss of the last 10 in bits/dim.
Nothing is written. `model.head_data_init=True` restores the data-dependent init of the ResNet VAE's
prior/posterior head that made the KL blow up in the first steps.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

STEPS = flags.DEFINE_integer("steps", 20, "Update steps to take.")
DATA_DIR = flags.DEFINE_string("data_dir", None, "Overrides config.data.dir.")
config_flags.DEFINE_config_file("config", None, "Config file and name.", lock_config=True)


def main(argv):
  del argv
  import jax
  import numpy as np
  from iaf_jax import data as data_lib, optim, train_lib
  from iaf_jax.models import build_model

  c = flags.FLAGS.config
  if DATA_DIR.value:
    with c.unlocked():
      c.data.dir = DATA_DIR.value
  ds = data_lib.load_for_config(c)
  tc, lik = c.train, c.model.likelihood
  model = build_model(c.model, ds.image_shape)
  opt = optim.make_optimizer(tc)
  state = train_lib.init_state(model, opt, ds.train[:tc.batch_size], c.seed, likelihood=lik, max_value=ds.max_value)
  step = jax.jit(train_lib.make_train_step(model, opt, likelihood=lik, max_value=ds.max_value,
                                           free_bits=tc.free_bits, ema_decay=tc.ema_decay,
                                           fused_adamax=optim.fused_adamax(tc)))
  rng = np.random.RandomState(c.seed)
  kls, losses = [], []
  for i in range(STEPS.value):
    state, m = step(state, ds.train[rng.randint(0, len(ds.train), tc.batch_size)])
    kls.append(float(m["kl"]))
    losses.append(float(m["neg_elbo"]))
    print(f"step {i}: kl {kls[-1]:.1f}  -elbo {losses[-1]:.1f}  grad norm {float(m['grad_norm']):.3g}", flush=True)
  dims = int(np.prod(ds.image_shape))
  print(json.dumps({"config": c.name, "steps": STEPS.value, "batch_size": tc.batch_size,
                    "learning_rate": tc.learning_rate, "mean_kl": float(np.mean(kls)), "peak_kl": max(kls),
                    "last10_neg_elbo_bits_per_dim": float(np.mean(losses[-10:]) / dims / np.log(2))}))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
