"""Matrix multiplication: C = op(A) @ op(B), op = transpose when the flag says so.

The flags let the VJP (and the fusion pass) express `A.T @ G` and `G @ W.T`
without materialising a transpose: the kernels hand them to GEMM.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...errors import JitgradError
from ..core import Tracer, primitive
from . import elementwise as E
from . import shape as S

matmul_p = primitive("matmul", "linalg")


def _op(x: np.ndarray, t: bool) -> np.ndarray:
    return x.T if t else x


matmul_p.def_impl(lambda a, b, *, ta, tb: _op(a, ta) @ _op(b, tb))


@matmul_p.def_shape
def _matmul_shape(a, b, *, ta, tb):
    if len(a[0]) != 2 or len(b[0]) != 2:
        raise JitgradError(f"matmul primitive takes 2-d operands, got {a[0]} and {b[0]}")
    if a[1] != b[1]:
        raise JitgradError(f"operands have different dtypes {a[1]} and {b[1]}")
    (m, k), (k2, n) = a[0][::-1] if ta else a[0], b[0][::-1] if tb else b[0]
    if k != k2:
        raise JitgradError(f"shapes {a[0]}{'.T' if ta else ''} and {b[0]}{'.T' if tb else ''} "
                           f"are not aligned: {k} (dim 1) != {k2} (dim 0)")
    return (m, n), a[1]


@matmul_p.def_vjp
def _matmul_vjp(cts, outs, ins, *, ta, tb):
    # d op(A) = G op(B)^T and d op(B) = op(A)^T G, each written as one flagged matmul.
    g, (a, b) = cts[0], ins
    ga = (matmul_p.bind(b, g, ta=tb, tb=True) if ta
          else matmul_p.bind(g, b, ta=False, tb=not tb))
    gb = (matmul_p.bind(g, a, ta=True, tb=ta) if tb
          else matmul_p.bind(a, g, ta=not ta, tb=False))
    return [ga, gb]


def matmul(a: Any, b: Any) -> Any:
    """numpy's matmul for 1-d and 2-d operands."""
    a, b = E.promote(a, b)
    if not isinstance(a, Tracer) and not isinstance(b, Tracer):
        a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise JitgradError("matmul of a 0-d array; use * for scalars")
    if a.ndim > 2 or b.ndim > 2:
        raise JitgradError(f"batched matmul is not supported (shapes {a.shape} and {b.shape})")
    if a.dtype.kind not in "f":
        raise JitgradError(f"matmul expects float operands, got {a.dtype}")
    a2 = S.reshape(a, (1, a.shape[0])) if a.ndim == 1 else a
    b2 = S.reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b
    out = matmul_p.bind(a2, b2, ta=False, tb=False)
    shape = a.shape[:-1] + b.shape[1:]
    return S.reshape(out, shape) if out.shape != shape else out


# ---------------------------------------------------------------- compiling

# np.dot inside Numba calls BLAS (scipy's OpenBLAS) with transpose flags for .T views,
# so no transpose is ever materialised.


@njit(cache=True)
def gemm(a, b, c, ta, tb):
    if ta and tb:
        np.dot(a.T, b.T, c)
    elif ta:
        np.dot(a.T, b, c)
    elif tb:
        np.dot(a, b.T, c)
    else:
        np.dot(a, b, c)


@intrinsic
def _xxgemm_accumulate(typingctx, c, transa, transb, m, n, k, pa, lda, pb, ldb, ldc):
    """Column-major C += op(A)·op(B) (alpha = beta = 1) through Numba's own BLAS binding
    (`numba_xxgemm`, scipy's BLAS): np.dot has no way to accumulate into its output."""
    def codegen(context, builder, signature, args):
        from numba.np.linalg import get_blas_kind, make_constant_slot
        c_arr, ta, tb, m_, n_, k_, pa_, lda_, pb_, ldb_, ldc_ = args
        dtype = signature.args[0].dtype
        char, vp = ir.IntType(8), cgutils.voidptr_t
        intp = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, vp, vp,
                                                intp, vp, intp, vp, vp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        one = make_constant_slot(context, builder, dtype, 1.0)

        def trans(flag):
            return builder.select(builder.icmp_unsigned("!=", flag, flag.type(0)),
                                  char(ord("t")), char(ord("n")))

        data_c = context.make_array(signature.args[0])(context, builder, c_arr).data
        res = builder.call(fn, (char(ord(get_blas_kind(dtype))), trans(ta), trans(tb),
                                m_, n_, k_, builder.bitcast(one, vp),
                                builder.inttoptr(pa_, vp), lda_, builder.inttoptr(pb_, vp),
                                ldb_, builder.bitcast(one, vp), builder.bitcast(data_c, vp),
                                ldc_))
        return builder.sext(res, context.get_value_type(types.int64))
    return types.int64(c, transa, transb, m, n, k, pa, lda, pb, ldb, ldc), codegen


