"""Tests of iaf_jax.data on small files written here (plus the real data of ../shared/data and
Fashion-MNIST when present)."""

import collections
import gzip
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
import time

import numpy as np
import pytest

from iaf_jax import data
from iaf_jax.data import DataError, Dataset, batch_indices, load_dataset, validate_for_likelihood

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


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


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def data_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == data.__name__ and r.levelno >= logging.WARNING]


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


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_npz_x_valid_is_the_official_validation_split(tmp_path, name):
    shape = (6, 6, 3) if name == "cifar10" else (6, 6)
    x = {k: unique_images(n, shape) + i for i, (k, n) in
         enumerate((("x_train", 9), ("x_valid", 4), ("x_test", 3)))}
    path = tmp_path / f"{name}.npz"
    np.savez(path, **x)
    ds = load_dataset(name, str(path), validation_size=5)  # Ignored: x_valid is the valid set.
    for split, key in (("train", "x_train"), ("valid", "x_valid"), ("test", "x_test")):
        np.testing.assert_array_equal(getattr(ds, split).reshape(x[key].shape), x[key])


def test_npz_checksums_of_arrays_as_stored(tmp_path):
    x_train, x_test = rand_images((5, 4, 4)).astype(np.int64), rand_images((3, 4, 4), 1)
    path = tmp_path / "some.npz"
    np.savez(path, x_train=x_train, x_test=x_test, y_train=np.zeros(5))
    ds = load_dataset("mnist", str(path))
    # int64 as stored, not the uint8 the data set holds; the channel axis added changes nothing.
    assert ds.checksums == {"some.npz[x_train]": sha(x_train), "some.npz[x_test]": sha(x_test)}
    assert sha(x_train) != sha(x_train.astype(np.uint8))
    assert data.array_sha256(x_test) == sha(x_test)
    assert ds.files == (str(path),)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_npz_truncated_or_damaged(tmp_path, damage):
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, x_train=rand_images((50, 8, 8)), x_test=rand_images((10, 8, 8), 1))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    else:  # Inside the first member's compressed bytes: the CRC / zlib check fails.
        raw[100:110] = bytes(255 - b for b in raw[100:110])
    path.write_bytes(bytes(raw))
    msg = raises_one_line("cannot read .npz", load_dataset, "mnist", str(tmp_path))
    assert msg.startswith(str(path)) and "truncated or damaged" in msg


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
    assert "binarized_mnist.npz" in msg


def binarized_splits(sizes=(7, 3, 4)):
    return {s: rand_images((n, 28, 28), seed, high=2)
            for seed, (s, n) in enumerate(zip(("train", "valid", "test"), sizes))}


@pytest.mark.parametrize("as_file", [True, False])
def test_binarized_npz_with_x_valid(tmp_path, as_file):
    splits = binarized_splits()
    np.savez(tmp_path / "binarized_mnist.npz", **{f"x_{s}": x for s, x in splits.items()})
    # In a directory the npz is preferred over .amat files (here with other content).
    for s, x in binarized_splits((2, 2, 2)).items():
        write_amat(tmp_path / f"binarized_mnist_{s}.amat", x)
    where = tmp_path / "binarized_mnist.npz" if as_file else tmp_path
    ds = load_dataset("binarized_mnist", str(where), validation_size=2)
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(ds, s)[..., 0], splits[s])
    assert ds.max_value == 1 and ds.source == f"{tmp_path / 'binarized_mnist.npz'} (npz)"
    assert ds.checksums == {f"binarized_mnist.npz[x_{s}]": sha(x) for s, x in splits.items()}


def test_binarized_npz_non_binary(tmp_path):
    splits = binarized_splits()
    splits["valid"][2, 3, 4] = 2
    path = tmp_path / "binarized_mnist.npz"
    np.savez(path, **{f"x_{s}": x for s, x in splits.items()})
    msg = raises_one_line("non-binary values", load_dataset, "binarized_mnist", str(tmp_path))
    assert msg.startswith(f"{path} [x_valid]")


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


