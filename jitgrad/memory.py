"""The memory planner: liveness over the schedule, every buffer placed in one arena.

Each materialised value gets a live range [first step that writes it, last step
that reads it]. Buffers are placed best-fit in order of decreasing size (as
XLA's heap simulator does): each at the lowest 64-byte-aligned offset that no
buffer with an overlapping live range occupies, so dead buffers are reused.
The arena's size is `peak_bytes`; `lower_bound` is the most bytes ever live at
once, so the gap between the two is fragmentation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ir import Var

ALIGN = 64  # every offset: the same alignment whichever buffer a kernel gets


def aligned(nbytes: int) -> int:
    return max(ALIGN, -(-nbytes // ALIGN) * ALIGN)


@dataclass
class Buffer:
    var: Var
    nbytes: int   # aligned size
    start: int    # step that first writes it
    end: int      # last step that reads it (inclusive)
    offset: int = -1

    def overlaps_in_time(self, other: Buffer) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class Plan:
    buffers: dict[Var, Buffer]
    peak_bytes: int
    lower_bound: int
    n_steps: int
    step_names: list[str]

    def live_bytes(self) -> list[int]:
        """Bytes live at each step (the memory timeline)."""
        live = [0] * self.n_steps
        for b in self.buffers.values():
            for s in range(b.start, b.end + 1):
                live[s] += b.nbytes
        return live

    def __str__(self) -> str:
        rows = [f"{'buffer':>8}  {'type':<18} {'offset':>10} {'bytes':>10}  live (steps)"]
        for b in sorted(self.buffers.values(), key=lambda b: (b.offset, b.start)):
            rows.append(f"{'%' + str(b.var.id):>8}  {b.var.type_str():<18} {b.offset:>10} "
                        f"{b.nbytes:>10}  {b.start}..{b.end}")
        rows.append(f"arena (peak_bytes): {self.peak_bytes} bytes; lower bound (most bytes live "
                    f"at once): {self.lower_bound} bytes; {len(self.buffers)} buffers, "
                    f"{self.n_steps} steps")
        return "\n".join(rows)

    __repr__ = __str__


def plan(steps: Sequence[tuple[Iterable[Var], Iterable[Var]]], keep: Iterable[Var],
         external: set[Var], step_names: list[str] | None = None) -> Plan:
    """steps: (vars written, vars read) per step; keep: live to the end (the results);
    external: values that live outside the arena (inputs, constants)."""
    buffers: dict[Var, Buffer] = {}
    for i, (writes, reads) in enumerate(steps):
        for v in writes:
            if v not in external and v not in buffers:
                buffers[v] = Buffer(v, aligned(v.nbytes), i, i)
        for v in reads:
            if v in buffers:
                buffers[v].end = max(buffers[v].end, i)
    last = max(len(steps) - 1, 0)
    for v in keep:
        if v in buffers:
            buffers[v].end = last
    placed: list[Buffer] = []
    for b in sorted(buffers.values(), key=lambda b: (-b.nbytes, b.start)):
        busy = sorted((p.offset, p.offset + p.nbytes) for p in placed if p.overlaps_in_time(b))
        offset = 0
        for lo, hi in busy:
            if offset + b.nbytes <= lo:
                break
            offset = max(offset, hi)
        b.offset = offset
        placed.append(b)
    result = Plan(buffers, max((b.offset + b.nbytes for b in placed), default=0), 0,
                  len(steps), step_names or [])
    result.lower_bound = max(result.live_bytes(), default=0)
    return result
