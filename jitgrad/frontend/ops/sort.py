"""Sorting: argsort is a primitive (stable, NaN last, as numpy's kind="stable"); sort and
partition gather through the permutation, so their gradient is the scatter of the
cotangent back to where each element came from (take_along_axis's VJP)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, WIDE_INTS, Kernel
from ...errors import JitgradError
from ..core import Tracer, primitive
from ..ir import Var
from . import elementwise as E
from . import shape as S

argsort_p = primitive("argsort", "sort", grad="zero")
argsort_p.def_impl(lambda x, *, axis: np.argsort(x, axis=axis, kind="stable"))


@argsort_p.def_shape
def _argsort_shape(x, *, axis):
    if x[1].kind not in "fiu":
        raise JitgradError(f"sorts floats and 64-bit integers, not {x[1]}")
    return x[0], np.int64


def _sortable(x: Any, axis: int | None) -> tuple[Any, int]:
    x = x if isinstance(x, Tracer) else np.asarray(x)
    if axis is None:
        x, axis = S.reshape(x, (-1,)), 0
    if x.ndim == 0:
        raise JitgradError("cannot sort a 0-d array")
    if not -x.ndim <= axis < x.ndim:
        raise JitgradError(f"axis {axis} is out of range for {x.ndim} dimensions")
    if x.dtype.kind in "bui" and x.dtype not in (np.dtype(np.int64), np.dtype(np.uint64)):
        x = E.cast(x, np.int64)  # widening keeps the order
    return x, int(axis) % x.ndim


def argsort(x: Any, axis: int | None = -1, kind: Any = None, order: Any = None) -> Any:
    """Indices that sort x along axis (stable; NaN sorts last; never differentiated)."""
    if order is not None:
        raise JitgradError("argsort(order=...) sorts structured arrays, which jitgrad has not")
    x, axis = _sortable(x, axis)
    return argsort_p.bind(x, axis=axis)


def sort(x: Any, axis: int | None = -1, kind: Any = None, order: Any = None) -> Any:
    """x sorted along axis; its gradient flows back through the permutation."""
    x, axis = _sortable(x, axis)
    return S.take_along_axis(x, argsort(x, axis, kind, order), axis)


def partition(x: Any, kth: Any, axis: int | None = -1, kind: Any = None,
              order: Any = None) -> Any:
    """A partition around kth: entries before each kth position are no larger, those after
    no smaller. numpy leaves their order within each side unspecified; jitgrad returns them
    sorted (O(n log n), not numpy's O(n) selection)."""
    xs, ax = _sortable(x, axis)
    n = xs.shape[ax]
    for k in np.atleast_1d(kth):
        if not -n <= int(k) < n:
            raise JitgradError(f"kth {int(k)} is out of bounds for an axis of size {n}")
    return sort(xs, ax, kind, order)


@njit(inline="always", cache=True)
def _before(a, b):
    """a sorts strictly before b: NaN after every number, as numpy sorts."""
    return a < b or (b != b and a == a)


@njit(cache=True)
def argsort_stable(x, y, idx, tmp):
    """Bottom-up merge sort of each (outer, :, inner) line's indices; idx and tmp (n int64
    each) are scratch in the arena."""
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            for k in range(n):
                idx[k] = k
            src, dst = idx, tmp
            width = 1
            while width < n:
                for lo in range(0, n, 2 * width):
                    mid = min(lo + width, n)
                    hi = min(lo + 2 * width, n)
                    a, b, t = lo, mid, lo
                    while a < mid and b < hi:
                        if _before(x[o, src[b], i], x[o, src[a], i]):  # ties keep order
                            dst[t] = src[b]
                            b += 1
                        else:
                            dst[t] = src[a]
                            a += 1
                        t += 1
                    while a < mid:
                        dst[t] = src[a]
                        a += 1
                        t += 1
                    while b < hi:
                        dst[t] = src[b]
                        b += 1
                        t += 1
                src, dst = dst, src
                width *= 2
            for k in range(n):
                y[o, k, i] = src[k]


ARGSORT = Kernel("argsort", "px py pi pt outer n inner", (
    "K.argsort_stable(carray(_vp(px), (outer, n, inner), {dt}), "
    "carray(_vp(py), (outer, n, inner), np.int64), carray(_vp(pi), max(n, 1), np.int64), "
    "carray(_vp(pt), max(n, 1), np.int64))\nreturn 0"), {**FLOATS, **WIDE_INTS})


@argsort_p.def_lowering
def _lower_argsort(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    axis = ins.kw["axis"]
    n = x.shape[axis]
    scratch = [Var((max(n, 1),), np.dtype(np.int64)) for _ in range(2)]
    low.call(ARGSORT, x.dtype, [x, y, *scratch, S.prod(x.shape[:axis]), n,
                                S.prod(x.shape[axis + 1:])], [y, *scratch], [x], ins)
