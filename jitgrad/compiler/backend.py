"""The Numba backend: plan, generate, load (from the on-disk cache when possible), run.

A compiled program is one native call: the generated `run(ptrs)` walks the
steps, calling library and fused kernels on addresses inside one arena.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import JitgradError, NonFiniteError
from ..frontend.ir import Program, Var, var_names
from . import cache, kernels, memory, threads
from .codegen import MetaAddress, lower, prepare, render_glue
from .executable import KernelCall


def _load_fused(fused: dict[str, str]) -> None:
    for sym, source in fused.items():
        if not kernels.is_registered(sym):
            threads.init()  # a parallel loop links against the threading layer's symbols
            module = cache.load_module("fused", source, extra_key=kernels.library_hash())
            kernels.register_symbols(module, [sym])


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _donatable(uses: list[memory.StepUse], steps: list[Any], out: Var, into: Var) -> bool:
    """Can the step computing `out` write straight into the memory of input `into`?

    Only if no later step reads the old value, the writing step itself reads
    `into` (if at all) element by element where it writes, and no step from it on
    can fail (a label or index check): a failed call must leave the caller's arrays
    untouched (train_step's contract), whatever the order fusion chose.
    """
    writer = next((i for i, u in enumerate(uses) if out in u.writes), None)
    if writer is None or into.shape != out.shape or into.dtype != out.dtype:
        return False
    if any(s.can_fail for s in steps[writer:]):
        return False
    if any(into in u.reads for u in uses[writer + 1:]):
        return False
    return into not in uses[writer].reads or steps[writer].elementwise


@dataclass(frozen=True)
class Planned:
    """A program lowered to kernel calls with its arena laid out; nothing compiled yet."""

    program: Program              # as given (what the interpreter re-runs to explain errors)
    prepared: Program
    low: Any                      # codegen.Lowering
    external: dict[Var, int]      # values outside the arena -> their pointer-table slot
    outputs: list[Var]
    plan: memory.Plan
    donated_in_place: set[int]    # results computed straight into the donated input
    donate_copy: list[tuple[int, int]]  # (result, input) pairs copied there after the call
    pinned_copy: list[tuple[int, Var]]  # pinned results given a slot of their own
    donate: dict[int, int] | None = None
    pinned: tuple[int, ...] = ()

    def with_remat(self, report: Any) -> Planned:
        """The same layout, its plan describing what recomputation chose."""
        return dataclasses.replace(self, plan=dataclasses.replace(self.plan, remat=report))


def plan_program(prog: Program, donate: dict[int, int] | None = None,
                 pinned: Sequence[int] | None = None, remat: Any = None) -> Planned:
    """Lower and lay out prog (pure Python: the memory planner's view of a program; the
    fused loops' source is made only when compiling asks for it). remat: the
    recomputation report the plan prints."""
    prepared = prepare(prog)
    low = lower(prepared)
    external = {v: i for i, v in enumerate(list(prepared.inputs) + list(prepared.consts))}
    root = low.root
    uses = [memory.StepUse([root(v) for v in s.writes], [root(v) for v in s.reads],
                           [(root(a), root(b)) for a, b in s.in_place]) for s in low.steps]
    outputs = [root(v) for v in prepared.outputs]
    # Donated results are computed in the input's own memory where that is safe
    # (the optimizer update writes the parameters in place); the rest are copied
    # there after the call.
    donate_copy: list[tuple[int, int]] = []
    donated_in_place: set[int] = set()
    for out_i, in_i in (donate or {}).items():
        out, into = outputs[out_i], prepared.inputs[in_i]
        if (out not in external and outputs.count(out) == 1
                and into not in outputs and _donatable(uses, low.steps, out, into)):
            external[out] = in_i
            donated_in_place.add(out_i)
        else:
            donate_copy.append((out_i, in_i))
    # A pinned result that is not an arena value of its own (an input, a constant, or
    # equal to another result) gets a slot of its own, filled by a copy after the call.
    pinned_vars: list[Var] = []
    pinned_copy: list[tuple[int, Var]] = []
    for out_i in pinned or ():
        v = outputs[out_i]
        if v in external or v in pinned_vars:
            v = Var(prepared.outputs[out_i].shape, v.dtype)
            pinned_copy.append((out_i, v))
        pinned_vars.append(v)
    plan = memory.plan(uses, outputs, set(external), pinned=pinned_vars, names=var_names(prog),
                       step_roles=[s.role for s in low.steps], remat=remat)
    for s in low.steps:
        if s.group is not None:
            s.alias = _shared_leaf(s, plan, external, root)
    return Planned(prog, prepared, low, external, outputs, plan, donated_in_place, donate_copy,
                   pinned_copy, dict(donate) if donate else None, tuple(pinned or ()))


def _shared_leaf(step: Any, plan: memory.Plan, external: dict[Var, int],
                 root: Callable[[Var], Var]) -> int | None:
    """The leaf of a fused loop's step whose memory its result was given (an input dying
    there, or the donated parameter an update overwrites), if any."""
    group = step.group
    if not group.keeps_out:
        return None
    out = root(group.out)
    for j, v in enumerate(group.leaves):
        if v.shape != group.out.shape or v.dtype != group.out.dtype:
            continue
        r = root(v)
        if out in external:
            if external.get(r) == external[out]:
                return j
        elif r not in external and plan.buffers[r] is plan.buffers[out]:
            return j
    return None


class _Arena:
    """One thread's working memory for an executable: the arena and the pointer table."""

    __slots__ = ("buf", "ptrs", "ptrs_addr", "last_args", "fixed_by")

    def __init__(self, buf: np.ndarray, ptrs: np.ndarray, last_args: list[Any]):
        self.buf = buf  # an aligned view: it keeps the whole allocation alive
        self.ptrs = ptrs
        self.ptrs_addr = _address(ptrs)
        self.last_args = last_args
        # The fast call (a token of its own) whose fixed pointers the table holds; None
        # once anything else rewrote a pointer.
        self.fixed_by: object | None = None


def glue_source(planned: Planned) -> str:
    """The program's chunk functions (codegen.render_glue) as the backend compiles them."""
    # The chunk symbols are named by the program's content, so equal programs share them.
    low = planned.low
    key = cache.module_key(str(planned.prepared) + str(sorted(low.fused_sources())))[:16]
    return render_glue(low, planned.plan, planned.external, key)


class NumbaExecutable:
    """A planned program compiled to native code (an `executable.Executable`)."""

    def __init__(self, planned: Planned, check_finite: bool = False):
        """The planned program's pinned results (`Planned.pinned`) are laid back to back at
        the start of the arena (`pinned_region()`) and returned as views of it, valid
        until the calling thread's next call, so that data-parallel training can
        all-reduce them in place."""
        self.program = planned.program
        self.check_finite = check_finite
        self._planned = planned
        pinned = planned.pinned
        kernels.require(s.sym for s in planned.low.steps)  # only the kernels it calls
        prepared, low, external = planned.prepared, planned.low, planned.external
        outputs = planned.outputs
        self._donate_copy = planned.donate_copy
        self._donated_in_place = planned.donated_in_place
        self.plan = planned.plan
        pinned_out = set(pinned or ())
        self._pinned_slots = [(out_i, self.plan.buffers[v].offset, v)
                              for out_i, v in planned.pinned_copy]
        self._labels = [s.label for s in low.steps]
        _load_fused(low.fused_sources())
        self.source = glue_source(planned)
        module = cache.load_module("step", self.source, extra_key=kernels.library_hash())
        # A short Python driver calls the chunks (~0.5 us each) rather than a compiled
        # entry function: one compile fewer per program.
        chunks = sorted((n for n in dir(module) if n.startswith("jg_chunk_")),
                        key=lambda n: int(n.rsplit("_", 1)[1]))
        self._chunks = [getattr(module, n).ctypes for n in chunks]
        self._meta = np.array(low.meta or [0], np.int64)
        self._consts = [np.ascontiguousarray(c) for c in prepared.consts.values()]
        self._n_inputs = len(prepared.inputs)
        self._n_ptrs = 2 + len(external)
        self._outputs = [self._output_spec(r, v.shape, external)
                         for r, v in zip(outputs, prepared.outputs, strict=True)]
        # Results handed over without a copy: donated ones (already in the caller's array)
        # and pinned arena values (views the distributed step all-reduces in place).
        self._returned_as_is = [i in self._donated_in_place or (i in pinned_out
                                                                and spec[0] == "arena")
                                for i, spec in enumerate(self._outputs)]
        # Each calling thread gets its own arena (made on its first call), so threads run
        # the native code at once (it releases the GIL) and never see each other's
        # intermediates. Donating executables (train_step) update the caller's arrays in
        # place, so their calls take turns instead: concurrent steps then apply one
        # after the other rather than tearing the parameters.
        self._local = threading.local()
        self._serial = threading.Lock() if (self._donated_in_place or self._donate_copy) \
            else None

    def _output_spec(self, v: Var, shape: tuple[int, ...],
                     external: dict[Var, int]) -> tuple[Any, ...]:
        if v in external:
            return ("external", external[v], shape)
        b = self.plan.buffers[v]
        return ("arena", b.offset, v.nbytes, v.dtype, shape)

    def kernel_calls(self) -> list[KernelCall]:
        """Every kernel call of the program, in order, with its arguments resolved to the
        calling thread's arena and the arrays of its last call (for profiling)."""
        ptrs = self._arena().ptrs
        low, plan, external = self._planned.low, self.plan, self._planned.external

        def value(x: Any) -> int:
            if isinstance(x, Var):
                x = low.root(x)
                return int(ptrs[2 + external[x]]) if x in external else \
                    int(ptrs[0]) + plan.buffers[x].offset
            if isinstance(x, MetaAddress):
                return int(ptrs[1]) + x.offset
            return int(x)

        return [KernelCall(s.label, s.sym, kernels.function(s.sym),
                           s.kernel.args if s.kernel is not None else [],
                           [value(a) for a in s.args]) for s in low.steps]

    def bare_call(self, args: Sequence[np.ndarray]) -> Callable[[], None]:
        """The native call alone on these arrays (no argument checks, nothing copied out of
        the arena): what benchmarks time as the floor of a call. Valid while args live."""
        arena = self._new_arena()
        for i, a in enumerate(args):
            arena.ptrs[2 + i] = _address(a)
        chunks, addr = self._chunks, arena.ptrs_addr

        def run() -> None:
            for chunk in chunks:
                if chunk(addr):
                    raise JitgradError("a kernel rejected its input")
        return run

    def fast_call(self, fixed: dict[int, np.ndarray]) -> Callable[[Sequence[np.ndarray]], Any]:
        """(executable.Executable.fast_call) The fixed leaves' pointers are written into each
        thread's pointer table once; a call writes the others' and runs the chunks."""
        others = [i for i in range(self._n_inputs) if i not in fixed]
        fixed_ptrs = [(2 + i, _address(a)) for i, a in fixed.items()]
        slots = [2 + i for i in others]
        chunks, local, first = self._chunks, self._local, self._outputs[0]
        lock = self._serial or threading.Lock()
        # Marks the tables holding this call's fixed pointers. Not a set of the tables'
        # ids: a thread's arena dies with the thread and the next thread's table can get
        # the same address (id), so its fixed pointers were never written (a segfault).
        token = object()

        def full_args(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
            args: list[Any] = [fixed.get(i) for i in range(self._n_inputs)]
            for i, a in zip(others, arrays, strict=True):
                args[i] = a
            return args

        def call(arrays: Sequence[np.ndarray]) -> Any:
            arena = getattr(local, "arena", None) or self._new_arena()
            ptrs, last = arena.ptrs, arena.last_args
            if arena.fixed_by is not token:
                for slot, address in fixed_ptrs:
                    ptrs[slot] = address
                for i in fixed:
                    last[i] = fixed[i]  # so that run() does not rewrite them either
                arena.fixed_by = token
            for slot, i, a in zip(slots, others, arrays, strict=True):
                if a is not last[i]:
                    ptrs[slot] = _address(a)
                    last[i] = a
            status = 0
            with lock:
                for chunk in chunks:
                    status = chunk(arena.ptrs_addr)
                    if status:
                        break
                if status:
                    self._explain_failure(full_args(arrays), status)
                if self._donate_copy or self._pinned_slots:  # results ready before a check
                    return self._finish(arena, full_args(arrays))[0]
            return self._collect(arena.buf, arrays, first, False) if first[0] == "arena" \
                else self._collect(arena.buf, full_args(arrays), first, False)
        return call

    def _arena(self) -> _Arena:
        """The calling thread's arena, made on its first call."""
        return getattr(self._local, "arena", None) or self._new_arena()

    def _new_arena(self) -> _Arena:
        raw = np.empty(self.plan.arena_bytes + memory.ALIGN, np.uint8)
        pad = (-_address(raw)) % memory.ALIGN
        ptrs = np.zeros(self._n_ptrs, np.int64)
        ptrs[0] = _address(raw) + pad
        ptrs[1] = _address(self._meta)
        for i, c in enumerate(self._consts):
            ptrs[2 + self._n_inputs + i] = _address(c)
        arena = _Arena(raw[pad:pad + self.plan.arena_bytes], ptrs, [None] * self._n_inputs)
        arena.buf[:self.plan.pinned_bytes] = 0  # padding between pinned values stays zero
        self._local.arena = arena
        return arena

    def pinned_region(self) -> np.ndarray:
        """The calling thread's pinned results (with alignment padding) as one flat uint8
        view of its arena."""
        return self._arena().buf[:self.plan.pinned_bytes]

    def _collect(self, arena: np.ndarray, args: Sequence[np.ndarray], spec: tuple[Any, ...],
                 in_place: bool) -> np.ndarray:
        if spec[0] == "external":
            _, i, shape = spec
            src = args[i] if i < self._n_inputs else self._consts[i - self._n_inputs]
            return src if in_place else np.array(src, copy=True).reshape(shape)
        _, offset, nbytes, dtype, shape = spec
        view = arena[offset:offset + nbytes].view(dtype).reshape(shape)
        return view if in_place else view.copy()

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._serial is None:
            outs = self._run(args)
        else:
            with self._serial:
                outs = self._run(args)
        if self.check_finite:
            bad = [i for i, o in enumerate(outs) if o.dtype.kind == "f"
                   and not np.all(np.isfinite(o))]
            if bad:
                from . import interp
                interp.run(self.program, args, check_finite=True)  # names the culprit
                # numpy computed it finitely where the compiled code did not
                raise NonFiniteError(f"result {bad[0]} of the compiled program is not finite "
                                     f"(the numpy interpreter's is)")
        return outs

    def _run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        arena = self._arena()
        ptrs, last = arena.ptrs, arena.last_args
        for i, a in enumerate(args):
            if a is not last[i]:  # parameters are the same arrays call after call
                ptrs[2 + i] = _address(a)
                last[i] = a
                arena.fixed_by = None
        status = 0
        for chunk in self._chunks:
            status = chunk(arena.ptrs_addr)
            if status:
                break
        if status:
            self._explain_failure(args, status)
        return self._finish(arena, args)

    def _finish(self, arena: _Arena, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The results of the call that just ran in arena, donated ones in place."""
        outs = [self._collect(arena.buf, args, spec, as_is)
                for spec, as_is in zip(self._outputs, self._returned_as_is, strict=True)]
        for out_i, offset, v in self._pinned_slots:
            slot = arena.buf[offset:offset + v.nbytes].view(v.dtype).reshape(v.shape)
            np.copyto(slot, outs[out_i])
            outs[out_i] = slot
        for out_i, in_i in self._donate_copy:
            np.copyto(args[in_i], outs[out_i])
            outs[out_i] = args[in_i]
        return outs

    def _explain_failure(self, args: Sequence[np.ndarray], status: int) -> None:
        """A kernel rejected an index or label; the interpreter names the value and line."""
        from . import interp
        interp.run(self.program, args)
        raise JitgradError(f"index or label out of range in {self._labels[status - 1]}")
