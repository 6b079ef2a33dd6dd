"""The numpy surface on traced values: numpy's ufuncs, functions and array methods that
become jitgrad primitives or compositions of them (issue 16: what autograd
differentiates). Importing this module adds them to trace.py's dispatch tables; the
README's list of the supported surface is generated from those tables
(`python docs/numpy_surface.py`).

Each numpy function here takes numpy's own signature: arguments jitgrad cannot honour
on a traced value (`out=`, `dtype=`, `where=`, `initial=`) raise a JitgradError naming
the function, never silently change the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import JitgradError, TracingError
from . import trace
from .core import Tracer, current_loc
from .ops import layout as Y
from .ops import maths as M
from .ops import reduce as R
from .ops import shape as S
from .ops import sort as O


def _reject(fname: str, **args: Any) -> None:
    """Raise for numpy arguments given a value jitgrad cannot honour."""
    for name, value in args.items():
        if value is not None:
            raise JitgradError(f"numpy.{fname}: argument {name}= is not supported on traced "
                               f"values (at {current_loc()})")


def _keep(keepdims: Any) -> bool:
    return bool(keepdims) if keepdims is not None else False


# ---------------------------------------------------------------- reductions, numpy's signatures

def np_prod(a, axis=None, dtype=None, out=None, keepdims=None, initial=None, where=None):
    _reject("prod", dtype=dtype, out=out, initial=initial, where=where)
    return R.prod(a, axis, _keep(keepdims))


def np_min(a, axis=None, out=None, keepdims=None, initial=None, where=None):
    _reject("min", out=out, initial=initial, where=where)
    return R.min(a, axis, _keep(keepdims))


def np_var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=None, *, where=None,
           mean=None, correction=None):
    _reject("var", dtype=dtype, out=out, where=where, mean=mean)
    return R.var(a, axis, ddof if correction is None else correction, _keep(keepdims))


def np_std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=None, *, where=None,
           mean=None, correction=None):
    _reject("std", dtype=dtype, out=out, where=where, mean=mean)
    return R.std(a, axis, ddof if correction is None else correction, _keep(keepdims))


def np_cumsum(a, axis=None, dtype=None, out=None):
    _reject("cumsum", dtype=dtype, out=out)
    return R.cumsum(a, axis)


def np_average(a, axis=None, weights=None, returned=False, *, keepdims=None):
    return R.average(a, axis, weights, returned, _keep(keepdims))


def np_stack(arrays, axis=0, out=None, *, dtype=None, casting=None):
    _reject("stack", out=out, dtype=dtype)
    return Y.stack(arrays, axis)


def np_sort(a, axis=-1, kind=None, order=None, *, stable=None):
    return O.sort(a, axis, kind, order)


def np_argsort(a, axis=-1, kind=None, order=None, *, stable=None):
    return O.argsort(a, axis, kind, order)


def np_broadcast_to(array, shape, subok=False):
    return S.broadcast_to(array, (shape,) if isinstance(shape, (int, np.integer)) else shape)


def np_squeeze(a, axis=None):
    return Y.squeeze(a, axis)


def _stacking(fn: Callable[[Any], Any], name: str) -> Callable[..., Any]:
    def stacker(tup, *, dtype=None, casting=None):
        _reject(name, dtype=dtype)
        return fn(tup)
    stacker.__name__ = name
    return stacker


# ---------------------------------------------------------------- the tables

UFUNCS: dict[Any, Callable[..., Any]] = {
    np.sin: M.sin, np.cos: M.cos, np.tan: M.tan, np.arcsin: M.arcsin, np.arccos: M.arccos,
    np.arctan: M.arctan, np.sinh: M.sinh, np.cosh: M.cosh, np.arcsinh: M.arcsinh,
    np.arccosh: M.arccosh, np.arctanh: M.arctanh, np.exp2: M.exp2, np.expm1: M.expm1,
    np.log2: M.log2, np.log10: M.log10, np.log1p: M.log1p, np.square: M.square,
    np.reciprocal: M.reciprocal, np.positive: M.positive, np.fabs: M.fabs,
    np.deg2rad: M.deg2rad, np.radians: M.deg2rad, np.rad2deg: M.rad2deg,
    np.degrees: M.rad2deg, np.minimum: M.minimum, np.fmin: M.fmin, np.fmax: M.fmax,
    np.logaddexp: M.logaddexp, np.logaddexp2: M.logaddexp2, np.arctan2: M.arctan2,
    np.hypot: M.hypot, np.remainder: M.remainder, np.floor_divide: M.floor_divide,
    np.divmod: M.divmod_,
}

FUNCTIONS: dict[Any, Callable[..., Any]] = {
    np.prod: np_prod, np.min: np_min, np.amin: np_min, np.var: np_var, np.std: np_std,
    np.cumsum: np_cumsum, np.average: np_average, np.clip: M.clip,
    np.nan_to_num: M.nan_to_num,
    np.sort: np_sort, np.argsort: np_argsort, np.partition: O.partition,
    np.stack: np_stack, np.vstack: _stacking(Y.vstack, "vstack"),
    np.hstack: _stacking(Y.hstack, "hstack"), np.dstack: Y.dstack,
    np.column_stack: Y.column_stack, np.row_stack: _stacking(Y.row_stack, "row_stack"),
    np.split: Y.split, np.array_split: Y.array_split, np.hsplit: Y.hsplit,
    np.vsplit: Y.vsplit, np.dsplit: Y.dsplit, np.repeat: Y.repeat, np.tile: Y.tile,
    np.pad: Y.pad, np.roll: Y.roll, np.flip: Y.flip, np.fliplr: Y.fliplr,
    np.flipud: Y.flipud, np.rot90: Y.rot90, np.squeeze: np_squeeze,
    np.expand_dims: Y.expand_dims, np.ravel: Y.ravel, np.swapaxes: Y.swapaxes,
    np.moveaxis: Y.moveaxis, np.rollaxis: Y.rollaxis, np.atleast_1d: Y.atleast_1d,
    np.atleast_2d: Y.atleast_2d, np.atleast_3d: Y.atleast_3d,
    np.broadcast_to: np_broadcast_to, np.append: Y.append, np.diff: Y.diff,
    np.select: Y.select,
}


# ---------------------------------------------------------------- array methods

def _method_round(x, decimals=0, out=None):
    _reject("ndarray.round", out=out)
    return trace._round(x, decimals)


def _method_clip(x, min=None, max=None, out=None, **kwargs):
    return M.clip(x, min, max, out, **kwargs)


def _method_ravel(x, order="C"):
    return Y.ravel(x, order)


def _method_squeeze(x, axis=None):
    return Y.squeeze(x, axis)


def _method_min(x, axis=None, out=None, keepdims=False, initial=None, where=None):
    return np_min(x, axis, out, keepdims, initial, where)


def _method_prod(x, axis=None, dtype=None, out=None, keepdims=False, initial=None, where=None):
    return np_prod(x, axis, dtype, out, keepdims, initial, where)


def _method_cumsum(x, axis=None, dtype=None, out=None):
    return np_cumsum(x, axis, dtype, out)


METHODS: dict[str, Callable[..., Any]] = {
    "min": _method_min, "prod": _method_prod, "var": np_var, "std": np_std,
    "cumsum": _method_cumsum, "ravel": _method_ravel, "flatten": _method_ravel,
    "squeeze": _method_squeeze, "swapaxes": Y.swapaxes, "clip": _method_clip,
    "round": _method_round,
}

OPERATORS: dict[str, Callable[..., Any]] = {
    "__mod__": M.remainder, "__rmod__": trace._swap(M.remainder),
    "__floordiv__": M.floor_divide, "__rfloordiv__": trace._swap(M.floor_divide),
    "__divmod__": M.divmod_, "__rdivmod__": trace._swap(M.divmod_),
}


def _iterate(x: Tracer) -> Any:
    """Iterating a traced array gives its slices along axis 0 (its shape is static)."""
    if not x.shape:
        raise TypeError("iteration over a 0-d traced array")
    return (x[i] for i in range(x.shape[0]))


def _no_conversion(x: Tracer, *args: Any, **kwargs: Any) -> Any:
    raise TracingError(
        f"a traced {x.ir_var.type_str()} was converted to a numpy array (at {current_loc()}): "
        "np.array, np.asarray, np.r_ and np.c_ cannot be traced, and given a list holding "
        "traced values they convert the list's items one by one before jitgrad sees it. "
        "Build the array with np.stack(list) (or np.concatenate, or jitgrad.numpy.array(list)); "
        "a traced value is only known when the compiled program runs.")


for _name, _fn in {**METHODS, **OPERATORS}.items():
    setattr(Tracer, _name, _fn)
Tracer.__iter__ = _iterate
Tracer.__array__ = _no_conversion
trace._UFUNCS.update(UFUNCS)
trace._FUNCTIONS.update(FUNCTIONS)
