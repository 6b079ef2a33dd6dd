import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from jitgrad.training.data import (
    Dataset,
    batches_per_epoch,
    check_labels,
    load_dataset,
    load_digits,
    load_file,
    load_idx_dir,
    minibatches,
    read_idx,
)

_IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C}
_IDX_CODES |= {np.float32: 0x0D, np.float64: 0x0E}


def write_idx(path: Path, arr: np.ndarray, *, compress: bool | None = None) -> Path:
    """Independent IDX writer, so read_idx is tested against the format, not itself."""
    code = _IDX_CODES[arr.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


# ------------------------------------------------------------------------- bundled digits


def test_digits_shapes_and_standardisation():
    d = load_digits()
    assert isinstance(d, Dataset)
    assert d.name == "digits" and d.n_classes == 10 and d.n_features == 64
    assert len(d.x_train) + len(d.x_test) == 1797
    assert len(d.x_test) == round(1797 * 0.2)
    assert d.x_train.shape == (len(d.y_train), 64) and d.x_test.shape == (len(d.y_test), 64)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert d.x_train.flags.c_contiguous and d.x_test.flags.c_contiguous
    assert set(np.unique(np.concatenate([d.y_train, d.y_test]))) == set(range(10))
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-5)
    std = d.x_train.std(axis=0)
    # Constant pixels (e.g. the top-left corner) stay exactly zero rather than NaN.
    assert np.all(np.isclose(std, 1.0, atol=1e-4) | (std == 0.0))
    assert np.isfinite(d.x_test).all()


def test_digits_split_is_seeded():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


def test_digits_options():
    d = load_digits(dtype=np.float64, test_fraction=0.5)
    assert d.x_train.dtype == np.float64
    assert abs(len(d.x_train) - len(d.x_test)) <= 1
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        load_digits(dtype=np.int32)


def test_load_dataset_spec_resolution(tmp_path):
    assert load_dataset(None).name == "digits"
    assert load_dataset("digits", seed=3).y_test.tolist() == load_digits(seed=3).y_test.tolist()
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(5, 3, 4)) * 50).astype(dtype)
    out = read_idx(write_idx(tmp_path / f"a.idx{suffix}", arr))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert out.shape == (5, 3, 4)
    np.testing.assert_array_equal(out, arr)
    out[0] = 0  # must be writable, not a view of the file buffer


def test_idx_gzip_detected_by_content(tmp_path):
    arr = np.arange(12, dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / "labels-idx1-ubyte", arr, compress=True))
    np.testing.assert_array_equal(out, arr)


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "page.html"
    p.write_bytes(b"<!DOCTYPE html><html></html>")
    with pytest.raises(ValueError, match=r"page\.html.*bad IDX magic"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))  # unknown type code
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(p)


def test_idx_truncated_and_oversized(tmp_path):
    raw = write_idx(tmp_path / "x.idx", np.ones((4, 4), np.float32)).read_bytes()
    (tmp_path / "short.idx").write_bytes(raw[:-3])
    with pytest.raises(ValueError, match=r"short\.idx: truncated data"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "hdr.idx").write_bytes(raw[:6])
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(tmp_path / "hdr.idx")
    (tmp_path / "long.idx").write_bytes(raw + b"\0")
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "long.idx")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(tmp_path / "bad.gz")


def _write_mnist_dir(directory: Path, gz: bool, n_train=30, n_test=10, classes=10) -> None:
    rng = np.random.default_rng(1)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 7, 7), dtype=np.uint8)
        images[:, 0, 0] = 0  # a constant pixel, as in real MNIST borders
        labels = rng.integers(0, classes, size=n, dtype=np.uint8)
        labels[0] = classes - 1
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_dir(tmp_path, gz):
    _write_mnist_dir(tmp_path, gz)
    d = load_idx_dir(tmp_path)
    assert d.x_train.shape == (30, 49) and d.x_test.shape == (10, 49)
    assert d.n_classes == 10 and d.name == tmp_path.name
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-5)
    assert np.all(d.x_train[:, 0] == 0) and np.all(d.x_test[:, 0] == 0)
    raw = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    col = raw.reshape(30, -1)[:, 1].astype(np.float64)
    np.testing.assert_allclose(d.x_train[:, 1], (col - col.mean()) / col.std(), rtol=1e-5)
    assert load_dataset(str(tmp_path)).x_train.shape == (30, 49)


