"""Elementwise fusion: chains of elementwise instructions become one loop.

A group is a tree of elementwise instructions whose interior values have a
single use; only its root is materialised. Scalar constants are folded into
every group that reads them as literals. relu-backward (`where(y > 0, g, 0)`),
bias + activation and the optimizer update all come out of this one rule as
single-pass loops.

A sum over the leading axes of a group's result (a primitive that
`sums_in_producer`) is computed in the group's own loop: `sum(W * W)` never
writes `W * W`, and a bias gradient's column sum runs in the pass of the
relu-backward producing its input, which is then written only if something else
reads it.
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
    # A sum of the group's result over its leading axes, computed in the same loop; the
    # result itself is then written only if `keeps_out` (something else reads it).
    reduction: Instr | None = None
    keeps_out: bool = True

    @property
    def out(self) -> Var:
        return self.root.outputs[0]

    @property
    def outputs(self) -> list[Var]:
        """The values the group's loop writes."""
        return ([self.out] if self.keeps_out else []) + (
            [self.reduction.outputs[0]] if self.reduction is not None else [])


def is_elementwise(ins: Instr) -> bool:
    return ins.prim.elementwise


def accumulated_product(ins: Instr, producer: dict[Var, Instr], uses: Counter[Var],
                        fused_into_one_reader: bool = False) -> Var | None:
    """For `x + A@B` whose product nothing else reads, the product: code generation makes
    such a sum one GEMM accumulating into the sum's buffer, so it stays a group's root.

    Not where x is itself an elementwise result and the sum's one reader is an
    elementwise loop (`fused_into_one_reader`): there GEMM writes its product and that
    loop adds x as it goes, so x is never written (the weight-decay term of an SGD
    update: one pass over the parameter reads W and the GEMM's dW, writes W)."""
    if not ins.prim.absorbs_accumulation:
        return None
    out = ins.outputs[0]
    for m, x in (ins.inputs, ins.inputs[::-1]):  # prefer the later product
        p = producer.get(m)
        if (p is not None and p.prim.accumulate is not None and uses[m] == 1 and m is not x
                and m.shape == x.shape == out.shape and m.dtype == x.dtype == out.dtype):
            px = producer.get(x)
            if fused_into_one_reader and px is not None and is_elementwise(px) \
                    and not is_const(px):
                return None
            return m
    return None


def _sum_fuses(ins: Instr, group: Group | None, outputs: set[Var]) -> bool:
    """Can the group computing ins's input compute this sum in its loop? A float sum over
    leading axes of the result, every leaf of the group either of the result's shape or a
    single value (the loop then indexes them all alike)."""
    if group is None or group.accumulates is not None or group.reduction is not None:
        return False
    out = group.out
    axes = ins.kw.get("axes", ())
    return (ins.prim.sums_in_producer and ins.inputs[0] is out and out.dtype.kind == "f"
            and out.size > 0 and ins.outputs[0].dtype == out.dtype
            and axes == tuple(range(len(axes))) and len(axes) > 0
            and not is_const(group.root)
            and all(v.shape == out.shape or v.size == 1 for v in group.leaves))


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

    readers: dict[Var, list[Instr]] = {}
    for ins in prog.instrs:
        for v in ins.inputs:
            readers.setdefault(v, []).append(ins)

    def one_elementwise_reader(v: Var) -> bool:
        """v is read once, by an elementwise loop that adds no product of its own (a chain
        of products summed into one gradient accumulates them all into one buffer)."""
        r = readers.get(v, [])
        return (uses[v] == 1 and v not in outputs and len(r) == 1 and is_elementwise(r[0])
                and not any(producer.get(u) is not None and producer[u].prim.accumulate
                            is not None for u in r[0].inputs))

    for ins in prog.instrs:
        if not is_elementwise(ins):
            g = group_of.get(ins.inputs[0]) if ins.inputs else None
            if _sum_fuses(ins, g, outputs):
                g.reduction = ins
                g.keeps_out = uses[g.out] > 1 or g.out in outputs
                continue
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
            if g is not None and uses[v] == ins.inputs.count(v) and v not in outputs \
                    and g.accumulates is None and g.reduction is None:
                trial = {**members, **g.members}
                if len(leaves_of(ins, trial)) <= MAX_LEAVES:
                    members = trial
                    absorbed.add(id(g))
        product = accumulated_product(ins, producer, uses,
                                      one_elementwise_reader(ins.outputs[0]))
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
        for v in item.outputs:
            position[v] = key
    return [item for _, item in sorted(zip(keys, schedule), key=lambda p: p[0])]
