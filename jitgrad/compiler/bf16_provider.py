"""The bfloat16 GEMM provider: MKL's cblas_gemm_bf16bf16f32, registered with compiler/blas.py.

It takes products of bfloat16 operands (uint16 bit patterns) into float32;
ops/bf16_gemm.py's `prepare` asks `chooses_bf16` (big enough to gain) before storing a
product's operands as bfloat16. It loads where the CPU multiplies bfloat16 natively
(precision.cpu_has_bf16: AMX-BF16 or AVX512_BF16) and blas.py's MKL loads (the `mkl`
extra), whose threads (GNU OpenMP, jitgrad's count) and fork handling it shares; the
symbol is bound by name, so generated code stays cacheable. JITGRAD_BF16_GEMM=0 turns
it off: the rounded operands then go to the float32 GEMM (same values, no speed-up).
JITGRAD_BF16_GEMM=1 loads it on a CPU without bfloat16 instructions too, where MKL
emulates them (the same products, slower than the float32 GEMM): so the tests run this
provider's kernels on every x86-64 CPU, not only where it pays.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
from numba import types

from . import blas, precision
from .cache import njit
from .kernels import Kernel

SYMBOL = "cblas_gemm_bf16bf16f32"
SWITCH_VAR = "JITGRAD_BF16_GEMM"
_U16, _F32 = np.dtype(np.uint16), np.dtype(np.float32)

# Below this much work (m·n·k), or with a short inner dimension, MKL's bfloat16 GEMM was
# no faster than its float32 one here (2 threads, AMX): 32x32x64 0.7x, 64x256x10 0.6x,
# 64x10x128 1.0x; 128x10x512 1.2x, 64x256x256 1.5-1.8x, 128x512x784 2.5-3.8x.
MIN_WORK = 1 << 19
MIN_K = 32


# MKL's CBLAS: (layout, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc) with
# MKL_INT 32-bit (the LP64 interface libmkl_rt selects by default); addresses as int64.
_I32 = types.int32
_cblas_gemm_bf16 = types.ExternalFunction(SYMBOL, types.void(
    _I32, _I32, _I32, _I32, _I32, _I32, types.float32, types.int64, _I32, types.int64, _I32,
    types.float32, types.int64, _I32))
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


@njit(cache=True)
def strided_bf16(c, pa, lda, pb, ldb, pc, ldc, m, n, k, ta, tb, beta):
    """Row-major C (float32, row stride ldc) = op(A)·op(B) + beta·C, A and B bfloat16 at
    addresses pa, pb with row strides lda and ldb (c: a view of C's dtype)."""
    if m == 0 or n == 0:
        return 0
    _cblas_gemm_bf16(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                     m, n, k, np.float32(1.0), pa, lda, pb, ldb, np.float32(beta), pc, ldc)
    return 0


@njit(cache=True)
def gemm_bf16(pa, pb, c, x, m, n, k, ta, tb, accumulate):
    """C = op(A)·op(B) (+ X when accumulating, X possibly C's own memory), row-major: A and
    B bfloat16 at addresses pa, pb; C and X float32 arrays of m·n."""
    if accumulate:
        blas.copy_into(c, x)
    if m == 0 or n == 0:
        return 0
    if k == 0:  # BLAS would reject lda = 0
        if not accumulate:
            c[:] = 0
        return 0
    return strided_bf16(c, pa, m if ta else k, pb, k if tb else n, c.ctypes.data, n, m, n, k,
                        ta, tb, 1.0 if accumulate else 0.0)


def _switch() -> str:
    return os.environ.get(SWITCH_VAR, "").strip()


def _load() -> str | None:
    if not precision.cpu_has_bf16() and _switch() != "1":
        return (f"this CPU has no bfloat16 instructions (AVX512_BF16 or AMX-BF16); "
                f"{SWITCH_VAR}=1 loads MKL's emulation of them (slower, for tests)")
    if not blas.available(blas.MKL_PROVIDER):
        return blas.why_unavailable(blas.MKL_PROVIDER.name)
    fn = getattr(blas._mkl, SYMBOL, None)
    if fn is None:
        return f"this MKL has no {SYMBOL}"
    import llvmlite.binding as llb
    llb.add_symbol(SYMBOL, ctypes.cast(fn, ctypes.c_void_p).value)
    return None


def _takes(shape: blas.GemmShape) -> bool:
    return shape.dtype == _U16 and shape.out_dtype == _F32


def _library() -> bool:
    return blas.available(PROVIDER)


# The variant is named by the operands' dtype (u16, as the lowering asks); C is float32.
_BODY = ("c = carray(_vp(pc), m * n, {dt})\n"
         "return K.gemm_bf16(pa, pb, c, %s, m, n, k, ta, tb, %d)")
GEMM_BF16 = Kernel("gemm_bf16", "pa pb pc m n k ta tb", _BODY % ("c", 0), {"u16": "np.float32"},
                   library=_library)
GEMM_BF16_ACC = Kernel("gemm_acc_bf16", "pa pb pc px m n k ta tb",
                       _BODY % ("carray(_vp(px), m * n, {dt})", 1), {"u16": "np.float32"},
                       library=_library)
STRIDED_BF16 = Kernel("strided_bf16", "pa lda pb ldb pc ldc m n k ta tb beta",
                      blas.STRIDED_BODY % "strided_bf16", {"u16": "np.float32"}, library=_library)
PROVIDER = blas.GemmProvider("mkl-bf16", GEMM_BF16, GEMM_BF16_ACC, _takes, STRIDED_BF16,
                             load=_load, variants=(("u16", "np.uint16", "np.float32"),))
blas.register(PROVIDER, priority=10)


def available() -> bool:
    """bfloat16 GEMMs run here: MKL present, CPU instructions (or JITGRAD_BF16_GEMM=1), not
    disabled (JITGRAD_BF16_GEMM=0)."""
    return _switch() != "0" and _library()


def chooses_bf16(shape: blas.GemmShape) -> bool:
    """Whether this product of bfloat16 operands (shape.dtype uint16) runs as a bfloat16
    GEMM (else the float32 GEMM multiplies the rounded float32 values): where it pays."""
    return (_takes(shape) and shape.k >= MIN_K and shape.m * shape.n * shape.k >= MIN_WORK
            and available())
