"""bfloat16 rounding: the explicit step a mixed-precision policy puts before a GEMM operand.

`round_bf16` rounds float32 values to the nearest bfloat16 (round to nearest, ties to
even; a NaN stays a quiet NaN of the same sign) and returns them as float32, so the
GEMM reading them computes exactly the product of bfloat16 operands, accumulated in
float32. Its VJP passes the cotangent through, as torch.autocast's casts do: the
rounding is a storage decision, not a function whose derivative (zero almost
everywhere) anyone wants.

The bit pattern itself (`bf16_bits`) is what a bfloat16 GEMM provider stores; both
the numpy reference and the compiled loops compute it the same way.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir as llir
from numba import prange, types
from numba.extending import intrinsic

from ...compiler.cache import njit
from ...compiler.kernels import Kernel
from ...compiler.threads import PARALLEL_MIN
from ...errors import JitgradError
from ..core import primitive

round_bf16_p = primitive("round_bf16", "elementwise")

_F32 = np.dtype(np.float32)


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 nearest each float32 of x (ties to even), as its uint16 bit pattern."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the
    # dropped half is above one half, or equal to it with the kept part odd.
    rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """The float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16, as float32 (the numpy reference of round_bf16)."""
    x = np.asarray(x)
    return bf16_to_f32(bf16_bits(x)).reshape(x.shape)


@round_bf16_p.def_shape
def _round_shape(x):
    if x[1] != _F32:
        raise JitgradError(f"rounds float32 values to bfloat16, got {x[1]}")
    return x


round_bf16_p.def_impl(round_to_bf16)
round_bf16_p.def_vjp(lambda cts, outs, ins: [cts[0]])

# ---------------------------------------------------------------- compiling

# The same bit arithmetic as bf16_bits, on one element (Numba widens the integer
# operations to 64 bits, so nothing wraps). Fused loops import them by name: this module
# declares a kernel (STORE_BF16), so its hash is in every generated module's key.


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True)
def bf16_bits_of(x):
    """The bfloat16 nearest the float32 x, as its bit pattern (uint16)."""
    u = _f32_bits(np.float32(x))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16((u >> 16) | 0x0040)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@njit(cache=True)
def round_bf16_of(x):
    """x rounded to bfloat16, as float32."""
    return _bits_f32(np.uint32(np.uint32(bf16_bits_of(x)) << 16))


BF16_HELPERS = ("from jitgrad.frontend.ops.precision import bf16_bits_of as _jg_bf16_bits, "
                "round_bf16_of as _jg_round_bf16\n")

round_bf16_p.def_scalar("_jg_round_bf16({0})", BF16_HELPERS)
round_bf16_p.def_label(lambda ins: " → bf16")

# ---------------------------------------------------------------- bfloat16 storage

# `to_bf16` stores rounded values as bfloat16 bit patterns (uint16, half the bytes): the
# form code generation gives the operands of a bfloat16 GEMM (ops/bf16_gemm.py), made
# once per value and step. It is no elementwise primitive of the fusion pass: it reads
# values that other instructions read too (a weight, an activation, a gradient), so it
# would not fuse, and on its own it runs on all threads.
to_bf16_p = primitive("to_bf16", "precision", grad="zero")  # integer bit patterns


@to_bf16_p.def_shape
def _to_bf16_shape(x):
    if x[1] != _F32:
        raise JitgradError(f"stores float32 values as bfloat16, got {x[1]}")
    return x[0], np.dtype(np.uint16)


to_bf16_p.def_impl(lambda x: bf16_bits(x).reshape(np.shape(x)))

# Below threads.PARALLEL_MIN elements the store runs on one thread: measured side by side
# (quiet machine, MKL's pool waiting passively), the medium MLP's bf16 step took 3,507/3,304 us
# with parallel stores from 2^16 elements and 2,769/2,742 us with them serial.


@njit(cache=True, parallel=True)
def store_bf16(x, out):
    """out[i] = the bfloat16 bits nearest x[i]: on all threads when the array is large."""
    n = x.size
    if n < PARALLEL_MIN:
        for i in range(n):
            out[i] = bf16_bits_of(x[i])
    else:
        for i in prange(n):
            out[i] = bf16_bits_of(x[i])
    return 0


STORE_BF16 = Kernel("store_bf16", "px pout n", (
    "return K.store_bf16(carray(_vp(px), n, np.float32), carray(_vp(pout), n, {dt}))"),
    {"u16": "np.uint16"})


@to_bf16_p.def_lowering
def _lower_store(low, ins) -> None:
    x, out = ins.inputs[0], ins.outputs[0]
    low.call(STORE_BF16, out.dtype, [x, out, out.size], [out], [x], ins)


to_bf16_p.def_label(lambda ins: " bf16 storage")
