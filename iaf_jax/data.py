"""Image datasets as uint8 numpy arrays [N, H, W, C], plus a resumable batch order.

Sources: scikit-learn's 8x8 digits (offline demo data), TFDS (`tfds.data_source`; reading a
prepared dataset needs no TensorFlow, preparing one does) or local files (IDX, .npz, the
CIFAR-10 npz parts or python pickles, binarised-MNIST .amat). The sha256 of every array read
from a file is recorded (`Dataset.checksums`) and compared with the published checksums of the
verified copies of the canonical datasets (../shared/data/README.md); a mismatch is logged as a
warning. Every problem with the data is reported as a one-line `DataError` that starts with the
file path or dataset name. Only numpy is needed here: no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import struct
import zlib

import numpy as np

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "binarized_mnist", "cifar10")
LIKELIHOODS = ("bernoulli", "logistic")

MAX_VALUE = {"digits": 16, "mnist": 255, "fashion_mnist": 255, "binarized_mnist": 1,
              "cifar10": 255}
_DIGITS_TEST_SIZE = 297
_IDX_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions (N, H, W).
_IDX_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_PART_FILES = ("cifar10_train_part1.npz", "cifar10_train_part2.npz")  # train, in this order
_CIFAR_TEST_NPZ = "cifar10_test.npz"
_AMAT_FILES = {s: f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")}
_BINARIZED_NPZ = "binarized_mnist.npz"
_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_CHANNELS = {"digits": 1, "mnist": 1, "fashion_mnist": 1, "binarized_mnist": 1, "cifar10": 3}
# What --config.data.dir can hold instead of a TFDS download.
_LOCAL_FILES = {
    "mnist": "mnist.npz or the MNIST IDX files",
    "fashion_mnist": f"the Fashion-MNIST IDX files (e.g. {_FASHION_MNIST_DIR})",
    "binarized_mnist": f"{_BINARIZED_NPZ} or the {', '.join(_AMAT_FILES.values())} files",
    "cifar10": (f"{', '.join(_CIFAR_PART_FILES)} and {_CIFAR_TEST_NPZ} (or the CIFAR-10 python "
                "batches)"),
}

# Published sha256 of each array's raw bytes, hashlib.sha256(np.ascontiguousarray(a).tobytes()),
# of the copies of the canonical datasets verified byte for byte in ../shared/data/README.md:
# {dataset: {(file, array): sha256}}.
_PUBLISHED_SHA256 = {
    "mnist": {
        ("mnist.npz", "x_train"):
            "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        ("mnist.npz", "y_train"):
            "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        ("mnist.npz", "x_test"):
            "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        ("mnist.npz", "y_test"):
            "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "binarized_mnist": {
        ("binarized_mnist.npz", "x_train"):
            "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
        ("binarized_mnist.npz", "x_valid"):
            "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
        ("binarized_mnist.npz", "x_test"):
            "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
    },
    "cifar10": {
        ("cifar10_train_part1.npz", "x_train"):
            "181849ce5fe0c3a5372ce4e79d7a4dd230ea3f1efb3ab58328126cccd5f47d36",
        ("cifar10_train_part1.npz", "y_train"):
            "9ef1e35b36c36e9b94da8fff1667bcf18bc6460248d263f936d71a6ecbd0e781",
        ("cifar10_train_part2.npz", "x_train"):
            "14d124458a8be55ea46e3e54f17b0518786d90475a22b47a6ddf57780b9fae16",
        ("cifar10_train_part2.npz", "y_train"):
            "d4dcb4c539dfe28fb2bd7915740a71434c22cccc5eb565f2d46aad4f0a43c1da",
        ("cifar10_test.npz", "x_test"):
            "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04",
        ("cifar10_test.npz", "y_test"):
            "cec8a24a1e92aa2ecaa0bbd3dbfa86bf6cd8759fbd209a832824c8cf0afca9d5",
    },
}
# The canonical files hold the same bytes (README's verification): the IDX image payload after its
# 16-byte header, and the .amat lines parsed into uint8 [N, 28, 28].
_SAME_CONTENT = {
    "mnist": {("train-images-idx3-ubyte", "images"): ("mnist.npz", "x_train"),
              ("t10k-images-idx3-ubyte", "images"): ("mnist.npz", "x_test")},
    "binarized_mnist": {(f, "images"): (_BINARIZED_NPZ, f"x_{s}") for s, f in _AMAT_FILES.items()},
}

log = logging.getLogger(__name__)


class DataError(ValueError):
  """One-line, user-facing error naming the file/dataset and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is ambiguous.
