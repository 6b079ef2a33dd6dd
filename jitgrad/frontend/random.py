"""`jg.random`: JAX-style random numbers that work inside compiled programs.

A key is a uint32 array of shape (2,) (`key(seed)`, as `jax.random.PRNGKey`); every
sampler is a pure function of its key, so pass keys as arguments and derive new ones
with `split` and `fold_in` -- a key passed as an argument is an ordinary input, and a
new key never recompiles. Values match `jax.random` bit for bit (the Threefry-2x32
generator in JAX's default layout, see ops/random.py), except that `normal` may differ
in the last bit or two where libm's log1p does. Every function also runs eagerly on
numpy arrays.

    key = jg.random.key(0)
    k1, k2 = jg.random.split(key)
    w = jg.random.normal(k1, (784, 128)) * 0.05
    keep = jg.random.bernoulli(k2, 0.9, (32, 128))

numpy's own `np.random` inside a traced function runs once, while tracing, and its
values are frozen into the program: jitgrad warns about it (see random_guard.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ..errors import JitgradError
from .core import Tracer, cast, current_loc
from .ops import elementwise as E
from .ops import random as R

__all__ = ["bernoulli", "bits", "fold_in", "key", "normal", "randint", "split", "uniform"]

_U32 = np.dtype(np.uint32)


def _fail(fn: str, message: str) -> JitgradError:
    return JitgradError(f"jg.random.{fn}: {message} (at {current_loc()})")


def _key_arg(key: Any, fn: str) -> Any:
    """key as the primitives take it: a traced or concrete uint32[2] array."""
    if not isinstance(key, Tracer):
        key = np.asarray(key)
    if key.shape != R.KEY_SHAPE or key.dtype != _U32:
        raise _fail(fn, f"the key must be a uint32 array of shape (2,), as jg.random.key(seed) "
                        f"and jg.random.split make, got {key.dtype}{list(key.shape)}")
    return key


def _shape_arg(shape: Any, fn: str) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else shape
    try:
        dims = tuple(dims)
    except TypeError:
        dims = None
    if dims is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                               and d >= 0 for d in dims):
        raise _fail(fn, f"shape must be a tuple of non-negative integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def _dtype_arg(dtype: DTypeLike, kinds: str, fn: str) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise _fail(fn, f"{dtype!r} is not a dtype") from None
    if dt.kind not in kinds or dt.itemsize not in (1, 2, 4, 8) or dt == np.float16:
        want = {"u": "an unsigned integer", "f": "a float32 or float64", "iu": "an integer"}
        raise _fail(fn, f"dtype must be {want[kinds]} dtype, got {dt}")
    return dt


def _fits(fn: str, shape: tuple[int, ...], *params: Any) -> None:
    """JAX's rule: parameters broadcast to the requested shape, not beyond it."""
    shapes = [np.shape(p) for p in params]
    try:
        ok = np.broadcast_shapes(shape, *shapes) == shape
    except ValueError:
        ok = False
    if not ok:
        raise _fail(fn, f"parameters of shapes {', '.join(map(str, shapes))} do not broadcast "
                        f"to the shape {shape}")


# ---------------------------------------------------------------- keys

def key(seed: int) -> np.ndarray:
    """A key from an integer seed: its 64 bits as two uint32 words, high word first (as
    jax.random.PRNGKey with 64-bit seeds enabled; for 0 <= seed < 2**31 in any mode)."""
    if isinstance(seed, Tracer):
        raise _fail("key", "the seed must be a concrete integer; inside a traced function, "
                           "derive keys with jg.random.fold_in(key, i) from a key argument")
    value = seed.item() if isinstance(seed, np.ndarray) and seed.ndim == 0 else seed
    if (not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_))
            or not -2**63 <= int(value) < 2**64):
        raise _fail("key", f"the seed must be an integer in [-2**63, 2**64), got {seed!r}")
    bits = int(value) % 2**64
    return np.array([bits >> 32, bits & 0xFFFFFFFF], dtype=_U32)


def split(key: Any, num: int | Sequence[int] = 2) -> Any:
    """`num` new keys, as an array of shape (num, 2) (unpackable: `k1, k2 = split(key)`);
    a tuple num gives keys of shape (*num, 2)."""
    key = _key_arg(key, "split")
    shape = _shape_arg(num, "split")
    keys = R.random_split_p.bind(key, num=math.prod(shape))
    return keys if len(shape) == 1 else keys.reshape(*shape, 2)


def fold_in(key: Any, data: Any) -> Any:
    """A new key that is a function of key and the integer data (a step or layer number,
    traced or not; taken modulo 2**32)."""
    key = _key_arg(key, "fold_in")
    if isinstance(data, Tracer):
        if data.shape != () or data.dtype.kind not in "iu":
            raise _fail("fold_in", f"data must be an integer scalar, got "
                                   f"{data.dtype}{list(data.shape)}")
        data = data if data.dtype == _U32 else cast(data, _U32)
    else:
        arr = np.asarray(data)
        if arr.shape != () or arr.dtype.kind not in "iu":
            raise _fail("fold_in", f"data must be an integer scalar, got {data!r}")
        if isinstance(data, int) and not 0 <= data < 2**32:
            raise _fail("fold_in", f"data must be in [0, 2**32), got {data}")
        data = arr.astype(_U32)  # numpy integers wrap around, as jnp.asarray(d, 'uint32')
    return R.random_fold_in_p.bind(key, data)


