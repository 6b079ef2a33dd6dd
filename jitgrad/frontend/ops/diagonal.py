"""Diagonals: np.diagonal (a strided view, copied) and its adjoint, the diagonal embedded
in zeros; trace, diag, triu and tril are built on them and on `where`.

Both primitives lower to the strided copy kernel: the diagonal of axes (i, j) is one
more dimension whose stride is the sum of theirs, so no index array is ever built.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer, primitive
from . import elementwise as E
from . import reduce as R
from . import shape as S


def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def diagonal_length(n1: int, n2: int, offset: int) -> int:
    return max(0, min(n1, n2 - offset) if offset >= 0 else min(n1 + offset, n2))


def _diagonal_shape(shape: tuple[int, ...], offset: int, axis1: int, axis2: int):
    rest = tuple(d for i, d in enumerate(shape) if i not in (axis1, axis2))
    return rest + (diagonal_length(shape[axis1], shape[axis2], offset),)


def _check_axes(ndim: int, axis1: int, axis2: int) -> tuple[int, int]:
    if ndim < 2:
        raise JitgradError(f"a diagonal needs 2 or more dimensions, got {ndim}")
    for a in (axis1, axis2):
        if not -ndim <= a < ndim:
            raise JitgradError(f"axis {a} is out of range for {ndim} dimensions")
    axis1, axis2 = axis1 % ndim, axis2 % ndim
    if axis1 == axis2:
        raise JitgradError(f"axis1 and axis2 cannot be the same ({axis1})")
    return axis1, axis2


# ---------------------------------------------------------------- the primitives

diagonal_p = primitive("diagonal", "shape")
diagonal_p.def_impl(lambda x, *, offset, axis1, axis2: np.diagonal(
    x, offset, axis1, axis2).copy())
diagonal_p.def_shape(lambda x, *, offset, axis1, axis2: (
    _diagonal_shape(x[0], offset, axis1, axis2), x[1]))
diagonal_p.def_vjp(lambda cts, outs, ins, *, offset, axis1, axis2: [embed_diagonal_p.bind(
    cts[0], shape=ins[0].shape, offset=offset, axis1=axis1, axis2=axis2)])

embed_diagonal_p = primitive("embed_diagonal", "shape")


@embed_diagonal_p.def_impl
def _embed_diagonal_impl(g, *, shape, offset, axis1, axis2):
    out = np.zeros(shape, g.dtype)
    view = np.moveaxis(out, (axis1, axis2), (-2, -1))  # writes go to out
    i = np.arange(g.shape[-1])
    view[..., i + max(-offset, 0), i + max(offset, 0)] = g
    return out


@embed_diagonal_p.def_shape
def _embed_diagonal_shape(g, *, shape, offset, axis1, axis2):
    if _diagonal_shape(shape, offset, axis1, axis2) != g[0]:
        raise JitgradError(f"a diagonal of shape {g[0]} does not fit offset {offset} of axes "
                           f"({axis1}, {axis2}) of {shape}")
    return shape, g[1]


embed_diagonal_p.def_vjp(lambda cts, outs, ins, *, shape, offset, axis1, axis2: [
    diagonal_p.bind(cts[0], offset=offset, axis1=axis1, axis2=axis2)])


def _geometry(shape: tuple[int, ...], offset: int, axis1: int, axis2: int
              ) -> tuple[list[int], int]:
    """Strides (elements) of the diagonal's dimensions within `shape`, and its start."""
    st = S.strides(shape)
    rest = [s for i, s in enumerate(st) if i not in (axis1, axis2)]
    start = offset * st[axis2] if offset >= 0 else -offset * st[axis1]
    return rest + [st[axis1] + st[axis2]], start


@diagonal_p.def_lowering
def _lower_diagonal(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    kw = ins.kw
    st, start = _geometry(x.shape, kw["offset"], kw["axis1"], kw["axis2"])
    S._copy(low, x, y, y.shape, st, S.strides(y.shape), start, 0, ins)


@embed_diagonal_p.def_lowering
def _lower_embed_diagonal(low, ins) -> None:
    g, y = ins.inputs[0], ins.outputs[0]
    kw = ins.kw
    low.call(S.ZERO, y.dtype, [y, y.size], [y], [], ins)
    st, start = _geometry(y.shape, kw["offset"], kw["axis1"], kw["axis2"])
    S._copy(low, g, y, g.shape, S.strides(g.shape), st, 0, start, ins)


# ---------------------------------------------------------------- numpy's functions

def diagonal(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1) -> Any:
    """np.diagonal: the diagonal of axes (axis1, axis2) becomes the last dimension."""
    a = _as_array(a)
    axis1, axis2 = _check_axes(a.ndim, axis1, axis2)
    return diagonal_p.bind(a, offset=int(offset), axis1=axis1, axis2=axis2)


def trace(a: Any, offset: int = 0, axis1: int = 0, axis2: int = 1) -> Any:
    """np.trace: the sum of a diagonal."""
    return R.sum(diagonal(a, offset, axis1, axis2), axis=-1)


def diag(v: Any, k: int = 0) -> Any:
    """np.diag: a 1-d array's square matrix with v on diagonal k, or a 2-d array's diagonal."""
    v = _as_array(v)
    if v.ndim == 1:
        n = v.shape[0] + abs(int(k))
        return embed_diagonal_p.bind(v, shape=(n, n), offset=int(k), axis1=0, axis2=1)
    if v.ndim == 2:
        return diagonal(v, k)
    raise JitgradError(f"diag takes a 1-d or 2-d array, got shape {v.shape}")


def _triangle(m: Any, k: int, upper: bool) -> Any:
    """m with the elements outside one triangle of its last two dimensions zeroed; a 1-d m
    is broadcast to a square matrix, as numpy does."""
    m = _as_array(m)
    if m.ndim == 0:
        raise JitgradError("triu/tril of a 0-d array")
    rows, cols = (m.shape[-1], m.shape[-1]) if m.ndim == 1 else m.shape[-2:]
    keep = (~np.tri(rows, cols, k - 1, dtype=bool) if upper
            else np.tri(rows, cols, k, dtype=bool))
    return E.where(keep, m, 0)


def tril(m: Any, k: int = 0) -> Any:
    """np.tril: the elements on and below diagonal k; the others zero."""
    return _triangle(m, int(k), upper=False)


def triu(m: Any, k: int = 0) -> Any:
    """np.triu: the elements on and above diagonal k; the others zero."""
    return _triangle(m, int(k), upper=True)
