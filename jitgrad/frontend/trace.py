"""Tracing: run a numpy-style function on Tracers and record a Program.

Operators and numpy's dispatch protocols (`__array_ufunc__`,
`__array_function__`) on Tracer are defined here, mapping onto the primitives'
user-facing functions in ops/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import JitgradError, TracingError
from . import random_guard, tree
from .core import Trace, Tracer, current_loc, with_user_loc
from .ir import Program, check_dtype
from .ops import contract as C
from .ops import diagonal as D
from .ops import elementwise as E
from .ops import indexing as X
from .ops import linalg as L
from .ops import reduce as R
from .ops import shape as S

# (shape, dtype, weak): what a compiled function is specialised on, per input leaf.
Signature = tuple[tuple[int, ...], np.dtype, bool]


def trace_flat(fn: Callable[..., Any], in_tree: tree.TreeDef,
               in_sigs: Sequence[Signature]) -> tuple[Program, tree.TreeDef, list[Tracer]]:
    """Trace fn on abstract inputs; returns the Program, the output structure and any
    values of enclosing traces the function captured (extra trailing program inputs)."""
    with Trace() as t, random_guard.guard():
        leaves = [t.new_input(s, d, w) for s, d, w in in_sigs]
        try:
            out = fn(*tree.unflatten(in_tree, leaves))
            out_leaves, out_tree = tree.flatten(out)
            prog = t.to_program(out_leaves)
        except JitgradError as e:  # argument checks raise before any line is known
            raise with_user_loc(e) from e.__cause__
    return prog, out_tree, [outer for outer, _ in t.captured.values()]


def signature_of(x: Any) -> Signature:
    if isinstance(x, Tracer):
        return x.shape, x.dtype, x.weak
    if isinstance(x, (bool, int, float)) and not isinstance(x, np.generic):
        return (), np.result_type(x), True
    if isinstance(x, (np.ndarray, np.generic)):
        return x.shape, check_dtype(x.dtype, "argument dtype"), False
    raise JitgradError(f"unsupported argument of type {type(x).__name__}: jitgrad takes numpy "
                       "arrays, Python scalars, and pytrees of them (dicts, lists, tuples, "
                       "NamedTuples, dataclasses, classes registered with jg.tree.register)")


# ---------------------------------------------------------------- operators on Tracer

def _swap(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    return lambda a, b: f(b, a)


def _no_concrete(what: str) -> Callable[..., Any]:
    def fail(self: Tracer, *args: Any) -> Any:
        raise TracingError(
            f"{what} needs a concrete value, but this is a traced {self.ir_var.type_str()} "
            f"inside jit/grad: its value is only known when the compiled program runs. "
            f"Python control flow on traced values (if/while/and/or) cannot be traced; use "
            f"jg.where(cond, a, b) to select between values. An argument meant as a Python "
            f"value (a shape, a loop count, a flag) can be a static argument: "
            f"jg.jit(f, static_argnums=..., static_argnames=...).")
    return fail


_METHODS: dict[str, Any] = {
    "__add__": E.add, "__radd__": _swap(E.add),
    "__sub__": E.sub, "__rsub__": _swap(E.sub),
    "__mul__": E.mul, "__rmul__": _swap(E.mul),
    "__truediv__": E.div, "__rtruediv__": _swap(E.div),
    "__pow__": E.power, "__rpow__": _swap(E.power),
    "__matmul__": L.matmul, "__rmatmul__": _swap(L.matmul),
    "__lt__": E.lt, "__le__": E.le, "__gt__": E.gt, "__ge__": E.ge,
    "__eq__": E.eq, "__ne__": E.ne,
    "__neg__": E.neg, "__pos__": lambda x: x, "__abs__": E.abs,
    "__bool__": _no_concrete("bool()"), "__float__": _no_concrete("float()"),
    "__int__": _no_concrete("int()"), "__index__": _no_concrete("an index"),
    "astype": E.cast,
    "sum": R.sum, "mean": R.mean, "max": R.max,
    "argmax": lambda x, axis=None: R.argmax(x, axis),  # numpy's default: flattened
    "transpose": lambda x, *axes: S.transpose(
        x, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else (axes or None)),
    "reshape": lambda x, *shape: S.reshape(
        x, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape),
}
for _name, _fn in _METHODS.items():
    setattr(Tracer, _name, _fn)
Tracer.__hash__ = object.__hash__
Tracer.T = property(lambda x: S.transpose(x))

# ---------------------------------------------------------------- numpy dispatch

_UFUNCS: dict[Any, Callable[..., Any]] = {
    np.add: E.add, np.subtract: E.sub, np.multiply: E.mul, np.true_divide: E.div,
    np.power: E.power, np.maximum: E.maximum, np.matmul: L.matmul,
    np.less: E.lt, np.less_equal: E.le, np.greater: E.gt, np.greater_equal: E.ge,
    np.equal: E.eq, np.not_equal: E.ne,
    np.negative: E.neg, np.positive: lambda x: x, np.exp: E.exp, np.log: E.log,
    np.tanh: E.tanh, np.sqrt: E.sqrt, np.absolute: E.abs, np.floor: E.floor,
    np.ceil: E.ceil, np.rint: E.round, np.sign: E.sign,
}


def _where(cond: Any, x: Any = None, y: Any = None) -> Any:
    if x is None or y is None:
        raise JitgradError("np.where(cond) with one argument has a data-dependent shape; "
                           "use the three-argument form")
    return E.where(cond, x, y)


_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    np.sum: R.sum, np.mean: R.mean, np.max: R.max, np.amax: R.max,
    np.argmax: lambda x, axis=None: R.argmax(x, axis),  # numpy's default: flattened
    np.where: _where, np.reshape: S.reshape, np.transpose: S.transpose,
    np.concatenate: S.concatenate, np.take_along_axis: S.take_along_axis,
    np.round: lambda x, decimals=0: _round(x, decimals), np.around: lambda x, decimals=0:
    _round(x, decimals), np.ndim: lambda x: x.ndim, np.shape: lambda x: x.shape,
    np.size: lambda x: x.size,
}


def _round(x: Any, decimals: int) -> Any:
    if decimals:
        raise JitgradError("np.round with decimals is not supported")
    return E.round(x)


def _ufunc_name(ufunc: Any) -> str:
    """numpy.sin, scipy.special.erf: the name a user would import the ufunc by."""
    module = getattr(ufunc, "__module__", None) or "numpy"
    return f"{module}.{ufunc.__name__}"


def _array_ufunc(self: Tracer, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
    fn = _UFUNCS.get(ufunc)
    if method != "__call__" or fn is None:
        name = _ufunc_name(ufunc) + ("" if method == "__call__" else f".{method}")
        raise JitgradError(f"{name} is not supported on traced values (at {current_loc()}); "
                           f"supported ufuncs: {', '.join(sorted(u.__name__ for u in _UFUNCS))}")
    if kwargs:
        raise JitgradError(f"{_ufunc_name(ufunc)}: keyword arguments {sorted(kwargs)} are not "
                           f"supported on traced values (at {current_loc()})")
    return fn(*inputs)


def _array_function(self: Tracer, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
    fn = _FUNCTIONS.get(func)
    if fn is None:
        # func.__module__ is where users find it: numpy.linalg.inv, not numpy.inv
        raise JitgradError(f"{func.__module__}.{func.__name__} is not supported on traced "
                           f"values (at {current_loc()}); supported: "
                           f"{', '.join(sorted(f.__name__ for f in _FUNCTIONS))} and the ufuncs")
    return fn(*args, **kwargs)


Tracer.__array_ufunc__ = _array_ufunc
Tracer.__array_function__ = _array_function

# ---------------------------------------------------------------- linear algebra and indexing

_FUNCTIONS.update({
    np.dot: C.dot, np.einsum: C.einsum, np.tensordot: C.tensordot, np.inner: C.inner,
    np.outer: C.outer, np.kron: C.kron, np.trace: D.trace, np.diag: D.diag,
    np.diagonal: D.diagonal, np.triu: D.triu, np.tril: D.tril,
})
Tracer.dot = C.dot
Tracer.__getitem__ = X.getitem
Tracer.__setitem__ = X.setitem
Tracer.at = property(X.IndexUpdates)

__all__ = ["trace_flat", "signature_of", "Signature"]
