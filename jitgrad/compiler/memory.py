"""The memory planner: liveness over the schedule, every buffer placed in one arena.

Each materialised value gets a live range [first step that writes it, last step
that reads it]. Buffers are placed best-fit in order of decreasing size (as
XLA's heap simulator does): each at the lowest 64-byte-aligned offset that no
buffer with an overlapping live range occupies, so dead buffers are reused.
The arena's size is `arena_bytes`; `peak_live_bytes` is the most bytes ever live
at once, so the gap between the two is fragmentation.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..frontend.ir import Var

ALIGN = 64  # every offset: the same alignment whichever buffer a kernel gets


def aligned(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


@dataclass
class Buffer:
    var: Var      # the first value stored here; `shared` lists values updated in place into it
    nbytes: int   # aligned size
    start: int    # step that first writes it
    end: int      # last step that reads it (inclusive)
    offset: int = -1
    shared: list[Var] = field(default_factory=list)

    def overlaps_in_time(self, other: Buffer) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class Plan:
    """The arena layout of one program; complete when made (nothing is filled in later)."""

    buffers: dict[Var, Buffer]  # every arena value -> its buffer (in-place values share one)
    arena_bytes: int            # the arena's size
    peak_live_bytes: int        # the most bytes live at once (arena_bytes - this: fragmentation)
    n_steps: int
    # Bytes at the start of the arena holding the `pinned` values of plan(), back to back
    # in the order given (each at its aligned size), live for the whole program.
    pinned_bytes: int = 0
    remat: Any = None  # remat.RematReport: saved/stored values, recompute work
    names: dict[Var, str] = field(default_factory=dict)  # as the program prints them
    # Per step: forward, backward or recompute (the memory timeline marks where backward starts).
    step_roles: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """Deprecated name of arena_bytes."""
        warnings.warn("Plan.peak_bytes is the arena size: use Plan.arena_bytes",
                      DeprecationWarning, stacklevel=2)
        return self.arena_bytes

    @property
    def lower_bound(self) -> int:
        """Deprecated name of peak_live_bytes."""
        warnings.warn("Plan.lower_bound is the most bytes live at once: use "
                      "Plan.peak_live_bytes", DeprecationWarning, stacklevel=2)
        return self.peak_live_bytes

    def name(self, v: Var) -> str:
        return self.names.get(v, f"%{v.id}")

    def unique_buffers(self) -> list[Buffer]:
        return list({id(b): b for b in self.buffers.values()}.values())

    def live_bytes(self) -> list[int]:
        """Bytes live at each step (the memory timeline)."""
        return _live_bytes(self.unique_buffers(), self.n_steps)

    @property
    def in_place(self) -> int:
        return sum(len(b.shared) for b in self.unique_buffers())

    def __str__(self) -> str:
        rows = [f"{'buffer':>8}  {'type':<18} {'offset':>10} {'bytes':>10}  {'live':<11} in place"]
        for b in sorted(self.unique_buffers(), key=lambda b: (b.offset, b.start)):
            shared = " ".join(self.name(v) for v in b.shared)
            rows.append(f"{self.name(b.var):>8}  {b.var.type_str():<18} {b.offset:>10} "
                        f"{b.nbytes:>10}  {f'{b.start}..{b.end}':<11} {shared}")
        rows.append(f"arena (arena_bytes): {self.arena_bytes} bytes; peak live "
                    f"(peak_live_bytes, the most bytes live at once): {self.peak_live_bytes} "
                    f"bytes; {len(self.unique_buffers())} buffers "
                    f"for {len(self.buffers)} values ({self.in_place} updated in place); "
                    f"{self.n_steps} steps")
        if self.remat is not None:
            rows.append(str(self.remat))
            rows.append("saved for backward: " + " ".join(
                f"{self.name(v)}:{v.type_str()}"
                f"{'' if v in self.remat.stored else '(recomputed)'}"
                for v in self.remat.saved))
        return "\n".join(rows)

    __repr__ = __str__


@dataclass
class StepUse:
    writes: list[Var]
    reads: list[Var]
    # (result, input) pairs the step may compute in place: it reads the input element by
    # element exactly where it writes the result, so the two can share memory.
    in_place: list[tuple[Var, Var]] = field(default_factory=list)


def plan(steps: Sequence[StepUse], keep: Iterable[Var], external: set[Var],
         in_place: bool = True, pinned: Sequence[Var] = (), *,
         names: dict[Var, str] | None = None, step_roles: Sequence[str] = (),
         remat: Any = None) -> Plan:
    """keep: values live to the end (the results); external: values outside the arena
    (inputs, constants, donated results). names, step_roles and remat describe the
    program for printing (Plan.names, Plan.step_roles, Plan.remat).

    pinned: arena values (distinct, not external) laid out first, in this order, from
    offset 0 and live for the whole program, so that together they form one contiguous
    region (`Plan.pinned_bytes`) that a caller can hand to a collective as one buffer
    (data-parallel training all-reduces every gradient in one call).
    """
    keep = set(keep) | set(pinned)
    last_read = {v: i for i, step in enumerate(steps) for v in step.reads}
    buffers: dict[Var, Buffer] = {}
    for i, step in enumerate(steps):
        for v in step.reads:
            if v in buffers:
                buffers[v].end = max(buffers[v].end, i)
        for v in step.writes:
            if v in external or v in buffers:
                continue
            donor = next((x for out, x in step.in_place if out is v and in_place
                          and x in buffers and last_read[x] == i and x not in keep
                          and x.dtype == v.dtype and x.nbytes == v.nbytes), None)
            if donor is not None:
                # The input dies here: the result takes over its buffer (in-place update).
                buffers[v] = buffers[donor]
                buffers[v].shared.append(v)
            else:
                buffers[v] = Buffer(v, aligned(v.nbytes), i, i)
    last = max(len(steps) - 1, 0)
    for v in keep:
        if v in buffers:
            buffers[v].end = last
    unique = list({id(b): b for b in buffers.values()}.values())
    placed: list[Buffer] = []
    pinned_bytes = 0
    for v in pinned:
        b = buffers.get(v)
        if b is None:  # written by no step: a slot the caller fills (a copy of a constant)
            b = buffers[v] = Buffer(v, aligned(v.nbytes), 0, last)
        if b.offset >= 0:
            raise ValueError(f"pinned value %{v.id} is listed twice or shares a buffer")
        # Live from before the first step to after the last: nothing else ever overlaps.
        b.start, b.end, b.offset = 0, last, pinned_bytes
        pinned_bytes += b.nbytes
        placed.append(b)
    for b in sorted(unique, key=lambda b: (-b.nbytes, b.start)):
        if b.offset >= 0:
            continue
        busy = sorted((p.offset, p.offset + p.nbytes) for p in placed if p.overlaps_in_time(b))
        offset = 0
        for lo, hi in busy:
            if offset + b.nbytes <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
    return Plan(buffers, max((b.offset + b.nbytes for b in placed), default=0),
                max(_live_bytes(unique, len(steps)), default=0), len(steps), pinned_bytes,
                remat, dict(names or {}), list(step_roles))


def _live_bytes(unique: Sequence[Buffer], n_steps: int) -> list[int]:
    live = [0] * n_steps
    for b in unique:
        for s in range(b.start, b.end + 1):
            live[s] += b.nbytes
    return live
