"""Finite-difference gradient checking in float64 (orders 1 and 2), shared by the tests.

- `numeric_grad(f, args, argnum)`: central differences of a scalar function with
  respect to one argument (an array, a Python float or a pytree of arrays);
- `numeric_hvp(grad_f, args, v, argnums)`: central differences of a gradient
  function along the direction v, i.e. a Hessian-vector product H v;
- `assert_grads_close(analytic, numeric)`: elementwise comparison with a
  relative tolerance plus an absolute one scaled by the gradient's norm;
- `check_grads(f, args, ...)`: jitgrad's gradient (order 1) and Hessian-vector
  product (order 2) against finite differences.

Every finite difference here is taken in float64 with a step relative to the
coordinate, so truncation (O(h^2)) and rounding (O(eps/h)) errors are both near
1e-10, four orders below the default tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import jitgrad as jg
from jitgrad.frontend import tree

EPS = 1e-5
RTOL = 1e-6
ATOL = 1e-6  # times the norm of the expected gradient


def _leaf_array(x: Any) -> np.ndarray:
    if np.asarray(x).dtype.kind != "f":
        raise TypeError(f"finite differences need float inputs, got {np.asarray(x).dtype}")
    return np.array(x, dtype=np.float64, copy=True)


def _with_arg(args: Sequence[Any], argnum: int, value: Any) -> list[Any]:
    out = list(args)
    out[argnum] = value
    return out


def numeric_grad(f: Callable[..., Any], args: Sequence[Any], argnum: int = 0,
                 eps: float = EPS) -> Any:
    """Central finite differences of the scalar f(*args) with respect to args[argnum].

    args[argnum] may be an array, a Python float or a pytree of them; the result
    has the same structure, with float64 arrays as leaves.
    """
    leaves, td = tree.flatten(args[argnum])
    leaves = [_leaf_array(x) for x in leaves]
    grads = []
    for k, leaf in enumerate(leaves):
        g = np.zeros_like(leaf)
        for i in np.ndindex(leaf.shape):
            h = eps * max(1.0, abs(float(leaf[i])))
            vals = []
            for sign in (1.0, -1.0):
                moved = leaf.copy()
                moved[i] += sign * h
                new_leaves = leaves[:k] + [moved] + leaves[k + 1:]
                value = f(*_with_arg(args, argnum, tree.unflatten(td, new_leaves)))
                vals.append(float(np.asarray(value, dtype=np.float64)))
            g[i] = (vals[0] - vals[1]) / (2.0 * h)
        grads.append(g)
    return tree.unflatten(td, grads)


def numeric_hvp(grad_f: Callable[..., Any], args: Sequence[Any], v: Any,
                argnums: int | Sequence[int] = 0, eps: float = EPS) -> Any:
    """Central differences of grad_f along the direction v: a Hessian-vector product H v.

    With an int argnums, grad_f returns the gradient wrt args[argnums] and v has
    that argument's structure. With a tuple argnums, grad_f returns a tuple of
    gradients, v is a tuple of directions (one per argument), all arguments move
    together, and the result is a tuple (the joint Hessian times v).
    """
    multi = not isinstance(argnums, int)
    nums = tuple(argnums) if multi else (argnums,)
    point = tuple(args[n] for n in nums)
    direction = tuple(v) if multi else (v,)
    x_leaves, td = tree.flatten(point)
    v_leaves, vtd = tree.flatten(direction)
    if vtd != td:
        raise ValueError("direction and argument have different structures")
    x_leaves = [_leaf_array(x) for x in x_leaves]
    v_leaves = [np.asarray(d, dtype=np.float64) for d in v_leaves]
    scale = max([1.0] + [float(np.max(np.abs(x), initial=0.0)) for x in x_leaves])
    h = eps * scale / max(1e-12, max(float(np.max(np.abs(d), initial=0.0)) for d in v_leaves))

    def at(sign: float) -> list[np.ndarray]:
        moved = tree.unflatten(td, [x + sign * h * d
                                    for x, d in zip(x_leaves, v_leaves, strict=True)])
        new_args = list(args)
        for n, value in zip(nums, moved, strict=True):
            new_args[n] = value
        g = grad_f(*new_args)
        g_leaves, gtd = tree.flatten(tuple(g) if multi else (g,))
        if gtd != td:
            raise ValueError("the gradient does not have the structure of its argument")
        return [np.asarray(x, dtype=np.float64) for x in g_leaves]

    plus, minus = at(1.0), at(-1.0)
    out = tree.unflatten(td, [(p - m) / (2.0 * h) for p, m in zip(plus, minus, strict=True)])
    return out if multi else out[0]


def assert_grads_close(analytic: Any, numeric: Any, rtol: float = RTOL, atol: float = ATOL,
                       what: str = "gradient") -> None:
    """|analytic - numeric| <= rtol |numeric| + atol * max(||numeric||, 1e-3), leaf by leaf.

    Both may be pytrees; their structures, shapes and values must agree. The
    absolute tolerance is scaled by the norm of the whole expected gradient, so
    near-zero entries of a large gradient are judged on the gradient's scale.
    """
    a_leaves, a_td = tree.flatten(analytic)
    n_leaves, n_td = tree.flatten(numeric)
    assert a_td == n_td, (f"{what}: structure {tree.describe(a_td)} differs from the expected "
                          f"{tree.describe(n_td)}")
    norm = float(np.sqrt(sum(np.sum(np.asarray(n, np.float64) ** 2) for n in n_leaves)))
    abs_tol = atol * max(norm, 1e-3)
    for k, (a, n) in enumerate(zip(a_leaves, n_leaves, strict=True)):
        a = np.asarray(a)
        n = np.asarray(n, dtype=np.float64)
        assert a.shape == n.shape, f"{what} leaf {k}: shape {a.shape} != expected {n.shape}"
        assert np.all(np.isfinite(a)), f"{what} leaf {k}: non-finite values {a}"
        err = np.abs(a.astype(np.float64) - n)
        bound = rtol * np.abs(n) + abs_tol
        if not np.all(err <= bound):
            worst = np.unravel_index(int(np.argmax(err - bound)), err.shape) if err.ndim else ()
            raise AssertionError(
                f"{what} leaf {k} differs from the expected value at index {worst}: "
                f"{a[worst]!r} vs {n[worst]!r} (|err| {err[worst]:.3g} > {bound[worst]:.3g});"
                f"\nanalytic:\n{a}\nexpected:\n{n}")


def random_like(rng: np.random.Generator, x: Any) -> Any:
    """A random float64 pytree with the structure and shapes of x (a direction or weights)."""
    leaves, td = tree.flatten(x)
    return tree.unflatten(td, [rng.normal(size=np.shape(leaf)) for leaf in leaves])


def vdot(a: Any, b: Any) -> Any:
    """sum(a * b) over the leaves of two pytrees, written with jitgrad (traceable)."""
    a_leaves, _ = tree.flatten(a)
    b_leaves, _ = tree.flatten(b)
    total = 0.0
    for x, y in zip(a_leaves, b_leaves, strict=True):
        total = total + jg.sum(x * y)
    return total


def check_grads(f: Callable[..., Any], args: Sequence[Any], argnums: int | Sequence[int] = 0,
                order: int = 2, ref: Callable[..., Any] | None = None,
                rng: np.random.Generator | None = None, rtol: float = RTOL,
                atol: float = ATOL) -> None:
    """jitgrad's gradients of the scalar f against finite differences, orders 1..order.

    Order 1 compares jg.grad(f) with finite differences of `ref` (default: f
    itself, eagerly on numpy arrays). Order 2 compares the Hessian-vector
    product grad(x -> <grad(f)(x), v>) with finite differences of jg.grad(f)
    along v, for a random direction v.
    """
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    ref = f if ref is None else ref
    rng = np.random.default_rng(1234) if rng is None else rng
    grads = jg.grad(f, argnums=nums)(*args)
    assert isinstance(grads, tuple) and len(grads) == len(nums)
    for n, g in zip(nums, grads, strict=True):
        assert_grads_close(g, numeric_grad(ref, args, n), rtol, atol,
                           what=f"d/d(arg {n}) (order 1)")
    if order < 2:
        return
    v = tuple(random_like(rng, args[n]) for n in nums)
    grad_all = jg.grad(f, argnums=nums)

    def directional(*a: Any) -> Any:
        return vdot(grad_all(*a), v)

    hvp = jg.grad(directional, argnums=nums)(*args)
    assert_grads_close(hvp, numeric_hvp(grad_all, args, v, nums), rtol, atol,
                       what="Hessian-vector product (order 2)")
