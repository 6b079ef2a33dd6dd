"""numpy for functions jitgrad traces, as autograd.numpy and jax.numpy are:
`import jitgrad.numpy as jnp`.

`array` and `asarray` accept (nested) lists holding traced values, stacking them, which
numpy's own cannot (numpy converts a list itself, before any dispatch protocol is asked).
Every other name is numpy's own function: on traced values numpy dispatches it to jitgrad.
"""

from __future__ import annotations

from typing import Any

import numpy as _np

from .errors import JitgradError
from .frontend.core import Tracer
from .frontend.ops import elementwise as _E
from .frontend.ops import layout as _layout


def _holds_tracer(obj: Any) -> bool:
    if isinstance(obj, Tracer):
        return True
    return isinstance(obj, (list, tuple)) and any(_holds_tracer(o) for o in obj)


def _build(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return _layout.stack([_build(o) for o in obj])
    return obj


def array(obj: Any, dtype: Any = None, *, copy: bool = True, **kwargs: Any) -> Any:
    """numpy.array, also of (nested) lists holding traced values (stacked)."""
    if not _holds_tracer(obj):
        return _np.array(obj, dtype=dtype, copy=copy, **kwargs)
    if kwargs:
        raise JitgradError(f"jitgrad.numpy.array: arguments {sorted(kwargs)} are not "
                           "supported on traced values")
    out = _build(obj)
    return out if dtype is None else _E.cast(out, dtype)


def asarray(obj: Any, dtype: Any = None, **kwargs: Any) -> Any:
    """numpy.asarray, also of traced values and of lists holding them."""
    if not _holds_tracer(obj):
        return _np.asarray(obj, dtype=dtype, **kwargs)
    return array(obj, dtype, **kwargs)


def __getattr__(name: str) -> Any:
    return getattr(_np, name)


def __dir__() -> list[str]:
    return sorted(set(dir(_np)) | {"array", "asarray"})
