"""bfloat16 GEMM: how precision="bf16" products run on CPUs with bfloat16 instructions.

The policy pass (compiler/precision.py) reads each GEMM operand through `round_bf16`,
whose float32 result any GEMM can multiply. Where this CPU multiplies bfloat16 natively
(AMX-BF16 / AVX512_BF16) and MKL's `cblas_gemm_bf16bf16f32` is loaded
(compiler/bf16_provider.py), code generation rewrites a 2-d product of two rounded
operands (`prepare`) into
- `to_bf16` (precision.py): the rounded operand stored as bfloat16 bit patterns (uint16,
  half the bytes), made once per value and step by a parallel pass — a weight once for
  its forward and backward products, never per GEMM call;
- `matmul_bf16`: op(A)·op(B) of bfloat16 operands, accumulated and returned in float32.
Both compute exactly what `round_bf16` then `matmul` compute, up to the order of the
float32 sums. Batched products keep the float32 GEMM on rounded values.
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
from . import linalg as L
from .precision import bf16_to_f32, round_bf16_p, to_bf16_p

# The product code generation gives precision="bf16" GEMMs (prepare makes it): its
# operands are integer bit patterns, so nothing differentiates it.
matmul_bf16_p = primitive("matmul_bf16", "linalg", grad="zero")

_F32, _U16 = np.dtype(np.float32), np.dtype(np.uint16)


@matmul_bf16_p.def_shape
def _matmul_bf16_shape(a, b, *, ta, tb):
    if a[1] != _U16 or b[1] != _U16 or len(a[0]) != 2 or len(b[0]) != 2:
        raise JitgradError(f"multiplies 2-d bfloat16 (uint16) matrices, got {a[1]}{list(a[0])} "
                           f"and {b[1]}{list(b[0])}")
    shape, _ = L._matmul_shape((a[0], _F32), (b[0], _F32), ta=ta, tb=tb)
    return shape, _F32


@matmul_bf16_p.def_impl
def _matmul_bf16_impl(a, b, *, ta, tb):
    fa, fb = bf16_to_f32(a).reshape(a.shape), bf16_to_f32(b).reshape(b.shape)
    return L._op(fa, ta) @ L._op(fb, tb)


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


def _prepare_product(ins: Instr, out: list[Instr]) -> None:
    a, b = ins.inputs
    seen = _seen(out)
    sources = [seen.rounded.get(a), seen.rounded.get(b)]
    if None in sources or a.ndim != 2 or b.ndim != 2:
        out.append(ins)
        return
    shape = L.gemm_shape(ins, ins.outputs[0])
    if not bf16_provider.chooses_bf16(dataclasses.replace(shape, dtype=np.dtype(np.uint16))):
        out.append(ins)
        return
    # each operand stored once: a weight's forward and backward products share it
    for src in sources:
        if src not in seen.stored:
            seen.stored[src] = emit_like(out, to_bf16_p, (src,), ins)
    out.append(Instr(matmul_bf16_p, tuple(seen.stored[src] for src in sources), ins.params,
                     ins.outputs, ins.loc, ins.role, ins.checkpoint))


L.matmul_p.def_prepare(_prepare_product)

# ---------------------------------------------------------------- compiling

@matmul_bf16_p.def_lowering
def _lower_bf16(low: Any, ins: Instr) -> None:
    a, b = ins.inputs
    c = ins.outputs[0]
    kernel = _provider(ins, c).plain
    low.call(kernel, a.dtype, [a, b, c, *L._gemm_args(ins, c)], [c], [a, b], ins)


@matmul_bf16_p.def_accumulate
def _accumulate_bf16(low: Any, ins: Instr, out: Var, x: Var) -> tuple[Any, np.dtype, list[Any]]:
    a, b = ins.inputs
    return _provider(ins, out).accumulate, a.dtype, [a, b, out, x, *L._gemm_args(ins, out)]


def _provider(ins: Instr, out: Var) -> Any:
    try:
        return blas.choose(L.gemm_shape(ins, out))
    except JitgradError:  # prepare never makes one then; a hand-made one
        raise NoLoweringError("it needs MKL's bfloat16 GEMM (the mkl extra) on a CPU with "
                              "AVX512_BF16 or AMX-BF16") from None


matmul_bf16_p.def_cost(L._matmul_flops)
matmul_bf16_p.def_label(lambda ins: " bf16" + L._matmul_label(ins))
