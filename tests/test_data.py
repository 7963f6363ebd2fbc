"""Tests of iaf_jax.data on small files written here (plus real Fashion-MNIST if present)."""

import collections
import gzip
import os
import pickle
import struct
import time

import numpy as np
import pytest

from iaf_jax import data
from iaf_jax.data import DataError, Dataset, batch_indices, load_dataset, validate_for_likelihood

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------- helpers


def write_idx(path, images, compress, magic=0x00000803):
    raw = struct.pack(">IIII", magic, *images.shape) + images.astype(np.uint8).tobytes()
    if compress:
        path = str(path) + ".gz"
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        with open(path, "wb") as f:
            f.write(raw)
    return path


def rand_images(shape, seed=0, high=256):
    rng = np.random.default_rng(seed)
    return rng.integers(0, high, size=shape, dtype=np.int64).astype(np.uint8)


def unique_images(n, shape=(4, 4)):
    """Images whose first two pixels encode their index: every row is distinct."""
    x = rand_images((n,) + shape, seed=n)
    flat = x.reshape(n, -1)
    flat[:, 0], flat[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def raises_one_line(match, fn, *args, **kwargs):
    """Asserts a DataError matching `match` whose message is a single line."""
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def rows(arr):
    return collections.Counter(r.tobytes() for r in arr)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("train_gz,test_gz", [(True, True), (False, False), (True, False)])
def test_idx_round_trip(tmp_path, train_gz, test_gz):
    # Non-square images: catches H/W mix-ups.
    x_train, x_test = rand_images((13, 7, 5), 1), rand_images((6, 7, 5), 2)
    write_idx(tmp_path / "train-images-idx3-ubyte", x_train, train_gz)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test, test_gz)
    ds = load_dataset("fashion_mnist", str(tmp_path))
    assert ds.train.dtype == np.uint8 and ds.test.dtype == np.uint8
    np.testing.assert_array_equal(ds.train, x_train[..., None])
    np.testing.assert_array_equal(ds.test, x_test[..., None])
    assert ds.valid.shape == (0, 7, 5, 1)
    assert ds.image_shape == (7, 5, 1) and ds.num_dims == 35
    assert ds.max_value == 255 and ds.name == "fashion_mnist"
    assert str(tmp_path) in ds.source and "IDX" in ds.source


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated(tmp_path, compress):
    write_idx(tmp_path / "train-images-idx3-ubyte", rand_images((10, 4, 4)), False)
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", rand_images((5, 4, 4)), compress)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[:-7])  # Cuts pixels (raw) or the gzip stream (compressed).
    msg = raises_one_line("truncated", load_dataset, "mnist", str(tmp_path))
    assert msg.startswith(str(path))


def test_idx_trailing_bytes(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", rand_images((10, 4, 4)), False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, rand_images((5, 4, 4)), False)
    with open(path, "ab") as f:
        f.write(b"xyz")
    raises_one_line("t10k-images-idx3-ubyte.*3 unexpected bytes", load_dataset, "mnist",
                    str(tmp_path))


def test_idx_wrong_magic(tmp_path):
    # 0x801 is the magic of a label file: a plausible mix-up.
    write_idx(tmp_path / "train-images-idx3-ubyte", rand_images((10, 4, 4)), True, magic=0x801)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rand_images((5, 4, 4)), True)
    msg = raises_one_line("magic", load_dataset, "mnist", str(tmp_path))
    assert "train-images-idx3-ubyte.gz" in msg


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    msg = raises_one_line("no such directory", load_dataset, "fashion_mnist", str(missing))
    assert msg.startswith(str(missing)) and "t10k-images-idx3-ubyte" in msg


