"""Datasets for training and benchmarking: the bundled 8x8 digits, MNIST-style IDX
directories, and user-supplied ``.npz`` / ``.csv`` files.

Every loader returns a :class:`Dataset` whose features are standardised with the
*training* mean and standard deviation, so that accuracy figures from different
runs and different sources are directly comparable and no test information leaks
into preprocessing.
"""

from __future__ import annotations

import gzip
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from ..frontend.ops.nn import check_labels
from .npz import read_npz

__all__ = [
    "Dataset",
    "batches_per_epoch",
    "check_labels",
    "load_dataset",
    "load_digits",
    "load_file",
    "load_idx_dir",
    "minibatches",
    "read_idx",
]

# IDX type code (third magic byte) -> big-endian element type, per the MNIST format spec.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Standard MNIST / Fashion-MNIST file names. Some mirrors (and Windows unzippers) use
# a dot instead of the second hyphen, so that spelling is accepted as a fallback.
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_GZIP_MAGIC = b"\x1f\x8b"

# Rows per chunk when computing feature statistics: bounds the float64 temporaries
# to a few MB even for MNIST-sized inputs.
_STATS_CHUNK = 4096


@dataclass(eq=False, repr=False)
class Dataset:
    """A train/test split of a classification problem.

    ``x_*`` are C-contiguous float arrays of shape ``[n, n_features]``; ``y_*`` are
    int64 class labels in ``[0, n_classes)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    name: str = "dataset"

    def __post_init__(self) -> None:
        # Validate once here so every loader (and hand-built datasets) share one
        # definition of "well-formed" and training code can trust the arrays.
        if self.n_classes < 1:
            raise ValueError(f"{self.name}: n_classes must be at least 1, got {self.n_classes}")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 2:
                raise ValueError(f"{self.name}: x_{split} must be 2-D, got shape {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"{self.name}: y_{split} must be 1-D with one label per row of "
                    f"x_{split} ({len(x)}), got shape {y.shape}"
                )
            check_labels(y, self.n_classes)
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise ValueError(
                f"{self.name}: train has {self.x_train.shape[1]} features but test has "
                f"{self.x_test.shape[1]}"
            )

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        # The default dataclass repr would print whole arrays.
        return (
            f"Dataset(name={self.name!r}, n_train={len(self.x_train)}, "
            f"n_test={len(self.x_test)}, n_features={self.n_features}, "
            f"n_classes={self.n_classes}, dtype={self.x_train.dtype})"
        )


# --------------------------------------------------------------------------- validation


def _as_labels(y: np.ndarray, source: str) -> np.ndarray:
    """Convert labels read from a file to int64, rejecting anything that is not a
    non-negative whole number (CSV readers hand us floats, so 3.0 must be accepted)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{source}: labels must be 1-D, got shape {y.shape}")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{source}: label {y[i]} at index {i} is not an integer")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    check_labels(y, what=f"{source}: label")
    return y


def _as_features(x: np.ndarray, source: str) -> np.ndarray:
    """Flatten per-example arrays (e.g. [n, 28, 28] images) to [n, features]."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"{source}: features must have shape [n_examples, n_features, ...], got shape {x.shape}"
        )
    if len(x) == 0:
        raise ValueError(f"{source}: no examples (shape {x.shape})")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{source}: features must be numeric, got dtype {x.dtype}")
    x = x.reshape(len(x), -1)
    if x.shape[1] == 0:
        raise ValueError(f"{source}: features have zero columns (shape {x.shape})")
    if x.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        if bad.size:
            raise ValueError(f"{source}: row {int(bad[0])} contains NaN or infinity")
    return x


def _float_dtype(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise ValueError(f"dtype must be a floating-point type, got {dt}")
    return dt


# ------------------------------------------------------------------------ preprocessing


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(n * test_fraction))
    if n_test < 1 or n_test > n - 1:
        raise ValueError(
            f"test_fraction={test_fraction} of {n} examples leaves an empty train or test split"
        )
    perm = np.random.default_rng(seed).permutation(n)
    # Sorting keeps each split in file order, which makes the split easy to inspect
    # and independent of anything but the chosen index sets.
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _standardise(
    x_train: np.ndarray, x_test: np.ndarray, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(x - mean) / std`` for both splits, with statistics from train only.

    Statistics are accumulated in float64 chunk by chunk so float32 output does not
    lose precision on large inputs and memory stays bounded.
    """
    n, d = x_train.shape
    if n == 0:
        raise ValueError("the training split is empty; cannot compute feature statistics")
    total = np.zeros(d)
    for i in range(0, n, _STATS_CHUNK):
        total += x_train[i : i + _STATS_CHUNK].sum(axis=0, dtype=np.float64)
    mean = total / n
    sq = np.zeros(d)
    for i in range(0, n, _STATS_CHUNK):
        c = x_train[i : i + _STATS_CHUNK].astype(np.float64) - mean
        sq += np.einsum("ij,ij->j", c, c)
    std = np.sqrt(sq / n)
    # Constant features (e.g. always-blank border pixels) are found exactly rather than
    # via std == 0, which rounding in the mean can miss; they get std 1 and their exact
    # value as mean, so they become exactly 0 in train instead of NaN or noise.
    constant = x_train.min(axis=0) == x_train.max(axis=0)
    mean[constant] = x_train[0, constant]
    std[constant] = 1.0

    def apply(x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=dtype, order="C", copy=True)
        out -= mean.astype(dtype)
        out /= std.astype(dtype)
        return out

    return apply(x_train), apply(x_test)


