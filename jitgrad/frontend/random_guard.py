"""A warning for numpy's random functions called while a function is being traced.

Tracing runs the user's function once on abstract values: `np.random.normal(...)` inside
it returns concrete numbers at that moment, which become constants of the program, so
every call of the compiled function sees the same "random" values (a dropout mask frozen
at trace time). While some thread traces, numpy's legacy module functions
(`np.random.rand`, `np.random.normal`, ...) and `np.random.default_rng` are replaced by
wrappers that warn (JitgradWarning, naming the user's line and pointing at jg.random)
when called by user code of a thread that is tracing; other threads, and jitgrad's own
calls, pass straight through. The originals are put back when the last trace ends.

What cannot be seen: functions imported by name before tracing (`from numpy.random import
normal`) and methods of a Generator or RandomState made outside the traced function
(their C methods cannot be wrapped); README.md documents the pitfall.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import JitgradWarning
from .core import _is_user_file, user_frame_loc

_lock = threading.Lock()
_tracing = threading.local()  # .depth: traces open in this thread
_active = 0  # traces open in all threads: the wrappers are installed while it is > 0
_originals: dict[str, Callable[..., Any]] = {}


def _guarded_names() -> list[str]:
    """np.random's sampling functions (methods of the hidden global RandomState) and
    default_rng."""
    legacy = np.random.mtrand._rand
    names = [n for n in np.random.__all__ if getattr(getattr(np.random, n, None), "__self__",
                                                     None) is legacy]
    return [n for n in names if n not in ("get_state", "set_state")] + ["default_rng"]


def _warn_if_traced(name: str) -> None:
    if not getattr(_tracing, "depth", 0):
        return
    caller = sys._getframe(2).f_code.co_filename  # the wrapper's caller
    if not _is_user_file(caller):
        return
    warnings.warn(
        f"np.random.{name} called while jitgrad traces this function (at "
        f"{user_frame_loc()}): it runs once, during tracing, and its result is frozen into "
        f"the compiled program, so every call sees the same numbers. Pass a key instead and "
        f"draw with jg.random (e.g. jg.random.normal(key, shape); jg.random.fold_in(key, "
        f"step) for a new key per step).", JitgradWarning, stacklevel=3)


def _wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _warn_if_traced(name)
        return fn(*args, **kwargs)
    return guarded


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Around one trace: warn about np.random called by it (this thread only)."""
    global _active
    with _lock:
        if _active == 0:
            for name in _guarded_names():
                _originals[name] = getattr(np.random, name)
                setattr(np.random, name, _wrap(name, _originals[name]))
        _active += 1
    _tracing.depth = getattr(_tracing, "depth", 0) + 1
    try:
        yield
    finally:
        _tracing.depth -= 1
        with _lock:
            _active -= 1
            if _active == 0:
                for name, fn in _originals.items():
                    setattr(np.random, name, fn)
                _originals.clear()
