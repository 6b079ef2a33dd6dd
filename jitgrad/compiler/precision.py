"""Mixed precision: the pass that rounds GEMM operands to bfloat16 (precision="bf16").

The policy is torch.autocast's for the CPU with dtype=bfloat16: every float32 operand
of a GEMM (each primitive declaring `gemm_operands`: matmul and the batched products,
so the forward GEMMs and the backward ones the VJPs emitted alike) is read through a
`round_bf16` instruction; the GEMM accumulates and returns float32, and everything else
(reductions, softmax, the loss, the optimizer update, the float32 master weights) is
untouched. A value read by several GEMMs (a weight in the forward product and in the
backward one) is rounded once per call, where it is first read.

float64 GEMMs are left in float64, as autocast leaves double tensors alone; a
program whose GEMMs are all float64 gets a warning saying the policy did nothing.
The pass runs after the other passes (so transposes are already folded into the
GEMM flags) and before recomputation and planning: the rounding is a step of the
program that `print(cf.program)` shows, the interpreter runs and the Numba backend
lowers (to bfloat16 storage and an MKL bfloat16 GEMM where the CPU has the
instructions, see bf16_gemm.py; to float32 GEMM on the rounded values elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import numpy as np

from ..errors import JitgradError, JitgradWarning
from ..frontend.core import emit_like
from ..frontend.ir import Instr, Program, Var
from ..frontend.ops.precision import round_bf16_p

PRECISIONS = ("f32", "bf16")
_ALIASES = {None: None, "f32": None, "float32": None, "bf16": "bf16", "bfloat16": "bf16"}
_F32 = np.dtype(np.float32)


def check_precision(precision: Any) -> str | None:
    """The policy precision names: None (float32 throughout, also "f32") or "bf16"."""
    try:
        return _ALIASES[precision]
    except (KeyError, TypeError):
        raise JitgradError(f"unknown precision {precision!r}: use 'f32' (or None, the "
                           f"default) or 'bf16'") from None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX-BF16), as LLVM
    sees the host."""
    import llvmlite.binding as llb
    features = llb.get_host_cpu_features()
    return bool(features.get("avx512bf16") or features.get("amx-bf16"))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(f"jitgrad: {message}", JitgradWarning, stacklevel=4)


def apply(prog: Program, precision: str | None) -> Program:
    """prog under the precision policy (unchanged for float32)."""
    if precision is None:
        return prog
    producer = prog.producers()
    rounded: dict[Var, Var] = {}
    instrs: list[Instr] = []
    gemms = float64_gemms = 0
    for ins in prog.instrs:
        if ins.prim.gemm_operands:
            gemms += 1
            inputs = list(ins.inputs)
            for k in ins.prim.gemm_operands:
                v = inputs[k]
                if v.dtype != _F32:
                    float64_gemms += v.dtype.kind == "f"
                    continue
                p = producer.get(v)
                if p is not None and p.prim is round_bf16_p:  # already bfloat16 values
                    continue
                if v not in rounded:
                    rounded[v] = emit_like(instrs, round_bf16_p, (v,), ins)
                inputs[k] = rounded[v]
            if inputs != list(ins.inputs):
                ins = dataclasses.replace(ins, inputs=tuple(inputs))
        instrs.append(ins)
    if gemms and not rounded and float64_gemms:
        _warn_once("precision='bf16' changed nothing: the program's GEMMs are float64 "
                   "(the policy rounds float32 operands only, as torch.autocast does)")
    elif rounded and not cpu_has_bf16():
        _warn_once("this CPU has no bfloat16 instructions (AVX512_BF16 or AMX-BF16): "
                   "precision='bf16' rounds the GEMM operands and multiplies them in "
                   "float32 here, giving the bfloat16 results but no speed-up")
    return Program(list(prog.inputs), instrs, list(prog.outputs), dict(prog.consts))