def test_missing_idx_file_is_named(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", rand_images((10, 4, 4)), True)
    msg = raises_one_line("missing", load_dataset, "mnist", str(tmp_path))
    assert "t10k-images-idx3-ubyte" in msg and "train-images" not in msg.split("expected")[0]


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize("as_file", [True, False])
def test_npz_hw_gets_channel_axis(tmp_path, as_file):
    x_train, x_test = rand_images((9, 6, 6)), rand_images((4, 6, 6), 1)
    path = tmp_path / "mnist.npz"
    # int64 holding integer values is accepted and converted.
    np.savez(path, x_train=x_train.astype(np.int64), x_test=x_test.astype(np.float32))
    ds = load_dataset("mnist", str(path if as_file else tmp_path))
    assert ds.train.shape == (9, 6, 6, 1) and ds.train.dtype == np.uint8
    np.testing.assert_array_equal(ds.train[..., 0], x_train)
    np.testing.assert_array_equal(ds.test[..., 0], x_test)
    assert "npz" in ds.source


def test_npz_rgb_for_cifar(tmp_path):
    x_train, x_test = rand_images((5, 8, 8, 3)), rand_images((2, 8, 8, 3), 1)
    np.savez(tmp_path / "cifar10.npz", x_train=x_train, x_test=x_test)
    ds = load_dataset("cifar10", str(tmp_path), likelihood="logistic")
    np.testing.assert_array_equal(ds.train, x_train)
    assert ds.image_shape == (8, 8, 3)


@pytest.mark.parametrize("bad,match", [
    (np.nan, "NaN"), (300, "out of range"), (-1, "out of range"), (0.5, "non-integer"),
    (np.inf, "out of range"),
])
def test_npz_bad_values(tmp_path, bad, match):
    x_train = rand_images((6, 4, 4)).astype(np.float64)
    x_train[3, 2, 1] = bad
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x_train, x_test=rand_images((2, 4, 4)))
    msg = raises_one_line(match, load_dataset, "mnist", str(path))
    assert msg.startswith(str(path))


@pytest.mark.parametrize("x_train,x_test,match", [
    (rand_images((4, 6, 6)), rand_images((2, 5, 6)), "shapes of the splits differ"),
    (rand_images((4, 6, 6, 2)), rand_images((2, 6, 6, 2)), "wrong shape"),
    (rand_images((4, 36)), rand_images((2, 36)), "wrong shape"),
    (np.full((4, 4, 4), "a"), rand_images((2, 4, 4)), "wrong dtype"),
])
def test_npz_bad_shapes_and_dtypes(tmp_path, x_train, x_test, match):
    np.savez(tmp_path / "mnist.npz", x_train=x_train, x_test=x_test)
    raises_one_line(match, load_dataset, "mnist", str(tmp_path))


def test_npz_missing_array(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=rand_images((4, 6, 6)), y_test=np.zeros(2))
    raises_one_line("missing array.*x_test", load_dataset, "mnist", str(path))


def test_npz_missing_in_directory_lists_expected(tmp_path):
    msg = raises_one_line("missing", load_dataset, "fashion_mnist", str(tmp_path))
    assert "fashion_mnist.npz" in msg


# ----------------------------------------------------------------------------- amat


def write_amat(path, x):
    np.savetxt(path, x.reshape(len(x), -1), fmt="%d")


def test_amat_fixed_binarised_with_official_valid(tmp_path):
    splits = {s: rand_images((n, 28, 28), seed, high=2)
              for s, n, seed in (("train", 7, 0), ("valid", 3, 1), ("test", 4, 2))}
    for s, x in splits.items():
        write_amat(tmp_path / f"binarized_mnist_{s}.amat", x)
    # validation_size is ignored: the file's own validation split is the valid set.
    ds = load_dataset("binarized_mnist", str(tmp_path), validation_size=2)
    assert ds.max_value == 1 and ds.image_shape == (28, 28, 1)
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(ds, s)[..., 0], splits[s])
    assert set(np.unique(ds.train)) <= {0, 1}


