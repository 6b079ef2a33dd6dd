"""Layer normalisation, as torch.nn.functional.layer_norm: one fused kernel each way.

`layer_norm` normalises the rows of x (its trailing `normalized_shape` dimensions
flattened): y = (x - mean)·rstd·w + b, rstd = 1/sqrt(var + eps), var the biased variance.
It is one primitive with three results — y and the statistics mean and rstd — computed in
one pass over each row, and the backward pass reads those saved statistics instead of
recomputing them from x: `layer_norm_grad` gives (dx, dw, db) from (g, x, w, mean, rstd)
in one kernel call.

Differentiation: the VJP of `layer_norm` is `layer_norm_grad` plus the paths through the
statistics (used when a second derivative reaches them). The VJP of `layer_norm_grad`
treats mean and rstd as inputs of their own and is written with primitives, so every
order works. With x̂ = (x - m)·r and ĝ = g·w (per row, n elements):

  dx = r·(ĝ - Σĝ/n - x̂·Σ(ĝ·x̂)/n),  dw = Σ_rows g·x̂,  db = Σ_rows g.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import prange

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...compiler.threads import COLUMN_BLOCK, PARALLEL_MIN
from ...errors import JitgradError
from ..core import Tracer, primitive
from ..ir import Var
from . import elementwise as E
from . import reduce as R
from . import shape as S


def _rows(x: Any, n: int) -> tuple[int, int]:
    return int(np.prod(x.shape, dtype=np.int64)) // max(n, 1), n


def _xhat(x: np.ndarray, mean: np.ndarray, rstd: np.ndarray) -> np.ndarray:
    return (x - mean[:, None]) * rstd[:, None]


def _check_2d(x, w, what: str) -> None:
    if len(x[0]) != 2 or x[1].kind != "f":
        raise JitgradError(f"{what} takes a 2-d float array of rows, got {x[0]} {x[1]}")
    if w[0] != x[0][1:] or w[1] != x[1]:
        raise JitgradError(f"weight {w[1]}{list(w[0])} does not match rows of "
                           f"{x[1]}{list(x[0][1:])}")


# ---------------------------------------------------------------- forward

layer_norm_p = primitive("layer_norm", "nn", n_outputs=3)


@layer_norm_p.def_impl
def _layer_norm_impl(x, w, b, *, eps):
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=1)
    rstd = 1.0 / np.sqrt(((x64 - mean[:, None]) ** 2).mean(axis=1) + eps)
    y = _xhat(x64, mean, rstd) * w + b
    return y.astype(x.dtype), mean.astype(x.dtype), rstd.astype(x.dtype)


@layer_norm_p.def_shape
def _layer_norm_shape(x, w, b, *, eps):
    _check_2d(x, w, "layer_norm")
    _check_2d(x, b, "layer_norm")
    return [x, (x[0][:1], x[1]), (x[0][:1], x[1])]


@layer_norm_p.def_vjp
def _layer_norm_vjp(cts, outs, ins, *, eps):
    (gy, gmean, grstd), (_, mean, rstd), (x, w, _) = cts, outs, ins
    rows, n = x.shape
    dx = dw = db = None
    if gy is not None:
        dx, dw, db = layer_norm_grad_p.bind(gy, x, w, mean, rstd)
    m, r = S.reshape(mean, (rows, 1)), S.reshape(rstd, (rows, 1))
    if gmean is not None:  # mean = Σx/n
        term = S.broadcast_to(S.reshape(gmean, (rows, 1)) * (1.0 / n), x.shape)
        dx = term if dx is None else dx + term
    if grstd is not None:  # rstd = (var + eps)^-1/2, dvar/dx = 2(x - mean)/n
        term = S.reshape(grstd, (rows, 1)) * (r * r * r) * (x - m) * (-1.0 / n)
        dx = term if dx is None else dx + term
    return [dx, dw, db]


# ---------------------------------------------------------------- backward

layer_norm_grad_p = primitive("layer_norm_grad", "nn", n_outputs=3)


@layer_norm_grad_p.def_impl
def _layer_norm_grad_impl(g, x, w, mean, rstd):
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    n = x.shape[1]
    xh = _xhat(x64, mean.astype(np.float64), rstd.astype(np.float64))
    gw = g64 * w
    dx = rstd[:, None] * (gw - gw.sum(axis=1, keepdims=True) / n
                          - xh * (gw * xh).sum(axis=1, keepdims=True) / n)
    return dx.astype(x.dtype), (g64 * xh).sum(axis=0).astype(x.dtype), \
        g64.sum(axis=0).astype(x.dtype)


@layer_norm_grad_p.def_shape
def _layer_norm_grad_shape(g, x, w, mean, rstd):
    _check_2d(x, w, "layer_norm_grad")
    if g != x:
        raise JitgradError(f"gradient {g[1]}{list(g[0])} does not match x {x[1]}{list(x[0])}")
    for stat in (mean, rstd):
        if stat != (x[0][:1], x[1]):
            raise JitgradError(f"statistics {stat[1]}{list(stat[0])} do not match "
                               f"{x[0][0]} rows of {x[1]}")
    return [x, w, w]


@layer_norm_grad_p.def_vjp
def _layer_norm_grad_vjp(cts, outs, ins):
    hx, hw, hb = cts
    g, x, w, mean, rstd = ins
    rows, n = x.shape
    m, r = S.reshape(mean, (rows, 1)), S.reshape(rstd, (rows, 1))
    xm = x - m
    xh = xm * r
    gw = g * w

    def row_sum(v: Any) -> Any:
        return R.sum(v, axis=1, keepdims=True)

    def plus(total: Any, term: Any) -> Any:
        return term if total is None else total + term

    dg = dxh = dr = dw = None  # None: no contribution yet
    if hb is not None:
        dg = S.broadcast_to(hb, x.shape)
    if hw is not None:
        dg = plus(dg, hw * xh)
        dxh = g * hw
    if hx is not None:
        c, d = row_sum(hx), row_sum(hx * xh)
        dgw = r * (hx - c * (1.0 / n) - xh * d * (1.0 / n))
        dg = plus(dg, dgw * w)
        dw = R.sum(g * dgw, axis=0)
        bsum = row_sum(gw * xh)
        dxh = plus(dxh, (hx * bsum + d * gw) * (r * (-1.0 / n)))
        dr = row_sum(hx * (gw - row_sum(gw) * (1.0 / n) - xh * bsum * (1.0 / n)))
    if dxh is None:  # only db asked for: x, mean and rstd take no gradient
        return [dg, None, None, None, None]
    dx = dxh * r
    dmean = S.reshape(R.sum(E.neg(dx), axis=1), (rows,))
    dr = plus(dr, row_sum(dxh * xm))
    return [dg, dx, dw, dmean, S.reshape(dr, (rows,))]


# ---------------------------------------------------------------- the user's function

def layer_norm(x: Any, normalized_shape: int | Sequence[int], weight: Any = None,
               bias: Any = None, eps: float = 1e-5) -> Any:
    """``torch.nn.functional.layer_norm``: x normalised over its trailing
    ``normalized_shape`` dimensions (biased variance, ``eps`` inside the square root), then
    ``* weight + bias`` (each of ``normalized_shape``, optional)."""
    if not isinstance(x, Tracer):
        x = np.asarray(x)
    shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) \
        else tuple(normalized_shape)
    shape = tuple(int(d) for d in shape)
    if E._dtype_of(x).kind != "f":
        raise JitgradError(f"layer_norm expects a float input, got {E._dtype_of(x)}")
    if not shape or tuple(x.shape[x.ndim - len(shape):]) != shape or len(shape) > x.ndim:
        raise JitgradError(f"layer_norm: normalized_shape {list(shape)} is not the trailing "
                           f"dimensions of an input of shape {list(x.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise JitgradError(f"layer_norm: eps must be a number >= 0, got {eps!r}")
    dtype = x.dtype
    rows, n = _rows(x, int(np.prod(shape, dtype=np.int64)))

    def param(p: Any, fill: float, what: str) -> Any:
        if p is None:
            return np.full(n, fill, dtype)
        p = p if isinstance(p, Tracer) else np.asarray(p)
        if tuple(p.shape) != shape:
            raise JitgradError(f"layer_norm: {what} of shape {list(p.shape)} does not match "
                               f"normalized_shape {list(shape)}")
        if p.dtype != dtype:
            raise JitgradError(f"layer_norm: {what} is {p.dtype}, the input {dtype}")
        return S.reshape(p, (n,))

    y, _, _ = layer_norm_p.bind(S.reshape(x, (rows, n)), param(weight, 1.0, "weight"),
                                param(bias, 0.0, "bias"), eps=float(eps))
    return S.reshape(y, x.shape)


# ---------------------------------------------------------------- compiling

# Rows are independent: each thread takes whole rows. Statistics accumulate in float64.
# The kernels may reassociate (fastmath "reassoc", nothing else): a row's sums then
# vectorise (LLVM keeps a strict left-to-right float sum scalar: GPT's 768 x 128 layer
# norm backward took 0.6 ms a call that way). A row's sums still come out the same on any
# number of threads, and the column sums of the backward pass add rows in order.
FAST = {"reassoc"}


@njit(inline="always", cache=True)
def _normalise_row(x, w, b, y, mean, rstd, eps, r):
    n = x.shape[1]
    s = 0.0
    for j in range(n):
        s += x[r, j]
    mu = s / n
    ss = 0.0
    for j in range(n):
        d = x[r, j] - mu
        ss += d * d
    inv = 1.0 / np.sqrt(ss / n + eps)
    for j in range(n):
        y[r, j] = (x[r, j] - mu) * inv * w[j] + b[j]
    mean[r] = mu
    rstd[r] = inv


@njit(cache=True, parallel=True, fastmath=FAST)
def layer_norm_rows(x, w, b, y, mean, rstd, eps):
    if x.size < PARALLEL_MIN:
        for r in range(x.shape[0]):
            _normalise_row(x, w, b, y, mean, rstd, eps, r)
    else:
        for r in prange(x.shape[0]):
            _normalise_row(x, w, b, y, mean, rstd, eps, r)
    return 0


@njit(inline="always", cache=True)
def _row_grad(g, x, w, mean, rstd, dx, r):
    n = x.shape[1]
    mu, inv = np.float64(mean[r]), np.float64(rstd[r])
    a = 0.0
    c = 0.0
    for j in range(n):
        gw = np.float64(g[r, j]) * w[j]
        a += gw
        c += gw * ((x[r, j] - mu) * inv)
    a /= n
    c /= n
    for j in range(n):
        xh = (x[r, j] - mu) * inv
        dx[r, j] = inv * (np.float64(g[r, j]) * w[j] - a - xh * c)


@njit(inline="always", cache=True)
def _column_add(g, x, mean, rstd, sw, sb, r, lo, width):
    """Row r's terms of the column sums lo .. lo + width: Σ g·x̂ and Σ g. (The loop counts
    from 0: LLVM vectorises it only so.)"""
    mu, inv = np.float64(mean[r]), np.float64(rstd[r])
    for c in range(width):
        gv = np.float64(g[r, lo + c])
        sw[lo + c] += gv * ((x[r, lo + c] - mu) * inv)  # g·x̂, as the reference groups it
        sb[lo + c] += gv


@njit(cache=True, parallel=True, fastmath=FAST)
def layer_norm_grad_rows(g, x, w, mean, rstd, dx, dw, db, acc):
    """dx row by row; dw and db summed down the rows in order into acc's float64 (2, n)
    (on threads, blocks of columns each: the same result as on one)."""
    rows, n = x.shape
    sw, sb = acc[0], acc[1]
    sw[:] = 0.0
    sb[:] = 0.0
    if x.size < PARALLEL_MIN:  # one sweep: each row is read once for both
        for r in range(rows):
            _row_grad(g, x, w, mean, rstd, dx, r)
            _column_add(g, x, mean, rstd, sw, sb, r, 0, n)
    else:
        for r in prange(rows):
            _row_grad(g, x, w, mean, rstd, dx, r)
        for blk in prange((n + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
            lo = blk * COLUMN_BLOCK
            width = min(COLUMN_BLOCK, n - lo)
            for r in range(rows):
                _column_add(g, x, mean, rstd, sw, sb, r, lo, width)
    for j in range(n):
        dw[j] = sw[j]
        db[j] = sb[j]
    return 0


LAYER_NORM = Kernel("layer_norm", "px pw pb py pmean prstd rows n peps", (
    "return K.layer_norm_rows(carray(_vp(px), (rows, n), {dt}), carray(_vp(pw), n, {dt}), "
    "carray(_vp(pb), n, {dt}), carray(_vp(py), (rows, n), {dt}), "
    "carray(_vp(pmean), rows, {dt}), carray(_vp(prstd), rows, {dt}), "
    "carray(_vp(peps), 1, np.float64)[0])"), FLOATS)
LAYER_NORM_GRAD = Kernel("layer_norm_grad", "pg px pw pmean prstd pdx pdw pdb pacc rows n", (
    "return K.layer_norm_grad_rows(carray(_vp(pg), (rows, n), {dt}), "
    "carray(_vp(px), (rows, n), {dt}), carray(_vp(pw), n, {dt}), "
    "carray(_vp(pmean), rows, {dt}), carray(_vp(prstd), rows, {dt}), "
    "carray(_vp(pdx), (rows, n), {dt}), carray(_vp(pdw), n, {dt}), "
    "carray(_vp(pdb), n, {dt}), carray(_vp(pacc), (2, n), np.float64))"), FLOATS)


def float_bits(value: float) -> int:
    """A float64 as the int64 with its bits: kernel arguments are int64, so a float
    parameter goes through the metadata block and the kernel views it as float64."""
    return int(np.float64(value).view(np.int64))


@layer_norm_p.def_lowering
def _lower_layer_norm(low, ins) -> None:
    x, w, b = ins.inputs
    y, mean, rstd = ins.outputs
    eps, _ = low.meta_block([float_bits(ins.kw["eps"])])
    low.call(LAYER_NORM, x.dtype, [x, w, b, y, mean, rstd, *x.shape, eps], [y, mean, rstd],
             [x, w, b], ins)


@layer_norm_grad_p.def_lowering
def _lower_layer_norm_grad(low, ins) -> None:
    g, x, w, mean, rstd = ins.inputs
    dx, dw, db = ins.outputs
    acc = Var((2, x.shape[1]), np.dtype(np.float64))  # scratch: the column sums
    low.call(LAYER_NORM_GRAD, x.dtype, [g, x, w, mean, rstd, dx, dw, db, acc, *x.shape],
             [dx, dw, db, acc], [g, x, w, mean, rstd], ins)