@njit(cache=True)
def gemm_accumulate(pa, pb, c, x, m, n, k, ta, tb):
    """C = op(A)·op(B) + X, row-major, with X possibly C's own memory: a gradient
    contribution from a matmul is added into the gradient's one buffer as it is computed
    (Deep Learning 6.5), never materialised on its own and summed."""
    if x.ctypes.data != c.ctypes.data:
        for i in range(c.size):
            c[i] = x[i]
    if m == 0 or n == 0 or k == 0:
        return 0
    # Row-major C = op(A)·op(B) is column-major C^T = op(B)^T·op(A)^T.
    return _xxgemm_accumulate(c, tb, ta, n, m, k, pb, k if tb else n, pa, m if ta else k, n)


GEMM = Kernel("gemm", "pa pb pc m n k ta tb", (
    "a = carray(_vp(pa), (k, m) if ta else (m, k), {dt})\n"
    "b = carray(_vp(pb), (n, k) if tb else (k, n), {dt})\n"
    "K.gemm(a, b, carray(_vp(pc), (m, n), {dt}), ta, tb)\nreturn 0"), FLOATS, uses_blas=True)
GEMM_ACC = Kernel("gemm_acc", "pa pb pc px m n k ta tb", (
    "return K.gemm_accumulate(pa, pb, carray(_vp(pc), m * n, {dt}), "
    "carray(_vp(px), m * n, {dt}), m, n, k, ta, tb)"), FLOATS, uses_blas=True)


def _gemm_args(ins, out) -> list[Any]:
    a, b = ins.inputs
    kw = ins.kw
    k = a.shape[0] if kw["ta"] else a.shape[1]
    return [out.shape[0], out.shape[1], k, int(kw["ta"]), int(kw["tb"])]


@matmul_p.def_lowering
def _lower_matmul(low, ins) -> None:
    a, b = ins.inputs
    c = ins.outputs[0]
    low.call(GEMM, a.dtype, [a, b, c, *_gemm_args(ins, c)], [c], [a, b], ins)


@matmul_p.def_accumulate
def _accumulate_matmul(ins, out, x):
    a, b = ins.inputs
    return GEMM_ACC, a.dtype, [a, b, out, x, *_gemm_args(ins, out)]


@matmul_p.def_simplify
def _fold_transposes(ins, producer):
    """2-d transposes of the operands become GEMM's transpose flags: `A.T @ G` reaches
    GEMM without a copy."""
    kw = ins.kw
    a, b = ins.inputs
    pa, pb = producer.get(a), producer.get(b)
    if pa is not None and pa.prim is S.transpose_p and pa.kw["perm"] == (1, 0):
        a, kw["ta"] = pa.inputs[0], not kw["ta"]
    if pb is not None and pb.prim is S.transpose_p and pb.kw["perm"] == (1, 0):
        b, kw["tb"] = pb.inputs[0], not kw["tb"]
    if (a, b) == ins.inputs:
        return None
    return dataclasses.replace(ins, inputs=(a, b), params=tuple(sorted(kw.items())))


@matmul_p.def_cost
def _matmul_flops(ins) -> int:
    a = ins.inputs[0]
    k = a.shape[0] if ins.kw["ta"] else a.shape[1]
    return 2 * ins.outputs[0].size * k


@matmul_p.def_label
def _matmul_label(ins) -> str:
    # ta/tb: the transposes GEMM applies, written as the product it computes
    kw = ins.kw
    return f" {'Aᵀ' if kw.get('ta') else 'A'}·{'Bᵀ' if kw.get('tb') else 'B'}"
