"""The offline demo (configs/mnist.py:demo on the binarized-MNIST subset in iaf_jax/assets) learns a model that
uses its latents: what a collapsed posterior (q(z|x) = p(z), the decoder ignoring z) cannot pass."""
import json
import os

import jax
import numpy as np
import pytest

from helpers import mnist
from iaf_jax import api, data as data_lib, train_lib


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  c = mnist.get_config("demo")
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 400, 400, 400, 50
  train_lib.train_and_evaluate(c, workdir)
  return workdir


def test_demo_data_is_the_shipped_binarized_mnist_subset():
  ds = data_lib.load_dataset("binarized_mnist", mnist.DEMO_DATA)
  assert (len(ds.train), len(ds.valid), len(ds.test)) == (10_000, 1_000, 1_000)
  assert ds.image_shape == (28, 28, 1) and ds.max_value == 1
  assert set(np.unique(ds.test)) == {0, 1}
  # a random subset of every digit, not the digit-grouped head of the test split: its mean image is the
  # (shuffled) training subset's (the first 1,000 test images, all 0s, differ from it by ~0.1 a pixel)
  assert np.abs(ds.test.mean(0) - ds.train.mean(0)).mean() < 0.02


def test_demo_model_uses_its_latents(demo_run):
  recs = [json.loads(line) for line in open(os.path.join(demo_run, "metrics.jsonl"))]
  kl = [r["kl"] for r in recs if "kl" in r]
  assert kl[-1] > 5.0, kl  # collapsed runs end below 0.3 nats
  model = api.load_trained(demo_run)
  ds = data_lib.load_dataset("binarized_mnist", mnist.DEMO_DATA)
  x = data_lib.fixed_subset(ds.test, 16).astype(np.float32)  # the test split is grouped by digit
  rec = np.asarray(model.reconstruct(x, jax.random.PRNGKey(0)))
  own = np.abs(rec - x).mean(axis=(1, 2, 3))
  # each reconstruction is closer to its own input than to the other inputs' (a shared image cannot be)
  others = np.array([[np.abs(rec[i] - x[j]).mean() for j in range(16)] for i in range(16)])
  assert np.mean(np.argmin(others, axis=1) == np.arange(16)) >= 0.8, others
  assert np.abs(rec[0] - rec[1:]).mean() > 0.05  # reconstructions of different digits differ


def test_damaged_packed_subset_is_a_one_line_error(tmp_path):
  with np.load(mnist.DEMO_DATA) as z:
    arrays = {k: z[k] for k in z.files}
  arrays["x_test_packbits"] = arrays["x_test_packbits"].copy()
  arrays["x_test_packbits"][3, 7] ^= 0xFF
  path = str(tmp_path / "demo.npz")
  np.savez_compressed(path, **arrays)
  with pytest.raises(data_lib.DataError, match=r"x_test_packbits\]: the unpacked images do not match") as e:
    data_lib.load_dataset("binarized_mnist", path)
  assert "\n" not in str(e.value)
