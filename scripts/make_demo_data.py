"""Rebuilds iaf_jax/assets/binarized_mnist_demo.npz, the offline demo's data, from the full binarized MNIST.

  python scripts/make_demo_data.py [--source ../shared/data/binarized_mnist.npz]

A fixed random subset (numpy default_rng(0) permutations, indices sorted) of Larochelle & Murray's binarized
MNIST: 10,000 training, 1,000 validation (from the official validation split) and 1,000 test images (random: the
test split is grouped by digit). Images are packed 8 pixels a byte (np.packbits over the 784 pixels, row-major);
data.load_dataset unpacks them. The sha256 of each unpacked array is stored beside it and checked on load.
"""
import argparse
import hashlib
import os

import numpy as np

SIZES = {"train": 10_000, "valid": 1_000, "test": 1_000}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "iaf_jax", "assets", "binarized_mnist_demo.npz")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--source", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                                                   "data", "binarized_mnist.npz"))
  p.add_argument("--out", default=OUT)
  args = p.parse_args()
  arrays = {}
  with np.load(args.source) as z:
    for seed, (split, n) in enumerate(SIZES.items()):
      x = z[f"x_{split}"]
      idx = np.sort(np.random.default_rng(seed).permutation(len(x))[:n])
      sub = np.ascontiguousarray(x[idx].reshape(n, 28, 28).astype(np.uint8))
      assert set(np.unique(sub)) <= {0, 1}
      arrays[f"x_{split}_packbits"] = np.packbits(sub.reshape(n, -1), axis=1)
      arrays[f"x_{split}_sha256"] = np.array(hashlib.sha256(sub.tobytes()).hexdigest())
      arrays[f"x_{split}_source_indices"] = idx.astype(np.int32)
  arrays["image_shape"] = np.array([28, 28], np.int32)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out):,} bytes): " +
        ", ".join(f"{s} {n}" for s, n in SIZES.items()))


if __name__ == "__main__":
  main()