# ---------------------------------------------------------------- samplers

def bits(key: Any, shape: Any = (), dtype: DTypeLike = np.uint32) -> Any:
    """Uniformly random unsigned integers (all bits random) of the given shape."""
    key = _key_arg(key, "bits")
    return R.random_bits_p.bind(key, shape=_shape_arg(shape, "bits"),
                                dtype=_dtype_arg(dtype, "u", "bits"))


def _as(x: Any, dtype: np.dtype) -> Any:
    """x converted to dtype: a cast for traced values, a numpy array otherwise."""
    if isinstance(x, Tracer):
        return x if x.dtype == dtype else cast(x, dtype)
    return np.asarray(x).astype(dtype)


def uniform(key: Any, shape: Any = (), dtype: DTypeLike = np.float32, minval: Any = 0.0,
            maxval: Any = 1.0) -> Any:
    """Floats uniform in [minval, maxval) (bounds broadcast to shape)."""
    key = _key_arg(key, "uniform")
    shape = _shape_arg(shape, "uniform")
    dtype = _dtype_arg(dtype, "f", "uniform")
    lo, hi = _as(minval, dtype), _as(maxval, dtype)
    _fits("uniform", shape, lo, hi)
    unit = R.random_uniform_p.bind(key, shape=shape, dtype=dtype)
    if not any(isinstance(b, Tracer) for b in (lo, hi)) and np.all(lo == 0) and np.all(hi == 1):
        return unit  # max(0, u * 1 + 0) is u, bit for bit
    return E.maximum(lo, unit * (hi - lo) + lo)


def normal(key: Any, shape: Any = (), dtype: DTypeLike = np.float32) -> Any:
    """Standard normal floats: sqrt(2) * erf_inv(u), u uniform in (-1, 1), as JAX."""
    dtype = _dtype_arg(dtype, "f", "normal")
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype))
    u = uniform(key, shape, dtype, lo, 1.0)
    return np.array(np.sqrt(2.0), dtype) * R.erf_inv(u)


def _probability(p: Any) -> Any:
    if isinstance(p, Tracer):
        if p.dtype.kind != "f":
            raise _fail("bernoulli", f"p must be a float, got a traced {p.dtype}")
        return p
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return np.asarray(p, np.float32)  # a Python number: JAX's default float
    arr = np.asarray(p)
    if arr.dtype.kind != "f":
        raise _fail("bernoulli", f"p must be a float or float array, got {arr.dtype}")
    return arr


def bernoulli(key: Any, p: Any = 0.5, shape: Any = None) -> Any:
    """Booleans that are True with probability p (broadcast to shape; default p's shape)."""
    key = _key_arg(key, "bernoulli")
    p = _probability(p)
    shape = np.shape(p) if shape is None else _shape_arg(shape, "bernoulli")
    _fits("bernoulli", shape, p)
    return uniform(key, shape, p.dtype) < p


def _bound(x: Any, dtype: np.dtype) -> tuple[Any, Any]:
    """(x in dtype, whether x exceeds dtype's maximum): concrete bounds are clipped to
    dtype's range, as JAX's randint does; traced ones are cast."""
    if isinstance(x, Tracer):
        if x.dtype.kind not in "iu":
            raise _fail("randint", f"bounds must be integers, got a traced {x.dtype}")
        return _as(x, dtype), False
    arr = np.asarray(x)
    if arr.dtype.kind not in "iub":
        raise _fail("randint", f"bounds must be integers, got {arr.dtype}")
    info = np.iinfo(dtype)
    wide = arr.astype(object)  # exact comparisons, whatever the two dtypes
    return (np.asarray(np.clip(wide, info.min, info.max)).astype(dtype),
            np.asarray(wide > info.max, bool))


def randint(key: Any, shape: Any, minval: Any, maxval: Any, dtype: DTypeLike = np.int32) -> Any:
    """Integers uniform in [minval, maxval) (bounds broadcast to shape; minval where
    maxval <= minval), as jax.random.randint: (hi * 2**bits + lo) mod span from two draws."""
    key = _key_arg(key, "randint")
    shape = _shape_arg(shape, "randint")
    dtype = _dtype_arg(dtype, "iu", "randint")
    unsigned = np.dtype(f"u{dtype.itemsize}")
    lo, _ = _bound(minval, dtype)
    hi, hi_too_big = _bound(maxval, dtype)
    _fits("randint", shape, lo, hi)
    k1, k2 = split(key)
    higher, lower = bits(k1, shape, unsigned), bits(k2, shape, unsigned)
    if isinstance(lo, Tracer) or isinstance(hi, Tracer):
        span = E.where(hi <= lo, 1, _as(hi - lo, unsigned))
        if np.any(hi_too_big):  # a concrete maxval past dtype's range (see below)
            span = E.where(hi_too_big & (hi > lo), span + 1, span)
    else:
        with np.errstate(over="ignore"):  # the difference wraps around, as JAX's
            span = np.where(hi <= lo, 1, np.subtract(hi, lo, dtype=dtype).astype(unsigned))
            # a maxval past dtype's range stands for one more value (2**bits wraps to 0)
            span = np.where(hi_too_big & (hi > lo), span + unsigned.type(1), span)
        span = span.astype(unsigned)
    offset = R.randint_offset_p.bind(higher, lower, span)
    return lo + _as(offset, dtype)
