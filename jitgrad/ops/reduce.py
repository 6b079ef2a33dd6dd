"""Reductions over axes: sum, max, argmax, max_argmax (two outputs, one pass), logsumexp."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import Tracer, primitive
from ..errors import JitgradError
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
