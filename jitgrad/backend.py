"""The Numba backend: plan, generate, load (from the on-disk cache when possible), run.

A compiled program is one native call: the generated `run(ptrs)` walks the
steps, calling library and fused kernels on addresses inside one arena.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import cache, kernels, memory
from .codegen import lower, prepare, render_glue
from .errors import JitgradError
from .ir import Program, Var

_registered: set[str] = set()
_register_lock = threading.Lock()


def _register_symbols(module: Any, prefix: str) -> None:
    """Make the module's C-ABI functions callable by name from generated code."""
    import llvmlite.binding as llb
    with _register_lock:
        for name in dir(module):
            if name.startswith(prefix) and name not in _registered:
                llb.add_symbol(name, getattr(module, name).address)
                _registered.add(name)


def _load_fused(fused: dict[str, str]) -> None:
    for sym, source in fused.items():
        if sym not in _registered:
            module = cache.load_module("fused", source, extra_key=kernels.library_hash())
            _register_symbols(module, sym)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


class NumbaExecutable:
    def __init__(self, prog: Program, check_finite: bool = False, remat: Any = None,
                 memory_budget: Any = None):
        if remat is not None or memory_budget is not None:
            raise JitgradError("recomputation (remat/memory_budget) is not implemented yet")
        kernels.ensure_loaded()
        self.program = prog
        self.check_finite = check_finite
        prepared = prepare(prog)
        low = lower(prepared)
        external = {v: i for i, v in enumerate(list(prepared.inputs) + list(prepared.consts))}
        self.plan = memory.plan([(s.writes, s.reads) for s in low.steps], prepared.outputs,
                                set(external), [s.label for s in low.steps])
        self._labels = [s.label for s in low.steps]
        _load_fused(low.fused)
        # The chunk symbols are named by the program's content, so equal programs share them.
        key = cache.module_key(str(prepared) + str(sorted(low.fused)))[:16]
        self.source = render_glue(low, self.plan, external, key)
        module = cache.load_module("step", self.source, extra_key=kernels.library_hash())
        _register_symbols(module, "jg_chunk_")
        self._run = module.run
        self._meta = np.array(low.meta or [0], np.int64)
        self._consts = [np.ascontiguousarray(c) for c in prepared.consts.values()]
        self._n_inputs = len(prepared.inputs)
        self._arena_raw = np.empty(self.plan.peak_bytes + memory.ALIGN, np.uint8)
        pad = (-_address(self._arena_raw)) % memory.ALIGN
        self._arena = self._arena_raw[pad:pad + self.plan.peak_bytes]
        self._ptrs = np.zeros(2 + len(external), np.int64)
        self._ptrs[0] = _address(self._arena_raw) + pad
        self._ptrs[1] = _address(self._meta)
        self._ptrs_addr = _address(self._ptrs)
        for i, c in enumerate(self._consts):
            self._ptrs[2 + self._n_inputs + i] = _address(c)
        self._outputs = [self._output_spec(v, external) for v in prepared.outputs]
        self._lock = threading.Lock()

    def _output_spec(self, v: Var, external: dict[Var, int]) -> tuple[Any, ...]:
        if v in external:
            return ("external", external[v])
        b = self.plan.buffers[v]
        return ("arena", b.offset, v.nbytes, v.dtype, v.shape)

    def _collect(self, args: Sequence[np.ndarray], spec: tuple[Any, ...]) -> np.ndarray:
        if spec[0] == "external":
            i = spec[1]
            src = args[i] if i < self._n_inputs else self._consts[i - self._n_inputs]
            return np.array(src, copy=True)
        _, offset, nbytes, dtype, shape = spec
        return self._arena[offset:offset + nbytes].view(dtype).reshape(shape).copy()

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        with self._lock:  # one arena per executable: callers take turns
            ptrs = self._ptrs
            for i, a in enumerate(args):
                ptrs[2 + i] = _address(a)
            status = self._run(self._ptrs_addr)
            if status:
                raise JitgradError(f"index or label out of range in {self._labels[status - 1]}")
            outs = [self._collect(args, s) for s in self._outputs]
        if self.check_finite and any(o.dtype.kind == "f" and not np.all(np.isfinite(o))
                                     for o in outs):
            from . import interp
            interp.run(self.program, args, check_finite=True)  # names the first culprit
        return outs


def compile_program(prog: Program, check_finite: bool = False, remat: Any = None,
                    memory_budget: Any = None) -> NumbaExecutable:
    return NumbaExecutable(prog, check_finite, remat, memory_budget)
