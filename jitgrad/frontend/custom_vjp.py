"""`jg.custom_vjp`: a function with a derivative rule of its own, as `jax.custom_vjp`.

    @jg.custom_vjp
    def log1pexp(x):
        return jg.log(1 + jg.exp(x))

    def fwd(x):                      # the output and the residuals bwd needs
        return log1pexp(x), x

    def bwd(x, g):                   # residuals, output cotangent -> one per argument
        return (g * jg.sigmoid(x),)

    log1pexp.defvjp(fwd, bwd)

Traced, a call runs `fwd` as ordinary code and marks its outputs with the rule
(ops/custom.py): differentiation calls `bwd` instead of differentiating through `fwd`'s
computation of the outputs; `bwd` is traced like any code, so its own derivative (order
2) follows from the primitives it uses and from `fwd`'s computation of the residuals.
Called on concrete arrays, outside any trace, the function is just `fun`. As in JAX,
keyword arguments are bound to positions (defaults included), and `bwd` returns one
cotangent per position: a pytree of the argument's structure, or None for no gradient.
Inside its own `fwd`, a call of the same function runs `fun` as plain code (that is
what a forward rule calling the function means).
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import JitgradError
from . import tree
from .core import Tracer, current_loc
from .ops import shape as S
from .ops.custom import custom_vjp_call

_TRACED = object()  # a residual leaf that is an input of the instruction


class custom_vjp:  # noqa: N801 (the name is JAX's)
    """Decorate `fun`; then `fun.defvjp(fwd, bwd)` gives its derivative rule."""

    def __init__(self, fun: Callable[..., Any]):
        self.fun = fun
        self.fwd: Callable[..., Any] | None = None
        self.bwd: Callable[..., Any] | None = None
        self._in_fwd = threading.local()
        functools.update_wrapper(self, fun)

    def defvjp(self, fwd: Callable[..., Any], bwd: Callable[..., Any]) -> None:
        """fwd(*args) -> (output, residuals); bwd(residuals, output_cotangent) -> a tuple
        of one cotangent per positional argument of fun."""
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fwd is None:
            raise JitgradError(f"custom_vjp function {self.__name__} has no rule: call "
                               f"{self.__name__}.defvjp(fwd, bwd) first (at {current_loc()})")
        args = self._positional(args, kwargs)
        leaves, in_tree = tree.flatten(args)
        if getattr(self._in_fwd, "active", False) or not any(
                isinstance(x, Tracer) for x in leaves):
            return self.fun(*args)
        self._in_fwd.active = True
        try:
            result = self.fwd(*args)
        finally:
            self._in_fwd.active = False
        if not (isinstance(result, tuple) and len(result) == 2):
            raise JitgradError(f"custom_vjp {self.__name__}: fwd must return (output, "
                               f"residuals), got a {type(result).__name__} (at {current_loc()})")
        out_leaves, out_tree = tree.flatten(result[0])
        res_leaves, res_tree = tree.flatten(result[1])
        rule = Rule(self, [tree.structure(a) for a in args], leaves, res_leaves, res_tree,
                    out_tree, len(out_leaves))
        traced = [x for x in [*leaves, *res_leaves] if isinstance(x, Tracer)]
        outs = custom_vjp_call(*traced, *out_leaves, rule=rule)
        return tree.unflatten(out_tree, outs)

    def _positional(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Keyword arguments bound to positions, defaults included (JAX's resolve_kwargs)."""
        try:
            bound = inspect.signature(self.fun).bind(*args, **kwargs)
        except ValueError:  # no signature (a builtin): positions as given
            return args
        except TypeError as e:
            raise JitgradError(f"custom_vjp {self.__name__}: {e} (at {current_loc()})") from None
        bound.apply_defaults()
        if bound.kwargs:
            raise JitgradError(f"custom_vjp {self.__name__}: keyword-only arguments "
                               f"{sorted(bound.kwargs)} have no position; make them "
                               f"positional or close over them (at {current_loc()})")
        return bound.args