class Dataset:
  """Train/valid/test uint8 images [N, H, W, C]; `valid` is the official validation split where
  the data has one, else carved from training data.

  `checksums` maps "file[array]" (file: base name) to the sha256 of that array's raw bytes as
  stored in the file; `files` are the absolute paths read. Both are empty for digits and TFDS.
  """

  name: str
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  max_value: int
  source: str
  checksums: dict = dataclasses.field(default_factory=dict)
  files: tuple = ()

  @property
  def image_shape(self) -> tuple:
    return tuple(int(d) for d in self.train.shape[1:])

  @property
  def num_dims(self) -> int:
    return int(np.prod(self.image_shape))


# ----------------------------------------------------------------------------- public API


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    validation_size: int = 0,
    seed: int = 0,
    likelihood: str = "bernoulli",
    max_train: int | None = None,
) -> Dataset:
  """Loads `name` from `data_dir` (local files) or TFDS (`data_dir=None`).

  `data_dir` is a directory of dataset files or the path of one .npz. `validation_size`
  examples are moved from train to valid by a permutation seeded with `seed`, unless the data
  has an official validation split (binarized_mnist, or an .npz holding `x_valid`), which is
  used instead. `max_train` truncates train afterwards.
  """
  if name not in DATASET_NAMES:
    raise DataError(f"{name!r}: unknown dataset; valid names are {', '.join(DATASET_NAMES)}")
  # Fail before a possibly slow load, not after it.
  _check_likelihood_name(name, likelihood)
  if validation_size < 0:
    raise DataError(f"{name}: validation_size must be >= 0, got {validation_size}")
  if max_train is not None and max_train < 1:
    raise DataError(f"{name}: max_train must be >= 1 or None, got {max_train}")

  record = _Record(name)
  train, valid, test, source = _load_splits(name, data_dir, record)
  where = f"{name} ({source})"
  _check_same_image_shape(where, train=train, valid=valid, test=test)
  if train.shape[-1] != _CHANNELS[name]:
    raise DataError(f"{where}: images have {train.shape[-1]} channel(s); {name} has "
                    f"{_CHANNELS[name]}")
  if valid is not None:
    if validation_size:
      log.info("%s: using the official validation split; validation_size ignored", name)
  elif validation_size:
    train, valid = _split_validation(train, validation_size, seed, where)
  else:
    valid = np.zeros((0,) + train.shape[1:], np.uint8)
  if max_train is not None:
    train = train[:max_train]

  ds = Dataset(name=name, train=train, valid=valid, test=test, max_value=MAX_VALUE[name],
               source=source, checksums=dict(record.checksums), files=tuple(record.files))
  validate_for_likelihood(ds, likelihood)
  return ds


def load_for_config(config) -> Dataset:
  """The dataset a run's config describes (config.data, config.seed, config.model.likelihood): what training,
  evaluation and the figures all load, the same way."""
  d = config.data
  return load_dataset(d.name, d.dir or None, validation_size=d.validation_size, seed=config.seed,
                      likelihood=config.model.likelihood, max_train=d.max_train or None)


