"""Recomputation checkpointing: which forward values the backward sweep keeps, which it recomputes.

The backward sweep reads some forward values (relu's output, a matmul's
left operand): those are *saved for backward*, and by default every one stays
live from the forward pass until its last backward use. Rematerialisation
stores only a subset; a backward instruction that needs a dropped value gets a
copy recomputed from stored values just before it (role "recompute"), so the
dropped value dies at its last forward use. Recomputed copies run the same
kernels on the same bits, so results are bitwise identical.

Policies choose the stored subset:
- `jg.checkpoint(fn)` regions: values computed inside a region are not stored;
- `remat="sqrt"`: Chen et al. (2016): about sqrt(n) evenly sized segments of
  the saved values in forward order, each recomputed once from its first value;
- `remat="full"`: nothing is stored, as `jg.checkpoint` around the whole function:
  backward recomputes what it needs from the arguments, each value once. On a chain
  the first backward step needs the last layer, so the whole forward pass is redone
  at once and the peak barely moves: it is the extreme of recomputation (the
  property tests run every random program under it), not a memory policy;
- `memory_budget=BYTES`: the subset with the least recompute work whose arena
  fits the budget; a dynamic program over segments, exact for the memory model
  below on chains, refined against the real planner.

Any stored subset is correct on any graph: a dropped value is recomputed from
whatever its inputs are (stored, program inputs, or recomputed in turn), so DAGs
(residual connections) need no special case; the segment model only steers the
choice.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import JitgradError
from ..frontend.core import is_const
from ..frontend.ir import Instr, Program, Var
from .memory import Plan, aligned
from .passes import dce

Policy = str | int | None


def _boundary(prog: Program) -> int:
    """Index of the first backward instruction (len(instrs) when there is none)."""
    return next((i for i, ins in enumerate(prog.instrs) if ins.role == "backward"),
                len(prog.instrs))


def saved_for_backward(prog: Program) -> list[Var]:
    """Forward values read after the forward pass ends, in the order they are computed.

    Program outputs and scalar constants are left out: they stay live whatever the
    policy (outputs) or cost nothing to keep (constants are folded into kernels).
    """
    b = _boundary(prog)
    read_later = {v for ins in prog.instrs[b:] for v in ins.inputs}
    outputs = set(prog.outputs)
    return [o for ins in prog.instrs[:b] if ins.role == "forward" and not is_const(ins)
            for o in ins.outputs if o in read_later and o not in outputs]


def flops(ins: Instr) -> int:
    """Work of one instruction: what its primitive declares (`def_cost`: 2mnk for a matmul,
    none for a scalar constant), else one per element touched."""
    if ins.prim.cost is not None:
        return ins.prim.cost(ins)
    return max([v.size for v in ins.inputs] + [o.size for o in ins.outputs])


def rematerialize(prog: Program, store: Iterable[Var]) -> Program:
    """prog where instructions after the forward pass read only stored forward values.

    Every other forward value they need is recomputed right before its first such
    reader, from stored values and program inputs; a recomputed copy serves all later
    readers, so each dropped value is computed at most twice in all.
    """
    b = _boundary(prog)
    producer = {o: ins for ins in prog.instrs[:b] for o in ins.outputs}
    keep = set(store) | set(prog.outputs)
    copies: dict[Var, Var] = {}
    instrs = list(prog.instrs[:b])

    def stored(v: Var) -> bool:
        return v not in producer or v in keep or is_const(producer[v])

    def available(v: Var) -> Var:
        # Depth-first with an explicit stack: a long dropped stretch (a checkpointed
        # region around a whole deep network) must not hit Python's recursion limit.
        stack = [v]
        while stack:
            u = stack[-1]
            if stored(u) or u in copies:
                stack.pop()
                continue
            ins = producer[u]
            missing = [w for w in ins.inputs if not stored(w) and w not in copies]
            if missing:
                stack += missing
                continue
            stack.pop()
            inputs = tuple(w if stored(w) else copies[w] for w in ins.inputs)
            outs = tuple(Var(o.shape, o.dtype) for o in ins.outputs)
            instrs.append(dataclasses.replace(ins, inputs=inputs, outputs=outs,
                                              role="recompute"))
            copies.update(zip(ins.outputs, outs, strict=True))
        return v if stored(v) else copies[v]

    for ins in prog.instrs[b:]:
        inputs = tuple(available(v) for v in ins.inputs)
        instrs.append(ins if inputs == ins.inputs else dataclasses.replace(ins, inputs=inputs))
    # Forward work whose only readers moved to the recomputed copies is dropped.
    return dce(Program(list(prog.inputs), instrs, list(prog.outputs), dict(prog.consts)))


# ---------------------------------------------------------------- the segment model

@dataclass
class Candidates:
    """The saved values in forward order with what storing/dropping each costs."""

    values: list[Var]
    nbytes: list[int]   # arena bytes a stored value occupies
    cost: list[int]     # flops to recompute it when the values before it are available
    # bytes of everything else live (gradients, temporaries) while backward uses each value
    overhead: list[int]

    @classmethod
    def of(cls, prog: Program, values: Sequence[Var]) -> Candidates:
        producer = prog.producers()
        stop = set(values) | set(prog.inputs) | set(prog.consts)
        cost = []
        for v in values:
            # the instructions between v and the values before it: v's own segment
            seen: set[int] = set()
            stack, work = [producer[v]], 0
            while stack:
                ins = stack.pop()
                if id(ins) in seen:
                    continue
                seen.add(id(ins))
                work += flops(ins)
                stack += [producer[u] for u in ins.inputs if u not in stop and u in producer]
            cost.append(work)
        return cls(list(values), [aligned(v.nbytes) for v in values], cost,
                   [0] * len(values))

    def measure_overhead(self, plan: Plan) -> None:
        """Read the other live bytes off the plan that stores every value: at the last read
        of each value, whatever is live besides the saved values."""
        live = plan.live_bytes()
        mine = [plan.buffers.get(v) for v in self.values]
        for i, b in enumerate(mine):
            if b is None:
                continue
            ours = sum(m.nbytes for m in mine if m is not None and m.start <= b.end <= m.end)
            self.overhead[i] = max(live[b.end] - ours, 0)

    def model_peak(self, stored: Sequence[bool]) -> int:
        """Bytes of saved values live at the worst moment of the backward sweep.

        Backward walks segments last to first; while it is in the segment that ends at
        stored value k, every stored value up to k is still live, plus the recomputed
        interior of that segment, plus the largest overhead measured inside it.
        """
        peak = prefix = interior = extra = 0
        for s, o, keep in zip(self.nbytes, self.overhead, stored, strict=True):
            extra = max(extra, o)
            if keep:
                prefix += s
                peak = max(peak, prefix + interior + extra)
                interior = extra = 0
            else:
                interior += s
        return max(peak, prefix + interior + extra)

    def recompute_cost(self, stored: Sequence[bool]) -> int:
        return sum(c for c, keep in zip(self.cost, stored, strict=True) if not keep)


def sqrt_policy(cands: Candidates) -> list[bool]:
    """Chen et al.'s sqrt(n) segments, sized by bytes so uneven layers split evenly.

    The values after the last checkpoint are stored too: backward needs them first,
    so dropping them would only recompute them at once.
    """
    n = len(cands.values)
    if n < 4:
        return [True] * n
    segment = sum(cands.nbytes) / math.sqrt(n)
    stored, acc = [False] * n, 0.0
    for i, s in enumerate(cands.nbytes):
        acc += s
        if acc >= segment:
            stored[i], acc = True, 0.0
    last = max((i for i in range(n) if stored[i]), default=-1)
    for i in range(last + 1, n):
        stored[i] = True
    return stored


def budget_policy(cands: Candidates, budget: int) -> list[bool] | None:
    """The stored subset of least recompute cost whose model_peak fits budget (None: none does).

    A dynamic program over the stored values in order: state (last stored index, bytes
    stored so far) -> least cost; Pareto-pruned, so it stays small.
    """
    n = len(cands.values)
    s = [*cands.nbytes, 0]
    o = [*cands.overhead, 0]
    # prefix sums: bytes and cost of the values strictly between j and k
    sb, sc = [0], [0]
    for size, cost in zip(cands.nbytes, cands.cost, strict=True):
        sb.append(sb[-1] + size)
        sc.append(sc[-1] + cost)
    # frontier[k]: non-dominated (prefix bytes, cost, previous index, previous state) with
    # value k stored (k = n is a virtual end of size 0; k = -1 the start).
    frontier: dict[int, list[tuple[int, int, int, int]]] = {-1: [(0, 0, -1, -1)]}
    for k in range(n + 1):
        states = []
        extra = o[k]
        for j in range(k - 1, -2, -1):  # extra: the largest overhead in (j, k]
            interior = sb[k] - sb[j + 1]
            skipped = sc[k] - sc[j + 1]
            for idx, (prefix, cost, _, _) in enumerate(frontier[j]):
                if prefix + s[k] + interior + extra <= budget:
                    states.append((prefix + s[k], cost + skipped, j, idx))
            if j >= 0:
                extra = max(extra, o[j])
        states.sort()
        pruned, best = [], None
        for st in states:
            if best is None or st[1] < best:
                pruned.append(st)
                best = st[1]
        frontier[k] = pruned
    if not frontier[n]:
        return None
    stored = [False] * n
    k, idx = n, min(range(len(frontier[n])), key=lambda i: frontier[n][i][1])
    while k != -1:
        _, _, j, jdx = frontier[k][idx]
        if k < n:
            stored[k] = True
        k, idx = j, jdx
    return stored


def smallest_model_budget(cands: Candidates) -> int:
    lo, hi = 0, max(sum(cands.nbytes) + max(cands.overhead, default=0), 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if budget_policy(cands, mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- choosing and applying

@dataclass
class RematReport:
    """What a policy decided and what it costs, printed with the plan."""

    policy: str
    saved: list[Var]          # forward values the backward sweep reads
    stored: list[Var]         # the ones kept live from the forward pass
    recompute_instrs: int
    recompute_flops: int
    forward_flops: int

    @property
    def stored_bytes(self) -> int:
        return sum(v.nbytes for v in self.stored)

    @property
    def saved_bytes(self) -> int:
        return sum(v.nbytes for v in self.saved)

    def __str__(self) -> str:
        ratio = self.recompute_flops / self.forward_flops if self.forward_flops else 0.0
        return (f"recomputation ({self.policy}): stores {len(self.stored)} of "
                f"{len(self.saved)} values saved for backward ({self.stored_bytes} of "
                f"{self.saved_bytes} bytes); recomputes {self.recompute_instrs} instructions, "
                f"{self.recompute_flops} flops ({ratio:.1%} of the forward pass)")


def describe(prog: Program, out: Program, saved: list[Var], stored: set[Var],
             policy: str) -> RematReport:
    """prog before recomputation, out after it."""
    b = _boundary(prog)
    fwd = sum(flops(i) for i in prog.instrs[:b] if i.role == "forward")
    rec = [i for i in out.instrs if i.role == "recompute"]
    return RematReport(policy, saved, [v for v in saved if v in stored], len(rec),
                       sum(flops(i) for i in rec), fwd)


def check_policy(remat: Policy, memory_budget: int | None) -> None:
    if remat not in (None, "none", "sqrt", "full"):
        raise JitgradError(f"remat={remat!r}: use None, 'none', 'sqrt' or 'full' "
                           "(or memory_budget=BYTES)")
    if memory_budget is not None:
        if remat not in (None, "none"):
            raise JitgradError("give either remat= or memory_budget=, not both")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) \
                or memory_budget <= 0:
            raise JitgradError(f"memory_budget must be a positive number of bytes, "
                               f"got {memory_budget!r}")


def apply(prog: Program, remat: Policy = None, memory_budget: int | None = None,
          plan_of: Callable[[Program], Plan] | None = None) -> tuple[Program, RematReport]:
    """prog with the chosen values recomputed rather than stored, and a report.

    plan_of(program) is the memory planner's layout of a program: memory_budget
    needs it to measure what the model leaves out (gradients, temporaries) and to
    check its choice against the real arena, fragmentation included. The program
    returned is then one plan_of was called on, so a caller that remembers its plans
    compiles the layout that was judged, without planning again.
    """
    saved = saved_for_backward(prog)
    producer = prog.producers()
    in_region = {v for v in saved if producer[v].checkpoint is not None}
    free = [v for v in saved if v not in in_region]  # the policy's to choose
    judged = None
    if memory_budget is not None:
        stored, judged = _fit_budget(prog, free, int(memory_budget), plan_of)
        policy = f"memory_budget={int(memory_budget)}"
    elif remat == "sqrt":
        cands = Candidates.of(prog, free)
        stored = {v for v, keep in zip(free, sqrt_policy(cands), strict=True) if keep}
        policy = "sqrt"
    elif remat == "full":  # the other extreme: keep nothing, recompute from the arguments
        stored, policy = set(), "full"
    else:
        stored = set(free)
        policy = "checkpoint regions" if in_region else "none"
    if judged is not None:
        out = judged
    else:
        out = rematerialize(prog, stored) if len(stored) < len(saved) else prog
    return out, describe(prog, out, saved, stored, policy)


def stores_and_recomputes(stored: int, saved: int) -> str:
    """What an arena keeps of the `saved` values backward reads, and what it recomputes."""
    if saved == 0:
        return "the backward sweep reads no forward values, so there is nothing to recompute"
    values = "value" if saved == 1 else "values"
    if stored == saved:
        return (f"storing {'the' if saved == 1 else 'all'} {saved} {values} saved for "
                "backward and recomputing none")
    if stored == 0:
        return (f"storing none of the {saved} {values} saved for backward and recomputing "
                f"{'it' if saved == 1 else 'them all'}")
    return (f"storing {stored} of the {saved} values saved for backward and recomputing "
            f"the other {saved - stored}")


def _fit_budget(prog: Program, free: list[Var], budget: int,
                plan_of: Callable[[Program], Plan] | None) -> tuple[set[Var], Program | None]:
    """The values to store, and the program that stores them if plan_of laid it out."""
    if plan_of is None:
        raise JitgradError("memory_budget needs the memory planner (backend 'numba')")
    cands = Candidates.of(prog, free)
    n = len(free)
    measured: dict[tuple[bool, ...], int] = {}
    programs: dict[tuple[bool, ...], Program] = {}

    def real(stored: Sequence[bool]) -> int:
        key = tuple(stored)
        if key not in measured:
            chosen = {v for v, keep in zip(free, key, strict=True) if keep}
            programs[key] = rematerialize(prog, chosen)
            measured[key] = plan_of(programs[key]).arena_bytes
        return measured[key]

    everything = plan_of(prog)
    full = measured[(True,) * n] = everything.arena_bytes
    if full <= budget:
        return set(free), None
    cands.measure_overhead(everything)
    # The model ranks choices roughly (it cannot see fragmentation or how temporaries
    # shift), so it proposes and the real planner judges: the model's optimum at a sweep
    # of budgets, then a local search on real arenas (store one more, or swap one).
    smallest = smallest_model_budget(cands)
    top = cands.model_peak([True] * n)
    for b in sorted({smallest + (top - smallest) * i // 8 for i in range(9)} | {budget}):
        stored = budget_policy(cands, b)
        if stored is not None:
            real(stored)
    real(sqrt_policy(cands))
    limit = len(measured) + 2 * n + 16  # real evaluations for the local search

    def neighbours(stored: tuple[bool, ...]) -> Iterator[tuple[bool, ...]]:
        on = [i for i in range(n) if stored[i]]
        off = [i for i in range(n) if not stored[i]]
        for i in sorted(off, key=lambda i: -cands.cost[i]):
            yield tuple(True if k == i else x for k, x in enumerate(stored))
        # swaps: on long chains only a segment boundary moving by one, else any pair
        pairs = [(i, j) for i in off for j in on if n <= 12 or abs(i - j) == 1]
        for i, j in pairs:
            yield tuple(True if k == i else False if k == j else x for k, x in enumerate(stored))

    def improve(best: tuple[bool, ...], score: Callable[[tuple[bool, ...]], float]
                ) -> tuple[bool, ...]:
        """First-improvement descent on score (lower is better)."""
        moved = True
        while moved and len(measured) < limit:
            moved = False
            for trial in neighbours(best):
                if len(measured) >= limit:
                    break
                real(trial)
                if score(trial) < score(best):
                    best, moved = trial, True
                    break
        return best

    feasible = [k for k, peak in measured.items() if peak <= budget]
    if not feasible:
        # of equally small arenas, the one recomputing least (storing everything, if that ties)
        least = improve(min(measured, key=lambda k: (measured[k], cands.recompute_cost(k))),
                        measured.__getitem__)
        raise JitgradError(
            f"memory_budget={budget} bytes cannot be met: the smallest arena this planner "
            f"fits is {measured[least]} bytes ({stores_and_recomputes(sum(least), n)}); "
            f"without recomputation it is {full} bytes")
    best = min(feasible, key=cands.recompute_cost)
    best = improve(best, lambda t: cands.recompute_cost(t) if measured[t] <= budget
                   else math.inf)
    return {v for v, keep in zip(free, best, strict=True) if keep}, programs.get(best)
