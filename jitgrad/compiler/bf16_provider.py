"""The bfloat16 GEMM provider: MKL's cblas_gemm_bf16bf16f32, where it pays.

Chosen at plan time (ops/bf16_gemm.py asks `chooses_bf16` for each product of two
rounded operands): the CPU must multiply bfloat16 natively (precision.cpu_has_bf16)
and MKL's runtime (the `mkl` extra: libmkl_rt from the `mkl` wheel) must load. MKL
runs its threads on GNU OpenMP, the pool Numba's omp threading layer uses, with
jitgrad's thread count; its symbol is bound by name (llvmlite add_symbol), so
generated code stays cacheable. JITGRAD_BF16_GEMM=0 turns the provider off (the
rounded operands then go to the float32 GEMM: same values, no speed-up).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys

from . import precision

_SYMBOL = "cblas_gemm_bf16bf16f32"
_GNU_OPENMP = 3  # MKL_THREADING_GNU


def _mkl_candidates() -> list[str]:
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))
    return found


@functools.cache
def _mkl() -> ctypes.CDLL | None:
    """libmkl_rt, its threading set up and the bf16 GEMM registered by name; None if
    there is no MKL (or it lacks the bfloat16 GEMM)."""
    import llvmlite.binding as llb

    from . import threads
    for path in _mkl_candidates():
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            fn = getattr(lib, _SYMBOL)
        except (OSError, AttributeError):
            continue
        lib.MKL_Set_Threading_Layer(_GNU_OPENMP)
        lib.MKL_Set_Num_Threads(threads.num_threads())
        # A forked child must not wait for the parent's MKL threads (GNU OpenMP pools do
        # not survive fork): it runs MKL on one thread.
        os.register_at_fork(after_in_child=functools.partial(lib.MKL_Set_Num_Threads, 1))
        llb.add_symbol(_SYMBOL, ctypes.cast(fn, ctypes.c_void_p).value)
        return lib
    return None


def available() -> bool:
    """bfloat16 GEMMs run natively here: CPU instructions and MKL present, not disabled."""
    if os.environ.get("JITGRAD_BF16_GEMM", "").strip() == "0":
        return False
    return precision.cpu_has_bf16() and _mkl() is not None


# Below this much work (m·n·k), or with a short inner dimension, MKL's bfloat16 GEMM was
# no faster than its float32 one here (2 threads, AMX): 32x32x64 0.7x, 64x256x10 0.6x,
# 64x10x128 1.0x; 128x10x512 1.2x, 64x256x256 1.5-1.8x, 128x512x784 2.5-3.8x.
MIN_WORK = 1 << 19
MIN_K = 32


def chooses_bf16(m: int, n: int, k: int) -> bool:
    """Whether an m×k by k×n product of bfloat16 operands runs as a bfloat16 GEMM (else
    the float32 GEMM multiplies the rounded values)."""
    return k >= MIN_K and m * n * k >= MIN_WORK and available()