def validate_for_likelihood(ds: Dataset, likelihood: str) -> None:
  """Raises DataError if `ds` cannot be modelled with `likelihood`."""
  _check_likelihood_name(ds.name, likelihood)
  if likelihood == "logistic" and ds.max_value != 255:
    raise DataError(
        f"{ds.name}: the data is not 8-bit (max_value {ds.max_value}) but the 'logistic' "
        "likelihood is a discretised logistic over 256 bins; use likelihood='bernoulli'")
  if likelihood == "bernoulli":
    # intensity / max_value is used as a probability: it must not exceed 1.
    for split, arr in (("train", ds.train), ("valid", ds.valid), ("test", ds.test)):
      top = int(arr.max()) if arr.size else 0
      if top <= ds.max_value:
        continue
      if ds.max_value == 1:
        raise DataError(f"{ds.name}: non-binary values (found {top}) in the {split} "
                        "split of fixed-binarised data (max_value 1) for a Bernoulli model")
      raise DataError(f"{ds.name}: {split} values up to {top} exceed max_value "
                      f"{ds.max_value}, so intensity/max_value is not a probability")


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Example indices of global training step `step` (0-based).

  Each epoch is a permutation seeded by (seed, epoch) cut into num_examples // batch_size
  full batches (the remainder is dropped), so a resumed run sees the same data order.
  """
  num_examples, batch_size, step, seed = int(num_examples), int(batch_size), int(step), int(seed)
  if num_examples < 1 or batch_size < 1:
    raise DataError(f"batch_indices: num_examples ({num_examples}) and batch_size "
                    f"({batch_size}) must be >= 1")
  if batch_size > num_examples:
    raise DataError(f"batch_indices: batch_size {batch_size} is larger than the "
                    f"{num_examples} training examples")
  if step < 0 or seed < 0:
    raise DataError(f"batch_indices: step ({step}) and seed ({seed}) must be >= 0")
  epoch, position = divmod(step, num_examples // batch_size)
  perm = _epoch_permutation(num_examples, seed, epoch)
  return perm[position * batch_size:(position + 1) * batch_size].copy()


def fixed_subset(images, n: int, seed: int = 0):
  """A fixed random subset of `n` examples of `images`, kept in their original order.

  For quick evaluations on part of a split. The indices are
  `np.sort(np.random.default_rng(seed).permutation(len(images))[:n])`: the same on every call
  and machine, so quick evaluations of different runs score the same examples. A prefix
  `images[:n]` is not a sample: binarized MNIST's test split is grouped by digit (all 0s
  first). `n >= len(images)` gives all of them.
  """
  n, total = int(n), len(images)
  if n < 0:
    raise DataError(f"fixed_subset: n must be >= 0, got {n}")
  return images[np.sort(np.random.default_rng(seed).permutation(total)[:n])]


def padded_batches(images, batch_size: int, pad_last: bool = True):
  """(start, chunk, n) for consecutive chunks of `batch_size` examples, n of them real: a short last chunk is
  padded with copies of its first example (`pad_last`), so every chunk has one shape and a jitted function
  compiles once. Callers keep the first n rows of each result."""
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    n = len(chunk)
    if pad_last and n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
    yield start, chunk, n


def array_sha256(arr) -> str:
  """sha256 (hex) of an array's raw bytes, as
  `hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()`."""
  flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)  # The same bytes, without a copy.
  return hashlib.sha256(flat).hexdigest()


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False  # Shared by the cache: nobody may modify it.
  return perm


# ----------------------------------------------------------------------------- dispatch


def _load_splits(name, data_dir, record):
  """Returns (train, valid or None, test, source) as checked uint8 NHWC arrays."""
  if name == "digits":
    return _load_digits()
  if data_dir is None:
    return _load_tfds(name)
  path = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
  if name == "binarized_mnist":
    return _load_binarized_local(path, record)
  if name == "cifar10":
    return _load_cifar_local(path, record)
  return _load_mnist_local(name, path, record)


class _Record:
  """The files read and the sha256 of each array as stored; compares them with the published."""

  def __init__(self, name):
    self.name, self.files, self.checksums = name, [], {}

  def add(self, path, array, arr):
    if path not in self.files:
      self.files.append(path)
    digest = array_sha256(arr)
    self.checksums[f"{os.path.basename(path)}[{array}]"] = digest
    published = _published_sha256(self.name, path, array)
    if published is not None and digest != published:
      log.warning("%s: %s of %s does not match the published sha256 (%s..., published "
                  "%s...); results are not comparable to the report's", self.name, array,
                  path, digest[:12], published[:12])


def _published_sha256(name, path, array):
  base = os.path.basename(path)
  if base.endswith(".gz"):
    base = base[:-3]
  base = base.replace(".idx", "-idx")  # The dotted IDX names of some mirrors.
  key = _SAME_CONTENT.get(name, {}).get((base, array), (base, array))
  return _PUBLISHED_SHA256.get(name, {}).get(key)


def _check_likelihood_name(where, likelihood):
  if likelihood not in LIKELIHOODS:
    raise DataError(f"{where}: unknown likelihood {likelihood!r}; expected one of "
                    f"{', '.join(LIKELIHOODS)}")


def _check_same_image_shape(where, **splits):
  shapes = {k: v.shape[1:] for k, v in splits.items() if v is not None}
  if len(set(shapes.values())) > 1:
    desc = ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items())
    raise DataError(f"{where}: image shapes of the splits differ ({desc}); they must match")


def _split_validation(train, validation_size, seed, where):
  n = len(train)
  if validation_size >= n:
    raise DataError(f"{where}: validation_size {validation_size} must be smaller than the "
                    f"{n} training examples")
  perm = np.random.default_rng(seed).permutation(n)
  # Sorted so that train keeps its original order (max_train then takes a stable prefix).
  keep, held_out = np.sort(perm[:n - validation_size]), np.sort(perm[n - validation_size:])
  return train[keep], train[held_out]


# ----------------------------------------------------------------------------- array checks


def _as_images(arr, where):
  """Checks shape, dtype and range of an image array; returns uint8 [N, H, W, C]."""
  arr = np.asarray(arr)
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
    raise DataError(f"{where}: wrong shape {arr.shape}; expected [N, H, W] or [N, H, W, C] "
                    "with C in {1, 3}")
  if arr.shape[0] == 0:
    raise DataError(f"{where}: contains no examples")
  if arr.dtype == np.bool_:
    return arr.astype(np.uint8)
  if arr.dtype.kind == "f":
    if np.isnan(arr).any():
      raise DataError(f"{where}: NaN pixels")
    if np.any(arr != np.round(arr)):  # +-inf passes here and fails the range check.
      raise DataError(f"{where}: wrong dtype {arr.dtype} with non-integer values; "
                      "expected integer pixel values 0..255")
  elif arr.dtype.kind not in "ui":
    raise DataError(f"{where}: wrong dtype {arr.dtype}; expected integer pixel values 0..255")
  lo, hi = arr.min(), arr.max()
  if lo < 0 or hi > 255:
    raise DataError(f"{where}: values out of range [{lo:g}, {hi:g}]; expected 0..255")
  if arr.dtype == np.uint8 and arr.flags.writeable and arr.flags.c_contiguous:
    return arr  # No copy of a large array that is already right.
  return arr.astype(np.uint8)


def _checked_images(name, arr, where):
  """`_as_images`, plus: fixed-binarised data must be 0/1."""
  images = _as_images(arr, where)
  if name == "binarized_mnist" and images.max() > 1:
    raise DataError(f"{where}: non-binary values (found {images.max()}); fixed-binarised "
                    "data must be 0 or 1")
  return images


def _first_line(exc):
  text = str(exc).strip().splitlines()
  return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


# ----------------------------------------------------------------------------- digits


def _load_digits():
  from sklearn.datasets import load_digits  # Lazy: only this dataset needs sklearn.

  images = _as_images(load_digits().images, "digits (sklearn.datasets.load_digits)")
  # A fixed permutation: the official order is grouped by writer.
  perm = np.random.default_rng(0).permutation(len(images))
  train, test = images[perm[:-_DIGITS_TEST_SIZE]], images[perm[-_DIGITS_TEST_SIZE:]]
  return train, None, test, "sklearn.datasets.load_digits"


# ----------------------------------------------------------------------------- tfds


def _load_tfds(name):
  """Reads a TFDS dataset, preparing it (download + generation) when it is not prepared yet.

  tensorflow-datasets reads a prepared dataset without TensorFlow, but the mnist,
  fashion_mnist, binarized_mnist and cifar10 builders need it to prepare one: they read the
  downloaded files with `tf.io.gfile.GFile` and `tfds.features.Image` encodes each image with
  `tf.image.encode_png`. Without TensorFlow an unprepared dataset is refused at once, not after
  a download (which, offline, fails only after minutes of retries).
  """
  splits = ("train", "validation", "test") if name == "binarized_mnist" else ("train", "test")
  local = f"pass --config.data.dir=DIR with {_LOCAL_FILES[name]}"
  try:
    import tensorflow_datasets as tfds  # Lazy: importing it costs ~1 s.

    try:
      sources = {s: tfds.data_source(name, split=s, download=False) for s in splits}
    except Exception as e:  # Not prepared yet (a KeyError with tfds 4.9), or unreadable.
      if not _have_tensorflow() and not tfds.builder(name).is_prepared():
        raise DataError(
            f"{name}: not prepared in tfds's data_dir, and tfds needs TensorFlow to "
            "prepare it (the builder reads the downloads with tf.io.gfile and encodes "
            f"images with tf.image.encode_png): pip install tensorflow-cpu, or {local}"
        ) from e
      sources = {s: tfds.data_source(name, split=s) for s in splits}
    arrays = {s: _read_data_source(sources[s], f"tfds:{name}/{s}") for s in splits}
  except DataError:
    raise
  except Exception as e:  # Download/preparation fails offline in many different ways.
    missing = _missing_module(e)
    if missing == "tensorflow":
      raise DataError(f"{name}: tfds needs TensorFlow to prepare this dataset: pip install "
                      f"tensorflow-cpu, or {local}") from e
    if missing:
      raise DataError(f"{name}: tensorflow-datasets needs the missing module {missing!r} "
                      f"(pip install -r requirements.txt), or {local}") from e
    raise DataError(f"{name}: can't be downloaded here (tfds failed with {_first_line(e)}); "
                    f"{local}") from e
  return arrays["train"], arrays.get("validation"), arrays["test"], f"tfds:{name}"


def _have_tensorflow():
  try:
    return importlib.util.find_spec("tensorflow") is not None
  except (ImportError, ValueError):
    return False


def _missing_module(exc):
  """The name of the module whose import failed somewhere in `exc`'s chain, else None."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, ModuleNotFoundError) and exc.name:
      return exc.name.split(".")[0]
    exc = exc.__cause__ or exc.__context__
  return None


