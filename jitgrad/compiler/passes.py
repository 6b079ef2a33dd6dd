"""Program-to-Program optimisations. Each is pure, switchable and never changes results.

- simplify: each primitive's own simplification (`Primitive.def_simplify`): stop_gradient
  is dropped (it only matters to differentiation), `x * 1` becomes x, 2-d transposes fold
  into matmul's transpose flags (so `A.T @ G` reaches GEMM without a copy);
- cse: one instruction per distinct (primitive, inputs, params);
- dce: removes instructions whose results are never used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from ..frontend.ir import Instr, Program, Var


def _rename(ins: Instr, subst: dict[Var, Var]) -> Instr:
    if not any(v in subst for v in ins.inputs):
        return ins
    return dataclasses.replace(ins, inputs=tuple(subst.get(v, v) for v in ins.inputs))


def _finish(prog: Program, instrs: list[Instr], subst: dict[Var, Var]) -> Program:
    return Program(list(prog.inputs), instrs, [subst.get(v, v) for v in prog.outputs],
                   dict(prog.consts))


def dce(prog: Program) -> Program:
    live = set(prog.outputs)
    kept: list[Instr] = []
    for ins in reversed(prog.instrs):
        if any(o in live for o in ins.outputs):
            kept.append(ins)
            live.update(ins.inputs)
    consts = {v: a for v, a in prog.consts.items() if v in live}
    return Program(list(prog.inputs), kept[::-1], list(prog.outputs), consts)


def _param_key(v: Any) -> Any:
    # -0.0 == 0.0 (same hash) in Python, but they are different constants: 1/-0.0 = -inf.
    return (v, math.copysign(1.0, v)) if isinstance(v, float) else v


def cse(prog: Program) -> Program:
    seen: dict[tuple, Instr] = {}
    subst: dict[Var, Var] = {}
    instrs: list[Instr] = []
    for ins in prog.instrs:
        ins = _rename(ins, subst)
        key = (ins.prim, ins.inputs, tuple((k, _param_key(v)) for k, v in ins.params))
        prev = seen.get(key)
        if prev is None:
            seen[key] = ins
            instrs.append(ins)
        else:
            subst.update(zip(ins.outputs, prev.outputs, strict=True))
    return _finish(prog, instrs, subst)


def simplify(prog: Program) -> Program:
    producer: dict[Var, Instr] = {}
    subst: dict[Var, Var] = {}
    instrs: list[Instr] = []
    for ins in prog.instrs:
        ins = _rename(ins, subst)
        rule = ins.prim.simplify
        simpler = rule(ins, producer) if rule is not None else None
        if isinstance(simpler, Var):
            subst[ins.outputs[0]] = simpler
            continue
        if isinstance(simpler, tuple):  # one Var per result of a multi-result instruction
            subst.update(zip(ins.outputs, simpler, strict=True))
            continue
        if simpler is not None:
            ins = simpler
        for o in ins.outputs:
            producer[o] = ins
        instrs.append(ins)
    return _finish(prog, instrs, subst)


DEFAULT_PASSES: tuple[Callable[[Program], Program], ...] = (simplify, cse, dce)


def optimize(prog: Program, passes=DEFAULT_PASSES) -> Program:
    for p in passes:
        prog = p(prog)
    return prog
