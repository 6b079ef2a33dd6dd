"""Shape primitives: reshape, transpose, broadcast_to, concatenate, slicing and gathers.

Each gather has a scatter-add as its VJP, and each scatter-add a gather, so
indexing stays differentiable to any order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, ITEM_SIZES, Kernel
from ...compiler.threads import PARALLEL_MIN
from ...errors import JitgradError
from ..core import Tracer, primitive


def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


# ---------------------------------------------------------------- reshape / transpose

reshape_p = primitive("reshape", "shape")
reshape_p.def_impl(lambda x, *, shape: np.reshape(x, shape))


@reshape_p.def_shape
def _reshape_shape(x, *, shape):
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(x[0], dtype=np.int64)):
        raise JitgradError(f"cannot reshape an array of shape {x[0]} into shape {shape}")
    return shape, x[1]


reshape_p.def_vjp(lambda cts, outs, ins, *, shape: [reshape(cts[0], ins[0].shape)])


def reshape(x: Any, shape: Any) -> Any:
    x = _as_array(x)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(d) for d in shape)
    if shape.count(-1) > 1:
        raise JitgradError(f"reshape to {shape}: at most one -1 is allowed")
    if -1 in shape:
        known = int(np.prod([d for d in shape if d != -1], dtype=np.int64))
        if known == 0 or x.size % known:
            raise JitgradError(f"cannot reshape an array of shape {x.shape} into shape {shape}")
        shape = tuple(x.size // known if d == -1 else d for d in shape)
    if shape == x.shape:
        return x
    return reshape_p.bind(x, shape=shape)


transpose_p = primitive("transpose", "shape")
transpose_p.def_impl(lambda x, *, perm: np.transpose(x, perm))
transpose_p.def_shape(lambda x, *, perm: (tuple(x[0][p] for p in perm), x[1]))
transpose_p.def_vjp(lambda cts, outs, ins, *, perm: [
    transpose(cts[0], tuple(int(i) for i in np.argsort(perm)))])


def transpose(x: Any, axes: Any = None) -> Any:
    x = _as_array(x)
    perm = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) % max(x.ndim, 1)
                                                                     for a in axes)
    if sorted(perm) != list(range(x.ndim)):
        raise JitgradError(f"axes {axes} are not a permutation of {x.ndim} dimensions")
    if perm == tuple(range(x.ndim)):
        return x
    return transpose_p.bind(x, perm=perm)


# ---------------------------------------------------------------- broadcast_to

broadcast_to_p = primitive("broadcast_to", "shape")
broadcast_to_p.def_impl(lambda x, *, shape: np.broadcast_to(x, shape).copy())


@broadcast_to_p.def_shape
def _broadcast_to_shape(x, *, shape):
    try:
        np.broadcast_shapes(x[0], shape)
        ok = np.broadcast_shapes(x[0], shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise JitgradError(f"cannot broadcast shape {x[0]} to {shape}")
    return shape, x[1]


@broadcast_to_p.def_vjp
def _broadcast_to_vjp(cts, outs, ins, *, shape):
    from .elementwise import unbroadcast
    return [unbroadcast(cts[0], ins[0].shape)]


def broadcast_to(x: Any, shape: Any) -> Any:
    x = _as_array(x)
    shape = tuple(int(d) for d in shape)
    return x if x.shape == shape else broadcast_to_p.bind(x, shape=shape)


# ---------------------------------------------------------------- concatenate

concatenate_p = primitive("concatenate", "shape")
concatenate_p.def_impl(lambda *xs, axis: np.concatenate(xs, axis=axis))


@concatenate_p.def_shape
def _concatenate_shape(*xs, axis):
    first = xs[0][0]
    for s, d in xs:
        if d != xs[0][1]:
            raise JitgradError(f"cannot concatenate dtypes {xs[0][1]} and {d}")
        if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first))
                                       if i != axis):
            raise JitgradError(
                f"shapes {[x[0] for x in xs]} differ outside the concatenation axis {axis}")
    return (first[:axis] + (int(np.sum([s[axis] for s, _ in xs])),) + first[axis + 1:],
            xs[0][1])


@concatenate_p.def_vjp
def _concatenate_vjp(cts, outs, ins, *, axis):
    grads, start = [], 0
    for x in ins:
        stop = start + x.shape[axis]
        index = tuple((start, stop, 1) if i == axis else (0, d, 1)
                      for i, d in enumerate(outs[0].shape))
        grads.append(slice_p.bind(cts[0], index=index))
        start = stop
    return grads


def concatenate(xs: Any, axis: int = 0) -> Any:
    from .elementwise import promote
    xs = promote(*xs)
    if not xs:
        raise JitgradError("concatenate needs at least one array")
    ndim = xs[0].ndim
    if not -ndim <= axis < ndim:
        raise JitgradError(f"axis {axis} is out of range for {ndim} dimensions")
    return concatenate_p.bind(*xs, axis=axis % ndim)


# ---------------------------------------------------------------- basic slicing

def _slices(index):
    return tuple(slice(a, None if b < 0 else b, c) for a, b, c in index)


def _sliced_len(start: int, stop: int, step: int) -> int:
    return len(range(start, stop, step))


slice_p = primitive("slice", "shape")
slice_p.def_impl(lambda x, *, index: x[_slices(index)])
slice_p.def_shape(lambda x, *, index: (tuple(_sliced_len(*t) for t in index), x[1]))
slice_p.def_vjp(lambda cts, outs, ins, *, index: [
    pad_slice_p.bind(cts[0], shape=ins[0].shape, index=index)])


pad_slice_p = primitive("pad_slice", "shape")


@pad_slice_p.def_impl
def _pad_slice_impl(g, *, shape, index):
    out = np.zeros(shape, g.dtype)
    out[_slices(index)] = g
    return out


@pad_slice_p.def_shape
def _pad_slice_shape(g, *, shape, index):
    if tuple(_sliced_len(*t) for t in index) != g[0]:
        raise JitgradError(f"slice {index} of {shape} does not have shape {g[0]}")
    return shape, g[1]


pad_slice_p.def_vjp(lambda cts, outs, ins, *, shape, index: [slice_p.bind(cts[0], index=index)])


# ---------------------------------------------------------------- gathers

def _check_int(idx, what):
    if idx[1].kind not in "iu":
        raise JitgradError(f"{what} indices must be integers, got {idx[1]}")


def _check_bounds(idx: np.ndarray, n: int) -> None:
    if idx.size and (idx.min() < -n or idx.max() >= n):
        bad = idx[(idx < -n) | (idx >= n)].flat[0]
        raise JitgradError(f"index {bad} is out of bounds for an axis of size {n}")


gather_p = primitive("gather", "shape", index_inputs=(1,))


@gather_p.def_impl
def _gather_impl(x, idx):
    _check_bounds(idx, x.shape[0])
    return x[idx]


@gather_p.def_shape
def _gather_shape(x, idx):
    _check_int(idx, "gather")
    if not x[0]:
        raise JitgradError("cannot index a 0-d array")
    return idx[0] + x[0][1:], x[1]


gather_p.def_vjp(lambda cts, outs, ins: [
    scatter_add_p.bind(cts[0], ins[1], n=ins[0].shape[0]), None])


scatter_add_p = primitive("scatter_add", "shape", index_inputs=(1,))


@scatter_add_p.def_impl
def _scatter_add_impl(g, idx, *, n):
    _check_bounds(idx, n)
    out = np.zeros((n,) + g.shape[idx.ndim:], g.dtype)
    np.add.at(out, idx, g)
    return out


@scatter_add_p.def_shape
def _scatter_add_shape(g, idx, *, n):
    _check_int(idx, "scatter_add")
    if g[0][:len(idx[0])] != idx[0]:
        raise JitgradError(f"updates of shape {g[0]} do not match indices of shape {idx[0]}")
    return (n,) + g[0][len(idx[0]):], g[1]


scatter_add_p.def_vjp(lambda cts, outs, ins, *, n: [gather_p.bind(cts[0], ins[1]), None])


def _along_axis_index(idx: np.ndarray, axis: int) -> tuple[np.ndarray, ...]:
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    return tuple(grid)


def _along_axis_shape(x_shape, idx, axis, what):
    _check_int(idx, what)
    if len(idx[0]) != len(x_shape) or any(
            a != b for i, (a, b) in enumerate(zip(idx[0], x_shape)) if i != axis):
        raise JitgradError(f"indices of shape {idx[0]} do not match an array of shape "
                           f"{x_shape} outside axis {axis}")


take_along_axis_p = primitive("take_along_axis", "shape", index_inputs=(1,))


@take_along_axis_p.def_impl
def _take_along_axis_impl(x, idx, *, axis):
    _check_bounds(idx, x.shape[axis])
    return np.take_along_axis(x, idx, axis)


@take_along_axis_p.def_shape
def _take_along_axis_shape(x, idx, *, axis):
    _along_axis_shape(x[0], idx, axis, "take_along_axis")
    return idx[0], x[1]


take_along_axis_p.def_vjp(lambda cts, outs, ins, *, axis: [
    scatter_along_axis(cts[0], ins[1], ins[0].shape, axis), None])


scatter_along_axis_p = primitive("scatter_along_axis", "shape", index_inputs=(1,))


@scatter_along_axis_p.def_impl
def _scatter_along_axis_impl(g, idx, *, shape, axis):
    _check_bounds(idx, shape[axis])
    out = np.zeros(shape, g.dtype)
    np.add.at(out, _along_axis_index(idx, axis), g)
    return out


@scatter_along_axis_p.def_shape
def _scatter_along_axis_shape(g, idx, *, shape, axis):
    _along_axis_shape(shape, idx, axis, "scatter_along_axis")
    if g[0] != idx[0]:
        raise JitgradError(f"updates of shape {g[0]} do not match indices of shape {idx[0]}")
    return shape, g[1]


scatter_along_axis_p.def_vjp(lambda cts, outs, ins, *, shape, axis: [
    take_along_axis_p.bind(cts[0], ins[1], axis=axis), None])


def scatter_along_axis(g: Any, idx: Any, shape: tuple[int, ...], axis: int) -> Any:
    """Zeros of `shape` with g added at idx along axis (the adjoint of take_along_axis)."""
    return scatter_along_axis_p.bind(g, idx, shape=tuple(shape), axis=axis)


def take_along_axis(x: Any, idx: Any, axis: int) -> Any:
    x, idx = _as_array(x), _as_array(idx)
    if not -x.ndim <= axis < x.ndim:
        raise JitgradError(f"axis {axis} is out of range for {x.ndim} dimensions")
    return take_along_axis_p.bind(x, idx, axis=axis % x.ndim)


def getitem(x: Any, key: Any) -> Any:
    """x[key] for basic indexing (ints, slices, None, ...); indexing.getitem takes the rest."""
    x = _as_array(x)
    key = key if isinstance(key, tuple) else (key,)
    n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > x.ndim:
        raise JitgradError(f"too many indices ({n_real}) for an array of shape {x.shape}")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (x.ndim - n_real) + key[i + 1:]
    key = key + (slice(None),) * (x.ndim - sum(1 for k in key if k is not None))
    index, out_shape, dim = [], [], 0
    for k in key:
        if k is None:
            out_shape.append(1)
            continue
        n = x.shape[dim]
        if isinstance(k, (int, np.integer)):
            if not -n <= k < n:
                raise JitgradError(f"index {k} is out of bounds for axis {dim} of size {n}")
            k = int(k) % n
            index.append((k, k + 1, 1))
        elif isinstance(k, slice):
            t = k.indices(n)
            index.append(t)
            out_shape.append(_sliced_len(*t))
        else:
            raise JitgradError(f"unsupported index {k!r} of type {type(k).__name__}")
        dim += 1
    out = x
    if any(t != (0, d, 1) for t, d in zip(index, x.shape)):
        out = slice_p.bind(x, index=tuple(index))
    return reshape(out, tuple(out_shape))


# ---------------------------------------------------------------- compiling

@njit(cache=True)
def copy_strided(src, dst, meta):
    """dst[dst_off + i·dst_strides] = src[src_off + i·src_strides] over an N-d index space.

    meta = [ndim, shape..., src_strides..., dst_strides..., src_off, dst_off] (elements).
    Serves transpose, broadcast_to, slice, pad_slice and concatenate.
    """
    nd = meta[0]
    shape = meta[1:1 + nd]
    ss = meta[1 + nd:1 + 2 * nd]
    ds = meta[1 + 2 * nd:1 + 3 * nd]
    so = meta[1 + 3 * nd]
    do = meta[2 + 3 * nd]
    total = 1
    for d in range(nd):
        total *= shape[d]
    if total == 0:
        return
    if nd == 0:
        dst[do] = src[so]
        return
    last = nd - 1
    n_last, s_last, d_last = shape[last], ss[last], ds[last]
    if nd == 1:
        for j in range(n_last):
            dst[do + j * d_last] = src[so + j * s_last]
        return
    # Rows of the last dim, in blocks along the dim before it. A block's start comes from
    # its number by division (no index array: kernels allocate nothing); rows within a
    # block just step.
    rows, s_row, d_row = shape[last - 1], ss[last - 1], ds[last - 1]
    unit = s_last == 1 and d_last == 1
    for block in range(total // (n_last * rows)):
        s, t, rest = so, do, block
        for d in range(last - 2, -1, -1):
            i = rest % shape[d]
            rest //= shape[d]
            s += i * ss[d]
            t += i * ds[d]
        for _ in range(rows):
            if unit:  # contiguous rows (a transpose keeping the last axis, a slice): vectors
                for j in range(n_last):
                    dst[np.uint64(t + j)] = src[np.uint64(s + j)]
            else:
                for j in range(n_last):
                    dst[t + j * d_last] = src[s + j * s_last]
            s += s_row
            t += d_row


@njit(cache=True)
def fill_zero(dst):
    for i in range(dst.size):
        dst[i] = 0


@njit(inline="always", cache=True)
def wrap_index(k, n):
    """k in [0, n), negative indices counting from the end as in numpy; -1 if out of range."""
    if k < -n or k >= n:
        return -1
    return k + n if k < 0 else k


@njit(cache=True)
def gather_rows(x, idx, y):
    n = x.shape[0]
    for r in range(idx.size):
        k = wrap_index(idx[r], n)
        if k < 0:
            return r + 1
        y[r, :] = x[k, :]
    return 0


SCATTER_COLUMNS = 16  # a block of columns per task: one 64-byte line of float32


@njit(inline="always", cache=True)
def _scatter_columns(g, idx, y, lo, hi):
    n = y.shape[0]
    for k in range(n):
        for c in range(lo, hi):
            y[k, c] = 0
    for r in range(idx.size):
        k = wrap_index(idx[r], n)
        for c in range(lo, hi):
            y[k, c] += g[r, c]


@njit(cache=True, parallel=True)
def scatter_add_rows(g, idx, y):
    """y[idx[r]] += g[r] for every r (an embedding's gradient). Large ones run on all
    threads, which split the columns, not the updates: each element is summed over r in
    order, so the result is the same on any number of threads, bit for bit."""
    n, width = y.shape
    for r in range(idx.size):  # all indices checked before anything is written
        if wrap_index(idx[r], n) < 0:
            return r + 1
    if g.size < PARALLEL_MIN:
        _scatter_columns(g, idx, y, 0, width)
        return 0
    blocks = (width + SCATTER_COLUMNS - 1) // SCATTER_COLUMNS
    for b in prange(blocks):
        lo = b * SCATTER_COLUMNS
        _scatter_columns(g, idx, y, lo, min(lo + SCATTER_COLUMNS, width))
    return 0


@njit(cache=True)
def take_along(x, idx, y):
    outer, n, inner = x.shape
    m = idx.shape[1]
    for o in range(outer):
        for j in range(m):
            for i in range(inner):
                k = wrap_index(idx[o, j, i], n)
                if k < 0:
                    return 1
                y[o, j, i] = x[o, k, i]
    return 0


@njit(cache=True)
def scatter_along(g, idx, y):
    outer, n, inner = y.shape
    m = idx.shape[1]
    y[:] = 0
    for o in range(outer):
        for j in range(m):
            for i in range(inner):
                k = wrap_index(idx[o, j, i], n)
                if k < 0:
                    return 1
                y[o, k, i] += g[o, j, i]
    return 0


COPY = Kernel("copy", "px py pmeta nmeta", (
    "K.copy_strided(carray(_vp(px), 1 << 40, {dt}), carray(_vp(py), 1 << 40, {dt}), "
    "carray(_vp(pmeta), nmeta, np.int64))\nreturn 0"), ITEM_SIZES)
ZERO = Kernel("zero", "py n", "K.fill_zero(carray(_vp(py), n, {dt}))\nreturn 0", ITEM_SIZES)
GATHER = Kernel("gather", "px pi py nidx nrows row", (
    "return K.gather_rows(carray(_vp(px), (nrows, row), {dt}), "
    "carray(_vp(pi), nidx, np.int64), carray(_vp(py), (nidx, row), {dt}))"), ITEM_SIZES,
    can_fail=True)
SCATTER_ADD = Kernel("scatter_add", "pg pi py nidx nrows row", (
    "return K.scatter_add_rows(carray(_vp(pg), (nidx, row), {dt}), "
    "carray(_vp(pi), nidx, np.int64), carray(_vp(py), (nrows, row), {dt}))"), FLOATS,
    can_fail=True)
TAKE_ALONG = Kernel("take_along", "px pi py outer n m inner", (
    "return K.take_along(carray(_vp(px), (outer, n, inner), {dt}), "
    "carray(_vp(pi), (outer, m, inner), np.int64), "
    "carray(_vp(py), (outer, m, inner), {dt}))"), ITEM_SIZES, can_fail=True)
SCATTER_ALONG = Kernel("scatter_along", "pg pi py outer n m inner", (
    "return K.scatter_along(carray(_vp(pg), (outer, m, inner), {dt}), "
    "carray(_vp(pi), (outer, m, inner), np.int64), "
    "carray(_vp(py), (outer, n, inner), {dt}))"), FLOATS, can_fail=True)


def prod(xs: Any) -> int:
    return int(np.prod(xs, dtype=np.int64))


def strides(shape: tuple[int, ...]) -> list[int]:
    """Row-major strides in elements."""
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def _copy(low, src, dst, shape, src_strides, dst_strides, src_off, dst_off, ins) -> None:
    meta = low.meta_block([len(shape), *shape, *src_strides, *dst_strides, src_off, dst_off])
    low.call(COPY, src.dtype, [src, dst, *meta], [dst], [src], ins)


@reshape_p.def_lowering
def _lower_reshape(low, ins) -> None:
    # Row-major data is unchanged by a reshape: the result is the same memory.
    low.same_memory(ins.outputs[0], ins.inputs[0])


@transpose_p.def_lowering
def _lower_transpose(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    xs = strides(x.shape)
    _copy(low, x, y, y.shape, [xs[p] for p in ins.kw["perm"]], strides(y.shape), 0, 0, ins)


@broadcast_to_p.def_lowering
def _lower_broadcast_to(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    lead = y.ndim - x.ndim
    xs = strides(x.shape)
    src = [0] * lead + [0 if x.shape[i] == 1 else xs[i] for i in range(x.ndim)]
    _copy(low, x, y, y.shape, src, strides(y.shape), 0, 0, ins)


def _slice_geometry(shape: tuple[int, ...], index: tuple) -> tuple[list[int], int]:
    st = strides(shape)
    return [s * step for s, (_, _, step) in zip(st, index)], sum(
        s * start for s, (start, _, _) in zip(st, index))


@slice_p.def_lowering
def _lower_slice(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    st, off = _slice_geometry(x.shape, ins.kw["index"])
    _copy(low, x, y, y.shape, st, strides(y.shape), off, 0, ins)


@pad_slice_p.def_lowering
def _lower_pad_slice(low, ins) -> None:
    g, y = ins.inputs[0], ins.outputs[0]
    low.call(ZERO, y.dtype, [y, y.size], [y], [], ins)
    st, off = _slice_geometry(y.shape, ins.kw["index"])
    _copy(low, g, y, g.shape, strides(g.shape), st, 0, off, ins)


@concatenate_p.def_lowering
def _lower_concatenate(low, ins) -> None:
    y = ins.outputs[0]
    axis = ins.kw["axis"]
    ys = strides(y.shape)
    start = 0
    for x in ins.inputs:
        _copy(low, x, y, x.shape, strides(x.shape), ys, 0, start * ys[axis], ins)
        start += x.shape[axis]


@gather_p.def_lowering
def _lower_gather(low, ins) -> None:
    x, idx = ins.inputs
    y = ins.outputs[0]
    low.call(GATHER, x.dtype, [x, idx, y, idx.size, x.shape[0], prod(x.shape[1:])], [y],
             [x, idx], ins)


@scatter_add_p.def_lowering
def _lower_scatter_add(low, ins) -> None:
    g, idx = ins.inputs
    y = ins.outputs[0]
    low.call(SCATTER_ADD, g.dtype, [g, idx, y, idx.size, y.shape[0], prod(y.shape[1:])], [y],
             [g, idx], ins)


def _along(kernel: Kernel, full_is_result: bool):
    def lower_it(low, ins) -> None:
        a, idx = ins.inputs
        y = ins.outputs[0]
        axis = ins.kw["axis"]
        full = y if full_is_result else a
        outer, inner = prod(full.shape[:axis]), prod(full.shape[axis + 1:])
        low.call(kernel, a.dtype, [a, idx, y, outer, full.shape[axis], idx.shape[axis], inner],
                 [y], [a, idx], ins)
    return lower_it


take_along_axis_p.def_lowering(_along(TAKE_ALONG, full_is_result=False))
scatter_along_axis_p.def_lowering(_along(SCATTER_ALONG, full_is_result=True))