def _read_data_source(source, where):
  """Reads the 'image' feature of every record of a tfds data source."""
  try:
    from tqdm.auto import tqdm

    # delay: a progress bar appears only when reading takes a while.
    indices = tqdm(range(len(source)), desc=where, delay=2.0, leave=False)
  except ImportError:
    indices = range(len(source))
  # Record by record: `__getitems__` is not mocked correctly by tfds.testing.mock_data.
  images = [np.asarray(source[i]["image"]) for i in indices]
  if not images:
    raise DataError(f"{where}: contains no examples")
  if len({im.shape for im in images}) > 1:
    raise DataError(f"{where}: images of different shapes; expected one H x W x C")
  return _as_images(np.stack(images), where)


# ----------------------------------------------------------------------------- MNIST / IDX / npz


def _load_mnist_local(name, path, record):
  if os.path.isfile(path):
    return _load_npz_or_fail(name, path, record)
  expected = (f"{_IDX_STEMS['train']}[.gz] and {_IDX_STEMS['test']}[.gz], or {name}.npz")
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such directory; expected a directory with {expected}")
  found = {split: _find_idx_file(path, stem) for split, stem in _IDX_STEMS.items()}
  if all(found.values()):
    images = {}
    for split, file in found.items():
      raw = _read_idx_images(file)
      record.add(file, "images", raw)
      images[split] = _as_images(raw, file)
    return images["train"], None, images["test"], f"{path} (IDX)"
  npz = os.path.join(path, f"{name}.npz")
  if os.path.isfile(npz):
    return _load_npz(name, npz, record)
  missing = [f"{_IDX_STEMS[s]}[.gz]" for s, f in found.items() if f is None]
  raise DataError(f"{path}: missing {', '.join(missing)} for {name}; expected {expected}")


