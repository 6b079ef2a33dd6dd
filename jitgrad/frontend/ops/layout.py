"""numpy's shape and layout functions, composed from the shape primitives.

Each is a composition, so each is differentiable to any order through the primitives'
own rules: stacking is reshape + concatenate; splitting, flipping and diff are slices;
swapping and moving axes are transposes; repeat (with per-element counts), pad (edge,
reflect, symmetric, wrap) and roll gather along an axis with an index array numpy
computes at trace time (the gradient is the gather's scatter-add); tile and repeat with
one count broadcast; pad with a constant concatenates constant blocks; select folds
where from its last condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer
from . import elementwise as E
from . import shape as S
from .reduce import normalize_axes


def _arr(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def _axis(axis: int, ndim: int) -> int:
    return normalize_axes(axis, ndim)[0]


def _unstack(arrays: Any) -> list[Any]:
    """The arrays of a sequence; a single traced array is its slices along axis 0, as numpy
    iterates an array."""
    if isinstance(arrays, Tracer):
        if arrays.ndim == 0:
            raise JitgradError("cannot iterate over a 0-d array")
        return [arrays[i] for i in range(arrays.shape[0])]
    if isinstance(arrays, np.ndarray):
        return list(arrays)
    out = [_arr(a) for a in arrays]
    if not out:
        raise JitgradError("need at least one array to stack")
    return out


# ---------------------------------------------------------------- reshapes

def ravel(x: Any, order: str = "C") -> Any:
    if order not in ("C", "A", "K"):
        raise JitgradError(f"ravel(order={order!r}): only row-major order is supported")
    return S.reshape(_arr(x), (-1,))


def squeeze(x: Any, axis: Any = None) -> Any:
    x = _arr(x)
    if axis is None:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    else:
        axes = normalize_axes(axis, x.ndim)
        bad = [a for a in axes if x.shape[a] != 1]
        if bad:
            raise JitgradError(f"cannot squeeze axis {bad[0]} of size {x.shape[bad[0]]} "
                               f"(shape {x.shape})")
    return S.reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def expand_dims(x: Any, axis: Any) -> Any:
    x = _arr(x)
    axes = normalize_axes(axis, x.ndim + (1 if isinstance(axis, (int, np.integer))
                                          else len(axis)))
    dims = iter(x.shape)
    return S.reshape(x, tuple(1 if i in axes else next(dims)
                              for i in range(x.ndim + len(axes))))


def atleast_1d(*arys: Any) -> Any:
    out = [S.reshape(a, (1,)) if a.ndim == 0 else a for a in map(_arr, arys)]
    return out[0] if len(out) == 1 else tuple(out)


def atleast_2d(*arys: Any) -> Any:
    out = [S.reshape(a, (1,) * (2 - a.ndim) + a.shape) if a.ndim < 2 else a
           for a in map(_arr, arys)]
    return out[0] if len(out) == 1 else tuple(out)


def atleast_3d(*arys: Any) -> Any:
    def three(a: Any) -> Any:
        shape = {0: (1, 1, 1), 1: (1, a.size, 1), 2: a.shape + (1,)}.get(a.ndim, a.shape)
        return S.reshape(a, shape)
    out = [three(a) for a in map(_arr, arys)]
    return out[0] if len(out) == 1 else tuple(out)


# ---------------------------------------------------------------- axis permutations

def swapaxes(x: Any, axis1: int, axis2: int) -> Any:
    x = _arr(x)
    perm = list(range(x.ndim))
    a, b = _axis(axis1, x.ndim), _axis(axis2, x.ndim)
    perm[a], perm[b] = perm[b], perm[a]
    return S.transpose(x, perm)


def moveaxis(x: Any, source: Any, destination: Any) -> Any:
    x = _arr(x)
    src = [_axis(a, x.ndim) for a in np.atleast_1d(source)]
    dst = [_axis(a, x.ndim) for a in np.atleast_1d(destination)]
    if len(src) != len(dst):
        raise JitgradError("moveaxis: source and destination need the same number of axes")
    order = [n for n in range(x.ndim) if n not in src]
    for d, s in sorted(zip(dst, src)):  # numpy's algorithm
        order.insert(d, s)
    return S.transpose(x, order)


def rollaxis(x: Any, axis: int, start: int = 0) -> Any:
    x = _arr(x)
    axis = _axis(axis, x.ndim)
    if not -x.ndim <= start <= x.ndim:
        raise JitgradError(f"rollaxis: start {start} is out of range for {x.ndim} dimensions")
    start = start % (x.ndim + 1) if start < 0 else start
    if axis < start:
        start -= 1
    order = [n for n in range(x.ndim) if n != axis]
    order.insert(start, axis)
    return S.transpose(x, order)


# ---------------------------------------------------------------- stacking

def stack(arrays: Any, axis: int = 0) -> Any:
    xs = E.promote(*_unstack(arrays))
    if len({a.shape for a in xs}) != 1:
        raise JitgradError(f"stack needs arrays of one shape, got {[a.shape for a in xs]}")
    axis = _axis(axis, xs[0].ndim + 1)
    return S.concatenate([expand_dims(a, axis) for a in xs], axis=axis)


def vstack(arrays: Any) -> Any:
    return S.concatenate([atleast_2d(a) for a in _unstack(arrays)], axis=0)


def hstack(arrays: Any) -> Any:
    xs = [atleast_1d(a) for a in _unstack(arrays)]
    return S.concatenate(xs, axis=0 if xs[0].ndim == 1 else 1)


def dstack(arrays: Any) -> Any:
    return S.concatenate([atleast_3d(a) for a in _unstack(arrays)], axis=2)


def column_stack(arrays: Any) -> Any:
    return S.concatenate([S.reshape(a, (a.size, 1)) if a.ndim < 2 else a
                          for a in _unstack(arrays)], axis=1)


row_stack = vstack


def append(arr: Any, values: Any, axis: int | None = None) -> Any:
    arr, values = _arr(arr), _arr(values)
    if axis is None:
        return S.concatenate([ravel(arr), ravel(values)], axis=0)
    return S.concatenate([arr, values], axis=axis)


# ---------------------------------------------------------------- splitting and slicing

def _slice_along(x: Any, axis: int, start: int, stop: int, step: int = 1) -> Any:
    key = [slice(None)] * x.ndim
    key[axis] = slice(start, stop, step)
    return S.getitem(x, tuple(key))


def array_split(x: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    x = _arr(x)
    axis = _axis(axis, x.ndim)
    n = x.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        sections = int(indices_or_sections)
        if sections <= 0:
            raise JitgradError("number of sections must be larger than 0")
        each, extra = divmod(n, sections)  # numpy's rule: the first `extra` get one more
        sizes = [each + 1] * extra + [each] * (sections - extra)
        bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    else:
        bounds = [0, *[int(i) for i in indices_or_sections], n]
    return [_slice_along(x, axis, a, max(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def split(x: Any, indices_or_sections: Any, axis: int = 0) -> list[Any]:
    x = _arr(x)
    if isinstance(indices_or_sections, (int, np.integer)):
        n = x.shape[_axis(axis, x.ndim)]
        if indices_or_sections <= 0 or n % indices_or_sections:
            raise JitgradError(f"array split does not result in an equal division: an axis "
                               f"of {n} into {indices_or_sections} sections")
    return array_split(x, indices_or_sections, axis)


def _split_at_least(name: str, ndim: int, axis: int):
    def fn(x: Any, indices_or_sections: Any) -> list[Any]:
        x = _arr(x)
        if x.ndim < ndim:
            raise JitgradError(f"{name} only works on arrays of {ndim} or more dimensions")
        return split(x, indices_or_sections, axis if x.ndim > 1 else 0)
    fn.__name__ = name
    return fn


hsplit = _split_at_least("hsplit", 1, 1)
vsplit = _split_at_least("vsplit", 2, 0)
dsplit = _split_at_least("dsplit", 3, 2)


def flip(x: Any, axis: Any = None) -> Any:
    x = _arr(x)
    axes = normalize_axes(axis, x.ndim)
    return S.getitem(x, tuple(slice(None, None, -1) if i in axes else slice(None)
                              for i in range(x.ndim)))


def fliplr(x: Any) -> Any:
    x = _arr(x)
    if x.ndim < 2:
        raise JitgradError("fliplr needs an array of at least 2 dimensions")
    return flip(x, 1)


def flipud(x: Any) -> Any:
    x = _arr(x)
    if x.ndim < 1:
        raise JitgradError("flipud needs an array of at least 1 dimension")
    return flip(x, 0)


def rot90(x: Any, k: int = 1, axes: Sequence[int] = (0, 1)) -> Any:
    x = _arr(x)
    if len(axes) != 2 or x.ndim < 2:
        raise JitgradError("rot90 needs two axes of an array of at least 2 dimensions")
    a, b = _axis(axes[0], x.ndim), _axis(axes[1], x.ndim)
    if a == b:
        raise JitgradError("rot90: the axes must differ")
    k %= 4
    if k == 0:
        return x
    if k == 2:
        return flip(flip(x, a), b)
    perm = list(range(x.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return S.transpose(flip(x, b), perm) if k == 1 else flip(S.transpose(x, perm), b)


def diff(x: Any, n: int = 1, axis: int = -1, prepend: Any = None, append: Any = None) -> Any:
    x = _arr(x)
    if n < 0:
        raise JitgradError(f"diff: order n = {n} must be non-negative")
    axis = _axis(axis, x.ndim)
    parts = []
    for extra, at_end in ((prepend, False), (append, True)):
        if extra is not None:
            e = _arr(extra)
            if e.ndim == 0:
                e = S.broadcast_to(e, tuple(1 if i == axis else d for i, d in enumerate(x.shape)))
            parts.append((e, at_end))
    if parts:
        x = S.concatenate([e for e, end in parts if not end] + [x]
                          + [e for e, end in parts if end], axis=axis)
    for _ in range(n):
        m = x.shape[axis]
        x = E.sub(_slice_along(x, axis, 1, m), _slice_along(x, axis, 0, max(m - 1, 0)))
    return x


# ---------------------------------------------------------------- gathers along an axis

def gather_along(x: Any, idx: np.ndarray, axis: int) -> Any:
    """x indexed by one concrete int array along axis (x[..., idx, ...]): a gather."""
    x = _arr(x)
    idx = np.asarray(idx, dtype=np.int64)
    if axis == 0:
        return S.gather_p.bind(x, idx)
    moved = moveaxis(x, axis, 0)
    return moveaxis(S.gather_p.bind(moved, idx), 0, axis)


def repeat(x: Any, repeats: Any, axis: int | None = None) -> Any:
    x = _arr(x)
    if axis is None:
        x, axis = ravel(x), 0
    axis = _axis(axis, x.ndim)
    reps = np.asarray(repeats)
    if reps.ndim == 0:  # one count: broadcast along a new axis, then merge the two
        r = int(reps)
        wide = S.broadcast_to(expand_dims(x, axis + 1),
                              x.shape[:axis + 1] + (r,) + x.shape[axis + 1:])
        return S.reshape(wide, x.shape[:axis] + (x.shape[axis] * r,) + x.shape[axis + 1:])
    return gather_along(x, np.repeat(np.arange(x.shape[axis]), reps), axis)


def tile(x: Any, reps: Any) -> Any:
    x = _arr(x)
    reps = tuple(int(r) for r in np.atleast_1d(reps))
    nd = max(x.ndim, len(reps))
    reps = (1,) * (nd - len(reps)) + reps
    shape = (1,) * (nd - x.ndim) + x.shape
    # each axis d of size s becomes (reps[d], s), broadcast, then merged
    wide = S.reshape(x, tuple(v for s in shape for v in (1, s)))
    wide = S.broadcast_to(wide, tuple(v for r, s in zip(reps, shape) for v in (r, s)))
    return S.reshape(wide, tuple(r * s for r, s in zip(reps, shape)))


def roll(x: Any, shift: Any, axis: Any = None) -> Any:
    x = _arr(x)
    if axis is None:
        return S.reshape(roll(ravel(x), shift, 0), x.shape)
    shifts, axes = np.broadcast_arrays(np.atleast_1d(shift), np.atleast_1d(axis))
    out = x
    for s, a in zip(shifts.tolist(), axes.tolist()):
        a = _axis(a, x.ndim)
        n = x.shape[a]
        if n and s % n:
            k = s % n  # the last k entries come first: two slices, one concatenation
            out = S.concatenate([_slice_along(out, a, n - k, n), _slice_along(out, a, 0, n - k)],
                                axis=a)
    return out


_INDEX_MODES = ("edge", "reflect", "symmetric", "wrap")


def pad(x: Any, pad_width: Any, mode: str = "constant", **kwargs: Any) -> Any:
    """numpy's pad in modes constant (constant_values), edge, reflect, symmetric, wrap."""
    x = _arr(x)
    widths = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (x.ndim, 2))
    if np.any(widths < 0):
        raise JitgradError(f"pad: negative pad width {pad_width}")
    if mode == "constant":
        extra = set(kwargs) - {"constant_values"}
        values = np.broadcast_to(np.asarray(kwargs.get("constant_values", 0)), (x.ndim, 2))
    elif mode in _INDEX_MODES:
        extra = set(kwargs) - ({"reflect_type"} if mode in ("reflect", "symmetric") else set())
        if kwargs.get("reflect_type", "even") != "even":
            raise JitgradError("pad: only reflect_type='even' is supported")
    else:
        raise JitgradError(f"pad mode {mode!r} is not supported on traced values; modes: "
                           f"constant, {', '.join(_INDEX_MODES)}")
    if extra:
        raise JitgradError(f"pad: arguments {sorted(extra)} are not supported in mode {mode!r}")
    out = x
    for a, (before, after) in enumerate(widths.tolist()):
        if not before and not after:
            continue
        if mode != "constant":
            out = gather_along(out, np.pad(np.arange(out.shape[a]), (before, after), mode=mode), a)
            continue
        blocks = []
        for width, value in ((before, values[a, 0]), (after, values[a, 1])):
            shape = tuple(width if i == a else d for i, d in enumerate(out.shape))
            blocks.append(np.full(shape, value, dtype=out.dtype))
        out = S.concatenate([blocks[0], out, blocks[1]], axis=a)
    return out


# ---------------------------------------------------------------- select

def select(condlist: Sequence[Any], choicelist: Sequence[Any], default: Any = 0) -> Any:
    """The choice of the first true condition, elementwise; default where none is."""
    if len(condlist) != len(choicelist):
        raise JitgradError("select: condlist and choicelist must have the same length")
    if not condlist:
        raise JitgradError("select needs at least one condition")
    out = default
    for cond, choice in zip(reversed(condlist), reversed(choicelist)):
        out = E.where(cond, choice, out)
    shape = E.broadcast_shapes(*(np.shape(c) for c in condlist),
                               *(np.shape(c) for c in choicelist))
    return S.broadcast_to(_arr(out), shape) if np.shape(out) != shape else out