# ------------------------------------------------------------------------------ loaders


def load_digits(
    dtype: DTypeLike = np.float32, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """The bundled 8x8 handwritten digits (1,797 images, 64 features, 10 classes).

    The split depends only on ``seed`` and ``test_fraction``, so results are
    reproducible across machines. See ``jitgrad/datasets/README.md`` for provenance.
    """
    dt = _float_dtype(dtype)
    ref = resources.files("jitgrad") / "datasets" / "digits.npz"
    with ref.open("rb") as f, np.load(f) as z:
        images, labels = z["images"], z["labels"].astype(np.int64)
    train, test = _split_indices(len(images), test_fraction, seed)
    x_train, x_test = _standardise(images[train], images[test], dt)
    return Dataset(x_train, labels[train], x_test, labels[test], n_classes=10, name="digits")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST container format).

    Gzip-compressed files are detected from their content, so ``foo.gz`` and an
    already-decompressed ``foo`` both work regardless of the name. The result is a
    writable array in native byte order with the shape stored in the header.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e

    if len(raw) < 4:
        raise ValueError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    zero0, zero1, code, ndim = raw[:4]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000TTNN with type "
            f"TT in {{08, 09, 0B, 0C, 0D, 0E}} and NN >= 1 dimensions); is this really an "
            f"IDX file?"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {header} bytes")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise ValueError(
            f"{path}: truncated data: shape {shape} of {dtype.name} needs {expected} bytes "
            f"after the header, found {actual}"
        )
    if actual > expected:
        raise ValueError(
            f"{path}: size mismatch: shape {shape} of {dtype.name} needs {expected} bytes "
            f"after the header, found {actual} ({actual - expected} extra)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    return data.astype(dtype.newbyteorder("=")).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"expected IDX file {stem!r} (or {stem + '.gz'!r}) in directory {str(directory)!r}"
    )


def load_idx_dir(
    directory: str | Path, dtype: DTypeLike = np.float32, *, name: str | None = None
) -> Dataset:
    """Load an MNIST-layout directory (MNIST, Fashion-MNIST, KMNIST, ...).

    Uses the official train/t10k split. Pixels are standardised with training
    statistics. The customary 1/255 scaling is not applied separately: any constant
    factor cancels in ``(x - mean) / std``, so skipping it gives the same values
    with one rounding step fewer.
    """
    directory = Path(directory)
    dt = _float_dtype(dtype)
    if not directory.is_dir():
        raise FileNotFoundError(f"IDX dataset directory {str(directory)!r} does not exist")
    paths = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}
    arrays = {key: read_idx(p) for key, p in paths.items()}

    xs, ys = {}, {}
    for split in ("train", "test"):
        xp, yp = paths[f"x_{split}"], paths[f"y_{split}"]
        x = _as_features(arrays[f"x_{split}"], str(xp))
        y = _as_labels(arrays[f"y_{split}"], str(yp))
        if len(x) != len(y):
            raise ValueError(f"{xp} has {len(x)} images but {yp} has {len(y)} labels")
        xs[split], ys[split] = x, y
    if xs["train"].shape[1] != xs["test"].shape[1]:
        raise ValueError(
            f"{directory}: train images have {xs['train'].shape[1]} pixels but test images "
            f"have {xs['test'].shape[1]}"
        )
    x_train, x_test = _standardise(xs["train"], xs["test"], dt)
    n_classes = int(max(ys["train"].max(initial=0), ys["test"].max(initial=0))) + 1
    return Dataset(x_train, ys["train"], x_test, ys["test"], n_classes, name=name or directory.name)


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a CSV text file ({e})") from None
    # A first row that does not parse as numbers is taken to be a header.
    try:
        [float(v) for v in first.split(",")]
        skip = 0
    except ValueError:
        skip = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # empty input; reported below
            table = np.loadtxt(
                path,
                delimiter=",",
                skiprows=skip,
                ndmin=2,
                dtype=np.float64,
                encoding="utf-8-sig",
            )
    except ValueError as e:
        raise ValueError(f"{path}: could not parse CSV ({e})") from e
    if table.shape[0] == 0:
        raise ValueError(f"{path}: no data rows")
    if table.shape[1] < 2:
        raise ValueError(
            f"{path}: need at least one feature column plus a label column, "
            f"got {table.shape[1]} column(s)"
        )
    return table[:, :-1], table[:, -1]


def _xy(x: np.ndarray, y: np.ndarray, src: str, tag: str) -> tuple[np.ndarray, np.ndarray]:
    x = _as_features(x, f"{src}[x{tag}]")
    y = _as_labels(y, f"{src}[y{tag}]")
    if len(x) != len(y):
        raise ValueError(f"{src}: x{tag} has {len(x)} rows but y{tag} has {len(y)} labels")
    return x, y