def _find_idx_file(directory, stem):
  # The dotted variant (train-images.idx3-ubyte) is how some mirrors name the files.
  dotted = stem.replace("-idx", ".idx")
  for base in (stem, dotted):
    for candidate in (base + ".gz", base):
      full = os.path.join(directory, candidate)
      if os.path.isfile(full):
        return full
  return None


def _read_file_bytes(path):
  """Reads a file, gunzipping it if it is gzip-compressed (by magic bytes, not suffix)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      return gzip.decompress(raw)
    return raw
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise DataError(f"{path}: file is truncated or not a valid gzip file "
                    f"({_first_line(e)})") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read file ({_first_line(e)})") from e


def _read_idx_images(path):
  """Parses an IDX uint8 image file: big-endian header (magic, N, H, W), then pixels."""
  raw = _read_file_bytes(path)
  if len(raw) < 16:
    raise DataError(f"{path}: file is truncated: {len(raw)} bytes, shorter than the "
                    "16-byte IDX header")
  magic, n, h, w = struct.unpack(">IIII", raw[:16])
  if magic != _IDX_IMAGES_MAGIC:
    raise DataError(f"{path}: bad magic number 0x{magic:08x}; expected "
                    f"0x{_IDX_IMAGES_MAGIC:08x} (IDX uint8 images)")
  expected, found = n * h * w, len(raw) - 16
  if found < expected:
    raise DataError(f"{path}: file is truncated: header says {n}x{h}x{w} = {expected} pixel "
                    f"bytes, found {found}")
  if found > expected:
    raise DataError(f"{path}: {found - expected} unexpected bytes after the {n}x{h}x{w} "
                    "images the header describes")
  return np.frombuffer(raw, np.uint8, count=expected, offset=16).reshape(n, h, w)


def _load_npz_or_fail(name, path, record):
  if not path.endswith(".npz"):
    raise DataError(f"{path}: expected a directory or an .npz file for {name}")
  if name == "cifar10" and os.path.basename(path) in _CIFAR_PART_FILES + (_CIFAR_TEST_NPZ,):
    raise DataError(f"{path}: one of the three CIFAR-10 files; pass the directory holding "
                    f"{', '.join(_CIFAR_PART_FILES)} and {_CIFAR_TEST_NPZ}")
  return _load_npz(name, path, record)


def _load_npz(name, path, record):
  """x_train/x_test, and x_valid (the official validation split) when present, of an .npz; or the same
  packed 8 pixels a byte (`x_*_packbits`, the demo subset of scripts/make_demo_data.py)."""
  arrays = _read_packed_npz(path)
  if arrays is None:
    arrays = _read_npz(path, ("x_train", "x_test"), optional=("x_valid",))
  images = {}
  for key, arr in arrays.items():
    record.add(path, key, arr)
    images[key] = _checked_images(name, arr, f"{path} [{key}]")
  return images["x_train"], images.get("x_valid"), images["x_test"], f"{path} (npz)"


def _read_packed_npz(path):
  """The unpacked {x_train, x_valid, x_test} of a packed-bits .npz (np.packbits of each image's pixels,
  `image_shape` [H, W], the sha256 of each unpacked array beside it), or None for another layout."""
  try:
    with np.load(path, allow_pickle=False) as z:
      if "x_train_packbits" not in z.files:
        return None
  except Exception:  # Not readable at all: _read_npz says so in one line.
    return None
  splits = ("x_train", "x_valid", "x_test")
  stored = _read_npz(path, ("image_shape",) + tuple(f"{s}_packbits" for s in ("x_train", "x_test")),
                     optional=tuple(f"{s}_{k}" for s in splits for k in ("packbits", "sha256")))
  h, w = (int(d) for d in stored["image_shape"])
  arrays = {}
  for split in splits:
    if f"{split}_packbits" not in stored:
      continue
    bits = stored[f"{split}_packbits"]
    if bits.ndim != 2 or bits.dtype != np.uint8 or bits.shape[1] != -(-h * w // 8):
      raise DataError(f"{path} [{split}_packbits]: wrong shape {bits.shape} or dtype {bits.dtype}; "
                      f"expected uint8 [N, {-(-h * w // 8)}] for {h}x{w} images")
    images = np.unpackbits(bits, axis=1, count=h * w).reshape(-1, h, w)
    want = stored.get(f"{split}_sha256")
    if want is not None and array_sha256(images) != str(want):
      raise DataError(f"{path} [{split}_packbits]: the unpacked images do not match the sha256 stored "
                      "beside them; the file is damaged (rebuild it with scripts/make_demo_data.py)")
    arrays[split] = images
  return arrays


def _read_npz(path, names, optional=()):
  """The arrays `names` (required) and `optional` (if present) of an .npz, as stored.

  allow_pickle=False: it is data, not code."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file")
  try:
    with np.load(path, allow_pickle=False) as z:
      missing = [k for k in names if k not in z.files]
      if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found "
                        f"{', '.join(z.files) or 'none'}")
      return {k: z[k] for k in tuple(names) + tuple(optional) if k in z.files}
  except DataError:
    raise
  except Exception as e:  # zipfile / zlib / format errors of a truncated or damaged file.
    raise DataError(f"{path}: cannot read .npz, the file is truncated or damaged "
                    f"({_first_line(e)})") from e