def write_cifar_parts(directory, n=(6, 5, 4), shape=(8, 8, 3)):
    """The ../shared/data layout: two training parts and a test file, with labels."""
    arrays = {}
    for i, (file, key) in enumerate((("cifar10_train_part1.npz", "train"),
                                     ("cifar10_train_part2.npz", "train"),
                                     ("cifar10_test.npz", "test"))):
        x = unique_images(n[i], shape) // 2 + 100 * (i == 1)  # Parts tell apart by value.
        arrays[file] = x
        np.savez(os.path.join(directory, file), **{f"x_{key}": x,
                                                   f"y_{key}": np.arange(n[i], dtype=np.uint8)})
    return arrays


def test_cifar_parts_concatenated_in_order(tmp_path):
    arrays = write_cifar_parts(tmp_path)
    write_cifar(tmp_path)  # Pickles beside the parts: the parts are read.
    ds = load_dataset("cifar10", str(tmp_path), likelihood="logistic", validation_size=2)
    part1, part2 = arrays["cifar10_train_part1.npz"], arrays["cifar10_train_part2.npz"]
    full = load_dataset("cifar10", str(tmp_path), likelihood="logistic")
    np.testing.assert_array_equal(full.train, np.concatenate([part1, part2]))
    np.testing.assert_array_equal(full.test, arrays["cifar10_test.npz"])
    assert rows(ds.train) + rows(ds.valid) == rows(full.train) and len(ds.valid) == 2
    assert full.source == f"{tmp_path} (CIFAR-10 npz parts)"
    assert full.files == tuple(str(tmp_path / f) for f in arrays)  # part1, part2, test
    assert full.checksums == {"cifar10_train_part1.npz[x_train]": sha(part1),
                              "cifar10_train_part2.npz[x_train]": sha(part2),
                              "cifar10_test.npz[x_test]": sha(arrays["cifar10_test.npz"])}


@pytest.mark.parametrize("missing", ["cifar10_train_part2.npz", "cifar10_test.npz"])
def test_cifar_missing_part(tmp_path, missing):
    write_cifar_parts(tmp_path)
    os.remove(tmp_path / missing)
    msg = raises_one_line("missing", load_dataset, "cifar10", str(tmp_path), likelihood="logistic")
    assert msg.startswith(f"{tmp_path}: missing {missing};")


def test_cifar_part_errors(tmp_path):
    write_cifar_parts(tmp_path, shape=(8, 8, 1))
    raises_one_line("1 channel.*cifar10 has 3", load_dataset, "cifar10", str(tmp_path))
    write_cifar_parts(tmp_path)
    msg = raises_one_line("one of the three CIFAR-10 files", load_dataset, "cifar10",
                          str(tmp_path / "cifar10_train_part1.npz"))
    assert "cifar10_test.npz" in msg
    np.savez(tmp_path / "cifar10_train_part2.npz", x_train=rand_images((3, 8, 6, 3)))
    raises_one_line("shapes of the splits differ", load_dataset, "cifar10", str(tmp_path))
    np.savez(tmp_path / "cifar10_train_part2.npz", y_train=np.zeros(3))
    msg = raises_one_line("missing array.*x_train", load_dataset, "cifar10", str(tmp_path))
    assert msg.startswith(str(tmp_path / "cifar10_train_part2.npz"))


# ----------------------------------------------------------------------------- published checksums


def test_mismatch_with_published_checksums_is_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    # Named like the real files, so they are "known": their content is not the published one.
    splits = binarized_splits()
    np.savez(tmp_path / "binarized_mnist.npz", **{f"x_{s}": x for s, x in splits.items()})
    load_dataset("binarized_mnist", str(tmp_path))
    msgs = data_warnings(caplog)
    assert len(msgs) == 3
    for s in ("train", "valid", "test"):
        assert any(m.startswith(f"binarized_mnist: x_{s} of {tmp_path / 'binarized_mnist.npz'} "
                                "does not match the published sha256") for m in msgs)
    assert all("results are not comparable to the report's" in m for m in msgs)

    caplog.clear()
    write_cifar_parts(tmp_path)
    load_dataset("cifar10", str(tmp_path), likelihood="logistic")
    msgs = data_warnings(caplog)
    assert len(msgs) == 3 and sum("x_train of " in m for m in msgs) == 2

    caplog.clear()  # The .amat files hold the bytes of binarized_mnist.npz: checked alike.
    for s, x in splits.items():
        write_amat(tmp_path / f"binarized_mnist_{s}.amat", x)
    os.remove(tmp_path / "binarized_mnist.npz")
    load_dataset("binarized_mnist", str(tmp_path))
    assert len(data_warnings(caplog)) == 3
    assert "images of " in data_warnings(caplog)[0]


