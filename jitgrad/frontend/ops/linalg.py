"""Matrix multiplication: C = op(A) @ op(B), op = transpose when the flag says so.

The flags let the VJP (and the fusion pass) express `A.T @ G` and `G @ W.T`
without materialising a transpose: the kernels hand them to GEMM. Operands may
carry leading batch dimensions, broadcast against each other as in np.matmul:
one kernel call loops over the batch calling GEMM on each pair of matrices at
its offset (a broadcast batch dimension has stride 0), so a batched product
never copies an operand.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...compiler import blas
from ...compiler.cache import njit
from ...errors import JitgradError
from ..core import Tracer, primitive
from . import elementwise as E
from . import shape as S

matmul_p = primitive("matmul", "linalg", gemm_operands=(0, 1))
# op(A) @ op(B) summed over the batch dimensions that `batch` (the result's batch shape)
# lacks or has as 1: the gradient of an operand broadcast along a batch, computed by GEMM
# accumulating over it, never materialised per batch and then summed.
matmul_sum_p = primitive("matmul_sum", "linalg", gemm_operands=(0, 1))
PRODUCTS = (matmul_p, matmul_sum_p)


def _op(x: np.ndarray, t: bool) -> np.ndarray:
    return np.swapaxes(x, -1, -2) if t else x


def _matrix_shape(shape: tuple[int, ...], t: bool) -> tuple[int, int]:
    return (shape[-1], shape[-2]) if t else (shape[-2], shape[-1])


@matmul_p.def_shape
def _matmul_shape(a, b, *, ta, tb):
    if len(a[0]) < 2 or len(b[0]) < 2:
        raise JitgradError(f"matmul primitive takes operands of 2 or more dimensions, got "
                           f"{a[0]} and {b[0]}")
    if a[1] != b[1]:
        raise JitgradError(f"operands have different dtypes {a[1]} and {b[1]}")
    (m, k), (k2, n) = _matrix_shape(a[0], ta), _matrix_shape(b[0], tb)
    if k != k2:
        raise JitgradError(f"shapes {a[0]}{'.T' if ta else ''} and {b[0]}{'.T' if tb else ''} "
                           f"are not aligned: {k} (dim -1) != {k2} (dim -2)")
    return E.broadcast_shapes(a[0][:-2], b[0][:-2]) + (m, n), a[1]


@matmul_sum_p.def_shape
def _matmul_sum_shape(a, b, *, ta, tb, batch):
    shape, dtype = _matmul_shape(a, b, ta=ta, tb=tb)
    full = shape[:-2]
    lead = len(full) - len(batch)
    if lead < 0 or any(d not in (1, f) for d, f in zip(batch, full[lead:], strict=True)):
        raise JitgradError(f"the batch {full} of {a[0]} @ {b[0]} cannot be summed to {batch}")
    return batch + shape[-2:], dtype


matmul_p.def_impl(lambda a, b, *, ta, tb: np.matmul(_op(a, ta), _op(b, tb)))


@matmul_sum_p.def_impl
def _matmul_sum_impl(a, b, *, ta, tb, batch):
    out = np.matmul(_op(a, ta), _op(b, tb))
    return E.unbroadcast(out, batch + out.shape[-2:])


def batched_matmul(a: Any, b: Any, ta: bool = False, tb: bool = False,
                   shape: tuple[int, ...] | None = None) -> Any:
    """op(a) @ op(b) for operands of 2 or more dimensions, batch dimensions broadcast.

    With `shape` (a gradient's: its operand's shape), the product is summed over the batch
    dimensions shape lacks or has as 1 (by GEMM accumulating over them: matmul_sum) and
    broadcast along those the product lacks. A batch of left operands times one matrix is
    one 2-d product over all their rows."""
    full = E.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if shape is not None:
        target = (1,) * max(0, len(full) + 2 - len(shape)) + tuple(shape)
        kept = tuple(t if f != 1 else 1 for t, f in zip(target[-2 - len(full):-2], full))
        if kept != full:
            return _fit(matmul_sum_p.bind(a, b, ta=ta, tb=tb, batch=kept), tuple(shape))
    if b.ndim == 2 and a.ndim > 2 and not ta:
        rows = S.reshape(a, (-1, a.shape[-1]))
        out = matmul_p.bind(rows, b, ta=False, tb=tb)
        out = S.reshape(out, a.shape[:-1] + out.shape[-1:])
    else:
        out = matmul_p.bind(a, b, ta=ta, tb=tb)
    return out if shape is None else _fit(out, tuple(shape))


def _fit(out: Any, shape: tuple[int, ...]) -> Any:
    """out, whose batch dimensions are shape's or 1 (right-aligned; extra leading ones are
    1), as an array of shape: reshaped, then broadcast."""
    if out.shape == shape:
        return out
    core = out.shape[max(0, out.ndim - len(shape)):]
    return S.broadcast_to(S.reshape(out, (1,) * (len(shape) - len(core)) + core), shape)


def _matmul_vjp(cts, outs, ins, *, ta, tb, batch=None):
    # d op(A) = G op(B)^T and d op(B) = op(A)^T G, each one flagged product summed over the
    # batch dimensions its operand was broadcast along (G broadcasts along any matmul_sum
    # summed over).
    g, (a, b) = cts[0], ins
    ga = (batched_matmul(b, g, ta=tb, tb=True, shape=a.shape) if ta
          else batched_matmul(g, b, ta=False, tb=not tb, shape=a.shape))
    gb = (batched_matmul(g, a, ta=True, tb=ta, shape=b.shape) if tb
          else batched_matmul(a, g, ta=not ta, tb=False, shape=b.shape))
    return [ga, gb]


for _p in PRODUCTS:
    _p.def_vjp(_matmul_vjp)


def matmul(a: Any, b: Any) -> Any:
    """numpy's matmul: 1-d operands are vectors, leading dimensions broadcast as batches."""
    a, b = E.promote(a, b)
    if not isinstance(a, Tracer) and not isinstance(b, Tracer):
        a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise JitgradError(f"matmul of a 0-d array (shapes {a.shape} and {b.shape}); "
                           "use * for scalars")
    if a.dtype.kind not in "f":
        raise JitgradError(f"matmul expects float operands, got {a.dtype}")
    a2 = S.reshape(a, (1, a.shape[0])) if a.ndim == 1 else a
    b2 = S.reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b
    out = batched_matmul(a2, b2)
    shape = out.shape[:-2] + (() if a.ndim == 1 else out.shape[-2:-1]) + (
        () if b.ndim == 1 else out.shape[-1:])
    return S.reshape(out, shape) if out.shape != shape else out