# ----------------------------------------------------------------------------- CIFAR-10


def _load_cifar_local(path, record):
  if os.path.isfile(path):
    return _load_npz_or_fail("cifar10", path, record)
  parts = _CIFAR_PART_FILES + (_CIFAR_TEST_NPZ,)
  expected = (f"{', '.join(parts)}, or {', '.join(_CIFAR_TRAIN_FILES)}, {_CIFAR_TEST_FILE} "
              f"(optionally in {_CIFAR_SUBDIR}/), or cifar10.npz")
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such directory; expected a directory with {expected}")
  if any(os.path.exists(os.path.join(path, f)) for f in parts):
    return _load_cifar_parts(path, record)
  batch_dir = path
  sub = os.path.join(path, _CIFAR_SUBDIR)
  if not os.path.exists(os.path.join(path, _CIFAR_TRAIN_FILES[0])) and os.path.isdir(sub):
    batch_dir = sub
  files = _CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,)
  missing = [f for f in files if not os.path.isfile(os.path.join(batch_dir, f))]
  if missing and os.path.isfile(os.path.join(path, "cifar10.npz")):
    return _load_npz("cifar10", os.path.join(path, "cifar10.npz"), record)
  if missing:
    raise DataError(f"{batch_dir}: missing {', '.join(missing)}; expected {expected}")
  train = np.concatenate(
      [_read_cifar_batch(os.path.join(batch_dir, f), record) for f in _CIFAR_TRAIN_FILES])
  test = _read_cifar_batch(os.path.join(batch_dir, _CIFAR_TEST_FILE), record)
  return train, None, test, f"{batch_dir} (CIFAR-10 python pickles)"


