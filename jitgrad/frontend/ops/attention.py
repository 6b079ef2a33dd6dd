"""Attention: a masked softmax with one fused pass each way, and scaled dot-product attention.

`masked_softmax(s, mask, scale=, causal=)` is softmax(scale·s + mask) over the last axis,
with positions after the query's (column j > row i of each T×S matrix) left out when
causal: one primitive whose kernel reads each row once, and whose gradient
`masked_softmax_grad` (scale·p·(g - Σ g·p)) is one pass over p and g. So attention is two
batched GEMMs around one fused pass each way; the T×S scores are written once.

Masks follow torch.nn.functional.scaled_dot_product_attention: a boolean mask says which
positions take part (True) and is applied as an additive 0 / -inf mask, as torch does; a
float mask is added to the scaled scores. A row with no position left (fully masked) is
all zeros, as torch's safe softmax makes it, not NaN. (Written by hand, `jg.softmax(
jg.where(mask, s, -inf))` stays numpy's softmax: NaN on such rows.)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import prange

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...compiler.threads import PARALLEL_MIN
from ...errors import JitgradError
from ..core import Tracer, primitive
from . import elementwise as E
from . import linalg as L
from . import reduce as R
from . import shape as S
from .norm import FAST, float_bits
from .vecmath import vm_exp


def _valid(shape: tuple[int, ...], causal: bool) -> np.ndarray:
    """Which positions of scores of `shape` causality keeps (all without it)."""
    t, n = shape[-2], shape[-1]
    keep = np.tril(np.ones((t, n), bool)) if causal else np.ones((t, n), bool)
    return np.broadcast_to(keep, shape)


def _masked_softmax_ref(s, *mask, scale, causal):
    z = s.astype(np.float64) * scale
    if mask:
        z = z + mask[0]
    valid = _valid(s.shape, causal)
    z = np.where(valid, z, -np.inf)
    m = z.max(axis=-1, keepdims=True)
    empty = m == -np.inf
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        e = np.exp(z - np.where(empty, 0.0, m))
        p = np.where(empty | ~valid, 0.0, e / e.sum(axis=-1, keepdims=True))
    return p.astype(s.dtype)


def _scores_shape(s, causal: bool, what: str):
    if len(s[0]) < 1 or s[1].kind != "f":
        raise JitgradError(f"{what} takes float scores, got {s[1]}{list(s[0])}")
    if causal and len(s[0]) < 2:
        raise JitgradError(f"{what}: a causal mask needs scores of 2 or more dimensions "
                           f"(..., T, S), got {list(s[0])}")


masked_softmax_p = primitive("masked_softmax", "nn")
masked_softmax_p.def_impl(_masked_softmax_ref)


@masked_softmax_p.def_shape
def _masked_softmax_shape(s, *mask, scale, causal):
    _scores_shape(s, causal, "masked_softmax")
    if mask:
        shape, dtype = mask[0]
        if dtype != s[1] or len(shape) > len(s[0]) or tuple(s[0][len(s[0]) - len(shape):]) \
                != tuple(shape) or not shape:
            raise JitgradError(f"an additive mask {dtype}{list(shape)} must have the scores' "
                               f"dtype {s[1]} and trailing dimensions of {list(s[0])}")
    return s


@masked_softmax_p.def_vjp
def _masked_softmax_vjp(cts, outs, ins, *, scale, causal):
    g, p = cts[0], outs[0]
    grads = [masked_softmax_grad_p.bind(g, p, scale=scale)]
    if len(ins) == 2:  # d(scale·s + mask)/d mask = 1: the gradient before scaling
        full = masked_softmax_grad_p.bind(g, p, scale=1.0)
        lead = tuple(range(full.ndim - ins[1].ndim))
        grads.append(R.sum(full, axis=lead) if lead else full)
    return grads


masked_softmax_grad_p = primitive("masked_softmax_grad", "nn")


@masked_softmax_grad_p.def_impl
def _masked_softmax_grad_ref(g, p, *, scale):
    g64, p64 = g.astype(np.float64), p.astype(np.float64)
    return (scale * p64 * (g64 - (g64 * p64).sum(axis=-1, keepdims=True))).astype(p.dtype)


@masked_softmax_grad_p.def_shape
def _masked_softmax_grad_shape(g, p, *, scale):
    _scores_shape(p, False, "masked_softmax_grad")
    if g != p:
        raise JitgradError(f"gradient {g[1]}{list(g[0])} does not match {p[1]}{list(p[0])}")
    return p


@masked_softmax_grad_p.def_vjp
def _masked_softmax_grad_vjp(cts, outs, ins, *, scale):
    # ds = scale·p·(g - Σg·p): linear in g (the same map again), and for p
    # d/dp_k = scale·(h_k·(g_k - Σg·p) - g_k·Σh·p).
    h, (g, p) = cts[0], ins
    gp = R.sum(g * p, axis=-1, keepdims=True)
    hp = R.sum(h * p, axis=-1, keepdims=True)
    return [masked_softmax_grad_p.bind(h, p, scale=scale), (h * (g - gp) - g * hp) * scale]


# ---------------------------------------------------------------- the user's functions

def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def _additive(mask: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
    """A mask as the additive mask the primitive takes: trailing dimensions of the scores'
    (broadcast to them if it has others)."""
    mask = _as_array(mask)
    if mask.dtype == np.bool_:
        mask = E.where(mask, E.asdtype(0.0, dtype), E.asdtype(-np.inf, dtype))
    elif mask.dtype.kind == "f":
        mask = E.asdtype(mask, dtype)
    else:
        raise JitgradError(f"an attention mask must be boolean or float, got {mask.dtype}")
    try:
        full = E.broadcast_shapes(tuple(mask.shape), shape)
    except JitgradError:
        full = None
    if full != shape:
        raise JitgradError(f"a mask of shape {list(mask.shape)} does not broadcast to the "
                           f"scores' shape {list(shape)}")
    while mask.ndim and mask.shape[0] == 1 and mask.ndim > 1:
        mask = S.reshape(mask, mask.shape[1:])  # leading 1s: the same mask for every batch
    if tuple(shape[len(shape) - mask.ndim:]) != tuple(mask.shape):
        mask = S.broadcast_to(mask, shape)
    return mask


def masked_softmax(s: Any, mask: Any = None, *, scale: float = 1.0,
                   causal: bool = False) -> Any:
    """softmax(scale·s + mask) over the last axis, one fused pass (and one for its gradient).

    ``mask``: boolean (True: take part) or float (added), broadcastable to s; ``causal``:
    column j of each of the T×S matrices of s takes part in row i only if j <= i. A row
    with nothing left is zeros."""
    s = _as_array(s)
    s = E.asdtype(s, E._float_dtype(s))
    if isinstance(scale, Tracer) or not isinstance(scale, (int, float)) or \
            not math.isfinite(scale):
        raise JitgradError(f"masked_softmax: scale must be a finite Python number, got "
                           f"{scale!r}")
    args = (s,) if mask is None else (s, _additive(mask, tuple(s.shape), s.dtype))
    return masked_softmax_p.bind(*args, scale=float(scale), causal=bool(causal))


def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: Any = None,
                                 is_causal: bool = False, scale: float | None = None) -> Any:
    """``torch.nn.functional.scaled_dot_product_attention`` (no dropout): softmax(q·kᵀ·scale
    + mask)·v over the last two dimensions, leading ones batched; scale defaults to
    1/sqrt(q.shape[-1]). Two batched GEMMs around one masked_softmax."""
    q, k, v = E.promote(_as_array(q), _as_array(k), _as_array(v))
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise JitgradError(f"attention takes q, k, v of 2 or more dimensions (..., L, E), got "
                           f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise JitgradError(f"attention: q {list(q.shape)}, k {list(k.shape)} and v "
                           f"{list(v.shape)} do not fit (q and k share E, k and v share S)")
    scores = L.batched_matmul(q, k, tb=True)
    p = masked_softmax(scores, attn_mask, causal=is_causal,
                       scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    return L.batched_matmul(p, v)


# ---------------------------------------------------------------- compiling

# The kernels may reassociate (fastmath "reassoc", nothing else), so that a row's sums
# vectorise; each row is still computed alone, the same on any number of threads. The
# exponentials are taken in the scores' dtype (libmvec's float32 exp: 8 lanes, not 4).

@njit(inline="always", cache=True)
def _softmax_row(s, mask, p, scale, t, causal, has_mask, r):
    n = s.shape[1]
    limit = min(r % t + 1, n) if causal else n
    mr = r % mask.shape[0]
    m = p.dtype.type(-np.inf)  # of the scores' dtype, as z is: exp(z - m) stays in it
    nan = False
    for j in range(limit):  # the max, as a select LLVM vectorises; NaN wins, as in np.max
        z = scale * s[r, j]
        if has_mask:
            z += mask[mr, j]
        m = z if z > m else m
        nan |= z != z
    if nan:
        m = p.dtype.type(np.nan)
    if m == -np.inf:  # nothing takes part: zeros
        for j in range(n):
            p[r, j] = 0
        return
    total = 0.0
    for j in range(limit):
        z = scale * s[r, j]
        if has_mask:
            z += mask[mr, j]
        e = vm_exp(z - m)
        p[r, j] = e
        total += e
    inv = 1.0 / total
    for j in range(limit):
        p[r, j] *= inv
    for j in range(limit, n):
        p[r, j] = 0


@njit(cache=True, parallel=True, fastmath=FAST)
def masked_softmax_rows(s, mask, p, scale, t, causal, has_mask):
    """Row r of the (rows, n) scores is row r % t of its T×S matrix (causality) and uses
    row r % len(mask) of the mask (a mask of the scores' trailing dimensions); scale has
    the scores' dtype."""
    if s.size < PARALLEL_MIN:
        for r in range(s.shape[0]):
            _softmax_row(s, mask, p, scale, t, causal, has_mask, r)
    else:
        for r in prange(s.shape[0]):
            _softmax_row(s, mask, p, scale, t, causal, has_mask, r)
    return 0


@njit(inline="always", cache=True)
def _softmax_grad_row(g, p, ds, scale, r):
    n = p.shape[1]
    dot = 0.0
    for j in range(n):
        dot += np.float64(g[r, j]) * p[r, j]
    for j in range(n):
        ds[r, j] = scale * p[r, j] * (g[r, j] - dot)


@njit(cache=True, parallel=True, fastmath=FAST)
def masked_softmax_grad_rows(g, p, ds, scale):
    if p.size < PARALLEL_MIN:
        for r in range(p.shape[0]):
            _softmax_grad_row(g, p, ds, scale, r)
    else:
        for r in prange(p.shape[0]):
            _softmax_grad_row(g, p, ds, scale, r)
    return 0


MASKED_SOFTMAX = Kernel("masked_softmax", "ps pmask pp rows n mrows t causal has_mask pscale", (
    "return K.masked_softmax_rows(carray(_vp(ps), (rows, n), {dt}), "
    "carray(_vp(pmask), (mrows, n), {dt}), carray(_vp(pp), (rows, n), {dt}), "
    "{dt}(carray(_vp(pscale), 1, np.float64)[0]), t, causal, has_mask)"), FLOATS)
MASKED_SOFTMAX_GRAD = Kernel("masked_softmax_grad", "pg pp pds rows n pscale", (
    "return K.masked_softmax_grad_rows(carray(_vp(pg), (rows, n), {dt}), "
    "carray(_vp(pp), (rows, n), {dt}), carray(_vp(pds), (rows, n), {dt}), "
    "carray(_vp(pscale), 1, np.float64)[0])"), FLOATS)


@masked_softmax_p.def_lowering
def _lower_masked_softmax(low, ins) -> None:
    s, p = ins.inputs[0], ins.outputs[0]
    n = s.shape[-1]
    rows = s.size // max(n, 1)
    mask = ins.inputs[1] if len(ins.inputs) == 2 else None
    mrows = 1 if mask is None else mask.size // max(n, 1)
    scale, _ = low.meta_block([float_bits(ins.kw["scale"])])
    t = s.shape[-2] if s.ndim >= 2 else 1
    low.call(MASKED_SOFTMAX, s.dtype,
             [s, 0 if mask is None else mask, p, rows, n, max(mrows, 1), max(t, 1),
              int(ins.kw["causal"]), int(mask is not None), scale],
             [p], [s] if mask is None else [s, mask], ins)


@masked_softmax_grad_p.def_lowering
def _lower_masked_softmax_grad(low, ins) -> None:
    g, p = ins.inputs
    ds = ins.outputs[0]
    n = p.shape[-1]
    scale, _ = low.meta_block([float_bits(ins.kw["scale"])])
    low.call(MASKED_SOFTMAX_GRAD, p.dtype, [g, p, ds, p.size // max(n, 1), n, scale], [ds],
             [g, p], ins)