# ---------------------------------------------------------------- compiling

# A 2-d product is one call of the GEMM provider chosen for its shape (compiler/blas.py);
# transposes reach it as flags, so `A.T @ G` never materialises a transpose. A batch of
# products loops over its matrices calling that provider's strided GEMM on each at its
# offset.


@njit(cache=True)
def gemm_batched(pa, pb, c, x, m, n, k, ta, tb, accumulate, meta, a, gemm):
    """C[i] (+)= op(A[i])·op(B[i]) for every index i of the batch, one GEMM per pair of
    matrices at its offset; C = X + ... when accumulating (X possibly C's memory).

    meta = [nd, batch shape..., A's, B's and C's batch strides...] in elements: an operand
    broadcast along a dimension has stride 0 there, and C has stride 0 along the dimensions
    it sums over: the first product of each of its matrices is written (beta = 0), the
    others added (beta = 1). a: a view of A's dtype (a bfloat16 product's operands are
    narrower than C); gemm: the address of the provider's strided GEMM (compiler/blas.py).
    """
    if accumulate:
        blas.copy_into(c, x)
    nd = meta[0]
    shape = meta[1:1 + nd]
    sa = meta[1 + nd:1 + 2 * nd]
    sb = meta[1 + 2 * nd:1 + 3 * nd]
    sc = meta[1 + 3 * nd:1 + 4 * nd]
    total = 1
    for d in range(nd):
        total *= shape[d]
    if c.size == 0:
        return 0
    if k == 0 or total == 0:
        if not accumulate:
            c[:] = 0
        return 0
    size, asize = c.itemsize, a.itemsize
    lda, ldb = m if ta else k, k if tb else n
    for i in range(total):
        oa, ob, oc, rest, first = 0, 0, 0, i, True
        for d in range(nd - 1, -1, -1):
            j = rest % shape[d]
            rest //= shape[d]
            oa += j * sa[d]
            ob += j * sb[d]
            oc += j * sc[d]
            if j and sc[d] == 0:
                first = False
        beta = 1 if accumulate or not first else 0
        blas.call_strided(gemm, pa + oa * asize, lda, pb + ob * asize, ldb,
                          c.ctypes.data + oc * size, n, m, n, k, ta, tb, beta)
    return 0


_BATCHED_BODY = (
    "c = carray(_vp(pc), size, {out})\n"
    "return K.gemm_batched(pa, pb, c, %s, m, n, k, ta, tb, %d, "
    "carray(_vp(pmeta), nmeta, np.int64), carray(_vp(pa), 0, {dt}), {gemm})")
GEMM_BATCHED = blas.GemmKernel("gemm_batched", "pa pb pc size m n k ta tb pmeta nmeta",
                               _BATCHED_BODY % ("c", 0))