def _load_cifar_parts(path, record):
  """The shared-data layout: training images in two .npz parts (concatenated in order), test."""
  parts = _CIFAR_PART_FILES + (_CIFAR_TEST_NPZ,)
  missing = [f for f in parts if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise DataError(f"{path}: missing {', '.join(missing)}; CIFAR-10 in parts needs "
                    f"{', '.join(parts)}")
  images = {}
  for file, key in zip(parts, ("x_train", "x_train", "x_test")):
    full = os.path.join(path, file)
    arr = _read_npz(full, (key,))[key]
    record.add(full, key, arr)
    images[file] = _checked_images("cifar10", arr, f"{full} [{key}]")
  _check_same_image_shape(path, **{f: images[f] for f in _CIFAR_PART_FILES})
  train = np.concatenate([images[f] for f in _CIFAR_PART_FILES])
  return train, None, images[_CIFAR_TEST_NPZ], f"{path} (CIFAR-10 npz parts)"


def _read_cifar_batch(path, record=None):
  """One CIFAR-10 python batch: a pickled dict whose b'data' is uint8 [n, 3072], CHW order.

  Unpickling can run code: only load batch files from a trusted source.
  """
  try:
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
  except Exception as e:  # EOFError, UnpicklingError, ... of a truncated/corrupt file.
    raise DataError(f"{path}: cannot unpickle CIFAR-10 batch, file is truncated or corrupt "
                    f"({_first_line(e)})") from e
  data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
  if data is None:
    raise DataError(f"{path}: not a CIFAR-10 batch: expected a dict with key b'data'")
  data = np.asarray(data)
  if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DataError(f"{path}: wrong shape {data.shape} for b'data'; expected [N, 3072]")
  if record is not None:
    record.add(path, "data", data)
  # Rows are the R, G, B planes (each 32x32, row-major): CHW -> HWC.
  return _as_images(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), path)


