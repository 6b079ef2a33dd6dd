"""The numpy surface (issue 16, part A): every numpy ufunc, function, array method and
operator jitgrad dispatches, called as a numpy user calls it, against numpy and finite
differences.

- `test_row`: each row checked as test_gradcheck.py checks its rows (values eager and
  jitted, order 1 and order 2 against central differences in float64, float32 kept).
  Rows run on the interpreter; on Numba only with JITGRAD_TEST_FULL=1.
- `test_family_compiled`: the default suite's Numba coverage. Every differentiable row of
  a family is put into one program (their weighted sums added), compiled once per order,
  and checked at orders 1 and 2, so each function runs compiled without a compile each.
- `test_every_entry_has_a_row`: every entry of the dispatch tables has a row.

The piecewise-constant rows (`//`, floor_divide raising UndefinedGradientError) are in
test_gradcheck.py with the primitives' rows; here they appear behind stop_gradient.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from gradcheck import assert_grads_close, numeric_grad, numeric_hvp, vdot
from test_gradcheck import (
    Op,
    _args,
    _check_values,
    _loss,
    _weights,
    away,
    distinct,
    mk,
    near_int,
    normal,
    pos,
    quotient_away,
    separated,
    uniform,
)
from test_gradcheck import test_op as check_row

import jitgrad as jg
import jitgrad.numpy as jnp
from jitgrad.frontend import numpy_surface as NS

SURFACE: list[tuple[str, str, Op]] = []  # (family, surface name, row)


def row(family: str, name: str, prim: str, variant: str, fn: Callable[..., Any],
        make: Callable[[np.random.Generator], tuple], ref: Callable[..., Any] | None = None,
        **kw: Any) -> None:
    """fn is called on traced values and (as the reference, unless ref is given) on numpy
    arrays: the same numpy call, dispatched to jitgrad or run by numpy."""
    SURFACE.append((family, name, Op(prim, f"{name}-{variant}", fn, ref or fn, make, **kw)))


# ---------------------------------------------------------------- unary ufuncs

UNARY_DOMAINS = {
    "arcsin": lambda *s: uniform(-0.8, 0.8, *s), "arccos": lambda *s: uniform(-0.8, 0.8, *s),
    "arctanh": lambda *s: uniform(-0.8, 0.8, *s), "tan": lambda *s: uniform(-1.2, 1.2, *s),
    "arccosh": lambda *s: uniform(1.2, 3.0, *s), "log2": pos, "log10": pos, "log1p": pos,
    "reciprocal": away, "fabs": away, "absolute": away,
}
for _uf, _prim in [(np.sin, "sin"), (np.cos, "cos"), (np.tan, "tan"), (np.arcsin, "arcsin"),
                   (np.arccos, "arccos"), (np.arctan, "arctan"), (np.sinh, "sinh"),
                   (np.cosh, "cosh"), (np.arcsinh, "arcsinh"), (np.arccosh, "arccosh"),
                   (np.arctanh, "arctanh"), (np.exp2, "exp2"), (np.expm1, "expm1"),
                   (np.log2, "log2"), (np.log10, "log10"), (np.log1p, "log1p"),
                   (np.square, "mul"), (np.reciprocal, "div"), (np.negative, "neg"),
                   (np.fabs, "abs"), (np.absolute, "abs"), (np.deg2rad, "mul"),
                   (np.radians, "mul"), (np.rad2deg, "mul"), (np.degrees, "mul")]:
    _gen = UNARY_DOMAINS.get(_uf.__name__, normal)
    row("unary", f"np.{_uf.__name__}", _prim, "2x3x2", lambda x, u=_uf: u(x), mk(_gen(2, 3, 2)))
row("unary", "np.positive", "tanh", "of-tanh", lambda x: np.positive(np.tanh(x)),
    mk(normal(3, 4)))
row("unary", "jg.erf", "erf", "3x4", jg.erf, mk(normal(3, 4)),
    ref=lambda x: np.vectorize(math.erf)(x))
NAN_INF = np.array([1.0, np.inf, np.nan, -np.inf])
SPECIAL = ~np.isfinite(NAN_INF)
NAN_ONLY = np.array([np.nan, 1.0, 1.0, np.nan])
row("unary", "np.nan_to_num", "where", "defaults",
    lambda x: np.nan_to_num(np.where(np.isnan(NAN_ONLY), NAN_ONLY, x)), mk(normal(3, 4)))
row("unary", "np.nan_to_num", "where", "values", lambda x: np.nan_to_num(
    np.where(SPECIAL, NAN_INF, x), nan=-1.0, posinf=9.0, neginf=-9.0), mk(normal(3, 4)))


# ---------------------------------------------------------------- binary ufuncs and operators

def pair(sa: tuple[int, ...], sb: tuple[int, ...], gen: Any = normal) -> Any:
    return mk(gen(*sa), gen(*sb))


for _uf, _prim, _make in [
        (np.minimum, "minimum", mk(separated((3, 4), (4,)))),
        (np.fmin, "fmin", mk(separated((3, 1), (1, 4)))),
        (np.fmax, "fmax", mk(separated((3, 4), (4,)))),
        (np.logaddexp, "logaddexp", pair((3, 4), (3, 1))),
        (np.logaddexp2, "logaddexp2", pair((2, 1, 3), (4, 1))),
        (np.arctan2, "arctan2", pair((3, 4), (4,), away)),
        (np.hypot, "hypot", pair((3, 1), (1, 4), away)),
        (np.power, "pow", mk(pos(3, 4), normal(3, 4))),
        (np.remainder, "remainder", mk(quotient_away((3, 4), (4,)))),
        (np.mod, "remainder", mk(quotient_away((3, 1), (1, 4))))]:
    row("binary", f"np.{_uf.__name__}", _prim, "broadcast", lambda a, b, u=_uf: u(a, b), _make)
row("binary", "np.true_divide", "div", "broadcast", lambda a, b: np.true_divide(a, b),
    mk(normal(3, 4), away(4)))
row("binary", "np.power", "pow", "array-exponent-broadcast", lambda a, b: np.power(a, b),
    mk(pos(3, 1), normal(4)))
row("binary", "np.power", "pow", "negative-base-int-exponents",
    lambda a: np.power(a, np.arange(4.0)), mk(normal(3, 4)))


def quotient(divisor: float, *shape: int) -> Any:
    """x with x / divisor away from integers (remainder and floor division jump there)."""
    return lambda r: divisor * near_int(0.2, 0.8, *shape)(r)


row("binary", "%", "remainder", "scalar", lambda x: x % 0.7, mk(quotient(0.7, 3, 4)))
row("binary", "%", "remainder", "reflected", lambda b: 2.5 % b,
    mk(lambda r: 2.5 / (r.integers(1, 4, size=(3, 4)) + r.uniform(0.2, 0.8, size=(3, 4)))))
row("binary", "%", "remainder", "arrays", lambda a, b: a % b,
    mk(quotient_away((3, 4), (3, 4))))
row("binary", "//", "floor_divide", "behind-stop_gradient",
    lambda x: x * jg.stop_gradient(x // 0.7), mk(quotient(0.7, 3, 4)),
    ref=lambda x: x * (x // 0.7))
row("binary", "np.floor_divide", "floor_divide", "behind-stop_gradient",
    lambda x: x * jg.stop_gradient(np.floor_divide(x, 0.7)), mk(quotient(0.7, 3, 4)),
    ref=lambda x: x * np.floor_divide(x, 0.7))
row("binary", "np.divmod", "remainder", "both",
    lambda x: jg.stop_gradient(np.divmod(x, 0.7)[0]) + np.divmod(x, 0.7)[1],
    mk(quotient(0.7, 3, 4)), ref=lambda x: np.divmod(x, 0.7)[0] + np.divmod(x, 0.7)[1])
row("binary", "divmod", "remainder", "builtin",
    lambda x: jg.stop_gradient(divmod(x, 0.7)[0]) * divmod(x, 0.7)[1],
    mk(quotient(0.7, 3, 4)), ref=lambda x: np.divmod(x, 0.7)[0] * np.divmod(x, 0.7)[1])
row("binary", "**", "pow", "array-exponent", lambda a, b: a ** b, mk(pos(3, 4), normal(4)))
row("binary", "abs()", "abs", "builtin", lambda x: abs(x) * x, mk(away(3, 4)))
row("binary", "np.clip", "maximum", "scalars", lambda x: np.clip(x, -0.5, 0.75),
    mk(lambda r: separated((3, 4), ())(r)[0] * 0.5))
row("binary", "np.clip", "minimum", "array-bounds", lambda x, lo, hi: np.clip(x, lo, hi),
    mk(lambda r: (r.integers(-3, 4, size=(3, 4)) + 0.5 * r.choice([-1, 1], size=(3, 4)),
                  r.integers(-3, 0, size=(4,)) + 0.0, r.integers(1, 4, size=(3, 1)) + 0.0)))
row("binary", "np.clip", "minimum", "upper-only", lambda x: np.clip(x, None, 0.25),
    mk(lambda r: separated((3, 4), ())(r)[0] + 0.25))


# ---------------------------------------------------------------- reductions

for _axis, _keep in [(None, False), (1, True), (-1, False), ((0, 2), True)]:
    _v = f"axis{_axis}-keepdims{_keep}"
    row("reduce", "np.prod", "prod", _v,
        lambda x, a=_axis, k=_keep: np.prod(x, axis=a, keepdims=k), mk(normal(2, 3, 4)))
    row("reduce", "np.min", "min", _v,
        lambda x, a=_axis, k=_keep: np.min(x, axis=a, keepdims=k), mk(distinct(2, 3, 4)))
    row("reduce", "np.var", "sum", _v,
        lambda x, a=_axis, k=_keep: np.var(x, axis=a, keepdims=k), mk(normal(2, 3, 4)))
    row("reduce", "np.std", "sqrt", _v,
        lambda x, a=_axis, k=_keep: np.std(x, axis=a, keepdims=k), mk(normal(2, 3, 4)))
row("reduce", "np.amin", "min", "axis0", lambda x: np.amin(x, axis=0), mk(distinct(3, 4)))
row("reduce", "np.max", "max", "axis-1-keepdims", lambda x: np.max(x, axis=-1, keepdims=True),
    mk(distinct(3, 4)))
row("reduce", "np.amax", "max", "axis0", lambda x: np.amax(x, 0), mk(distinct(3, 4)))
row("reduce", "np.var", "sum", "ddof1", lambda x: np.var(x, axis=0, ddof=1), mk(normal(4, 3)))
row("reduce", "np.std", "sqrt", "ddof1-keepdims",
    lambda x: np.std(x, axis=1, ddof=1, keepdims=True), mk(normal(3, 4)))
for _axis in (None, 0, -1):
    row("reduce", "np.cumsum", "cumsum", f"axis{_axis}",
        lambda x, a=_axis: np.cumsum(x, axis=a), mk(normal(2, 3, 2)))
row("reduce", "np.average", "sum", "no-weights", lambda x: np.average(x, axis=1),
    mk(normal(3, 4)))
row("reduce", "np.average", "sum", "weights-along-axis",
    lambda x, w: np.average(x, axis=1, weights=w), mk(normal(3, 4), pos(4)))
row("reduce", "np.average", "sum", "full-weights-returned",
    lambda x, w: np.average(x, weights=w, returned=True), mk(normal(3, 4), pos(3, 4)))
row("reduce", "np.average", "sum", "keepdims",
    lambda x, w: np.average(x, axis=0, weights=w, keepdims=True), mk(normal(3, 4), pos(3)))
row("reduce", "np.sort", "take_along_axis", "axis-1", lambda x: np.sort(x), mk(distinct(3, 4)))
row("reduce", "np.sort", "take_along_axis", "axis0", lambda x: np.sort(x, axis=0),
    mk(distinct(4, 3)))
row("reduce", "np.sort", "take_along_axis", "axisNone", lambda x: np.sort(x, axis=None),
    mk(distinct(2, 3)))
row("reduce", "np.argsort", "argsort", "axis0", lambda x: np.argsort(x, axis=0),
    mk(distinct(3, 4)), kind="nograd")
row("reduce", "np.partition", "take_along_axis", "kth1",
    lambda x: jg.frontend.ops.sort.partition(x, 1), mk(distinct(3, 5)), ref=lambda x: np.sort(x))
row("reduce", "np.round", "round", "behind-stop_gradient",
    lambda x: x * jg.stop_gradient(np.round(x)), mk(near_int(0.1, 0.4, 3, 4)))
row("reduce", "np.around", "round", "behind-stop_gradient",
    lambda x: x + jg.stop_gradient(np.around(x)), mk(near_int(0.1, 0.4, 3, 4)))


# ---------------------------------------------------------------- shape and layout

def two(*shape: int) -> Any:
    return mk(normal(*shape), normal(*shape))


for _name, _f, _prim, _make in [
        ("np.stack", lambda a, b: np.stack([a, b], axis=-1), "concatenate", two(3, 4)),
        ("np.vstack", lambda a, b: np.vstack([a, b]), "concatenate", two(4)),
        ("np.hstack", lambda a, b: np.hstack((a, b)), "concatenate", two(2, 3)),
        ("np.dstack", lambda a, b: np.dstack([a, b]), "concatenate", two(2, 3)),
        ("np.column_stack", lambda a, b: np.column_stack([a, b]), "concatenate", two(3)),
        ("np.row_stack", lambda a, b: np.row_stack([a, b]), "concatenate", two(3)),
        ("np.append", lambda a, b: np.append(a, b), "concatenate", two(2, 2)),
        ("np.append", lambda a, b: np.append(a, b, axis=1), "concatenate", two(2, 2)),
        ("np.select", lambda a, b: np.select([a > 0.5, a < -0.5], [a * b, b], -a), "where",
         mk(lambda r: r.choice([-1.0, 0.0, 1.0], size=(3, 4)) + r.uniform(-0.2, 0.2, (3, 4)),
            normal(4)))]:
    row("layout", _name, _prim, "pair", _f, _make)
row("layout", "np.stack", "concatenate", "of-one-traced-array", lambda x: np.stack(x, axis=1),
    mk(normal(3, 4)))
row("layout", "np.vstack", "concatenate", "of-one-traced-array", lambda x: np.vstack(x * 2.0),
    mk(normal(3, 4)))

for _name, _f, _shape in [
        ("np.split", lambda x: np.split(x, 2, axis=1), (3, 4)),
        ("np.split", lambda x: np.split(x, [1, 3]), (4, 2)),
        ("np.array_split", lambda x: np.array_split(x, 3, axis=-1), (2, 5)),
        ("np.hsplit", lambda x: np.hsplit(x, 2), (3, 4)),
        ("np.vsplit", lambda x: np.vsplit(x, [1]), (3, 4)),
        ("np.dsplit", lambda x: np.dsplit(x, 2), (2, 2, 4))]:
    row("layout", _name, "slice", "x".join(map(str, _shape)),
        lambda x, f=_f: tuple(p * (k + 1.0) for k, p in enumerate(f(x))), mk(normal(*_shape)))

for _name, _f, _prim, _shape in [
        ("np.repeat", lambda x: np.repeat(x, 2, axis=1), "broadcast_to", (3, 2)),
        ("np.repeat", lambda x: np.repeat(x, [1, 0, 3], axis=0), "gather", (3, 2)),
        ("np.repeat", lambda x: np.repeat(x, 2), "broadcast_to", (2, 2)),
        ("np.tile", lambda x: np.tile(x, (2, 1, 3)), "broadcast_to", (2, 3)),
        ("np.pad", lambda x: np.pad(x, ((1, 2), (0, 1)), constant_values=0.5), "concatenate",
         (2, 3)),
        ("np.pad", lambda x: np.pad(x, 2, mode="edge"), "gather", (2, 3)),
        ("np.pad", lambda x: np.pad(x, ((1, 2), (2, 1)), mode="reflect"), "gather", (3, 4)),
        ("np.pad", lambda x: np.pad(x, (1, 3), mode="symmetric"), "gather", (3, 3)),
        ("np.pad", lambda x: np.pad(x, 1, mode="wrap"), "gather", (2, 3)),
        ("np.roll", lambda x: np.roll(x, 1, axis=1), "concatenate", (3, 4)),
        ("np.roll", lambda x: np.roll(x, -3), "concatenate", (3, 4)),
        ("np.roll", lambda x: np.roll(x, (1, 2), axis=(0, 1)), "concatenate", (3, 4)),
        ("np.flip", lambda x: np.flip(x, axis=(0, 2)), "slice", (2, 3, 2)),
        ("np.fliplr", lambda x: np.fliplr(x), "slice", (3, 4)),
        ("np.flipud", lambda x: np.flipud(x), "slice", (3, 4)),
        ("np.rot90", lambda x: np.rot90(x), "transpose", (3, 4)),
        ("np.rot90", lambda x: np.rot90(x, 2, axes=(1, 2)), "slice", (2, 3, 4)),
        ("np.rot90", lambda x: np.rot90(x, -1), "transpose", (3, 4)),
        ("np.squeeze", lambda x: np.squeeze(x) * 2.0, "reshape", (3, 1, 4, 1)),
        ("np.squeeze", lambda x: np.squeeze(x, axis=1), "reshape", (3, 1, 4, 1)),
        ("np.expand_dims", lambda x: np.expand_dims(x, (0, -1)), "reshape", (3, 4)),
        ("np.ravel", lambda x: np.ravel(x), "reshape", (3, 4)),
        ("np.swapaxes", lambda x: np.swapaxes(x, 0, -1), "transpose", (2, 3, 4)),
        ("np.moveaxis", lambda x: np.moveaxis(x, 0, -1), "transpose", (2, 3, 4)),
        ("np.moveaxis", lambda x: np.moveaxis(x, [0, 1], [2, 0]), "transpose", (2, 3, 4)),
        ("np.rollaxis", lambda x: np.rollaxis(x, 2), "transpose", (2, 3, 4)),
        ("np.rollaxis", lambda x: np.rollaxis(x, 0, 2), "transpose", (2, 3, 4)),
        ("np.atleast_1d", lambda x: np.atleast_1d(x), "reshape", ()),
        ("np.atleast_2d", lambda x: np.atleast_2d(x), "reshape", (4,)),
        ("np.atleast_3d", lambda x: np.atleast_3d(x), "reshape", (3, 4)),
        ("np.atleast_3d", lambda x: np.atleast_3d(x[0], x), "reshape", (4,)),
        ("np.broadcast_to", lambda x: np.broadcast_to(x, (2, 3, 4)), "broadcast_to", (3, 1)),
        ("np.diff", lambda x: np.diff(x), "sub", (3, 5)),
        ("np.diff", lambda x: np.diff(x, n=2, axis=0), "sub", (5, 3)),
        ("np.diff", lambda x: np.diff(x, prepend=0.5, append=x[:, :1]), "sub", (3, 4))]:
    row("layout", _name, _prim, "x".join(map(str, _shape)) or "scalar", _f, mk(normal(*_shape)))


# ---------------------------------------------------------------- array methods

for _name, _f, _prim, _make in [
        ("x.sum", lambda x: x.sum(axis=1, keepdims=True), "sum", mk(normal(3, 4))),
        ("x.mean", lambda x: x.mean(axis=(0, 2)), "sum", mk(normal(2, 3, 4))),
        ("x.max", lambda x: x.max(axis=0), "max", mk(distinct(3, 4))),
        ("x.min", lambda x: x.min(axis=-1, keepdims=True), "min", mk(distinct(3, 4))),
        ("x.prod", lambda x: x.prod(axis=0), "prod", mk(normal(3, 4))),
        ("x.var", lambda x: x.var(axis=1, ddof=1), "sum", mk(normal(3, 4))),
        ("x.std", lambda x: x.std(), "sqrt", mk(normal(3, 4))),
        ("x.cumsum", lambda x: x.cumsum(axis=1), "cumsum", mk(normal(3, 4))),
        ("x.cumsum", lambda x: x.cumsum(), "cumsum", mk(normal(3, 4))),
        ("x.ravel", lambda x: x.ravel() * np.arange(12.0), "reshape", mk(normal(3, 4))),
        ("x.flatten", lambda x: x.flatten() * np.arange(12.0), "reshape", mk(normal(4, 3))),
        ("x.squeeze", lambda x: x.squeeze(0), "reshape", mk(normal(1, 4))),
        ("x.reshape", lambda x: x.reshape((4, 3)), "reshape", mk(normal(3, 4))),
        ("x.transpose", lambda x: x.transpose((1, 0, 2)), "transpose", mk(normal(2, 3, 4))),
        ("x.T", lambda x: x.T * np.arange(3.0), "transpose", mk(normal(3, 4))),
        ("x.swapaxes", lambda x: x.swapaxes(0, 1), "transpose", mk(normal(3, 4))),
        ("x.clip", lambda x: x.clip(-0.5, 0.5), "minimum",
         mk(lambda r: separated((3, 4), ())(r)[0] * 0.5)),
        ("x.clip", lambda x: x.clip(min=0.25), "maximum",
         mk(lambda r: separated((3, 4), ())(r)[0] + 0.25)),
        ("x.astype", lambda x: x.astype(np.float64) * (x > 0).astype(np.float64), "cast",
         mk(away(3, 4))),
        ("x.round", lambda x: x + jg.stop_gradient(x.round()), "round",
         mk(near_int(0.1, 0.4, 3, 4)))]:
    row("methods", _name, _prim, "method", _f, _make)


# ---------------------------------------------------------------- helpers

def _param(family: str, name: str, op: Op) -> Any:
    return pytest.param(op, id=op.id, marks=pytest.mark.numba_full)


def _families() -> dict[str, list[Op]]:
    out: dict[str, list[Op]] = {}
    for family, _, op in SURFACE:
        if op.kind == "diff" and op.order2:
            out.setdefault(family, []).append(op)
    return out


FAMILIES = _families()


def _combined(ops: list[Op]) -> tuple[Callable[..., Any], Callable[..., Any], tuple]:
    """One scalar function of every row's arguments: the sum of each row's weighted sum,
    written once with jitgrad (traced) and once with the rows' numpy references."""
    args, spans = [], []
    for op in ops:
        a = _args(op)
        spans.append((len(args), len(args) + len(a)))
        args.extend(a)
    losses = [(_loss(op.fn, _weights(op)), _loss(op.ref, _weights(op))) for op in ops]

    def total(which: int) -> Callable[..., Any]:
        def f(*xs: Any) -> Any:
            out = 0.0
            for (lo, hi), pair_ in zip(spans, losses, strict=True):
                out = out + pair_[which](*xs[lo:hi])
            return out
        return f

    return total(0), total(1), tuple(args)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("op", [_param(*r) for r in SURFACE])