GEMM_BATCHED_ACC = blas.GemmKernel("gemm_batched_acc",
                                   "pa pb pc px size m n k ta tb pmeta nmeta",
                                   _BATCHED_BODY % ("carray(_vp(px), size, {out})", 1))


def _gemm_args(ins, out) -> list[Any]:
    a = ins.inputs[0]
    kw = ins.kw
    m, n = out.shape[-2:]
    k = a.shape[-2] if kw["ta"] else a.shape[-1]
    return [m, n, k, int(kw["ta"]), int(kw["tb"])]


def _batch_strides(shape: tuple[int, ...], batch: tuple[int, ...]) -> list[int]:
    """Strides (elements) of an array of `shape` along the full batch dimensions `batch`
    (its own batch dimensions right-aligned); 0 where it is broadcast or summed along."""
    own = shape[:-2]
    lead = len(batch) - len(own)
    st = S.strides(shape)
    return [0 if d < lead or (own[d - lead] == 1 and batch[d] != 1) else st[d - lead]
            for d in range(len(batch))]


def _batch_meta(low, ins) -> tuple[str, int]:
    a, b = ins.inputs
    c = ins.outputs[0]
    batch = E.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return low.meta_block([len(batch), *batch, *(
        s for v in (a, b, c) for s in _batch_strides(v.shape, batch))])


def gemm_shape(ins, out) -> blas.GemmShape:
    """A product (one matrix of a batch) as the GEMM providers see it."""
    a = ins.inputs[0]
    m, n, k, ta, tb = _gemm_args(ins, out)
    return blas.GemmShape(m, n, k, bool(ta), bool(tb), a.dtype, out.dtype)


def _lower_product(low, ins) -> None:
    a, b = ins.inputs
    c = ins.outputs[0]
    if a.ndim == b.ndim == 2:
        kernel = blas.choose(gemm_shape(ins, c)).plain
        low.call(kernel, a.dtype, [a, b, c, *_gemm_args(ins, c)], [c], [a, b], ins)
    else:
        low.call(GEMM_BATCHED.kernel(gemm_shape(ins, c)), a.dtype,
                 [a, b, c, c.size, *_gemm_args(ins, c), *_batch_meta(low, ins)], [c], [a, b],
                 ins)


def _accumulate_product(low, ins, out, x):
    a, b = ins.inputs
    if a.ndim == b.ndim == 2:
        kernel = blas.choose(gemm_shape(ins, out)).accumulate
        return kernel, a.dtype, [a, b, out, x, *_gemm_args(ins, out)]
    return (GEMM_BATCHED_ACC.kernel(gemm_shape(ins, out)), a.dtype,
            [a, b, out, x, out.size, *_gemm_args(ins, out), *_batch_meta(low, ins)])


def _swaps_last_two(ins) -> bool:
    perm = ins.kw["perm"]
    nd = len(perm)
    return nd >= 2 and perm == tuple(range(nd - 2)) + (nd - 1, nd - 2)


def _fold_transposes(ins, producer):
    """Transposes of the operands' last two dimensions become GEMM's transpose flags:
    `A.T @ G` reaches GEMM without a copy."""
    kw = ins.kw
    a, b = ins.inputs
    pa, pb = producer.get(a), producer.get(b)
    if pa is not None and pa.prim is S.transpose_p and _swaps_last_two(pa):
        a, kw["ta"] = pa.inputs[0], not kw["ta"]
    if pb is not None and pb.prim is S.transpose_p and _swaps_last_two(pb):
        b, kw["tb"] = pb.inputs[0], not kw["tb"]
    if (a, b) == ins.inputs:
        return None
    return dataclasses.replace(ins, inputs=(a, b), params=tuple(sorted(kw.items())))


def _matmul_flops(ins) -> int:
    a, b = ins.inputs
    m, n = ins.outputs[0].shape[-2:]
    k = a.shape[-2] if ins.kw["ta"] else a.shape[-1]
    batch = E.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return 2 * int(np.prod(batch, dtype=np.int64)) * m * n * k


def _matmul_label(ins) -> str:
    # ta/tb: the transposes GEMM applies, written as the product it computes
    kw = ins.kw
    a, b = ins.inputs
    kind = ("Σ batched " if "batch" in kw else "batched ") if max(a.ndim, b.ndim) > 2 else ""
    return f" {kind}{'Aᵀ' if kw.get('ta') else 'A'}·{'Bᵀ' if kw.get('tb') else 'B'}"


for _p in PRODUCTS:
    _p.def_lowering(_lower_product)
    _p.def_accumulate(_accumulate_product)
    _p.def_simplify(_fold_transposes)
    _p.def_cost(_matmul_flops)
    _p.def_label(_matmul_label)