def test_published_checksum_match_and_unknown_files(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING)
    x_train, x_test = rand_images((5, 4, 4)), rand_images((3, 4, 4), 1)
    np.savez(tmp_path / "mnist.npz", x_train=x_train, x_test=x_test)
    published = {("mnist.npz", "x_train"): sha(x_train), ("mnist.npz", "x_test"): sha(x_test)}
    monkeypatch.setitem(data._PUBLISHED_SHA256, "mnist", published)
    load_dataset("mnist", str(tmp_path))
    assert data_warnings(caplog) == []
    load_dataset("fashion_mnist", str(tmp_path / "mnist.npz"))  # Not a file of fashion_mnist.
    assert data_warnings(caplog) == []
    # The same content in the canonical IDX files is checked against the same checksums.
    write_idx(tmp_path / "train-images-idx3-ubyte", x_train, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test[:2], False)
    ds = load_dataset("mnist", str(tmp_path))
    assert "IDX" in ds.source and data_warnings(caplog) == [
        f"mnist: images of {tmp_path / 't10k-images-idx3-ubyte'} does not match the published "
        f"sha256 ({sha(x_test[:2])[:12]}..., published {sha(x_test)[:12]}...); results are not "
        "comparable to the report's"]
    assert ds.checksums["train-images-idx3-ubyte.gz[images]"] == sha(x_train)


def test_data_info_records_files_and_checksums(tmp_path):
    from iaf_jax import config_lib, workdir as workdir_lib

    write_cifar_parts(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path), likelihood="logistic")
    config_lib.write_data_info(str(tmp_path), ds)
    info = config_lib.load_data_info(str(tmp_path))
    assert info["files"] == list(ds.files) and len(info["files"]) == 3
    assert info["checksums"] == ds.checksums and len(info["checksums"]) == 3
    assert info["image_shape"] == [8, 8, 3] and info["max_value"] == 255
    old = {k: v for k, v in info.items() if k not in ("files", "checksums")}
    (tmp_path / workdir_lib.DATA_INFO_FILE).write_text(json.dumps(old))  # An older workdir.
    assert config_lib.load_data_info(str(tmp_path))["checksums"] == {}


# ----------------------------------------------------------------------------- fixed_subset


def test_fixed_subset():
    grouped = np.repeat(np.arange(10, dtype=np.uint8), 100)[:, None, None]  # Sorted by "digit".
    sub = data.fixed_subset(grouped, 50)
    assert sub.shape == (50, 1, 1) and len(np.unique(sub)) >= 8  # Not just the 0s of a prefix.
    assert np.all(np.diff(sub.ravel().astype(int)) >= 0)  # Original order kept.
    idx = np.sort(np.random.default_rng(0).permutation(1000)[:50])
    np.testing.assert_array_equal(sub, grouped[idx])
    np.testing.assert_array_equal(data.fixed_subset(grouped, 50), sub)  # Fixed.
    assert not np.array_equal(data.fixed_subset(grouped, 50, seed=1), sub)
    np.testing.assert_array_equal(data.fixed_subset(grouped, 5000), grouped)
    assert len(data.fixed_subset(grouped, 0)) == 0
    raises_one_line("fixed_subset: n must be >= 0", data.fixed_subset, grouped, -1)


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
    monkeypatch.setattr(tfds, "data_source", lambda name, split, **kw: fake[split])
    ds = load_dataset("binarized_mnist", validation_size=2)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (5, 3, 4) and ds.max_value == 1


