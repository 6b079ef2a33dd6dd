"""Program-to-Program optimisations. Each is pure, switchable and never changes results.

- simplify: drops stop_gradient (it only matters to differentiation) and `x * 1`, and folds
  2-d transposes into matmul's transpose flags, so `A.T @ G` reaches GEMM
  without a copy;
- cse: one instruction per distinct (primitive, inputs, params);
- dce: removes instructions whose results are never used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from .ir import Instr, Program, Var
from .ops.elementwise import mul_p, stop_gradient_p
from .ops.linalg import matmul_p
from .ops.shape import transpose_p


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
        if ins.prim is stop_gradient_p:
            subst[ins.outputs[0]] = ins.inputs[0]
            continue
        if ins.prim is mul_p:
            same = _multiplied_by_one(ins, producer)
            if same is not None:
                subst[ins.outputs[0]] = same
                continue
        if ins.prim is matmul_p:
            kw = ins.kw
            a, b = ins.inputs
            pa, pb = producer.get(a), producer.get(b)
            if pa is not None and pa.prim is transpose_p and pa.kw["perm"] == (1, 0):
                a, kw["ta"] = pa.inputs[0], not kw["ta"]
            if pb is not None and pb.prim is transpose_p and pb.kw["perm"] == (1, 0):
                b, kw["tb"] = pb.inputs[0], not kw["tb"]
            ins = dataclasses.replace(ins, inputs=(a, b), params=tuple(sorted(kw.items())))
        for o in ins.outputs:
            producer[o] = ins
        instrs.append(ins)
    return _finish(prog, instrs, subst)


def _multiplied_by_one(ins: Instr, producer: dict[Var, Instr]) -> Var | None:
    """x for `x * 1` (the seed of every gradient) when that changes no shape or dtype."""
    for one, x in (ins.inputs, ins.inputs[::-1]):
        p = producer.get(one)
        if (p is not None and p.prim.name == "const" and p.kw["value"] == 1
                and x.shape == ins.outputs[0].shape and x.dtype == ins.outputs[0].dtype):
            return x
    return None


DEFAULT_PASSES: tuple[Callable[[Program], Program], ...] = (simplify, cse, dce)


def optimize(prog: Program, passes=DEFAULT_PASSES) -> Program:
    for p in passes:
        prog = p(prog)
    return prog
