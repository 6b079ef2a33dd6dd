"""Reductions over axes: sum, max, argmax, max_argmax (two outputs, one pass), logsumexp."""

from __future__ import annotations

import builtins
import dataclasses
from typing import Any

import numpy as np

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, WIDE_INTS, Kernel
from ...errors import JitgradError
from ..core import Tracer, cast_p, emit_like, primitive
from ..ir import Var
from . import elementwise as E
from . import shape as S


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise JitgradError(f"axis {a} is out of range for an array of {ndim} dimensions")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise JitgradError(f"repeated axis in {axis}")
    return tuple(sorted(out))


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def _expand_back(g: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """g reshaped to the keepdims shape of a reduction of `shape` over `axes`."""
    return S.reshape(g, reduced_shape(shape, axes, True))


# ---------------------------------------------------------------- sum

sum_p = primitive("sum", "reduce")
sum_p.sums_in_producer = True  # sum(W * W) in the loop computing W * W (compiler/fusion.py)
sum_p.def_impl(lambda x, *, axes, keepdims: np.sum(x, axis=axes, keepdims=keepdims))
sum_p.def_shape(lambda x, *, axes, keepdims: (reduced_shape(x[0], axes, keepdims), x[1]))


@sum_p.def_vjp
def _sum_vjp(cts, outs, ins, *, axes, keepdims):
    return [S.broadcast_to(_expand_back(cts[0], ins[0].shape, axes), ins[0].shape)]


def sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Sum over axes (numpy semantics; booleans sum to int64)."""
    x = _as_array(x)
    if x.dtype == np.dtype(bool):
        x = E.cast(x, np.int64)
    return sum_p.bind(x, axes=normalize_axes(axis, x.ndim), keepdims=bool(keepdims))


def mean(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    x = _as_array(x)
    if x.dtype.kind != "f":
        x = E.cast(x, np.float64)
    axes = normalize_axes(axis, x.ndim)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    return E.mul(sum(x, axes, keepdims), 1.0 / (count or 1))


# ---------------------------------------------------------------- max

def _nonempty(x, axes):
    if any(x[0][a] == 0 for a in axes):
        raise JitgradError(f"cannot take the max over an empty axis of shape {x[0]}")


max_p = primitive("max", "reduce")
max_p.def_impl(lambda x, *, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims))


@max_p.def_shape
def _max_shape(x, *, axes, keepdims):
    _nonempty(x, axes)
    return reduced_shape(x[0], axes, keepdims), x[1]


@max_p.def_vjp
def _max_vjp(cts, outs, ins, *, axes, keepdims):
    x = ins[0]
    y = _expand_back(outs[0], x.shape, axes)
    mask = E.cast(E.eq(x, y), x.dtype)
    count = sum(mask, axes, keepdims=True)  # ties share the gradient evenly
    return [mask * (_expand_back(cts[0], x.shape, axes) / count)]


def max(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    x = _as_array(x)
    return max_p.bind(x, axes=normalize_axes(axis, x.ndim), keepdims=bool(keepdims))


def _single_axis(x: Any, axis: int) -> int:
    if x.ndim == 0:
        raise JitgradError("argmax of a 0-d array")
    return normalize_axes(axis, x.ndim)[0]


argmax_p = primitive("argmax", "reduce", grad="zero")
argmax_p.def_impl(lambda x, *, axis: np.argmax(x, axis=axis))


@argmax_p.def_shape
def _argmax_shape(x, *, axis):
    _nonempty(x, (axis,))
    return reduced_shape(x[0], (axis,), False), np.int64


def argmax(x: Any, axis: int | None = -1) -> Any:
    """Index of the first maximum along axis (int64, never differentiated); axis=None
    indexes the flattened array, as numpy does."""
    x = _as_array(x)
    if axis is None:
        x, axis = S.reshape(x, (-1,)), 0
    return argmax_p.bind(x, axis=_single_axis(x, axis))


max_argmax_p = primitive("max_argmax", "reduce", n_outputs=2)


@max_argmax_p.def_impl
def _max_argmax_impl(x, *, axis):
    idx = np.argmax(x, axis=axis)
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis).squeeze(axis), idx


@max_argmax_p.def_shape
def _max_argmax_shape(x, *, axis):
    _nonempty(x, (axis,))
    shape = reduced_shape(x[0], (axis,), False)
    return [(shape, x[1]), (shape, np.int64)]


@max_argmax_p.def_vjp
def _max_argmax_vjp(cts, outs, ins, *, axis):
    # The values are x at the returned indices, so the gradient goes to those only.
    x = ins[0]
    idx = _expand_back(outs[1], x.shape, (axis,))
    g = _expand_back(cts[0], x.shape, (axis,))
    return [S.scatter_along_axis(g, idx, x.shape, axis)]


def max_argmax(x: Any, axis: int | None = -1) -> tuple[Any, Any]:
    """(max, argmax) along axis, computed in one pass over memory (axis=None: flattened)."""
    x = _as_array(x)
    if axis is None:
        x, axis = S.reshape(x, (-1,)), 0
    return max_argmax_p.bind(x, axis=_single_axis(x, axis))


# ---------------------------------------------------------------- logsumexp

logsumexp_p = primitive("logsumexp", "reduce")


@logsumexp_p.def_impl
def _logsumexp_impl(x, *, axes, keepdims):
    m = np.max(x, axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=axes, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axes)


@logsumexp_p.def_shape
def _logsumexp_shape(x, *, axes, keepdims):
    if x[1].kind != "f":
        raise JitgradError(f"expects a float input, got {x[1]}")
    return reduced_shape(x[0], axes, keepdims), x[1]


@logsumexp_p.def_vjp
def _logsumexp_vjp(cts, outs, ins, *, axes, keepdims):
    x = ins[0]
    y = _expand_back(outs[0], x.shape, axes)
    return [_expand_back(cts[0], x.shape, axes) * E.exp(x - y)]


def logsumexp(x: Any, axis: Any = -1, keepdims: bool = False) -> Any:
    """log(sum(exp(x))) along axes, computed stably."""
    x = E.asdtype(x, E._float_dtype(x))
    return logsumexp_p.bind(x, axes=normalize_axes(axis, x.ndim), keepdims=bool(keepdims))


# ---------------------------------------------------------------- compiling

# Kernels reduce an (outer, n, inner) view over its middle axis: `prepare` makes every
# reduction's axes contiguous, and widens bool and narrow integers to int64 (integer sums
# wrap around the same whatever the width, so casting back gives numpy's result).

@njit(cache=True)
def reduce_sum(x, y, acc):
    # Accumulate in float64 whatever the dtype: a float32 running sum over millions of
    # terms (a weight-decay term) drifts by ~0.1%. acc (inner float64s) is scratch in the
    # arena: kernels allocate nothing.
    outer, n, inner = x.shape
    if inner == 1:
        for o in range(outer):
            # eight partial sums let LLVM vectorise without reassociating one accumulator
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            k = 0
            while k + 8 <= n:
                a0 += x[o, k, 0]
                a1 += x[o, k + 1, 0]
                a2 += x[o, k + 2, 0]
                a3 += x[o, k + 3, 0]
                a4 += x[o, k + 4, 0]
                a5 += x[o, k + 5, 0]
                a6 += x[o, k + 6, 0]
                a7 += x[o, k + 7, 0]
                k += 8
            total = 0.0
            while k < n:
                total += x[o, k, 0]
                k += 1
            y[o, 0] = total + (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
        return
    for o in range(outer):
        acc[:] = 0.0
        for k in range(n):  # row by row: contiguous, vectorised over the columns
            for i in range(inner):
                acc[i] += x[o, k, i]
        for i in range(inner):
            y[o, i] = acc[i]


@njit(cache=True)
def reduce_sum_int(x, y):
    # 64-bit integers sum exactly (wrapping around as numpy's do): no float accumulator
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = 0
        for k in range(n):
            for i in range(inner):
                y[o, i] += x[o, k, i]


@njit(cache=True)
def reduce_max(x, y, idx):
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = x[o, 0, i]
            idx[o, i] = 0
        for k in range(1, n):
            for i in range(inner):
                v = x[o, k, i]
                # NaN wins, as in numpy's max/argmax
                if v > y[o, i] or (v != v and y[o, i] == y[o, i]):
                    y[o, i] = v
                    idx[o, i] = k


@njit(cache=True)
def reduce_logsumexp(x, y, m):
    # m (inner values of x's dtype): the running maxima, scratch in the arena
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            m[i] = x[o, 0, i]
            y[o, i] = 0
        for k in range(1, n):
            for i in range(inner):
                if x[o, k, i] > m[i]:
                    m[i] = x[o, k, i]
        for i in range(inner):
            if not np.isfinite(m[i]):
                m[i] = 0
        for k in range(n):
            for i in range(inner):
                y[o, i] += np.exp(x[o, k, i] - m[i])
        for i in range(inner):
            y[o, i] = np.log(y[o, i]) + m[i]


_VIEW = "carray(_vp(px), (outer, n, inner), {dt}), carray(_vp(py), (outer, inner), {dt})"
SUM = Kernel("sum", "px py pacc outer n inner", (
    f"K.reduce_sum({_VIEW}, carray(_vp(pacc), max(inner, 1), np.float64))\nreturn 0"), FLOATS)
SUM_INT = Kernel("sum", "px py outer n inner", f"K.reduce_sum_int({_VIEW})\nreturn 0",
                 WIDE_INTS)
# reduce_max compares; for integers NaN never occurs
MAX = Kernel("max", "px py pi outer n inner", (
    f"K.reduce_max({_VIEW}, carray(_vp(pi), (outer, inner), np.int64))\nreturn 0"),
    {**FLOATS, **WIDE_INTS})
LOGSUMEXP = Kernel("logsumexp", "px py pm outer n inner", (
    f"K.reduce_logsumexp({_VIEW}, carray(_vp(pm), max(inner, 1), {{dt}}))\nreturn 0"), FLOATS)

_WIDE = (np.dtype(np.int64), np.dtype(np.uint64))


def _prepare_reduction(ins, out) -> None:
    casts_back = []
    x = ins.inputs[0]
    if x.dtype.kind in "biu" and x.dtype not in _WIDE:
        wide = emit_like(out, cast_p, (x,), ins, dtype=np.dtype(np.int64))
        avals = ins.prim.abstract_eval([(wide.shape, wide.dtype)], ins.kw)
        outputs = [old if d == old.dtype else Var(s, d)
                   for (s, d), old in zip(avals, ins.outputs, strict=True)]
        casts_back = [dataclasses.replace(ins, prim=cast_p, inputs=(new,),
                                          params=(("dtype", old.dtype),), outputs=(old,))
                      for new, old in zip(outputs, ins.outputs, strict=True) if new is not old]
        ins = dataclasses.replace(ins, inputs=(wide,), outputs=tuple(outputs))
        x = wide
    axes = ins.kw.get("axes")
    if axes and axes != tuple(range(axes[0], axes[-1] + 1)):
        rest = tuple(a for a in range(x.ndim) if a not in axes)
        moved = emit_like(out, S.transpose_p, (x,), ins, perm=rest + axes)
        red = emit_like(out, ins.prim, (moved,), ins, axes=tuple(range(len(rest), x.ndim)),
                        keepdims=False)
        out.append(dataclasses.replace(ins, prim=S.reshape_p, inputs=(red,),
                                       params=(("shape", ins.outputs[0].shape),)))
    else:
        out.append(ins)
    out.extend(casts_back)


def _reduce_dims(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int]:
    if not axes:
        return S.prod(shape), 1, 1
    first, last = axes[0], axes[-1]
    return S.prod(shape[:first]), S.prod(shape[first:last + 1]), S.prod(shape[last + 1:])


@sum_p.def_lowering
def _lower_sum(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    dims = _reduce_dims(x.shape, ins.kw["axes"])
    if x.dtype.kind != "f":  # 64-bit integers sum exactly: no running sum
        _plain_reduction(SUM_INT)(low, ins)
        return
    # a float64 running sum per column (scratch in the arena, which the planner frees at
    # once: kernels allocate nothing)
    acc = Var((builtins.max(dims[2], 1),), np.dtype(np.float64))
    low.call(SUM, x.dtype, [x, y, acc, *dims], [y, acc], [x], ins)


@max_p.def_lowering
def _lower_max(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    idx = Var(y.shape, np.dtype(np.int64))  # the positions: scratch
    low.call(MAX, x.dtype, [x, y, idx, *_reduce_dims(x.shape, ins.kw["axes"])], [y, idx], [x],
             ins)


@logsumexp_p.def_lowering
def _lower_logsumexp(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    dims = _reduce_dims(x.shape, ins.kw["axes"])
    running_max = Var((builtins.max(dims[2], 1),), x.dtype)  # scratch
    low.call(LOGSUMEXP, x.dtype, [x, y, running_max, *dims], [y, running_max], [x], ins)


def _lower_argmax(low, ins) -> None:
    x = ins.inputs[0]
    if len(ins.outputs) == 2:
        y, idx = ins.outputs
    else:  # argmax alone: the maxima go to a scratch buffer the planner frees at once
        idx = ins.outputs[0]
        y = Var(idx.shape, x.dtype)
    dims = _reduce_dims(x.shape, (ins.kw["axis"],))
    low.call(MAX, x.dtype, [x, y, idx, *dims], [y, idx], [x], ins)


for _p in (sum_p, max_p, argmax_p, max_argmax_p, logsumexp_p):
    _p.def_prepare(_prepare_reduction)
argmax_p.def_lowering(_lower_argmax)
max_argmax_p.def_lowering(_lower_argmax)



# ================================================================ numpy surface (issue 16)
# prod, min and cumsum are primitives (a kernel each); var, std and average compose them.

# ---------------------------------------------------------------- prod

prod_p = primitive("prod", "reduce")
prod_p.def_impl(lambda x, *, axes, keepdims: np.prod(x, axis=axes, keepdims=keepdims))
prod_p.def_shape(lambda x, *, axes, keepdims: (reduced_shape(x[0], axes, keepdims), x[1]))


@prod_p.def_vjp
def _prod_vjp(cts, outs, ins, *, axes, keepdims):
    # d prod / d x_i is the product of the others, computed without dividing by x_i (which
    # may be zero) as the product of the entries before i times that of the entries after:
    # scans of multiplications, whose own VJPs keep every order exact.
    x = ins[0]
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    moved = S.transpose(x, rest + axes)
    lines = S.reshape(moved, moved.shape[:len(rest)] + (_count(x.shape, axes),))
    others = S.reshape(_exclusive_products(lines), moved.shape)
    others = S.transpose(others, tuple(int(i) for i in np.argsort(rest + axes)))
    return [_expand_back(cts[0], x.shape, axes) * others]


def _exclusive_products(x: Any) -> Any:
    """prod_{j != i} x[..., j] for every i along the last axis, in O(n log n) multiplies."""
    n = x.shape[-1]

    def shifted(v: Any, d: int) -> Any:  # v moved d places along the last axis, 1s in front
        ones = np.ones(v.shape[:-1] + (builtins.min(d, n),), v.dtype)
        if d >= n:
            return ones
        return S.concatenate([ones, S.getitem(v, (Ellipsis, slice(0, n - d)))], axis=-1)

    def prefix(v: Any) -> Any:  # inclusive running product (Hillis-Steele scan)
        d = 1
        while d < n:
            v = v * shifted(v, d)
            d *= 2
        return v

    backwards = (Ellipsis, slice(None, None, -1))
    before = prefix(shifted(x, 1))
    after = S.getitem(prefix(shifted(S.getitem(x, backwards), 1)), backwards)
    return before * after


def prod(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    """Product over axes (numpy semantics; booleans and integers multiply as int64)."""
    x = _as_array(x)
    if x.dtype.kind in "biu" and x.dtype not in _WIDE:
        x = E.cast(x, np.int64)
    return prod_p.bind(x, axes=normalize_axes(axis, x.ndim), keepdims=bool(keepdims))


@njit(cache=True)
def reduce_prod(x, y):
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = 1
        for k in range(n):  # row by row: contiguous, vectorised over the columns
            for i in range(inner):
                y[o, i] *= x[o, k, i]


PROD = Kernel("prod", "px py outer n inner", f"K.reduce_prod({_VIEW})\nreturn 0",
              {**FLOATS, **WIDE_INTS})


def _plain_reduction(kernel: Kernel):
    """The lowering of a reduction whose kernel needs no scratch: (x, y, outer, n, inner)."""
    def lower(low, ins) -> None:
        x, y = ins.inputs[0], ins.outputs[0]
        low.call(kernel, x.dtype, [x, y, *_reduce_dims(x.shape, ins.kw["axes"])], [y], [x],
                 ins)
    return lower


prod_p.def_lowering(_plain_reduction(PROD))


# ---------------------------------------------------------------- min

min_p = primitive("min", "reduce")
min_p.def_impl(lambda x, *, axes, keepdims: np.min(x, axis=axes, keepdims=keepdims))


@min_p.def_shape
def _min_shape(x, *, axes, keepdims):
    if any(x[0][a] == 0 for a in axes):
        raise JitgradError(f"cannot take the min over an empty axis of shape {x[0]}")
    return reduced_shape(x[0], axes, keepdims), x[1]


min_p.def_vjp(_max_vjp)  # ties share the gradient evenly, as for max


def min(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
    x = _as_array(x)
    return min_p.bind(x, axes=normalize_axes(axis, x.ndim), keepdims=bool(keepdims))


@njit(cache=True)
def reduce_min(x, y):
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = x[o, 0, i]
        for k in range(1, n):
            for i in range(inner):
                v = x[o, k, i]
                if v < y[o, i] or v != v:  # NaN wins, as in numpy's min
                    y[o, i] = v


MIN = Kernel("min", "px py outer n inner", f"K.reduce_min({_VIEW})\nreturn 0",
             {**FLOATS, **WIDE_INTS})
min_p.def_lowering(_plain_reduction(MIN))


for _p in (prod_p, min_p):
    _p.def_prepare(_prepare_reduction)


# ---------------------------------------------------------------- cumsum

cumsum_p = primitive("cumsum", "reduce")
cumsum_p.def_impl(lambda x, *, axis, reverse: (
    np.flip(np.cumsum(np.flip(x, axis), axis=axis), axis) if reverse
    else np.cumsum(x, axis=axis)))
cumsum_p.def_shape(lambda x, *, axis, reverse: x)
# the adjoint of a running sum is the running sum from the other end
cumsum_p.def_vjp(lambda cts, outs, ins, *, axis, reverse: [
    cumsum_p.bind(cts[0], axis=axis, reverse=not reverse)])


def cumsum(x: Any, axis: int | None = None) -> Any:
    """Running sum along axis (None: of the flattened array), numpy's cumsum."""
    x = _as_array(x)
    if axis is None:
        x, axis = S.reshape(x, (-1,)), 0
    if x.ndim == 0:
        x = S.reshape(x, (1,))
    if x.dtype.kind in "biu" and x.dtype not in _WIDE:
        x = E.cast(x, np.int64)
    return cumsum_p.bind(x, axis=_single_axis(x, axis), reverse=False)


@njit(cache=True)
def scan_sum(x, y, reverse):
    outer, n, inner = x.shape
    for o in range(outer):
        for j in range(n):
            k = n - 1 - j if reverse else j
            prev = k + 1 if reverse else k - 1
            for i in range(inner):
                y[o, k, i] = x[o, k, i] + (y[o, prev, i] if j else 0)


CUMSUM = Kernel("cumsum", "px py outer n inner reverse", (
    "K.scan_sum(carray(_vp(px), (outer, n, inner), {dt}), "
    "carray(_vp(py), (outer, n, inner), {dt}), reverse)\nreturn 0"), {**FLOATS, **WIDE_INTS})


@cumsum_p.def_lowering
def _lower_cumsum(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    dims = _reduce_dims(x.shape, (ins.kw["axis"],))
    low.call(CUMSUM, x.dtype, [x, y, *dims, int(ins.kw["reverse"])], [y], [x], ins)


# ---------------------------------------------------------------- compositions

def _count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    return int(np.prod([shape[a] for a in axes], dtype=np.int64))


def var(x: Any, axis: Any = None, ddof: int = 0, keepdims: bool = False) -> Any:
    """Variance over axes, divided by n - ddof (numpy's var)."""
    x = _as_array(x)
    if x.dtype.kind != "f":
        x = E.cast(x, np.float64)
    axes = normalize_axes(axis, x.ndim)
    centred = x - mean(x, axes, keepdims=True)
    dof = _count(x.shape, axes) - ddof
    return E.mul(sum(centred * centred, axes, keepdims), 1.0 / dof if dof > 0 else np.inf)


def std(x: Any, axis: Any = None, ddof: int = 0, keepdims: bool = False) -> Any:
    return E.sqrt(var(x, axis, ddof, keepdims))


def average(x: Any, axis: Any = None, weights: Any = None, returned: bool = False,
            keepdims: bool = False) -> Any:
    """numpy's average: sum(x * w) / sum(w) over axis; 1-d weights lie along one axis."""
    x = _as_array(x)
    if weights is None:
        avg = mean(x, axis, keepdims)
        if not returned:
            return avg
        axes = normalize_axes(axis, x.ndim)
        return avg, E.asdtype(np.full(np.shape(avg), _count(x.shape, axes)), avg.dtype)
    w = _as_array(weights)
    if x.dtype.kind != "f":
        x = E.cast(x, np.float64)
    if w.shape != x.shape:
        if axis is None or not isinstance(axis, (int, np.integer)):
            raise JitgradError(f"average: weights of shape {w.shape} differ from the array's "
                               f"{x.shape}; give the one axis they lie along")
        ax = normalize_axes(axis, x.ndim)[0]
        if w.shape != (x.shape[ax],):
            raise JitgradError(f"average: weights of shape {w.shape} do not match axis {axis} "
                               f"of an array of shape {x.shape}")
        w = S.reshape(w, tuple(x.shape[ax] if i == ax else 1 for i in range(x.ndim)))
    x, w = E.promote(x, w)
    total = sum(S.broadcast_to(w, x.shape), axis, keepdims)
    avg = sum(x * w, axis, keepdims) / total
    return (avg, total) if returned else avg
