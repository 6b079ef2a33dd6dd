"""Elementwise fusion: chains of elementwise instructions become one loop.

A group is a tree of elementwise instructions whose interior values have a
single use; only its root is materialised. Scalar constants are folded into
every group that reads them as literals. relu-backward (`where(y > 0, g, 0)`),
bias + activation and the optimizer update all come out of this one rule as
single-pass loops.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..frontend.core import is_const
from ..frontend.ir import Instr, Program, Var

MAX_LEAVES = 12  # keeps kernel signatures short; a larger tree is split at a leaf


@dataclass
class Group:
    root: Instr
    members: dict[Var, Instr]  # every output Var of the tree -> its instruction
    leaves: list[Var]          # materialised inputs, in first-use order
    # For a root `x + A@B` whose product nothing else reads: that matmul (a primitive with
    # `def_accumulate`), which code generation turns into one GEMM accumulating into the
    # group's result.
    accumulates: Instr | None = None

    @property
    def out(self) -> Var:
        return self.root.outputs[0]


def is_elementwise(ins: Instr) -> bool:
    return ins.prim.elementwise


def accumulated_product(ins: Instr, producer: dict[Var, Instr], uses: Counter[Var]) -> Var | None:
    """For `x + A@B` whose product nothing else reads, the product: code generation makes
    such a sum one GEMM accumulating into the sum's buffer, so it stays a group's root."""
    if not ins.prim.absorbs_accumulation:
        return None
    out = ins.outputs[0]
    for m, x in (ins.inputs, ins.inputs[::-1]):  # prefer the later product
        p = producer.get(m)
        if (p is not None and p.prim.accumulate is not None and uses[m] == 1 and m is not x
                and m.shape == x.shape == out.shape and m.dtype == x.dtype == out.dtype):
            return m
    return None


def fuse(prog: Program) -> list[Instr | Group]:
    """The program as a schedule of single instructions and fused elementwise groups."""
    producer = prog.producers()
    uses: Counter[Var] = Counter(v for ins in prog.instrs for v in ins.inputs)
    uses.update(prog.outputs)
    outputs = set(prog.outputs)
    group_of: dict[Var, Group] = {}
    absorbed: set[int] = set()  # ids of groups merged into a later one
    schedule: list[Instr | Group] = []

    def leaves_of(ins: Instr, members: dict[Var, Instr]) -> list[Var]:
        out: list[Var] = []
        for v in ins.inputs:
            p = members.get(v)
            if p is None:
                if not is_const(producer.get(v)) and v not in out:
                    out.append(v)
            else:
                out += [x for x in leaves_of(p, members) if x not in out]
        return out

    for ins in prog.instrs:
        if not is_elementwise(ins):
            schedule.append(ins)
            continue
        members = {ins.outputs[0]: ins}
        for v in ins.inputs:
            p = producer.get(v)
            if p is None or not is_elementwise(p):
                continue
            if is_const(p):
                members[v] = p
                continue
            g = group_of.get(v)
            if g is not None and uses[v] == 1 and v not in outputs and g.accumulates is None:
                trial = {**members, **g.members}
                if len(leaves_of(ins, trial)) <= MAX_LEAVES:
                    members = trial
                    absorbed.add(id(g))
        product = accumulated_product(ins, producer, uses)
        group = Group(ins, members, leaves_of(ins, members),
                      producer[product] if product is not None else None)
        group_of[ins.outputs[0]] = group
        schedule.append(group)
    # A constant needs its own buffer only where a non-elementwise op or the caller reads it.
    needed = outputs | {v for ins in prog.instrs if not is_elementwise(ins) for v in ins.inputs}
    return _accumulate_early([s for s in schedule if not (isinstance(s, Group) and (
        id(s) in absorbed or (is_const(s.root) and s.out not in needed)))])


def _accumulate_early(schedule: list[Instr | Group]) -> list[Instr | Group]:
    """The schedule with each GEMM-accumulating group moved up to where its inputs are ready.

    Such a group runs its matmul, so left at its root's place it would delay the
    matmul there: a weight gradient added into the optimizer's momentum or weight
    decay (`mu*buf + A.T@G`) would keep the layer's activation A and gradient G live
    from the backward sweep to the update at the end of the step, every layer at once.
    Right after its last input is computed, it frees them where the matmul would.
    Order among the other steps is unchanged; moving a computation earlier is always
    safe in SSA form (the planner refuses in-place donation into a caller's array
    before a step that can fail, see backend._donatable).
    """
    position: dict[Var, tuple[int, ...]] = {}  # sort key of the step that writes a value
    keys: list[tuple[int, ...]] = []
    for i, item in enumerate(schedule):
        if isinstance(item, Group) and item.accumulates is not None:
            # right after the latest step writing one of its inputs, before anything later
            key = max((position[v] for v in item.leaves if v in position), default=(-1,)) + (i,)
        else:
            key = (i,)
        keys.append(key)
        for v in ([item.out] if isinstance(item, Group) else item.outputs):
            position[v] = key
    return [item for _, item in sorted(zip(keys, schedule), key=lambda p: p[0])]
