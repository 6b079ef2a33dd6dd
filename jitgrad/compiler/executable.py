"""What a backend hands back: the interface every executable implements.

`api`, `train`, `distributed`, `show` and the benchmarks use executables only through
this interface; the Numba backend (`backend.NumbaExecutable`) and the interpreter
(`interp.InterpretedExecutable`) both implement it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..frontend.ir import Program
from .memory import Plan


@dataclass(frozen=True)
class KernelCall:
    """One kernel call of a compiled program, resolved for profiling: `fn(*args)` runs it."""

    label: str              # primitive (or fused ops) and the user's line
    symbol: str
    fn: Callable[..., int]  # ctypes entry point
    arg_names: list[str]    # the kernel's declared C arguments ([] for a generated loop)
    args: list[int]         # addresses and sizes, in the calling thread's arena

    def named_args(self) -> dict[str, int]:
        return dict(zip(self.arg_names, self.args, strict=False))


class Executable(Protocol):
    program: Program
    plan: Plan | None     # the memory plan (None: the interpreter plans nothing)
    source: str           # what runs: generated glue, or the program itself

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Results for these (contiguous, correctly typed) argument leaves."""

    def pinned_region(self) -> np.ndarray:
        """The calling thread's pinned results as one flat uint8 view (empty if none)."""

    def kernel_calls(self) -> list[KernelCall]:
        """Every kernel call, in order (empty where nothing is compiled)."""

    def bare_call(self, args: Sequence[np.ndarray]) -> Callable[[], Any]:
        """The computation alone on these arrays, for timing its floor."""

    def fast_call(self, fixed: dict[int, np.ndarray]) -> Callable[[Sequence[np.ndarray]], Any]:
        """A call whose argument leaves `fixed` (index -> array: train_step's parameters and
        state) are the same arrays every time: `call(others)` takes the other leaves in
        order (already contiguous, of their signatures), runs as `run` does, and returns
        the first result only; its work does not grow with the number of fixed leaves."""
