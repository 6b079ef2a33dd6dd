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


def check_differentiable(out: Var, what: str) -> None:
    """A gradient is of a float scalar (or a float array of size 1, as autograd allows)."""
    if out.dtype.kind != "f" or (what == "grad" and out.size != 1):
        need = "a float scalar" if what == "grad" else "float values"
        raise JitgradError(f"{what} needs a function returning {need}, got "
                           f"{out.type_str()}" + ("; reduce it first (e.g. jg.sum)"
                                                  if what == "grad" else ""))


def grad_program(prog: Program, wrt: Sequence[int], out_index: int = 0) -> Program:
    """A Program returning prog's outputs, then d outputs[out_index] / d inputs[i], i in wrt.

    The output is a float scalar, or any float array of size 1."""
    out = prog.outputs[out_index]
    check_differentiable(out, "grad")
    wrt_vars = [prog.inputs[i] for i in wrt]
    with Trace() as t:
        env = replay(prog, [t.new_input(v.shape, v.dtype) for v in prog.inputs])
        seed = _constant(t, np.ones(out.shape, out.dtype))
        grads = _reverse_sweep(t, prog, env, wrt_vars, out, seed)
        return t.to_program([env[o] for o in prog.outputs] + grads)


def jacobian_program(prog: Program, wrt: Sequence[int], n_outputs: int) -> Program:
    """A Program returning prog's outputs, then, for each of its first n_outputs (float)
    and each input i in wrt, the Jacobian d output / d input (shape out.shape + in.shape).

    Reverse mode: one sweep per output element, seeded with that element's unit vector,
    all in this one program after one forward pass."""
    wrt_vars = [prog.inputs[i] for i in wrt]
    with Trace() as t:
        env = replay(prog, [t.new_input(v.shape, v.dtype) for v in prog.inputs])
        jacobians = []
        for out in prog.outputs[:n_outputs]:
            check_differentiable(out, "jacobian")
            rows = []
            for k in range(out.size):
                unit = np.zeros(out.size, out.dtype)
                unit[k] = 1
                seed = _constant(t, unit.reshape(out.shape))
                rows.append(_reverse_sweep(t, prog, env, wrt_vars, out, seed))
            with instr_tags("backward"):
                for j, v in enumerate(wrt_vars):
                    jacobians.append(_stack([r[j] for r in rows], out.shape, v))
        return t.to_program([env[o] for o in prog.outputs] + jacobians)


def _stack(rows: Sequence[Any], out_shape: tuple[int, ...], v: Var) -> Any:
    """The gradients of each output element with respect to v, as one array."""
    if len(rows) == 1:
        return S.reshape(rows[0], out_shape + v.shape)
    flat = S.concatenate([S.reshape(r, (1, v.size)) for r in rows], axis=0)
    return S.reshape(flat, out_shape + v.shape)


def _reverse_sweep(t: Trace, prog: Program, env: dict[Var, Any], wrt_vars: Sequence[Var],
                   out: Var, seed: Any) -> list[Any]:
    """One backward pass from `out` (cotangent `seed`) over prog replayed as env: the
    gradient of each wrt Var, zeros where no path reaches it."""
    path = _on_path(prog, wrt_vars, out)
    grad_table: dict[Var, Any] = {out: seed}
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
        return [S.broadcast_to(_constant(t, np.zeros((), v.dtype)), v.shape) if g is None
                else g for v, g in zip(wrt_vars, grads, strict=True)]


def _constant(t: Trace, value: np.ndarray) -> Tracer:
    with instr_tags("backward"):
        return Tracer(t, t.var_of(value))


def _check_cotangent(ins: Any, v: Var, g: Any) -> None:
    if tuple(g.shape) != v.shape or np.dtype(g.dtype) != v.dtype:
        raise JitgradError(f"internal error: the VJP of {ins.prim.name} produced "
                           f"{np.dtype(g.dtype)}{tuple(g.shape)} for {v!r}")