@pytest.mark.parametrize("name", ["binarized_mnist", "mnist", "cifar10"])
def test_tfds_import_chain_up_to_the_download(tfds, tmp_path, monkeypatch, name):
    """Offline: tensorflow_datasets imports, builds the builder and gets as far as downloading
    (tfds 4.9.10 also needs importlib_resources, which it does not declare for Python >= 3.9)."""
    class Download(Exception):
        pass

    def download(self, *args, **kwargs):
        raise Download()

    monkeypatch.setattr(tfds.download.DownloadManager, "download", download)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download)
    builder = tfds.builder(name, data_dir=str(tmp_path))
    assert not builder.is_prepared()
    with pytest.raises(Download):
        builder.download_and_prepare(file_format="array_record")


def test_tfds_preparing_needs_tensorflow(tfds, tmp_path, monkeypatch):
    """What _load_tfds's message says: after the download, the builder needs TensorFlow."""
    if data._have_tensorflow():
        pytest.skip("TensorFlow is installed")
    amat = tmp_path / "x.amat"
    write_amat(amat, rand_images((2, 28, 28), high=2))
    monkeypatch.setattr(tfds.download.DownloadManager, "download",
                        lambda self, urls: {k: str(amat) for k in urls})
    builder = tfds.builder("binarized_mnist", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ModuleNotFoundError) as info:
        builder.download_and_prepare(file_format="array_record")
    assert info.value.name == "tensorflow"


class FakeBuilder:
    def is_prepared(self):
        return False


def fake_tfds(tfds, monkeypatch, download_error):
    """tfds.data_source: not prepared (download=False), `download_error` when downloading."""
    calls = []

    def data_source(name, split, download=True, **kwargs):
        calls.append(download)
        if not download:
            raise KeyError("Trying to access `splits['train']` but `splits` is empty.")
        raise download_error

    monkeypatch.setattr(tfds, "data_source", data_source)
    monkeypatch.setattr(tfds, "builder", lambda name, **kwargs: FakeBuilder())
    return calls


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "binarized_mnist"])
def test_tfds_download_failure(tfds, monkeypatch, name):
    calls = fake_tfds(tfds, monkeypatch,
                      OSError("Temporary failure in name resolution\nmore detail"))
    monkeypatch.setattr(data, "_have_tensorflow", lambda: True)
    msg = raises_one_line("can.* be downloaded here", load_dataset, name)
    assert calls == [False, True]
    assert msg.startswith(name) and "--config.data.dir=" in msg
    assert "OSError: Temporary failure in name resolution" in msg and "more detail" not in msg
    assert (FASHION_DIR in msg) == (name == "fashion_mnist")
    assert ("cifar10_train_part1.npz" in msg) == (name == "cifar10")


@pytest.mark.parametrize("name", ["mnist", "binarized_mnist", "cifar10"])
def test_tfds_without_tensorflow_no_download(tfds, monkeypatch, name):
    calls = fake_tfds(tfds, monkeypatch, AssertionError("must not download"))
    monkeypatch.setattr(data, "_have_tensorflow", lambda: False)
    msg = raises_one_line("needs TensorFlow to prepare", load_dataset, name)
    assert calls == [False]  # Refused before a download that could only be wasted.
    assert msg.startswith(f"{name}: not prepared") and "pip install tensorflow-cpu" in msg
    assert "--config.data.dir=" in msg


def test_tfds_missing_module(tfds, monkeypatch):
    err = ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")
    fake_tfds(tfds, monkeypatch, err)
    monkeypatch.setattr(data, "_have_tensorflow", lambda: True)
    msg = raises_one_line("missing module 'importlib_resources'", load_dataset, "mnist")
    assert msg.startswith("mnist: ") and "requirements.txt" in msg


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason=f"{FASHION_DIR} not present")
def test_real_fashion_mnist():
    ds = load_dataset("fashion_mnist", FASHION_DIR, validation_size=5000, likelihood="logistic")
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (55000, 5000, 10000)
    assert ds.image_shape == (28, 28, 1) and ds.train.dtype == np.uint8
    assert ds.max_value == 255 and ds.train.max() == 255 and ds.test.max() == 255
    assert ds.source == f"{FASHION_DIR} (IDX)"


