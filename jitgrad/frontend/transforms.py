"""Jacobians and Hessians (reverse mode), and what stays out of scope: jvp, vmap, jacfwd.

`jg.jacobian(f)(x)` is JAX's `jacrev`: one vector-Jacobian product per output element,
all of them in one compiled program after a single forward pass
(`autodiff.jacobian_program`), not a Python loop of calls. Its cost is that of one
backward sweep per output element, so it suits functions with few outputs (a
Hessian's rows, a small model's per-output sensitivities); for one direction use
`jg.grad` of a dot product instead. `jg.hessian(f)` is `jacobian(grad(f))`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..compiler.passes import dce
from ..errors import JitgradError
from . import tree
from .api import argnums_tuple, aux_split, grad, jit, per_argnum, trace_wrt
from .autodiff import jacobian_program
from .core import _trace_stack, eval_program, user_frame_loc


def jacobian(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
             has_aux: bool = False) -> Callable[..., Any]:
    """The Jacobian of fn with respect to argument(s) argnums (jax.jacrev / jax.jacobian).

    For an output of shape S and an argument of shape T the result has shape S + T.
    Pytrees nest as in JAX: the output's structure, holding at each leaf the structure
    of the differentiated argument (a tuple of them for a tuple argnums). With has_aux,
    fn returns (output, aux) and the result is (jacobian, aux). Outputs must be float.
    """
    multi, nums = argnums_tuple(argnums)

    @functools.wraps(fn)
    def jacobian_fn(*args: Any, **kwargs: Any) -> Any:
        if not _trace_stack():
            return compiled(*args, **kwargs)
        traced = trace_wrt(fn, args, kwargs, nums, "jacobian")
        jac_tree, aux_tree = aux_split(traced.out_tree, has_aux)
        n_jac, n_wrt = tree.num_leaves(jac_tree), len(traced.wrt_leaves)
        prog = dce(traced.program)
        outs = eval_program(jacobian_program(prog, range(n_wrt), n_jac), traced.inputs())
        n_out = len(prog.outputs)
        jac = tree.unflatten(jac_tree, [
            per_argnum(traced, outs[n_out + k * n_wrt:n_out + (k + 1) * n_wrt], multi)
            for k in range(n_jac)])
        if aux_tree is None:
            return jac
        return jac, tree.unflatten(aux_tree, outs[n_jac:n_out])

    compiled = jit(jacobian_fn)
    return jacobian_fn


def hessian(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
            has_aux: bool = False) -> Callable[..., Any]:
    """The Hessian of a scalar fn: jacobian(grad(fn)) (jax.hessian). For an argument of
    shape T the result has shape T + T; for a tuple argnums, a tuple of tuples."""
    return jacobian(grad(fn, argnums, has_aux), argnums, has_aux)


def _out_of_scope(name: str, why: str) -> NoReturn:
    raise JitgradError(f"jg.{name} is not supported: {why} (at {user_frame_loc()})")


def jvp(fun: Any, *args: Any, **kwargs: Any) -> NoReturn:
    """Forward mode is out of scope: this raises, naming the reverse-mode workarounds."""
    _out_of_scope("jvp", "jitgrad differentiates in reverse mode only. A Jacobian-vector "
                  "product J·v is jg.jacobian(f)(x) @ v for a small f; a Hessian-vector "
                  "product is jg.grad(lambda x: jg.sum(jg.grad(f)(x) * v))(x)")


def jacfwd(fun: Any, *args: Any, **kwargs: Any) -> NoReturn:
    """Forward-mode Jacobians are out of scope: this raises, naming jg.jacobian."""
    _out_of_scope("jacfwd", "jitgrad differentiates in reverse mode only; jg.jacobian "
                  "(reverse mode, as jax.jacrev) computes the same matrix")


def vmap(fun: Any, *args: Any, **kwargs: Any) -> NoReturn:
    """Automatic batching is out of scope: this raises, naming the workarounds."""
    _out_of_scope("vmap", "jitgrad has no batching transformation. Write the batch axis "
                  "into the function (numpy broadcasting, x @ W over a batch of rows), or "
                  "call the jitted function once per example; per-example gradients of a "
                  "loss summed over a batch are jg.jacobian of the vector of losses")
