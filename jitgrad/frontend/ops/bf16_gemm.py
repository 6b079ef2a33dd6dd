"""bfloat16 GEMM: how precision="bf16" products run on CPUs with bfloat16 instructions.

The policy pass (compiler/precision.py) reads each GEMM operand through `round_bf16`,
whose float32 result any GEMM can multiply. Where this CPU multiplies bfloat16 natively
(AMX-BF16 / AVX512_BF16) and MKL's `cblas_gemm_bf16bf16f32` is loaded
(compiler/bf16_provider.py), code generation rewrites a product of two rounded
operands (`prepare`) into
- `to_bf16` (precision.py): the rounded operand stored as bfloat16 bit patterns (uint16,
  half the bytes), made once per value and step by a parallel pass — a weight once for
  its forward and backward products, never per GEMM call;
- `matmul_bf16`: op(A)·op(B) of bfloat16 operands (2-d or batched), accumulated and
  returned in float32; a convolution (ops/conv.py) keeps its primitive and takes the
  stored operands, its kernels then unrolling bfloat16 and multiplying through the
  bfloat16 provider's strided GEMM.
Both compute exactly what `round_bf16` then the float32 product compute, up to the order
of the float32 sums.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np

from ...compiler import bf16_provider, blas
from ...errors import JitgradError, NoLoweringError
from ..core import emit_like, primitive
from ..ir import Instr, Var
from . import conv as CV
from . import elementwise as E
from . import linalg as L
from .precision import bf16_to_f32, round_bf16_p, to_bf16_p

# The product code generation gives precision="bf16" GEMMs (prepare makes it): its
# operands are integer bit patterns, so nothing differentiates it.
matmul_bf16_p = primitive("matmul_bf16", "linalg", grad="zero")

_F32, _U16 = np.dtype(np.float32), np.dtype(np.uint16)


@matmul_bf16_p.def_shape
def _matmul_bf16_shape(a, b, *, ta, tb, batch=None):
    if a[1] != _U16 or b[1] != _U16:
        raise JitgradError(f"multiplies bfloat16 (uint16) matrices, got {a[1]}{list(a[0])} "
                           f"and {b[1]}{list(b[0])}")
    if batch is None:  # matmul's product, else matmul_sum's (summed over batch dimensions)
        shape, _ = L._matmul_shape((a[0], _F32), (b[0], _F32), ta=ta, tb=tb)
    else:
        shape, _ = L._matmul_sum_shape((a[0], _F32), (b[0], _F32), ta=ta, tb=tb, batch=batch)
    return shape, _F32


@matmul_bf16_p.def_impl
def _matmul_bf16_impl(a, b, *, ta, tb, batch=None):
    fa, fb = bf16_to_f32(a).reshape(a.shape), bf16_to_f32(b).reshape(b.shape)
    out = np.matmul(L._op(fa, ta), L._op(fb, tb))
    return out if batch is None else E.unbroadcast(out, batch + out.shape[-2:])


# ---------------------------------------------------------------- the rewrite

class _Seen:
    """What the prepared instructions so far round and store: round_bf16 result -> its
    operand, operand -> its to_bf16 result. Kept up to date as `out` grows, so a program
    is indexed once however many products it has."""

    def __init__(self, out: list[Instr]):
        self.out, self.indexed = out, 0
        self.rounded: dict[Var, Var] = {}
        self.stored: dict[Var, Var] = {}

    def update(self) -> _Seen:
        for ins in self.out[self.indexed:]:
            if ins.prim is round_bf16_p:
                self.rounded[ins.outputs[0]] = ins.inputs[0]
            elif ins.prim is to_bf16_p:
                self.stored.setdefault(ins.inputs[0], ins.outputs[0])
        self.indexed = len(self.out)
        return self


_local = threading.local()  # the program being prepared in this thread: its _Seen


def _seen(out: list[Instr]) -> _Seen:
    seen = getattr(_local, "seen", None)
    if seen is None or seen.out is not out:
        seen = _local.seen = _Seen(out)
    return seen.update()


def _stored_operands(ins: Instr, out: list[Instr], shape: blas.GemmShape
                     ) -> tuple[Var, Var] | None:
    """ins's two GEMM operands stored as bfloat16 (appended to out where not yet), when
    both are rounded and a bfloat16 GEMM of this shape pays; else None."""
    seen = _seen(out)
    sources = [seen.rounded.get(v) for v in ins.inputs[:2]]
    if None in sources or not bf16_provider.chooses_bf16(
            dataclasses.replace(shape, dtype=_U16)):
        return None
    # each operand stored once: a weight's forward and backward products share it
    for src in sources:
        if src not in seen.stored:
            seen.stored[src] = emit_like(out, to_bf16_p, (src,), ins)
    return seen.stored[sources[0]], seen.stored[sources[1]]


def _prepare_product(ins: Instr, out: list[Instr]) -> None:
    stored = _stored_operands(ins, out, L.gemm_shape(ins, ins.outputs[0]))
    out.append(ins if stored is None else Instr(
        matmul_bf16_p, stored, ins.params, ins.outputs, ins.loc, ins.role, ins.checkpoint))


def _prepare_conv(ins: Instr, out: list[Instr]) -> None:
    # the same primitive on bfloat16 operands (a bias stays float32): its lowering picks
    # the bfloat16 provider's kernels by the operands' dtype
    stored = _stored_operands(ins, out, CV.gemm_shape(ins))
    out.append(ins if stored is None else dataclasses.replace(
        ins, inputs=stored + ins.inputs[2:]))


for _p in L.PRODUCTS:
    _p.def_prepare(_prepare_product)
for _p in CV.CONVS:
    _p.def_prepare(_prepare_conv)

# ---------------------------------------------------------------- compiling

# matmul's own lowering: blas.choose gives uint16 operands the bfloat16 provider
@matmul_bf16_p.def_lowering
def _lower_bf16(low: Any, ins: Instr) -> None:
    _check_provider()
    L._lower_product(low, ins)


@matmul_bf16_p.def_accumulate
def _accumulate_bf16(low: Any, ins: Instr, out: Var, x: Var) -> tuple[Any, np.dtype, list[Any]]:
    _check_provider()
    return L._accumulate_product(low, ins, out, x)


def _check_provider() -> None:
    if not blas.available(bf16_provider.PROVIDER):  # prepare never makes one then; a hand-made one
        raise NoLoweringError("it needs MKL's bfloat16 GEMM (the mkl extra) on a CPU with "
                              "AVX512_BF16 or AMX-BF16")


matmul_bf16_p.def_cost(L._matmul_flops)
matmul_bf16_p.def_label(lambda ins: " bf16" + L._matmul_label(ins))