def _split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    train, test = _split_indices(len(x), test_fraction, seed)
    return x[train], y[train], x[test], y[test]


def load_file(
    path: str | Path,
    dtype: DTypeLike = np.float32,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a classification dataset from a ``.npz`` or ``.csv`` file.

    * ``.npz`` with keys ``x``, ``y`` (split here with ``test_fraction``/``seed``), or
      ``x_train``, ``y_train``, ``x_test``, ``y_test`` (split used as given).
      Features of shape ``[n, ...]`` are flattened.
    * ``.csv``: one example per row, the last column is the integer label; an
      optional non-numeric header row is skipped.

    Labels must be non-negative integers; ``n_classes`` is the largest label + 1.
    """
    path = Path(path)
    dt = _float_dtype(dtype)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    src = str(path)
    suffix = path.suffix.lower()

    if suffix == ".npz":
        arrays = read_npz(path, "dataset file")
        if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
            # A split shipped with the file is used as given, so results match its source.
            x_tr, y_tr = _xy(arrays["x_train"], arrays["y_train"], src, "_train")
            x_te, y_te = _xy(arrays["x_test"], arrays["y_test"], src, "_test")
            if x_tr.shape[1] != x_te.shape[1]:
                raise ValueError(
                    f"{src}: x_train has {x_tr.shape[1]} features but x_test has {x_te.shape[1]}"
                )
        elif {"x", "y"} <= arrays.keys():
            x, y = _xy(arrays["x"], arrays["y"], src, "")
            x_tr, y_tr, x_te, y_te = _split(x, y, test_fraction, seed)
        else:
            raise ValueError(
                f"{src}: expected arrays 'x' and 'y', or 'x_train', 'y_train', 'x_test' "
                f"and 'y_test'; found {sorted(arrays)}"
            )
    elif suffix == ".csv":
        features, labels = _read_csv(path)
        x = _as_features(features, src)
        y = _as_labels(labels, f"{src} (label column)")
        x_tr, y_tr, x_te, y_te = _split(x, y, test_fraction, seed)
    else:
        raise ValueError(f"{src}: unsupported file type {suffix!r} (expected .npz or .csv)")

    x_train, x_test = _standardise(x_tr, x_te, dt)
    n_classes = int(max(y_tr.max(initial=0), y_te.max(initial=0))) + 1
    return Dataset(x_train, y_tr, x_test, y_te, n_classes, name=path.stem)


def load_dataset(
    spec: str | Path | None = None,
    dtype: DTypeLike = np.float32,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Resolve a command-line style dataset spec.

    ``None`` or ``"digits"`` -> the bundled digits; a directory -> MNIST-style IDX
    files (official split, ``seed`` unused); a file -> :func:`load_file`.
    """
    if spec is None or spec == "digits":
        return load_digits(dtype, test_fraction=test_fraction, seed=seed)
    path = Path(spec)
    if path.is_dir():
        return load_idx_dir(path, dtype)
    if path.is_file():
        return load_file(path, dtype, test_fraction=test_fraction, seed=seed)
    raise FileNotFoundError(
        f"dataset {str(spec)!r} is neither a built-in name ('digits'), an existing "
        f"directory of IDX files, nor an existing .npz/.csv file"
    )


# ---------------------------------------------------------------------------- batching


def batches_per_epoch(n_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches :func:`minibatches` yields for ``n_examples`` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if drop_last:
        return n_examples // batch_size
    return -(-n_examples // batch_size)


def minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    rng: np.random.Generator | int,
    drop_last: bool = True,
    *,
    rank: int = 0,
    num_ranks: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled ``(x_batch, y_batch)`` pairs, as C-contiguous copies.

    The order depends only on ``rng`` (a Generator, or an int seed), so a training
    run is reproducible. With ``drop_last`` every batch has exactly ``batch_size``
    rows, which keeps compiled kernels on a single shape; the final partial batch's
    examples are simply seen in a later epoch under a different shuffle.

    Data-parallel training: with ``num_ranks`` > 1, ``batch_size`` is per rank and
    each global batch of ``num_ranks * batch_size`` rows is cut into one slice per
    rank; rank ``rank`` gets its slice. Every rank must pass the same seed, so that
    the ranks see disjoint shards whose union, step by step, is exactly what one
    process with the global batch size would see.

    Arguments are checked when this is called, not on the first ``next()``.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)} labels")
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} is outside [0, {num_ranks})")
    global_batch = batch_size * num_ranks
    n_batches = batches_per_epoch(len(x), global_batch, drop_last)
    if n_batches == 0 and len(x) > 0:
        raise ValueError(
            f"batch_size={global_batch} exceeds the {len(x)} examples with drop_last=True, "
            f"so an epoch would have no batches"
        )
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    perm = rng.permutation(len(x))

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in range(n_batches):
            start = b * global_batch + rank * batch_size
            idx = perm[start : min(start + batch_size, len(x))]
            # Fancy indexing already copies; ascontiguousarray only guards odd inputs.
            yield np.ascontiguousarray(x[idx]), np.ascontiguousarray(y[idx])

    return generate()
