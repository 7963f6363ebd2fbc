"""Image datasets as uint8 numpy arrays [N, H, W, C], plus a resumable batch order.

Sources: scikit-learn's 8x8 digits (offline demo data), TFDS (`tfds.data_source`, no
TensorFlow needed) or local files (IDX, .npz, CIFAR-10 python pickles, binarised-MNIST
.amat). Every problem with the data is reported as a one-line `DataError` that starts
with the file path or dataset name. Only numpy is needed here: no JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import os
import pickle
import struct
import zlib

import numpy as np

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "binarized_mnist", "cifar10")
LIKELIHOODS = ("bernoulli", "logistic")

_MAX_VALUE = {"digits": 16, "mnist": 255, "fashion_mnist": 255, "binarized_mnist": 1,
              "cifar10": 255}
_DIGITS_TEST_SIZE = 297
_IDX_IMAGES_MAGIC = 0x00000803  # IDX: unsigned bytes, 3 dimensions (N, H, W).
_IDX_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_CIFAR_SUBDIR = "cifar-10-batches-py"
_AMAT_FILES = {s: f"binarized_mnist_{s}.amat" for s in ("train", "valid", "test")}
_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

log = logging.getLogger(__name__)


class DataError(ValueError):
    """One-line, user-facing error naming the file/dataset and the problem."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is ambiguous.
class Dataset:
    """Train/valid/test uint8 images [N, H, W, C]; `valid` is carved from training data."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    max_value: int
    source: str

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

    `validation_size` examples are moved from train to valid by a permutation seeded with
    `seed`, unless the dataset has an official validation split (binarized_mnist), which
    is used instead. `max_train` truncates train afterwards.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"{name!r}: unknown dataset; valid names are {', '.join(DATASET_NAMES)}")
    # Fail before a possibly slow load, not after it.
    _check_likelihood_name(name, likelihood)
    if validation_size < 0:
        raise DataError(f"{name}: validation_size must be >= 0, got {validation_size}")
    if max_train is not None and max_train < 1:
        raise DataError(f"{name}: max_train must be >= 1 or None, got {max_train}")

    train, valid, test, source = _load_splits(name, data_dir)
    where = f"{name} ({source})"
    _check_same_image_shape(where, train=train, valid=valid, test=test)
    if valid is not None:
        if validation_size:
            log.info("%s: using the official validation split; validation_size ignored", name)
    elif validation_size:
        train, valid = _split_validation(train, validation_size, seed, where)
    else:
        valid = np.zeros((0,) + train.shape[1:], np.uint8)
    if max_train is not None:
        train = train[:max_train]

    ds = Dataset(name=name, train=train, valid=valid, test=test,
                 max_value=_MAX_VALUE[name], source=source)
    validate_for_likelihood(ds, likelihood)
    return ds


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


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False  # Shared by the cache: nobody may modify it.
    return perm


# ----------------------------------------------------------------------------- dispatch


def _load_splits(name, data_dir):
    """Returns (train, valid or None, test, source) as checked uint8 NHWC arrays."""
    if name == "digits":
        return _load_digits()
    if data_dir is None:
        return _load_tfds(name)
    path = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if name == "binarized_mnist":
        return _load_amat_dir(path)
    if name == "cifar10":
        return _load_cifar_local(path)
    return _load_mnist_local(name, path)


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
    return arr.astype(np.uint8)


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
    splits = ("train", "validation", "test") if name == "binarized_mnist" else ("train", "test")
    try:
        import tensorflow_datasets as tfds  # Lazy: importing it costs ~1 s.

        arrays = {s: _read_data_source(tfds.data_source(name, split=s), f"tfds:{name}/{s}")
                  for s in splits}
    except DataError:
        raise
    except Exception as e:  # Download/preparation fails offline in many different ways.
        hint = f" (e.g. {_FASHION_MNIST_DIR})" if name == "fashion_mnist" else ""
        raise DataError(
            f"{name}: can't be downloaded here (tfds failed with {_first_line(e)}); pass "
            f"--config.data.dir=... with local files{hint}") from e
    return arrays["train"], arrays.get("validation"), arrays["test"], f"tfds:{name}"


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


def _load_mnist_local(name, path):
    if os.path.isfile(path):
        return _load_npz_or_fail(name, path)
    expected = (f"{_IDX_STEMS['train']}[.gz] and {_IDX_STEMS['test']}[.gz], or {name}.npz")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory; expected a directory with {expected}")
    found = {split: _find_idx_file(path, stem) for split, stem in _IDX_STEMS.items()}
    if all(found.values()):
        train = _as_images(_read_idx_images(found["train"]), found["train"])
        test = _as_images(_read_idx_images(found["test"]), found["test"])
        return train, None, test, f"{path} (IDX)"
    npz = os.path.join(path, f"{name}.npz")
    if os.path.isfile(npz):
        return _load_npz(npz)
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


def _load_npz_or_fail(name, path):
    if not path.endswith(".npz"):
        raise DataError(f"{path}: expected a directory or an .npz file for {name}")
    return _load_npz(path)


def _load_npz(path):
    """Loads x_train/x_test from an .npz (allow_pickle=False: it is data, not code)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "x_test") if k not in z.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found "
                                f"{', '.join(z.files) or 'none'}")
            x_train, x_test = z["x_train"], z["x_test"]
    except DataError:
        raise
    except Exception as e:  # zipfile / pickle / format errors of a damaged file.
        raise DataError(f"{path}: cannot read .npz ({_first_line(e)})") from e
    train = _as_images(x_train, f"{path} [x_train]")
    test = _as_images(x_test, f"{path} [x_test]")
    return train, None, test, f"{path} (npz)"