@pytest.fixture(scope="module")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"../shared/data not present: {os.path.abspath(SHARED_DATA)}")
    return os.path.abspath(SHARED_DATA)


def readme_checksums(directory):
    """(file, array) -> sha256 from the table of ../shared/data/README.md: a second copy."""
    text = open(os.path.join(directory, "README.md")).read()
    rx = r"^\| `([\w.]+\.npz)` \| `(\w+)` \|[^\n]*\| `([0-9a-f]{64})` \|$"
    return {(f, a): h for f, a, h in re.findall(rx, text, re.M)}


def test_published_table_is_the_readmes(shared_data):
    table = readme_checksums(shared_data)
    assert len(table) == 13
    assert table == {k: v for d in data._PUBLISHED_SHA256.values() for k, v in d.items()}


@pytest.mark.parametrize("name,sizes,shape", [
    ("binarized_mnist", (50000, 10000, 10000), (28, 28, 1)),
    ("mnist", (60000, 0, 10000), (28, 28, 1)),
    ("cifar10", (50000, 0, 10000), (32, 32, 3)),
])
def test_real_shared_data(shared_data, caplog, name, sizes, shape):
    caplog.set_level(logging.WARNING)
    likelihood = "logistic" if name == "cifar10" else "bernoulli"
    ds = load_dataset(name, shared_data, validation_size=0, likelihood=likelihood)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == sizes
    assert ds.image_shape == shape and ds.train.dtype == np.uint8
    if name == "binarized_mnist":
        assert ds.max_value == 1 and int(ds.train.sum()) == 5118041  # Ones per README.
        assert int(ds.valid.sum()) == 1028036 and int(ds.test.sum()) == 1038896
    else:
        assert ds.max_value == 255 and ds.train.max() == 255
    table = readme_checksums(shared_data)
    assert ds.checksums and ds.checksums == {f"{f}[{a}]": table[f, a] for f, a in table
                                             if f"{f}[{a}]" in ds.checksums}
    assert {f"{f}[{a}]" for f, a in table if a.startswith("x_")
            and os.path.join(shared_data, f) in ds.files} == set(ds.checksums)
    assert data_warnings(caplog) == []


def test_real_binarized_npz_as_file_and_truncated(shared_data, tmp_path):
    path = os.path.join(shared_data, "binarized_mnist.npz")
    ds = load_dataset("binarized_mnist", path, validation_size=5000)
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (50000, 10000, 10000)
    copy = tmp_path / "binarized_mnist.npz"
    shutil.copyfile(path, copy)
    with open(copy, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    msg = raises_one_line("truncated or damaged", load_dataset, "binarized_mnist", str(copy))
    assert msg.startswith(str(copy))


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


def test_model_inputs_of_binary_data_are_the_bernoulli_draw_without_drawing():
  """With max_value 1 (binarized MNIST) every probability is 0 or >= 1, so the draw is decided: model_inputs
  skips it and returns exactly what jax.random.bernoulli gives, for every uint8 value and any key. With a larger
  max_value it still draws: different keys give different binarisations."""
  import jax
  import jax.numpy as jnp

  images = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1))
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    drawn = jax.random.bernoulli(key, images.astype(jnp.float32) / 1).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(data.model_inputs(key, images, "bernoulli", 1)), np.asarray(drawn))
  rng_ops = lambda m: [e.primitive.name for e in jax.make_jaxpr(
      lambda k, x: data.model_inputs(k, x, "bernoulli", m))(jax.random.PRNGKey(0), images).eqns
      if "random" in e.primitive.name or "threefry" in e.primitive.name or e.primitive.name == "pjit"]
  assert rng_ops(1) == [] and rng_ops(255) != []
  grey = jnp.full((4, 8, 8, 1), 128, jnp.uint8)
  a, b = (np.asarray(data.model_inputs(jax.random.PRNGKey(s), grey, "bernoulli", 255)) for s in (0, 1))
  assert set(np.unique(a)) == {0.0, 1.0} and (a != b).any()
