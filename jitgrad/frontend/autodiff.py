"""Reverse-mode differentiation as a Program-to-Program transformation.

Back-propagation as in Deep Learning, Algorithm 6.2: walk the instructions in
reverse, filling a grad_table that maps each Var to the Var holding its
gradient. Each primitive's VJP rule emits ordinary instructions, so the result
is a Program like any other and can be differentiated again. A Var reached by
several paths gets the sum of its contributions. Only Vars on a path from a
requested input to the output receive gradients, so the cost is O(1)
instructions per forward edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import JitgradError, UndefinedGradientError
from .core import Trace, Tracer, instr_tags, replay, source_loc
from .ir import Program, Var
from .ops import elementwise as E
from .ops import shape as S


def _on_path(prog: Program, wrt: Sequence[Var], out: Var) -> set[Var]:
    """Vars that depend on a wrt input (through float values) and that the output uses."""
    active = set(wrt)
    for ins in prog.instrs:
        if any(v in active for v in ins.inputs):
            active.update(o for o in ins.outputs if o.dtype.kind == "f")
    useful = {out}
    for ins in reversed(prog.instrs):
        if any(o in useful for o in ins.outputs):
            useful.update(ins.inputs)
    return active & useful


def grad_program(prog: Program, wrt: Sequence[int], out_index: int = 0) -> Program:
    """A Program returning prog's outputs, then d outputs[out_index] / d inputs[i], i in wrt."""
    out = prog.outputs[out_index]
    if out.shape != () or out.dtype.kind != "f":
        raise JitgradError(f"grad needs a function returning a float scalar, got "
                           f"{out.type_str()}; reduce it first (e.g. jg.sum)")
    wrt_vars = [prog.inputs[i] for i in wrt]
    with Trace() as t:
        env = replay(prog, [t.new_input(v.shape, v.dtype) for v in prog.inputs])
        path = _on_path(prog, wrt_vars, out)
        with instr_tags("backward"):
            grad_table: dict[Var, Any] = {out: _constant(t, 1.0, out.dtype)}
        for ins in reversed(prog.instrs):
            cts = [grad_table.pop(o, None) for o in ins.outputs]
            needs = [v in path for v in ins.inputs]
            if all(c is None for c in cts) or not any(needs) or ins.prim.grad == "zero":
                continue
            if ins.prim.grad == "undefined":
                raise UndefinedGradientError(
                    f"the gradient of {ins.prim.name} is undefined (it is piecewise constant), "
                    f"but a requested gradient flows through it at {ins.loc}; wrap its input "
                    f"in jg.stop_gradient if it is meant to be a constant")
            with source_loc(ins.loc), instr_tags("backward"):
                grads = ins.prim.vjp(cts, [env[o] for o in ins.outputs],
                                     [env[v] for v in ins.inputs], **ins.kw)
                for v, g, need in zip(ins.inputs, grads, needs, strict=True):
                    if need and g is not None:
                        _check_cotangent(ins, v, g)
                        grad_table[v] = E.add(grad_table[v], g) if v in grad_table else g
        grads = [grad_table.get(v) for v in wrt_vars]
        with instr_tags("backward"):
            grads = [S.broadcast_to(_constant(t, 0.0, v.dtype), v.shape) if g is None else g
                     for v, g in zip(wrt_vars, grads, strict=True)]
        return t.to_program([env[o] for o in prog.outputs] + grads)


def _constant(t: Trace, value: float, dtype: np.dtype) -> Tracer:
    return Tracer(t, t.var_of(np.asarray(value, dtype)))


def _check_cotangent(ins: Any, v: Var, g: Any) -> None:
    if tuple(g.shape) != v.shape or np.dtype(g.dtype) != v.dtype:
        raise JitgradError(f"internal error: the VJP of {ins.prim.name} produced "
                           f"{np.dtype(g.dtype)}{tuple(g.shape)} for {v!r}")