# ----------------------------------------------------------------------------- binarised MNIST


def _load_binarized_local(path, record):
  """binarized_mnist.npz (a file, or in the directory: preferred), else the three .amat files."""
  if os.path.isfile(path):
    return _load_npz_or_fail("binarized_mnist", path, record)
  npz = os.path.join(path, _BINARIZED_NPZ)
  if os.path.isfile(npz):
    return _load_npz("binarized_mnist", npz, record)
  return _load_amat_dir(path, record)


def _load_amat_dir(path, record=None):
  expected = f"{_BINARIZED_NPZ} or {', '.join(_AMAT_FILES.values())}"
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such directory; expected a directory with {expected}")
  files = {s: os.path.join(path, f) for s, f in _AMAT_FILES.items()}
  missing = [_AMAT_FILES[s] for s, f in files.items() if not os.path.isfile(f)]
  if missing:
    raise DataError(f"{path}: missing {', '.join(missing)}; expected {expected}")
  train, valid, test = (_read_amat(files[s], record) for s in ("train", "valid", "test"))
  return train, valid, test, f"{path} (amat)"


def _read_amat(path, record=None):
  """A fixed-binarised MNIST .amat: one image a line, 784 space-separated 0/1 values."""
  raw = _read_file_bytes(path)
  if not raw.strip():
    raise DataError(f"{path}: contains no examples")
  values = _parse_binary_amat(raw)
  try:
    if values is None:  # Not the usual layout: the general (slow) parser says why.
      values = np.loadtxt(path, dtype=np.float32, ndmin=2)
  except (ValueError, OSError) as e:
    raise DataError(f"{path}: cannot parse as lines of space-separated numbers "
                    f"({_first_line(e)})") from e
  if values.shape[1] != 28 * 28:
    raise DataError(f"{path}: wrong shape: {values.shape[1]} values a line; "
                    "expected 784 (28x28)")
  images = _as_images(values.reshape(-1, 28, 28), path)
  if record is not None:  # The uint8 [N, 28, 28] images: the bytes binarized_mnist.npz holds.
    record.add(path, "images", images)
  return _checked_images("binarized_mnist", images, path)


def _parse_binary_amat(raw):
  """Fast path (several times faster than np.loadtxt) for the usual layout: single 0/1
  digits separated by spaces, the same number on each line. Returns None otherwise."""
  b = np.frombuffer(raw, np.uint8)
  is_digit = (b == ord("0")) | (b == ord("1"))
  is_space = (b == ord(" ")) | (b == ord("\n")) | (b == ord("\r")) | (b == ord("\t"))
  if not np.all(is_digit | is_space) or np.any(is_digit[1:] & is_digit[:-1]):
    return None
  # Digits per line (blank lines skipped): sums over the segments that start each line.
  starts = np.concatenate([[0], np.flatnonzero(b == ord("\n")) + 1])
  per_line = np.add.reduceat(is_digit.view(np.uint8), starts[starts < len(b)], dtype=np.int64)
  per_line = per_line[per_line > 0]
  if per_line.size == 0 or np.any(per_line != per_line[0]):
    return None
  return (np.compress(is_digit, b) - ord("0")).reshape(per_line.size, per_line[0])


def model_inputs(key, images, likelihood: str, max_value: int):
  """uint8 images -> what a model's likelihood scores, on device (pure, jit-able).

  Bernoulli: a fresh binarisation, pixel / max_value as the probability of a 1 (dynamic binarisation; data
  that is already {0, 1} comes through unchanged). Discretized logistic: the 8-bit values as float.
  """
  import jax
  import jax.numpy as jnp

  x = images.astype(jnp.float32)
  if likelihood == "bernoulli":
    if max_value == 1:
      # Probabilities 0 or >= 1: the draw is decided (uniform [0, 1) < p), so it is skipped, not drawn: the same
      # values without generating a random number per pixel each step (binarized MNIST; docs/performance.md).
      return (x > 0).astype(jnp.float32)
    return jax.random.bernoulli(key, x / max_value).astype(jnp.float32)
  return x