# ----------------------------------------------------------------------------- CIFAR-10


def _load_cifar_local(path):
    if os.path.isfile(path):
        return _load_npz_or_fail("cifar10", path)
    expected = (f"{', '.join(_CIFAR_TRAIN_FILES)}, {_CIFAR_TEST_FILE} (optionally in "
                f"{_CIFAR_SUBDIR}/), or cifar10.npz")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory; expected a directory with {expected}")
    batch_dir = path
    sub = os.path.join(path, _CIFAR_SUBDIR)
    if not os.path.exists(os.path.join(path, _CIFAR_TRAIN_FILES[0])) and os.path.isdir(sub):
        batch_dir = sub
    files = _CIFAR_TRAIN_FILES + (_CIFAR_TEST_FILE,)
    missing = [f for f in files if not os.path.isfile(os.path.join(batch_dir, f))]
    if missing and os.path.isfile(os.path.join(path, "cifar10.npz")):
        return _load_npz(os.path.join(path, "cifar10.npz"))
    if missing:
        raise DataError(f"{batch_dir}: missing {', '.join(missing)}; expected {expected}")
    train = np.concatenate(
        [_read_cifar_batch(os.path.join(batch_dir, f)) for f in _CIFAR_TRAIN_FILES])
    test = _read_cifar_batch(os.path.join(batch_dir, _CIFAR_TEST_FILE))
    return train, None, test, f"{batch_dir} (CIFAR-10 python pickles)"


def _read_cifar_batch(path):
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
    # Rows are the R, G, B planes (each 32x32, row-major): CHW -> HWC.
    return _as_images(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), path)


# ----------------------------------------------------------------------------- binarised MNIST


def _load_amat_dir(path):
    expected = ", ".join(_AMAT_FILES.values())
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such directory; expected a directory with {expected}")
    files = {s: os.path.join(path, f) for s, f in _AMAT_FILES.items()}
    missing = [_AMAT_FILES[s] for s, f in files.items() if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{path}: missing {', '.join(missing)}; expected {expected}")
    train, valid, test = (_read_amat(files[s]) for s in ("train", "valid", "test"))
    return train, valid, test, f"{path} (amat)"


def _read_amat(path):
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
    if images.max() > 1:
        raise DataError(f"{path}: non-binary values (found {images.max()}); fixed-binarised "
                        "data must be 0 or 1")
    return images


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
        return jax.random.bernoulli(key, x / max_value).astype(jnp.float32)
    return x