def test_row(op: Op, backend: str) -> None:
    check_row(op, backend)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiled(family: str) -> None:
    """Every differentiable row of the family compiled with Numba in one program: the
    value against numpy, the gradient (order 1) against finite differences of the numpy
    references, the Hessian-vector product (order 2) against finite differences of the
    compiled gradient."""
    f, ref, args = _combined(FAMILIES[family])
    nums = tuple(range(len(args)))
    value = jg.jit(f, backend="numba")(*args)
    np.testing.assert_allclose(value, ref(*args), rtol=1e-10)
    gcf = jg.jit(jg.grad(f, argnums=nums), backend="numba")
    grads = gcf(*args)
    for n, g in enumerate(grads):
        assert_grads_close(g, numeric_grad(ref, args, n), what=f"d/d(arg {n})")
    v = tuple(np.random.default_rng(n).normal(size=a.shape) for n, a in enumerate(args))
    hcf = jg.jit(jg.grad(lambda *a: vdot(jg.grad(f, argnums=nums)(*a), v), argnums=nums),
                 backend="numba")
    assert_grads_close(hcf(*args), numeric_hvp(gcf, args, v, nums),
                       what="Hessian-vector product")


def _surface_names() -> set[str]:
    names = {f"np.{u.__name__}" for u in NS.UFUNCS} | {f"np.{f.__name__}" for f in NS.FUNCTIONS}
    names |= {f"x.{m}" for m in NS.METHODS}
    names |= {"%", "//", "divmod"}  # NS.OPERATORS
    # named by the issue and dispatched since before it
    names |= {"np.negative", "np.absolute", "np.true_divide", "np.power", "np.max", "np.amax",
              "x.sum", "x.mean", "x.max", "x.reshape", "x.transpose", "x.T", "x.astype", "**",
              "abs()", "jg.erf"}
    return names