def test_amat_slow_path_same_as_fast_path(tmp_path):
    # Irregular spacing forces np.loadtxt; the result must not depend on the parser.
    x = rand_images((3, 784), 5, high=2)
    path = tmp_path / "a.amat"
    with open(path, "w") as f:
        for r in x:
            f.write("  ".join(str(v) for v in r) + " \n")
    np.testing.assert_array_equal(data._read_amat(str(path)).reshape(3, -1), x)
    write_amat(path, x)
    assert data._parse_binary_amat(open(path, "rb").read()) is not None  # The fast path ran.
    np.testing.assert_array_equal(data._read_amat(str(path)).reshape(3, -1), x)


def test_amat_non_binary(tmp_path):
    for s in ("train", "valid", "test"):
        x = rand_images((3, 28, 28), high=2)
        if s == "valid":
            x[1, 5, 5] = 2
        write_amat(tmp_path / f"binarized_mnist_{s}.amat", x)
    msg = raises_one_line("non-binary", load_dataset, "binarized_mnist", str(tmp_path))
    assert "binarized_mnist_valid.amat" in msg


@pytest.mark.parametrize("content,match", [("0 1 1\n1 0 0\n", "wrong shape"),
                                          ("0 1\n1\n", "cannot parse"), ("", "no examples")])
def test_amat_malformed(tmp_path, content, match):
    path = tmp_path / "x.amat"
    path.write_text(content)
    raises_one_line(match, data._read_amat, str(path))


def test_amat_missing_files(tmp_path):
    write_amat(tmp_path / "binarized_mnist_train.amat", rand_images((2, 28, 28), high=2))
    msg = raises_one_line("missing", load_dataset, "binarized_mnist", str(tmp_path))
    assert "binarized_mnist_valid.amat" in msg and "binarized_mnist_test.amat" in msg


# ----------------------------------------------------------------------------- CIFAR-10


