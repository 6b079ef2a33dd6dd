"""The compiler pipeline, in one place: trace → passes → remat → plan → compile.

    trace (trace.trace_flat; grad is a transformation traced like any code)
      → passes (passes.optimize)
      → precision policy (precision.apply: bfloat16 GEMM operands with precision="bf16")
      → recomputation (remat.apply, judged with the real planner)
      → plan (backend.plan_program: prepare → fuse → lower → memory plan)
      → executable (backend.NumbaExecutable renders and loads the glue; or the interpreter)

`build` returns one immutable record, `Compiled`, holding every stage's output. The
plan that recomputation chose is the one compiled: each candidate program is planned
once and remembered. `api.jit`, `train_step`, `distributed`, `show`, `memsweep` and the
benchmarks all come through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import JitgradError
from ..frontend import tree
from ..frontend.ir import Program
from ..frontend.trace import Signature, trace_flat
from . import precision as precision_mod
from . import remat as remat_mod
from .executable import Executable
from .memory import Plan
from .passes import optimize

BACKENDS = ("numba", "interpret")


@dataclass(frozen=True)
class Compiled:
    """One specialisation of a function: its program, plan and executable."""

    program: Program           # optimised and rematerialised: what runs
    in_tree: tree.TreeDef      # the arguments' structure and leaf signatures it was built for
    sigs: tuple[Signature, ...]
    out_tree: tree.TreeDef
    remat: remat_mod.RematReport  # what is stored and what recomputed
    planned: Any               # backend.Planned (lowering + memory plan), or None
    executable: Executable | None  # None when only planned (`jitgrad show`)

    @property
    def plan(self) -> Plan | None:
        return self.planned.plan if self.planned is not None else None

    @property
    def source(self) -> str:
        if self.executable is not None:
            return self.executable.source
        from .backend import glue_source
        return glue_source(self.planned)


def trace(fn: Any, in_tree: tree.TreeDef, sigs: Sequence[Signature]
          ) -> tuple[Program, tree.TreeDef]:
    prog, out_tree, captured = trace_flat(fn, in_tree, sigs)
    if captured:
        raise JitgradError("a jitted function captured a value being traced by an enclosing "
                           "transformation; pass it as an argument instead")
    return prog, out_tree


class _Planner:
    """backend.plan_program, remembering each program's plan (programs are kept alive, so
    their ids stay theirs)."""

    def __init__(self, donate: dict[int, int] | None, pinned: Sequence[int] | None):
        self.donate, self.pinned = donate, pinned
        self.planned: dict[int, tuple[Program, Any]] = {}

    def __call__(self, prog: Program) -> Any:
        hit = self.planned.get(id(prog))
        if hit is None:
            from .backend import plan_program  # the planner is the Numba backend's
            hit = self.planned[id(prog)] = (prog, plan_program(prog, self.donate, self.pinned))
        return hit[1]

    def plan(self, prog: Program) -> Plan:
        return self(prog).plan


def build(fn: Any, in_tree: tree.TreeDef, sigs: Sequence[Signature], *,
          backend: str | None, remat: Any = None, memory_budget: Any = None,
          donate: dict[int, int] | None = None, pinned: Sequence[int] | None = None,
          check_finite: bool = False, precision: str | None = None) -> Compiled:
    """Every stage for fn at these argument signatures. backend None plans for the Numba
    backend without compiling (what `jitgrad show` prints)."""
    prog, out_tree = trace(fn, in_tree, sigs)
    return build_program(prog, in_tree, sigs, out_tree, backend=backend, remat=remat,
                         memory_budget=memory_budget, donate=donate, pinned=pinned,
                         check_finite=check_finite, precision=precision)


def build_program(prog: Program, in_tree: tree.TreeDef, sigs: Sequence[Signature],
                  out_tree: tree.TreeDef, *, backend: str | None, remat: Any = None,
                  memory_budget: Any = None, donate: dict[int, int] | None = None,
                  pinned: Sequence[int] | None = None, check_finite: bool = False,
                  precision: str | None = None) -> Compiled:
    """`build` from a traced program on."""
    if backend is not None and backend not in BACKENDS:
        raise JitgradError(f"unknown backend {backend!r}: use 'numba' or 'interpret'")
    planner = _Planner(donate, pinned)
    prog = precision_mod.apply(optimize(prog), precision_mod.check_precision(precision))
    prog, report = remat_mod.apply(prog, remat, memory_budget, planner.plan)
    planned = planner(prog).with_remat(report) if backend != "interpret" else None
    executable: Executable | None = None
    if backend == "numba":
        from .backend import NumbaExecutable
        executable = NumbaExecutable(planned, check_finite)
    elif backend == "interpret":
        from .interp import InterpretedExecutable
        executable = InterpretedExecutable(prog, check_finite=check_finite, donate=donate)
    return Compiled(prog, in_tree, tuple(sigs), out_tree, report, planned, executable)