def test_every_entry_has_a_row():
    covered = {name for _, name, _ in SURFACE}
    missing = sorted(_surface_names() - covered)
    assert not missing, f"numpy surface without a row: {missing}"
    operators = {"__mod__": "%", "__floordiv__": "//", "__divmod__": "divmod"}
    assert {operators[k] for k in NS.OPERATORS if k in operators} <= covered


# ---------------------------------------------------------------- behaviour beyond the rows

def test_partition_is_a_partition():
    x = np.random.default_rng(3).permutation(20).reshape(4, 5).astype(np.float64)
    for kth in (0, 2, -1):
        got = jg.jit(lambda x, k=kth: np.partition(x, k, axis=1))(x)
        want = np.partition(x, kth, axis=1)
        k = kth % 5
        np.testing.assert_array_equal(got[:, k], want[:, k])
        assert np.all(got[:, :k] <= got[:, k:k + 1]) and np.all(got[:, k + 1:] >= got[:, k:k + 1])


def test_sort_is_stable_and_puts_nan_last(backend):
    x = np.array([[2.0, np.nan, 1.0, 2.0, -np.inf, 1.0], [0.0, 0.0, np.inf, np.nan, -1.0, 0.0]])
    idx = jg.jit(lambda x: np.argsort(x, axis=-1))(x)
    np.testing.assert_array_equal(idx, np.argsort(x, axis=-1, kind="stable"))
    np.testing.assert_array_equal(jg.jit(lambda x: np.sort(x))(x), np.sort(x))
    # ties: the gradient goes to the element each sorted position came from
    g = jg.jit(jg.grad(lambda x: jg.sum(np.sort(x) * np.arange(4.0))))(
        np.array([1.0, 0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(g, [2.0, 0.0, 3.0, 1.0])


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_arithmetic_follows_python_signs(dtype, backend):
    a = np.array([7, -7, 7, -7, 0, 5], dtype)
    b = np.array([2, 2, -2, -2, 3, 0], dtype)
    q, r = jg.jit(lambda a, b: (a // b, a % b))(a, b)
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(q, a // b)
        np.testing.assert_array_equal(r, a % b)
    assert q.dtype == dtype and r.dtype == dtype
    np.testing.assert_array_equal(jg.jit(lambda a: np.cumsum(a) + np.prod(a[:3]))(a),
                                  np.cumsum(a) + np.prod(a[:3]))
    np.testing.assert_array_equal(jg.jit(lambda a: np.min(a))(a), np.min(a))


def test_nan_to_num_defaults_are_the_dtypes_extremes(backend):
    for dtype in (np.float32, np.float64):
        x = np.array([np.inf, -np.inf, np.nan, 1.5], dtype)
        got = jg.jit(lambda x: np.nan_to_num(x))(x)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, np.nan_to_num(x))


def test_min_max_propagate_nan_fmin_fmax_ignore_it(backend):
    x = np.array([[1.0, np.nan, -2.0], [0.5, 3.0, 2.0]])
    y = np.array([np.nan, 0.0, -3.0])
    f = jg.jit(lambda x, y: (np.min(x, axis=1), np.minimum(x, y), np.fmin(x, y), np.fmax(x, y)))
    for got, want in zip(f(x, y), (np.min(x, axis=1), np.minimum(x, y), np.fmin(x, y),
                                   np.fmax(x, y)), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_list_of_traced_values_names_np_stack():
    with pytest.raises(jg.TracingError, match=r"np\.stack") as info:
        jg.jit(lambda x: np.array([x[0], x[1]]))(np.ones(3))
    assert "list" in str(info.value) and "test_numpy_surface.py:" in str(info.value)
    for convert in (lambda x: np.asarray(x), lambda x: np.r_[x, x], lambda x: np.c_[x, x]):
        with pytest.raises(jg.TracingError, match=r"np\.stack"):
            jg.jit(convert)(np.ones(3))


def test_jitgrad_numpy_builds_arrays_of_traced_values(backend):
    def f(x):
        m = jnp.array([[x[0], x[1] * 2.0], [x[2], 1.0]])
        return jnp.sum(jnp.asarray([x[0], x[1]]) ** 2) + jnp.sum(jnp.sin(m) * m)

    x = np.array([0.3, -0.7, 1.1])

    def ref(x):
        m = np.array([[x[0], x[1] * 2.0], [x[2], 1.0]])
        return np.sum(np.array([x[0], x[1]]) ** 2) + np.sum(np.sin(m) * m)

    np.testing.assert_allclose(jg.jit(f)(x), ref(x), rtol=1e-12)
    assert_grads_close(jg.jit(jg.grad(f))(x), numeric_grad(ref, (x,)))
    assert jnp.pi == np.pi and jnp.float32 is np.float32 and jnp.linspace is np.linspace
    np.testing.assert_array_equal(jnp.array([1, 2]), np.array([1, 2]))


def test_iterating_a_traced_array_gives_its_rows():
    x = np.arange(6.0).reshape(3, 2)
    rows = jg.jit(lambda x: [r * 2.0 for r in x])(x)
    np.testing.assert_array_equal(np.stack(rows), x * 2.0)


def test_unsupported_functions_are_named_with_their_module_and_line():
    cases = [(lambda x: np.linalg.inv(x), r"numpy\.linalg\.inv"),
             (lambda x: np.fft.fft(x), r"numpy\.fft\.fft"),
             (lambda x: np.cumprod(x), r"numpy\.cumprod"),
             (lambda x: np.add.accumulate(x), r"numpy\.add\.accumulate"),
             (lambda x: np.sin(x, out=x), r"numpy\.sin: keyword"),
             (lambda x: np.var(x, dtype=np.float32), r"numpy\.var: argument dtype="),
             (lambda x: np.pad(x, 1, mode="maximum"), r"pad mode 'maximum'")]
    for fn, pattern in cases:
        with pytest.raises(jg.JitgradError, match=pattern) as info:
            jg.jit(fn)(np.eye(3))
        assert "test_numpy_surface.py:" in str(info.value), str(info.value)


def test_readme_lists_the_generated_surface(tmp_path):
    """The README's list of the numpy surface is what docs/numpy_surface.py generates."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "docs", "numpy_surface.py"),
                          "--check"], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stdout + out.stderr


def test_eager_calls_on_numpy_arrays_match_numpy():
    """The jitgrad functions also run eagerly on numpy arrays (bind's numpy reference)."""
    x = np.random.default_rng(1).uniform(0.2, 0.9, size=(3, 4))
    pairs = [(jg.sin(x), np.sin(x)), (jg.arctanh(x), np.arctanh(x)), (jg.erf(x),
             np.vectorize(math.erf)(x)), (jg.minimum(x, 0.5), np.minimum(x, 0.5)),
             (jg.remainder(x, 0.3), np.remainder(x, 0.3)), (jg.prod(x, axis=0), np.prod(x, 0)),
             (jg.cumsum(x, axis=1), np.cumsum(x, 1)), (jg.sort(x), np.sort(x)),
             (jg.var(x, axis=1), np.var(x, 1)), (jg.clip(x, 0.3, 0.6), np.clip(x, 0.3, 0.6))]
    for got, want in pairs:
        _check_values(got, want, rtol=1e-12, atol=0, jitted=False)