class Rule:
    """One traced call's derivative. Only the traced argument and residual leaves are
    inputs of the instruction (then the outputs); the others are constants, kept here."""

    def __init__(self, fn: custom_vjp, arg_trees: Sequence[tree.TreeDef],
                 arg_leaves: Sequence[Any], res_leaves: Sequence[Any], res_tree: tree.TreeDef,
                 out_tree: tree.TreeDef, n_outputs: int):
        self.fn = fn
        self.arg_trees = arg_trees
        self.arg_traced = [isinstance(x, Tracer) for x in arg_leaves]
        # residuals as bwd receives them: constants in place, traced ones from the inputs
        self.res_consts = [_TRACED if isinstance(x, Tracer) else x for x in res_leaves]
        self.res_tree, self.out_tree = res_tree, out_tree
        self.n_outputs = n_outputs

    def __repr__(self) -> str:
        return self.fn.__name__

    def vjp(self, cts: Sequence[Any], ins: Sequence[Any]) -> list[Any]:
        n_args = sum(self.arg_traced)
        n_res = self.res_consts.count(_TRACED)
        res_it = iter(ins[n_args:n_args + n_res])
        res = tree.unflatten(self.res_tree, [next(res_it) if x is _TRACED else x
                                             for x in self.res_consts])
        outs = ins[n_args + n_res:]
        g = [S.broadcast_to(np.zeros((), o.dtype), o.shape) if ct is None else ct
             for ct, o in zip(cts, outs, strict=True)]
        arg_cts = self.fn.bwd(res, tree.unflatten(self.out_tree, g))
        return self._check(arg_cts, ins[:n_args]) + [None] * (n_res + len(outs))

    def _check(self, arg_cts: Any, traced_args: Sequence[Any]) -> list[Any]:
        """bwd's cotangents for the traced argument leaves, checked against them."""
        name = self.fn.__name__
        if not isinstance(arg_cts, (tuple, list)) or len(arg_cts) != len(self.arg_trees):
            got = (f"{len(arg_cts)} cotangents" if isinstance(arg_cts, (tuple, list))
                   else f"a {type(arg_cts).__name__}")
            raise JitgradError(f"custom_vjp {name}: bwd must return a tuple of "
                               f"{len(self.arg_trees)} cotangent(s), one per argument of "
                               f"{name}, got {got} (at {current_loc()})")
        leaves: list[Any] = []
        for i, (ct, td) in enumerate(zip(arg_cts, self.arg_trees, strict=True)):
            if ct is None:
                leaves += [None] * tree.num_leaves(td)
                continue
            ct_leaves, ct_tree = tree.flatten(ct)
            if ct_tree != td:
                raise JitgradError(f"custom_vjp {name}: bwd's cotangent for argument {i} "
                                   f"has structure {tree.describe(ct_tree)}, the argument "
                                   f"{tree.describe(td)} (at {current_loc()})")
            leaves += ct_leaves
        out, it = [], iter(traced_args)
        for ct, traced in zip(leaves, self.arg_traced, strict=True):
            if not traced:
                continue
            arg = next(it)
            if ct is None or arg.dtype.kind != "f":  # integers carry no gradient
                out.append(None)
                continue
            # a Python scalar takes the argument's dtype (weak, as everywhere)
            dtype = ct.dtype if hasattr(ct, "dtype") else arg.dtype
            if np.shape(ct) != arg.shape or np.dtype(dtype) != arg.dtype:
                raise JitgradError(
                    f"custom_vjp {name}: bwd returned a cotangent of {np.dtype(dtype)}"
                    f"{tuple(np.shape(ct))} for an argument of {arg.dtype}{tuple(arg.shape)}"
                    f" (at {current_loc()})")
            out.append(ct if isinstance(ct, Tracer) else np.asarray(ct, arg.dtype))
        return out