def test_load_idx_dir_errors(tmp_path):
    _write_mnist_dir(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte.*" + tmp_path.name):
        load_idx_dir(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(9, np.uint8))
    with pytest.raises(ValueError, match="10 images but .* 9 labels"):
        load_idx_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_idx_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------- npz / csv


def test_load_npz_unsplit(tmp_path):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 2, 3)), rng.integers(0, 4, size=50)
    y[0] = 3
    np.savez(tmp_path / "toy.npz", x=x, y=y)
    d = load_file(tmp_path / "toy.npz", test_fraction=0.2, seed=5)
    assert d.name == "toy" and d.n_classes == 4
    assert d.x_train.shape == (40, 6) and d.x_test.shape == (10, 6)
    np.testing.assert_allclose(d.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(d.x_train.std(axis=0), 1.0, atol=1e-5)
    again = load_file(tmp_path / "toy.npz", test_fraction=0.2, seed=5)
    np.testing.assert_array_equal(d.y_test, again.y_test)


def test_load_npz_presplit(tmp_path):
    rng = np.random.default_rng(3)
    parts = {
        "x_train": rng.normal(size=(20, 4)),
        "y_train": np.arange(20) % 3,
        "x_test": rng.normal(size=(6, 4)),
        "y_test": np.array([0, 1, 2, 3, 0, 1], np.int32),
    }
    np.savez(tmp_path / "split.npz", **parts)
    d = load_file(tmp_path / "split.npz", dtype=np.float64)
    np.testing.assert_array_equal(d.y_test, parts["y_test"])
    assert d.n_classes == 4 and d.y_test.dtype == np.int64
    mu, sd = parts["x_train"].mean(axis=0), parts["x_train"].std(axis=0)
    np.testing.assert_allclose(d.x_test, (parts["x_test"] - mu) / sd)


def test_load_npz_errors(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, features=np.zeros((3, 2)), labels=np.zeros(3))
    with pytest.raises(ValueError, match=r"expected arrays 'x' and 'y'.*features"):
        load_file(p)
    np.savez(p, x=np.zeros((4, 2)), y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="4 rows but y has 3 labels"):
        load_file(p)
    np.savez(p, x=np.zeros(4), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"bad\.npz\[x\].*shape \(4,\)"):
        load_file(p)
    np.savez(p, x=np.zeros((4, 2)), y=np.array([0, 1, 2.5, 1]))
    with pytest.raises(ValueError, match="label 2.5 at index 2 is not an integer"):
        load_file(p)
    np.savez(p, x=np.zeros((4, 2)), y=np.array([0, 1, -1, 1]))
    with pytest.raises(ValueError, match="label -1 at index 2 is negative"):
        load_file(p)


def test_load_csv(tmp_path):
    rows = [[0.5, 1.0, 2], [1.5, -1.0, 0], [2.5, 0.0, 1], [3.5, 2.0, 2], [4.5, 1.0, 0]]
    body = "\n".join(",".join(str(v) for v in r) for r in rows * 4) + "\n"
    (tmp_path / "plain.csv").write_text(body)
    (tmp_path / "header.csv").write_text("a,b,label\n" + body)
    a = load_file(tmp_path / "plain.csv", test_fraction=0.25, seed=1)
    b = load_dataset(str(tmp_path / "header.csv"), seed=1)
    assert a.x_train.shape == (15, 2) and a.n_classes == 3
    assert b.x_train.shape == (16, 2)
    c = load_file(tmp_path / "header.csv", test_fraction=0.25, seed=1)
    np.testing.assert_array_equal(a.x_train, c.x_train)
    np.testing.assert_array_equal(a.y_test, c.y_test)


def test_load_csv_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("1,2,0\n3,4,1.5\n")
    with pytest.raises(ValueError, match="label 1.5 at index 1 is not an integer"):
        load_file(p)
    p.write_text("1,2,0\n3,4,-2\n")
    with pytest.raises(ValueError, match="label -2 at index 1 is negative"):
        load_file(p)
    p.write_text("1,2,0\n3,4\n")
    with pytest.raises(ValueError, match=r"d\.csv: could not parse"):
        load_file(p)
    p.write_text("x,label\n")
    with pytest.raises(ValueError, match="no data rows"):
        load_file(p)
    p.write_text("0\n1\n")
    with pytest.raises(ValueError, match="feature column plus a label column"):
        load_file(p)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_file(tmp_path / "missing.csv")
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_file(tmp_path / "d.json")


# ------------------------------------------------------------------------------- labels


def test_check_labels():
    check_labels(np.array([0, 2, 1]), 3)
    with pytest.raises(ValueError, match=r"label 7 at index 2 is outside \[0, 3\)"):
        check_labels(np.array([0, 1, 7, 9]), 3)
    with pytest.raises(ValueError, match="label -1 at index 0"):
        check_labels(np.array([-1, 1]), 3)
    with pytest.raises(ValueError, match="integer dtype"):
        check_labels(np.array([0.0, 1.0]), 3)


def test_dataset_validates_labels():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="label 5 at index 1"):
        Dataset(x, np.array([0, 5, 1]), x, np.array([0, 1, 1]), n_classes=2)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("drop_last", [True, False])
def test_minibatches_cover_epoch(drop_last):
    n, bs = 23, 5
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n)
    batches = list(minibatches(x, y, bs, np.random.default_rng(0), drop_last=drop_last))
    assert len(batches) == batches_per_epoch(n, bs, drop_last) == (4 if drop_last else 5)
    seen = np.concatenate([yb for _, yb in batches])
    assert len(np.unique(seen)) == len(seen)  # nobody twice
    assert len(seen) == (20 if drop_last else n)
    for xb, yb in batches:
        assert xb.flags.c_contiguous and yb.flags.c_contiguous
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)  # rows stay paired with labels
        if drop_last:
            assert len(xb) == bs


def test_minibatches_deterministic():
    x, y = np.random.default_rng(0).normal(size=(40, 3)), np.arange(40)

    def order(seed):
        return np.concatenate([yb for _, yb in minibatches(x, y, 8, seed)])

    np.testing.assert_array_equal(order(7), order(7))
    assert not np.array_equal(order(7), order(8))
    # A shared Generator gives a fresh shuffle each epoch.
    rng = np.random.default_rng(0)
    e1 = np.concatenate([yb for _, yb in minibatches(x, y, 8, rng)])
    e2 = np.concatenate([yb for _, yb in minibatches(x, y, 8, rng)])
    assert not np.array_equal(e1, e2)


def test_minibatches_errors():
    x, y = np.zeros((4, 2)), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="no batches"):
        minibatches(x, y, 5, 0)
    with pytest.raises(ValueError, match="4 rows but y has 3"):
        minibatches(x, y[:3], 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        minibatches(x, y, 0, 0)
    assert len(list(minibatches(x, y, 5, 0, drop_last=False))) == 1