def write_cifar(directory, n=20):
    """Real format: pickled dicts with bytes keys, b'data' uint8 [n, 3072] as R, G, B planes."""
    os.makedirs(directory, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        flat = rand_images((n, 3072), 10 + i)
        batches[name] = flat
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [0] * n, b"data": flat}, f)
    return batches


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar_pickles_nhwc(tmp_path, subdir):
    batches = write_cifar(tmp_path / subdir)
    # A known pixel: example 3 of batch 2, row 4, column 9, in each colour plane.
    planes = batches["data_batch_2"][3].reshape(3, 32, 32)
    planes[0, 4, 9], planes[1, 4, 9], planes[2, 4, 9] = 11, 22, 33
    batches["data_batch_2"][3] = planes.reshape(-1)
    with open(tmp_path / subdir / "data_batch_2", "wb") as f:
        pickle.dump({b"data": batches["data_batch_2"], b"labels": [0] * 20}, f)

    ds = load_dataset("cifar10", str(tmp_path), likelihood="logistic")
    assert ds.train.shape == (100, 32, 32, 3) and ds.test.shape == (20, 32, 32, 3)
    assert ds.max_value == 255 and ds.train.dtype == np.uint8
    np.testing.assert_array_equal(ds.train[20 + 3, 4, 9], [11, 22, 33])
    # Every pixel: train is batches 1..5 in order, each CHW -> HWC.
    expected = np.concatenate([batches[f"data_batch_{k}"] for k in range(1, 6)])
    np.testing.assert_array_equal(ds.train, expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert ds.train[0, 0, 1, 0] == batches["data_batch_1"][0, 1]  # R plane, row 0, column 1.
    assert ds.test[0, 1, 0, 2] == batches["test_batch"][0, 2048 + 32]  # B plane, row 1, column 0.


def test_cifar_missing_and_truncated(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_4")
    msg = raises_one_line("missing", load_dataset, "cifar10", str(tmp_path))
    assert msg.split("; expected")[0].endswith("missing data_batch_4")
    write_cifar(tmp_path)
    raw = open(tmp_path / "test_batch", "rb").read()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    msg = raises_one_line("truncated", load_dataset, "cifar10", str(tmp_path))
    assert msg.startswith(str(tmp_path / "test_batch"))


def test_cifar_wrong_shape(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": rand_images((20, 1024))}, f)
    raises_one_line("data_batch_1: wrong shape", load_dataset, "cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- validation split


@pytest.fixture
def npz_dir(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=unique_images(50), x_test=unique_images(10))
    return str(tmp_path)


def test_validation_split_properties(npz_dir):
    full = load_dataset("mnist", npz_dir)
    ds = load_dataset("mnist", npz_dir, validation_size=12, seed=3)
    assert len(ds.train) == 38 and len(ds.valid) == 12
    assert not set(rows(ds.train)) & set(rows(ds.valid))  # Disjoint.
    assert rows(ds.train) + rows(ds.valid) == rows(full.train)  # Union = original (multiset).
    np.testing.assert_array_equal(ds.test, full.test)  # Test untouched.
    again = load_dataset("mnist", npz_dir, validation_size=12, seed=3)
    np.testing.assert_array_equal(again.valid, ds.valid)
    np.testing.assert_array_equal(again.train, ds.train)
    other = load_dataset("mnist", npz_dir, validation_size=12, seed=4)
    assert rows(other.valid) != rows(ds.valid)


def test_validation_split_matches_spec_permutation(npz_dir):
    # The last validation_size entries of default_rng(seed).permutation(N) are the valid set.
    full = load_dataset("mnist", npz_dir)
    ds = load_dataset("mnist", npz_dir, validation_size=5, seed=7)
    held_out = np.random.default_rng(7).permutation(50)[-5:]
    assert rows(ds.valid) == rows(full.train[held_out])


def test_validation_size_too_large_and_max_train(npz_dir):
    raises_one_line("validation_size 50 must be smaller than the 50", load_dataset, "mnist",
                    npz_dir, validation_size=50)
    ds = load_dataset("mnist", npz_dir, validation_size=10, max_train=7)
    assert len(ds.train) == 7 and len(ds.valid) == 10


def test_unknown_dataset_lists_names():
    msg = raises_one_line("unknown dataset", load_dataset, "svhn")
    assert all(n in msg for n in data.DATASET_NAMES)


# ----------------------------------------------------------------------------- digits


def test_digits():
    ds = load_dataset("digits", "/ignored/path", validation_size=100, seed=1)
    assert ds.max_value == 16 and ds.image_shape == (8, 8, 1) and ds.num_dims == 64
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (1797 - 297 - 100, 100, 297)
    assert ds.train.dtype == np.uint8 and ds.train.max() == 16 and ds.train.min() == 0
    again = load_dataset("digits", validation_size=100, seed=2)
    np.testing.assert_array_equal(again.test, ds.test)  # The test split does not depend on seed.
    assert rows(again.train) + rows(again.valid) == rows(ds.train) + rows(ds.valid)
    raises_one_line("not 8-bit", load_dataset, "digits", likelihood="logistic")


# ----------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock(tfds, name, shape):
    # mock_data supports tfds.data_source when a split is named (as load_dataset does); with
    # this tfds release its mocked `__getitems__` is broken, hence record-by-record reads.
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_dataset(name, validation_size=2)
    assert ds.train.shape == (4,) + shape and ds.valid.shape == (2,) + shape
    assert ds.test.shape == (6,) + shape
    assert ds.train.dtype == np.uint8 and ds.max_value == 255 and ds.source == f"tfds:{name}"


def test_tfds_binarized_uses_its_validation_split(tfds, monkeypatch):
    # Mocked by monkeypatching: mock_data's random images are not binary.
    sizes = {"train": 5, "validation": 3, "test": 4}
    fake = {s: [{"image": np.full((28, 28, 1), i % 2, np.uint8)} for i in range(n)]
            for s, n in sizes.items()}
    monkeypatch.setattr(tfds, "data_source", lambda name, split: fake[split])
    ds = load_dataset("binarized_mnist", validation_size=2)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (5, 3, 4) and ds.max_value == 1


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10"])
def test_tfds_download_failure(tfds, monkeypatch, name):
    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(tfds, "data_source", offline)
    msg = raises_one_line("can.* be downloaded here", load_dataset, name)
    assert msg.startswith(name) and "--config.data.dir=" in msg
    assert (FASHION_DIR in msg) == (name == "fashion_mnist")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason=f"{FASHION_DIR} not present")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist", FASHION_DIR, validation_size=5000, likelihood="logistic")
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (55000, 5000, 10000)
    assert ds.image_shape == (28, 28, 1) and ds.train.dtype == np.uint8
    assert ds.max_value == 255 and ds.train.max() == 255 and ds.test.max() == 255
    assert ds.source == f"{FASHION_DIR} (IDX)"


# ----------------------------------------------------------------------------- batch_indices


def test_batch_indices_epoch_is_a_permutation():
    n, b = 103, 10  # 10 full batches per epoch; 3 examples dropped each epoch.
    for epoch in range(3):
        batches = [batch_indices(n, b, epoch * 10 + i, seed=5) for i in range(10)]
        seen = np.concatenate(batches)
        assert all(len(x) == b for x in batches)
        assert len(set(seen.tolist())) == 100 and seen.min() >= 0 and seen.max() < n
        expected = np.random.default_rng([5, epoch]).permutation(n)[:100]
        np.testing.assert_array_equal(np.sort(seen), np.sort(expected))


def test_batch_indices_epochs_differ_and_deterministic():
    e0 = np.concatenate([batch_indices(40, 8, s, seed=1) for s in range(5)])
    e1 = np.concatenate([batch_indices(40, 8, s, seed=1) for s in range(5, 10)])
    assert not np.array_equal(e0, e1) and sorted(e0) == sorted(e1) == list(range(40))
    data._epoch_permutation.cache_clear()  # A resumed process: nothing cached.
    np.testing.assert_array_equal(batch_indices(40, 8, 7, seed=1), e1[16:24])
    assert not np.array_equal(batch_indices(40, 8, 7, seed=2), e1[16:24])


def test_batch_indices_cheap_and_safe():
    start = time.perf_counter()
    for step in range(2000):
        idx = batch_indices(60000, 128, step, seed=0)
    assert time.perf_counter() - start < 2.0  # Cached: not one permutation per step.
    idx[:] = -1  # Returned arrays are copies: the cache cannot be corrupted.
    assert batch_indices(60000, 128, 1999, seed=0).min() >= 0


@pytest.mark.parametrize("args", [(10, 11, 0, 0), (10, 0, 0, 0), (10, 2, -1, 0)])
def test_batch_indices_errors(args):
    raises_one_line("batch_indices", batch_indices, *args)


# ----------------------------------------------------------------------------- likelihood


def make_ds(max_value, train):
    empty = np.zeros((0,) + train.shape[1:], np.uint8)
    return Dataset("toy", train, empty, train[:1], max_value, "test")


def test_validate_for_likelihood():
    binary = rand_images((4, 3, 3, 1), high=2)
    validate_for_likelihood(make_ds(1, binary), "bernoulli")
    validate_for_likelihood(make_ds(255, rand_images((4, 3, 3, 1))), "bernoulli")
    validate_for_likelihood(make_ds(255, rand_images((4, 3, 3, 1))), "logistic")
    bad = binary.copy()
    bad[2, 1, 1, 0] = 2
    raises_one_line("toy: non-binary values.*Bernoulli", validate_for_likelihood, make_ds(1, bad),
                    "bernoulli")
    raises_one_line("exceed max_value 16", validate_for_likelihood,
                    make_ds(16, rand_images((4, 3, 3, 1))), "bernoulli")
    raises_one_line("not 8-bit", validate_for_likelihood, make_ds(1, binary), "logistic")
    raises_one_line("not 8-bit", validate_for_likelihood, make_ds(16, binary), "logistic")
    raises_one_line("unknown likelihood", validate_for_likelihood, make_ds(1, binary), "gaussian")


def test_load_dataset_checks_likelihood_before_loading(tmp_path):
    # The directory does not exist: the likelihood error must come first (cheap).
    raises_one_line("unknown likelihood", load_dataset, "mnist", str(tmp_path / "x"),
                    likelihood="normal")
