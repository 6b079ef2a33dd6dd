"""The reference interpreter: runs any Program with numpy. It is the tests' oracle."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import NonFiniteError
from ..frontend.core import replay
from ..frontend.ir import Instr, Program, Var, format_instr


def run(prog: Program, args: Sequence[np.ndarray], check_finite: bool = False) -> list[np.ndarray]:
    def check(ins: Instr, var: Var, val: np.ndarray) -> None:
        if var.dtype.kind == "f" and not np.all(np.isfinite(val)):
            raise NonFiniteError(f"non-finite value produced by instruction "
                                 f"`{format_instr(ins, {})}` at {ins.loc}")

    # Inputs are jit's to check (api.check_finite_inputs names them by their place).
    if not check_finite:
        env = replay(prog, args)
    else:
        with np.errstate(all="ignore"):  # NonFiniteError names the culprit better
            env = replay(prog, args, check)
    return [env[v] for v in prog.outputs]


class InterpretedExecutable:
    """A Program run by the numpy interpreter (backend="interpret"; an
    `executable.Executable`)."""

    def __init__(self, prog: Program, check_finite: bool = False,
                 donate: dict[int, int] | None = None):
        self.program = prog
        self.check_finite = check_finite
        self.donate = donate or {}
        self.plan = None
        self.source = str(prog)
        # Donating calls (train_step) read and then overwrite the caller's arrays: calls
        # from several threads take turns, so that no update is lost (as in the backend).
        self._serial = threading.Lock() if self.donate else None

    def pinned_region(self) -> np.ndarray:
        return np.empty(0, np.uint8)

    def kernel_calls(self) -> list[Any]:
        return []

    def bare_call(self, args: Sequence[np.ndarray]) -> Callable[[], Any]:
        return lambda: run(self.program, args)

    def fast_call(self, fixed: dict[int, np.ndarray]) -> Callable[[Sequence[np.ndarray]], Any]:
        n = len(self.program.inputs)
        others = [i for i in range(n) if i not in fixed]

        def call(arrays: Sequence[np.ndarray]) -> np.ndarray:
            args: list[Any] = [fixed.get(i) for i in range(n)]
            for i, a in zip(others, arrays, strict=True):
                args[i] = a
            return self.run(args)[0]
        return call

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        if self._serial is None:
            return self._run(args)
        with self._serial:
            return self._run(args)

    def _run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        # Results are fresh arrays the caller owns, never views of inputs or constants.
        outs = [np.array(o, copy=True) for o in run(self.program, args, self.check_finite)]
        for out_i, in_i in self.donate.items():  # donated results land in the input's memory
            np.copyto(args[in_i], outs[out_i])
            outs[out_i] = args[in_i]
        return outs
