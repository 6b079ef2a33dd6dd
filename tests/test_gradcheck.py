"""One OpInfo-style table: a row per primitive variant, each checked against numpy and
finite differences on every backend.

Each row is a function of float (and possibly integer) arrays built from the
user-facing API, the numpy reference of that function, and an input generator
that keeps inputs away from kinks, ties and jumps. For every row:

- the primitive it is about appears in the traced program;
- jit(fn) and the eager fn equal the numpy reference (values, shapes, dtypes),
  and `validate` accepts every program compiled on the way;
- "diff" rows: the gradient of sum(out * w) equals central finite differences
  of the numpy reference (order 1), and the Hessian-vector product equals finite
  differences of the gradient (order 2);
- "nograd" rows (comparisons, argmax): the gradient is exactly zero and asking
  for it never raises;
- "undefined" rows (floor, ceil, round, sign): asking for a gradient through
  them raises UndefinedGradientError naming the primitive and this file's line,
  while stop_gradient and gradients with respect to other arguments work;
- float32 inputs give float32 outputs and float32 gradients.

Internal primitives (pad_slice, scatter_add, scatter_along_axis,
softmax_cross_entropy_grad, broadcast_to) are reached through jg.grad inside the
row (their user-facing origin) and also bound directly so that their own VJP
rules are checked at first order.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from convref import (
    np_avg_pool2d,
    np_avg_pool2d_grad,
    np_conv2d,
    np_conv2d_input_grad,
    np_conv2d_weight_grad,
    np_max_pool2d,
    np_max_pool2d_grad,
)
from gradcheck import assert_grads_close, numeric_grad, numeric_hvp, vdot
from scipy import special

import jitgrad as jg
from jitgrad.compiler import bf16_provider
from jitgrad.frontend import tree
from jitgrad.frontend.core import registry
from jitgrad.frontend.ir import validate
from jitgrad.frontend.ops import attention as ATT
from jitgrad.frontend.ops import bf16_gemm as BF16
from jitgrad.frontend.ops import conv as CV
from jitgrad.frontend.ops import gelu as GELU
from jitgrad.frontend.ops import linalg as L
from jitgrad.frontend.ops import nn as NN
from jitgrad.frontend.ops import norm as NORM
from jitgrad.frontend.ops import pool as PL
from jitgrad.frontend.ops import precision as PREC
from jitgrad.frontend.ops import random as R
from jitgrad.frontend.ops import shape as S
from jitgrad.frontend.trace import signature_of, trace_flat

# ---------------------------------------------------------------- input generators
# Each generator maps a numpy Generator to an array (or a tuple of arrays).


def normal(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda r: r.normal(size=shape)


def pos(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Positive, away from 0 (log, sqrt, pow bases, divisors)."""
    return lambda r: r.uniform(0.5, 2.0, size=shape)


def away(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Either sign, at least 0.3 from 0 (relu, abs, sign, divisors)."""
    return lambda r: r.choice([-1.0, 1.0], size=shape) * r.uniform(0.3, 1.5, size=shape)


def distinct(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """All entries at least 0.2 apart (max, argmax: no ties)."""
    def gen(r: np.random.Generator) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        vals = (r.permutation(n) - n / 2) * 0.3 + r.uniform(-0.05, 0.05, size=n)
        return vals.reshape(shape)
    return gen


def separated(sa: tuple[int, ...], sb: tuple[int, ...]) -> Callable[[np.random.Generator], Any]:
    """Two arrays whose broadcast differences are all at least 0.3 from 0 (maximum, <, where)."""
    def gen(r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        a = r.integers(-2, 3, size=sa) + 0.5 + r.uniform(-0.1, 0.1, size=sa)
        b = r.integers(-2, 3, size=sb) + r.uniform(-0.1, 0.1, size=sb)
        return a, b
    return gen


def ints_as_floats(*shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Small integers stored as floats: exact ties for == and !=."""
    return lambda r: r.integers(-1, 2, size=shape).astype(np.float64)


def near_int(lo: float, hi: float, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """An integer plus a fraction in [lo, hi]: away from the jumps of floor/ceil/round."""
    return lambda r: (r.integers(-3, 3, size=shape)
                      + r.choice([-1.0, 1.0], size=shape) * r.uniform(lo, hi, size=shape))


def const(value: Any) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda r: np.asarray(value)


def mk(*gens: Callable[[np.random.Generator], Any]) -> Callable[[np.random.Generator], tuple]:
    def make(r: np.random.Generator) -> tuple:
        out: list[Any] = []
        for g in gens:
            v = g(r)
            out.extend(v if isinstance(v, tuple) else (v,))
        return tuple(out)
    return make


# ---------------------------------------------------------------- numpy references

def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_logsumexp(x, axis=-1, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def np_softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def np_sce(logits, labels):
    return np.mean(np_logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels])


def np_sce_grad(logits, labels):
    p = np_softmax(logits)
    p[np.arange(len(labels)), labels] -= 1.0
    return p / len(labels)


def np_pad_slice(g, shape, key):
    out = np.zeros(shape, g.dtype)
    out[key] = g
    return out


def np_scatter_add(g, idx, n):
    out = np.zeros((n,) + g.shape[idx.ndim:], g.dtype)
    np.add.at(out, idx, g)
    return out


def np_scatter_along_axis(g, idx, shape, axis):
    out = np.zeros(shape, g.dtype)
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    np.add.at(out, tuple(grid), g)
    return out


def np_max_argmax(x, axis):
    return np.max(x, axis=axis), np.argmax(x, axis=axis)


def dtanh(x):
    return 1.0 - np.tanh(x) ** 2


# ---------------------------------------------------------------- the table

@dataclass(frozen=True)
class Op:
    prim: str                       # the primitive this row is about
    variant: str                    # what is special about it (becomes the test id)
    fn: Callable[..., Any]          # built from jitgrad's user-facing API
    ref: Callable[..., Any]         # numpy reference
    make: Callable[[np.random.Generator], tuple]
    kind: str = "diff"              # "diff" | "nograd" | "undefined"
    order2: bool = True
    f32: bool = True                # float32 inputs keep the whole row float32
    # Expected gradients of sum(out * w) for rows finite differences cannot judge
    # (stop_gradient): (args, weights) -> one gradient per float argument.
    expected_grad: Callable[..., list[np.ndarray]] | None = None
    # an optional library the Numba lowering calls (MKL's bfloat16 GEMM): skipped without it
    requires: Callable[[], bool] | None = None

    @property
    def id(self) -> str:
        return f"{self.prim}-{self.variant}"


IDX4 = np.array([2, 0, 2, -1])          # repeated and negative indices into an axis of 4
IDX2D = np.array([[0, 1], [3, 3]])
TAKE1 = np.array([[0, 3], [2, 2], [1, 0]])  # take_along_axis on (3,4), axis 1
TAKE0 = np.array([[2, 0, 1, 1], [0, 0, 2, 1]])  # take_along_axis on (3,4), axis 0
LABELS = np.array([1, 0, 3, 3, 2])

OPS: list[Op] = []


def add(prim: str, variant: str, fn, ref, make, **kw) -> None:
    OPS.append(Op(prim, variant, fn, ref, make, **kw))


# unary elementwise, several ranks
SHAPES = [(), (5,), (3, 4), (2, 3, 2)]
UNARY = [
    ("neg", lambda x: -x, np.negative, normal),
    ("exp", jg.exp, np.exp, normal),
    ("log", jg.log, np.log, pos),
    ("tanh", jg.tanh, np.tanh, normal),
    ("sigmoid", jg.sigmoid, np_sigmoid, normal),
    ("sqrt", jg.sqrt, np.sqrt, pos),
    ("abs", jg.abs, np.abs, away),
    ("relu", jg.relu, lambda x: np.maximum(x, 0.0), away),
]
for _name, _fn, _ref, _gen in UNARY:
    for _shape in SHAPES:
        add(_name, "x".join(map(str, _shape)) or "scalar", _fn, _ref, mk(_gen(*_shape)))
add("tanh", "np.tanh", lambda x: np.tanh(x), np.tanh, mk(normal(3, 4)))
add("exp", "np.exp", lambda x: np.exp(x), np.exp, mk(normal(3, 4)))
add("log", "np.log", lambda x: np.log(x), np.log, mk(pos(3, 4)))
add("sqrt", "np.sqrt", lambda x: np.sqrt(x), np.sqrt, mk(pos(3, 4)))
add("abs", "builtin-abs", lambda x: abs(x), np.abs, mk(away(3, 4)))
add("neg", "np.negative", lambda x: np.negative(x), np.negative, mk(normal(3, 4)))

# binary arithmetic with broadcasting
PAIRS = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3)), ((2, 1, 3), (4, 1))]
BINARY = [
    ("add", lambda a, b: a + b, np.add, lambda sa, sb: mk(normal(*sa), normal(*sb))),
    ("sub", lambda a, b: a - b, np.subtract, lambda sa, sb: mk(normal(*sa), normal(*sb))),
    ("mul", lambda a, b: a * b, np.multiply, lambda sa, sb: mk(normal(*sa), normal(*sb))),
    ("div", lambda a, b: a / b, np.divide, lambda sa, sb: mk(normal(*sa), away(*sb))),
    ("pow", lambda a, b: a ** b, np.power, lambda sa, sb: mk(pos(*sa), normal(*sb))),
    ("maximum", jg.maximum, np.maximum, lambda sa, sb: mk(separated(sa, sb))),
]
for _name, _fn, _ref, _gen in BINARY:
    for _sa, _sb in PAIRS:
        _variant = f"{'x'.join(map(str, _sa)) or 'scalar'}-{'x'.join(map(str, _sb)) or 'scalar'}"
        add(_name, _variant, _fn, _ref, _gen(_sa, _sb))
add("add", "python-float", lambda x: x + 2.5, lambda x: x + 2.5, mk(normal(3, 4)))
add("add", "numpy-left", lambda x: np.arange(4.0).astype(x.dtype) + x,
    lambda x: np.arange(4.0) + x, mk(normal(3, 4)))
add("sub", "python-int-left", lambda x: 3 - x, lambda x: 3 - x, mk(normal(3, 4)))
add("mul", "python-float-left", lambda x: 0.5 * x, lambda x: 0.5 * x, mk(normal(3, 4)))
add("mul", "same-operand", lambda x: x * x, lambda x: x * x, mk(normal(3, 4)))
add("div", "python-float-left", lambda x: 2.0 / x, lambda x: 2.0 / x, mk(away(3, 4)))
add("div", "by-int", lambda x: x / 4, lambda x: x / 4, mk(normal(3, 4)))
add("pow", "int-exponent", lambda x: x ** 3, lambda x: x ** 3, mk(normal(3, 4)))
add("pow", "float-base", lambda x: 2.0 ** x, lambda x: 2.0 ** x, mk(normal(3, 4)))
add("pow", "np.power", lambda a, b: np.power(a, b), np.power, mk(pos(3, 4), normal(4)))
add("maximum", "python-float", lambda x: jg.maximum(x, 0.25), lambda x: np.maximum(x, 0.25),
    mk(lambda r: separated((3, 4), ())(r)[0] + 0.25))
add("maximum", "np.maximum", lambda a, b: np.maximum(a, b), np.maximum,
    mk(separated((3, 4), (4,))))

# comparisons: values only, no gradient, never raising
CMPS = [("lt", lambda a, b: a < b, np.less), ("le", lambda a, b: a <= b, np.less_equal),
        ("gt", lambda a, b: a > b, np.greater), ("ge", lambda a, b: a >= b, np.greater_equal),
        ("eq", lambda a, b: a == b, np.equal), ("ne", lambda a, b: a != b, np.not_equal)]
for _name, _fn, _ref in CMPS:
    _tie = _name in ("eq", "ne")
    for _sa, _sb in [((3, 4), (3, 4)), ((3, 1), (1, 4))]:
        _gen = (mk(ints_as_floats(*_sa), ints_as_floats(*_sb)) if _tie
                else mk(separated(_sa, _sb)))
        add(_name, f"{'x'.join(map(str, _sa))}-{'x'.join(map(str, _sb))}", _fn, _ref, _gen,
            kind="nograd")
add("gt", "python-float", lambda x: x > 0.25, lambda x: x > 0.25,
    mk(lambda r: separated((3, 4), ())(r)[0] + 0.25), kind="nograd")
add("lt", "np.less", lambda a, b: np.less(a, b), np.less, mk(separated((3, 4), (4,))),
    kind="nograd")
add("eq", "np.equal", lambda a, b: np.equal(a, b), np.equal,
    mk(ints_as_floats(3, 4), ints_as_floats(4)), kind="nograd")

# where: gradients routed by masks
add("where", "cmp-of-operands", lambda a, b: jg.where(a > b, a * b, a - b),
    lambda a, b: np.where(a > b, a * b, a - b), mk(separated((3, 4), (3, 4))))
add("where", "broadcast-all", lambda c, a, b: jg.where(c > 0, a, b),
    lambda c, a, b: np.where(c > 0, a, b), mk(away(3, 1), normal(3, 4), normal(4)))
add("where", "python-float-branch", lambda x: jg.where(x < 0.25, x, 2.0 * x),
    lambda x: np.where(x < 0.25, x, 2.0 * x),
    mk(lambda r: separated((3, 4), ())(r)[0] + 0.25))
add("where", "np.where", lambda a, b: np.where(a > b, a, b), lambda a, b: np.where(a > b, a, b),
    mk(separated((3, 1), (1, 4))))

# casts and constants
add("cast", "bool-to-float", lambda x: (x > 0).astype(x.dtype) * x + x.astype(x.dtype),
    lambda x: (x > 0) * x + x, mk(away(3, 4)))
add("cast", "int-sum-to-float",
    lambda a, b: jg.sum(a > b, axis=1).astype(a.dtype) * jg.sum(a * a, axis=1),
    lambda a, b: np.sum(a > b, axis=1) * np.sum(a * a, axis=1), mk(separated((3, 4), (3, 4))))
add("const", "python-floats", lambda x: x * 2.0 + 1.5, lambda x: x * 2.0 + 1.5, mk(normal(3, 4)))
add("const", "python-ints", lambda x: (x - 1) * 3, lambda x: (x - 1) * 3, mk(normal(5)))
add("const", "scalar-only", lambda x: jg.sum(x) * 0.0 + 7.0, lambda x: np.sum(x) * 0.0 + 7.0,
    mk(normal(3)))

# stop_gradient: the stopped value is a constant to differentiation
add("stop_gradient", "of-self", lambda x: x * jg.stop_gradient(x * x), lambda x: x ** 3,
    mk(normal(3, 4)), expected_grad=lambda args, ws: [ws[0] * args[0] ** 2], order2=False)
add("stop_gradient", "two-args", lambda x, y: jg.stop_gradient(x) * y + x,
    lambda x, y: x * y + x, mk(normal(3, 4), normal(4)),
    expected_grad=lambda args, ws: [ws[0], np.sum(ws[0] * args[0], axis=0)], order2=False)

# round_bf16 (mixed precision): float32 in, bfloat16 values out; the cotangent passes
# through, as torch.autocast's casts do (finite differences of a step function cannot judge)
add("round_bf16", "via-float32", lambda x: PREC.round_bf16_p.bind(x.astype(np.float32)
                                                                   ).astype(x.dtype),
    lambda x: PREC.round_to_bf16(x.astype(np.float32)).astype(x.dtype), mk(normal(3, 4)),
    expected_grad=lambda args, ws: [ws[0].astype(np.float32).astype(np.float64)],
    order2=False)


# bfloat16 storage and GEMM: the forms code generation gives a precision="bf16" product
# (integer bit patterns: no gradient flows through them; finite differences would see the
# rounding's steps)
def _no_grads(args, ws):
    return [np.zeros_like(a) for a in args]


def _bf16(x):
    return PREC.to_bf16_p.bind(x.astype(np.float32))


add("to_bf16", "bits", lambda x: _bf16(x).astype(x.dtype),
    lambda x: PREC.bf16_bits(x.astype(np.float32)).astype(x.dtype), mk(normal(3, 4)),
    kind="nograd", expected_grad=_no_grads)
for _ta, _tb in ((False, False), (True, False), (False, True)):
    add("matmul_bf16", f"{'aT' if _ta else 'a'}-{'bT' if _tb else 'b'}",
        lambda a, b, ta=_ta, tb=_tb: BF16.matmul_bf16_p.bind(_bf16(a), _bf16(b), ta=ta, tb=tb
                                                             ).astype(a.dtype),
        lambda a, b, ta=_ta, tb=_tb: ((PREC.round_to_bf16(a.astype(np.float32)).T if ta else
                                       PREC.round_to_bf16(a.astype(np.float32)))
                                      @ (PREC.round_to_bf16(b.astype(np.float32)).T if tb else
                                         PREC.round_to_bf16(b.astype(np.float32)))
                                      ).astype(a.dtype),
        mk(normal(4, 3) if _ta else normal(3, 4), normal(5, 4) if _tb else normal(4, 5)),
        kind="nograd", expected_grad=_no_grads, requires=bf16_provider.available)



# custom_vjp_call: a user's rule (the true derivative, so that finite differences judge it),
# its residual tanh(x) computed by the forward function; order 2 differentiates the rule.
@jg.custom_vjp
def _tanh_times(x, y):
    return jg.tanh(x) * y


def _tanh_times_fwd(x, y):
    t = jg.tanh(x)
    return t * y, (t, y)


def _tanh_times_bwd(res, g):
    t, y = res
    return g * (1 - t * t) * y, jg.sum(g * t, axis=0)


_tanh_times.defvjp(_tanh_times_fwd, _tanh_times_bwd)
add("custom_vjp_call", "rule-with-residuals", _tanh_times, lambda x, y: np.tanh(x) * y,
    mk(normal(3, 4), normal(4)))

# piecewise constant: gradient undefined
add("floor", "3x4", lambda x: jg.floor(x), np.floor, mk(near_int(0.2, 0.8, 3, 4)),
    kind="undefined")
add("floor", "np.floor", lambda x: np.floor(x), np.floor, mk(near_int(0.2, 0.8, 5)),
    kind="undefined")
add("ceil", "3x4", lambda x: jg.ceil(x), np.ceil, mk(near_int(0.2, 0.8, 3, 4)),
    kind="undefined")
add("ceil", "np.ceil", lambda x: np.ceil(x), np.ceil, mk(near_int(0.2, 0.8, 5)),
    kind="undefined")
add("round", "3x4", lambda x: jg.round(x), np.round, mk(near_int(0.1, 0.4, 3, 4)),
    kind="undefined")
add("round", "np.rint", lambda x: np.rint(x), np.rint, mk(near_int(0.6, 0.9, 5)),
    kind="undefined")
add("sign", "3x4", lambda x: jg.sign(x), np.sign, mk(away(3, 4)), kind="undefined")
add("sign", "np.sign", lambda x: np.sign(x), np.sign, mk(away(2, 3)), kind="undefined")
add("round", "np.round", lambda x: np.round(x), np.round, mk(near_int(0.6, 0.9, 5)),
    kind="undefined")

# reductions with axis / keepdims variants
for _name, _fn, _ref, _gen in [("sum", jg.sum, np.sum, normal), ("mean", jg.mean, np.mean, normal),
                               ("max", jg.max, np.max, distinct)]:
    _prim = "sum" if _name == "mean" else _name
    for _axis, _keep in [(None, False), (0, False), (1, True), (-1, False), ((0, 2), False),
                         ((0, 2), True), (None, True)]:
        add(_prim, f"{_name}-axis{_axis}-keepdims{_keep}",
            lambda x, f=_fn, a=_axis, k=_keep: f(x, axis=a, keepdims=k),
            lambda x, f=_ref, a=_axis, k=_keep: f(x, axis=a, keepdims=k), mk(_gen(2, 3, 4)))
    add(_prim, f"{_name}-vector", _fn, _ref, mk(_gen(5)))
add("sum", "scalar", jg.sum, np.sum, mk(normal()))
add("sum", "method", lambda x: x.sum(axis=0), lambda x: x.sum(axis=0), mk(normal(3, 4)))
add("sum", "np.sum", lambda x: np.sum(x, axis=1, keepdims=True),
    lambda x: np.sum(x, axis=1, keepdims=True), mk(normal(3, 4)))
add("sum", "mean-method", lambda x: x.mean(axis=1), lambda x: x.mean(axis=1), mk(normal(3, 4)))
add("max", "method", lambda x: x.max(), lambda x: x.max(), mk(distinct(3, 4)))
add("max", "np.max", lambda x: np.max(x, axis=0), lambda x: np.max(x, axis=0),
    mk(distinct(3, 4)))

for _axis, _shape in [(0, (3, 4)), (-1, (3, 4)), (1, (2, 3, 4))]:
    add("argmax", f"axis{_axis}-{'x'.join(map(str, _shape))}",
        lambda x, a=_axis: jg.argmax(x, axis=a), lambda x, a=_axis: np.argmax(x, axis=a),
        mk(distinct(*_shape)), kind="nograd")
    add("max_argmax", f"axis{_axis}-{'x'.join(map(str, _shape))}",
        lambda x, a=_axis: jg.max_argmax(x, axis=a), lambda x, a=_axis: np_max_argmax(x, a),
        mk(distinct(*_shape)))
add("argmax", "np.argmax-flat", lambda x: np.argmax(x), lambda x: np.argmax(x),
    mk(distinct(3, 4)), kind="nograd")
add("argmax", "method", lambda x: x.argmax(axis=0), lambda x: x.argmax(axis=0),
    mk(distinct(3, 4)), kind="nograd")
add("argmax", "method-flat", lambda x: x.argmax(), lambda x: x.argmax(), mk(distinct(2, 3, 2)),
    kind="nograd")
add("argmax", "axis-None", lambda x: jg.argmax(x, axis=None), lambda x: np.argmax(x, axis=None),
    mk(distinct(3, 4)), kind="nograd")
add("max_argmax", "axis-None", lambda x: jg.max_argmax(x, axis=None),
    lambda x: (np.max(x), np.argmax(x)), mk(distinct(3, 4)))
add("max_argmax", "indices-reused",
    lambda x: jg.take_along_axis(x * x, jg.reshape(jg.max_argmax(x, axis=1)[1], (3, 1)), 1),
    lambda x: np.take_along_axis(x * x, np.argmax(x, axis=1)[:, None], 1), mk(distinct(3, 4)))

for _axis, _keep in [(-1, False), (0, True), (None, False), ((0, 2), False)]:
    add("logsumexp", f"axis{_axis}-keepdims{_keep}",
        lambda x, a=_axis, k=_keep: jg.logsumexp(x, axis=a, keepdims=k),
        lambda x, a=_axis, k=_keep: np_logsumexp(x, axis=a, keepdims=k), mk(normal(2, 3, 4)))
add("logsumexp", "softmax", lambda x: jg.softmax(x, axis=-1), np_softmax, mk(normal(3, 5)))
add("logsumexp", "softmax-axis0", lambda x: jg.softmax(x, axis=0),
    lambda x: np_softmax(x, axis=0), mk(normal(3, 5)))

# matmul: ranks 1 and 2, transposed operands (folded into flags by simplify), dispatch
add("matmul", "2d-2d", lambda a, b: a @ b, np.matmul, mk(normal(3, 4), normal(4, 5)))
add("matmul", "1d-2d", lambda a, b: a @ b, np.matmul, mk(normal(4), normal(4, 5)))
add("matmul", "2d-1d", lambda a, b: a @ b, np.matmul, mk(normal(3, 4), normal(4)))
add("matmul", "1d-1d", lambda a, b: a @ b, np.matmul, mk(normal(4), normal(4)))
add("matmul", "aT-b", lambda a, b: a.T @ b, lambda a, b: a.T @ b, mk(normal(4, 3), normal(4, 5)))
add("matmul", "a-bT", lambda a, b: a @ b.T, lambda a, b: a @ b.T, mk(normal(3, 4), normal(5, 4)))
add("matmul", "aT-bT", lambda a, b: jg.matmul(a.T, b.T), lambda a, b: a.T @ b.T,
    mk(normal(4, 3), normal(5, 4)))
add("matmul", "np.matmul", lambda a, b: np.matmul(a, b), np.matmul,
    mk(normal(2, 3), normal(3, 2)))
add("matmul", "np.dot", lambda a, b: np.dot(a, b), np.dot, mk(normal(2, 3), normal(3)))
add("matmul", "numpy-left", lambda b: np.eye(3, 4).astype(b.dtype) @ b,
    lambda b: np.eye(3, 4) @ b, mk(normal(4, 2)))

# neural-network primitives (integer labels are a traced integer input)
add("softmax_cross_entropy", "5x4", jg.softmax_cross_entropy, np_sce,
    mk(normal(5, 4), const(LABELS)))
add("softmax_cross_entropy", "composed", lambda x, w: jg.softmax_cross_entropy(x @ w, LABELS),
    lambda x, w: np_sce(x @ w, LABELS), mk(normal(5, 3), normal(3, 4)))
add("softmax_cross_entropy_grad", "via-grad",
    lambda z, y: jg.grad(jg.softmax_cross_entropy)(z, y), np_sce_grad,
    mk(normal(5, 4), const(LABELS)))
add("softmax_cross_entropy_grad", "direct",
    lambda z: NN.softmax_cross_entropy_grad_p.bind(z, LABELS),
    lambda z: np_sce_grad(z, LABELS), mk(normal(5, 4)))

# transformers (issue 21): layer norm, GELU, the masked softmax; their gradient primitives
# are also bound directly (with statistics of their own: the VJP takes them as inputs)
def np_layer_norm(x, w=None, b=None, n_dims=1, eps=1e-5):
    axes = tuple(range(x.ndim - n_dims, x.ndim))
    xh = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return xh * (1.0 if w is None else w) + (0.0 if b is None else b)


def np_layer_norm_grad(g, x, w, mean, rstd):
    n = x.shape[1]
    xh = (x - mean[:, None]) * rstd[:, None]
    gw = g * w
    dx = rstd[:, None] * (gw - gw.mean(axis=1, keepdims=True)
                          - xh * (gw * xh).sum(axis=1, keepdims=True) / n)
    return dx, (g * xh).sum(axis=0), g.sum(axis=0)


def np_gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def np_gelu_grad(x, approximate="none"):
    if approximate == "tanh":
        c = np.sqrt(2 / np.pi)
        t = np.tanh(c * (x + 0.044715 * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + special.erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)


def np_masked_softmax(s, mask=None, scale=1.0, causal=False):
    z = s * scale + (0.0 if mask is None else mask)
    if causal:
        z = np.where(np.tril(np.ones(s.shape[-2:], bool)), z, -np.inf)
    m = np.max(z, axis=-1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(m), m, 0))
    total = e.sum(axis=-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1), 0.0)


def np_attention(q, k, v, causal=True):
    return np_masked_softmax(q @ np.swapaxes(k, -1, -2), scale=1 / np.sqrt(q.shape[-1]),
                             causal=causal) @ v


BOOL_MASK = np.array([[True, False, True, True], [False, False, False, False],
                      [True, True, False, True]])  # the middle row is fully masked

add("layer_norm", "affine", lambda x, w, b: jg.nn.layer_norm(x, 4, w, b), np_layer_norm,
    mk(normal(2, 3, 4), normal(4), normal(4)))
add("layer_norm", "two-dims-plain", lambda x: jg.nn.layer_norm(x, (3, 4), eps=1e-3),
    lambda x: np_layer_norm(x, n_dims=2, eps=1e-3), mk(normal(2, 3, 4)))
add("layer_norm_grad", "direct", lambda g, x, w, m, r: NORM.layer_norm_grad_p.bind(g, x, w, m, r),
    np_layer_norm_grad, mk(normal(3, 4), normal(3, 4), normal(4), normal(3), pos(3)))
for _approx in ("none", "tanh"):
    add("gelu", _approx, lambda x, a=_approx: jg.gelu(x, approximate=a),
        lambda x, a=_approx: np_gelu(x, a), mk(normal(3, 4)))
    add("gelu_grad", f"{_approx}-direct",
        lambda x, a=_approx: GELU.gelu_grad_p.bind(x, approximate=a),
        lambda x, a=_approx: np_gelu_grad(x, a), mk(normal(3, 4)))
add("gelu", "bias-gelu-composed", lambda x, b: jg.gelu(x + b) * 2.0,
    lambda x, b: np_gelu(x + b) * 2.0, mk(normal(3, 4), normal(4)))
add("masked_softmax", "causal-scaled", lambda s: jg.nn.masked_softmax(s, causal=True, scale=0.5),
    lambda s: np_masked_softmax(s, scale=0.5, causal=True), mk(normal(2, 4, 4)))
add("masked_softmax", "additive-mask", lambda s, m: jg.nn.masked_softmax(s, m),
    lambda s, m: np_masked_softmax(s, m), mk(normal(2, 3, 4), normal(3, 4)))
add("masked_softmax", "bool-mask-fully-masked-row", lambda s: jg.nn.masked_softmax(s, BOOL_MASK),
    lambda s: np_masked_softmax(s, np.where(BOOL_MASK, 0.0, -np.inf)), mk(normal(2, 3, 4)))
add("masked_softmax", "causal-attention",
    lambda q, k, v: jg.nn.scaled_dot_product_attention(q, k, v, is_causal=True), np_attention,
    mk(normal(2, 3, 2), normal(2, 3, 2), normal(2, 3, 2)))
add("masked_softmax_grad", "direct",
    lambda g, p: ATT.masked_softmax_grad_p.bind(g, p, scale=0.5),
    lambda g, p: 0.5 * p * (g - (g * p).sum(axis=-1, keepdims=True)),
    mk(normal(2, 3, 4), normal(2, 3, 4)))

# shape primitives
add("reshape", "2d", lambda x: jg.reshape(x, (2, 6)), lambda x: x.reshape(2, 6), mk(normal(3, 4)))
add("reshape", "minus-one", lambda x: jg.reshape(x, -1), lambda x: x.reshape(-1),
    mk(normal(2, 3, 2)))
add("reshape", "method", lambda x: x.reshape(6, 2), lambda x: x.reshape(6, 2),
    mk(normal(2, 3, 2)))
add("reshape", "np.reshape", lambda x: np.reshape(x, (4, 3)), lambda x: np.reshape(x, (4, 3)),
    mk(normal(3, 4)))
add("reshape", "to-scalar", lambda x: jg.reshape(x, ()), lambda x: x.reshape(()),
    mk(normal(1, 1)))
add("transpose", "T", lambda x: x.T, lambda x: x.T, mk(normal(3, 4)))
add("transpose", "axes", lambda x: jg.transpose(x, (1, 2, 0)),
    lambda x: np.transpose(x, (1, 2, 0)), mk(normal(2, 3, 4)))
add("transpose", "method", lambda x: x.transpose(2, 0, 1), lambda x: x.transpose(2, 0, 1),
    mk(normal(2, 3, 4)))
add("transpose", "np.transpose", lambda x: np.transpose(x), np.transpose, mk(normal(2, 3, 4)))
add("broadcast_to", "row", lambda x: S.broadcast_to(x, (3, 4)),
    lambda x: np.broadcast_to(x, (3, 4)), mk(normal(4)))
add("broadcast_to", "column", lambda x: S.broadcast_to(x, (3, 4)),
    lambda x: np.broadcast_to(x, (3, 4)), mk(normal(3, 1)))
add("broadcast_to", "scalar", lambda x: S.broadcast_to(x, (2, 3)),
    lambda x: np.broadcast_to(x, (2, 3)), mk(normal()))
add("broadcast_to", "via-grad-of-sum",
    lambda x: jg.grad(lambda y: jg.sum(jg.tanh(jg.sum(y, axis=1))))(x),
    lambda x: np.broadcast_to(dtanh(np.sum(x, axis=1))[:, None], x.shape), mk(normal(3, 4)))
add("concatenate", "axis0", lambda a, b: jg.concatenate([a, b], axis=0),
    lambda a, b: np.concatenate([a, b], axis=0), mk(normal(2, 4), normal(3, 4)))
add("concatenate", "axis1", lambda a, b: jg.concatenate([a, b], axis=1),
    lambda a, b: np.concatenate([a, b], axis=1), mk(normal(3, 2), normal(3, 1)))
add("concatenate", "three-axis-1", lambda a, b, c: jg.concatenate([a, b, c], axis=-1),
    lambda a, b, c: np.concatenate([a, b, c], axis=-1),
    mk(normal(2, 3, 1), normal(2, 3, 2), normal(2, 3, 1)))
add("concatenate", "np.concatenate", lambda a, b: np.concatenate([a, b]),
    lambda a, b: np.concatenate([a, b]), mk(normal(2), normal(3)))
add("concatenate", "same-twice", lambda a: jg.concatenate([a, a * 2.0], axis=0),
    lambda a: np.concatenate([a, a * 2.0], axis=0), mk(normal(2, 3)))

SLICES: list[tuple[str, Any, tuple[int, ...]]] = [
    ("1:3", np.s_[1:3], (5,)), ("cols-step2", np.s_[:, ::2], (3, 5)),
    ("reversed", np.s_[::-1], (4,)), ("int", np.s_[1], (3, 4)),
    ("ellipsis", np.s_[..., 1:], (2, 3, 4)), ("newaxis", np.s_[None, 1:3], (4, 3)),
    ("int-and-step", np.s_[2, 1:4:2], (3, 5)), ("negative", np.s_[-1, -3:], (3, 4)),
    ("neg-step-window", np.s_[3:0:-2, 2::-1], (5, 4))]
for _variant, _key, _shape in SLICES:
    add("slice", _variant, lambda x, k=_key: x[k], lambda x, k=_key: x[k], mk(normal(*_shape)))
add("pad_slice", "via-grad-of-slice", lambda x: jg.grad(lambda y: jg.sum(jg.tanh(y[1:3])))(x),
    lambda x: np_pad_slice(dtanh(x[1:3]), x.shape, np.s_[1:3]), mk(normal(5, 2)))
add("pad_slice", "via-grad-of-strided",
    lambda x: jg.grad(lambda y: jg.sum(jg.tanh(y[::-2, 1])))(x),
    lambda x: np_pad_slice(dtanh(x[::-2, 1]), x.shape, np.s_[::-2, 1]), mk(normal(5, 3)))
add("pad_slice", "direct",
    lambda g: S.pad_slice_p.bind(g, shape=(5, 4), index=((1, 4, 1), (0, 4, 2))),
    lambda g: np_pad_slice(g, (5, 4), np.s_[1:4, 0:4:2]), mk(normal(3, 2)))

add("gather", "repeated-negative", lambda x: x[IDX4], lambda x: x[IDX4], mk(normal(4, 3)))
add("gather", "2d-index", lambda x: x[IDX2D], lambda x: x[IDX2D], mk(normal(4)))
add("gather", "list-index", lambda x: x[[1, 1, 0]], lambda x: x[[1, 1, 0]], mk(normal(3, 2)))
add("gather", "traced-index", lambda x, i: x[i] * 2.0, lambda x, i: x[i] * 2.0,
    mk(normal(4, 3), const(IDX4)))
add("scatter_add", "via-grad-of-gather",
    lambda x: jg.grad(lambda y: jg.sum(jg.tanh(y[IDX4])))(x),
    lambda x: np_scatter_add(dtanh(x[IDX4]), IDX4, 4), mk(normal(4, 3)))
add("scatter_add", "direct", lambda g: S.scatter_add_p.bind(g, IDX4, n=5),
    lambda g: np_scatter_add(g, IDX4, 5), mk(normal(4, 3)))

add("take_along_axis", "axis1", lambda x: jg.take_along_axis(x, TAKE1, 1),
    lambda x: np.take_along_axis(x, TAKE1, 1), mk(normal(3, 4)))
add("take_along_axis", "axis0", lambda x: jg.take_along_axis(x, TAKE0, axis=0),
    lambda x: np.take_along_axis(x, TAKE0, axis=0), mk(normal(3, 4)))
add("take_along_axis", "traced-index", lambda x, i: jg.take_along_axis(x, i, -1),
    lambda x, i: np.take_along_axis(x, i, -1), mk(normal(3, 4), const(TAKE1)))
add("take_along_axis", "np.take_along_axis", lambda x: np.take_along_axis(x, TAKE1, axis=1),
    lambda x: np.take_along_axis(x, TAKE1, axis=1), mk(normal(3, 4)))
add("scatter_along_axis", "via-grad",
    lambda x: jg.grad(lambda y: jg.sum(jg.tanh(jg.take_along_axis(y, TAKE1, 1))))(x),
    lambda x: np_scatter_along_axis(dtanh(np.take_along_axis(x, TAKE1, 1)), TAKE1, x.shape, 1),
    mk(normal(3, 4)))
add("scatter_along_axis", "direct", lambda g: S.scatter_along_axis(g, TAKE0, (3, 4), 0),
    lambda g: np_scatter_along_axis(g, TAKE0, (3, 4), 0), mk(normal(2, 4)))

# the product summed over a batch: the gradient of an operand a batched matmul broadcasts
add("matmul_sum", "via-grad-of-broadcast",
    lambda w, h: jg.grad(lambda w: jg.sum(jg.tanh(w @ h)))(w),
    lambda w, h: np.sum(dtanh(w @ h) @ np.swapaxes(h, -1, -2), axis=0),
    mk(normal(3, 4), normal(2, 4, 5)))
add("matmul_sum", "direct-keepdims", lambda a, b: L.matmul_sum_p.bind(
    a, b, ta=False, tb=True, batch=(1, 3)), lambda a, b: np.sum(
    a @ np.swapaxes(b, -1, -2), axis=0, keepdims=True), mk(normal(2, 3, 4, 5), normal(3, 2, 5)))

# diagonals (the rows of the functions built on them are in test_linalg.py)
add("diagonal", "offset-axes", lambda x: jg.diagonal(x, -1, 2, 0),
    lambda x: np.diagonal(x, -1, 2, 0), mk(normal(3, 2, 4)))
add("embed_diagonal", "via-grad-of-diagonal",
    lambda x: jg.grad(lambda y: jg.sum(jg.tanh(jg.diagonal(y, 1))))(x),
    lambda x: np.diag(dtanh(np.diagonal(x, 1)), 1)[:3, :4], mk(normal(3, 4)))
add("embed_diagonal", "diag-of-vector", lambda v: jg.diag(v, -2), lambda v: np.diag(v, -2),
    mk(normal(3)))


# random numbers: the key is a traced uint32 input. A draw has no gradient ("nograd": a
# float argument x enters as x * 0); through its bounds, a scale or dropout it does.
KEY = jg.random.key(17)
F32 = np.dtype(np.float32)


def np_randint(key, shape, lo, hi):
    """jax.random.randint's construction on the numpy references: two draws, reduced."""
    k1, k2 = R._pairs_ref(key, 0, 2)
    u32 = np.dtype(np.uint32)
    span = np.full(shape, hi - lo, np.uint32)
    return lo + R._offset_ref(R._bits_ref(k1, shape, u32), R._bits_ref(k2, shape, u32),
                              span).astype(np.int32)


for _dt in (np.uint8, np.uint64):
    add("random_bits", np.dtype(_dt).name,
        lambda x, k, d=_dt: jg.random.bits(k, x.shape, d).astype(x.dtype) + x * 0,
        lambda x, k, d=_dt: R._bits_ref(k, x.shape, np.dtype(d)).astype(x.dtype) + x * 0,
        mk(normal(3, 4), const(KEY)), kind="nograd")
add("random_uniform", "unit", lambda x, k: jg.random.uniform(k, x.shape).astype(x.dtype) + x * 0,
    lambda x, k: R._unit_ref(k, x.shape, F32).astype(x.dtype) + x * 0,
    mk(normal(3, 4), const(KEY)), kind="nograd")
add("random_uniform", "traced-bounds",
    lambda a, b, k: jg.random.uniform(k, (3, 4), a.dtype, a, b),
    lambda a, b, k: np.maximum(a, R._unit_ref(k, (3, 4), a.dtype) * (b - a) + a),
    mk(normal(4), lambda r: r.uniform(3.0, 4.0, size=(3, 1)), const(KEY)), f32=False)
add("random_uniform", "dropout", lambda x, k: jg.nn.dropout(k, x, 0.3),
    lambda x, k: np.where(R._unit_ref(k, x.shape, F32) < np.float32(0.7), x * (1 / 0.7), 0.0),
    mk(normal(3, 4), const(KEY)))
add("erf_inv", "3x4", R.erf_inv, special.erfinv, mk(lambda r: r.uniform(-0.9, 0.9, size=(3, 4))))
add("erf_inv", "normal-times-x", lambda x, k: jg.random.normal(k, x.shape, x.dtype) * x,
    lambda x, k: np.sqrt(2.0) * special.erfinv(
        R._unit_ref(k, x.shape, x.dtype) * 2.0 + np.nextafter(-1.0, 0.0)) * x,
    mk(normal(3, 4), const(KEY)), f32=False)  # float32 draws other values
add("random_split", "3", lambda x, k: jg.random.split(k, 3).astype(x.dtype) + x * 0,
    lambda x, k: R._pairs_ref(k, 0, 3).astype(x.dtype) + x * 0, mk(normal(3, 2), const(KEY)),
    kind="nograd")
add("random_fold_in", "traced-data",
    lambda x, k, d: jg.random.fold_in(k, d).astype(x.dtype) + x * 0,
    lambda x, k, d: R._pairs_ref(k, int(d), 1)[0].astype(x.dtype) + x * 0,
    mk(normal(2), const(KEY), const(np.uint32(99))), kind="nograd")
add("randint_offset", "int32",
    lambda x, k: jg.random.randint(k, x.shape, -3, 12).astype(x.dtype) + x * 0,
    lambda x, k: np_randint(k, x.shape, -3, 12).astype(x.dtype) + x * 0,
    mk(normal(3, 4), const(KEY)), kind="nograd")


# ---------------------------------------------------------------- the numpy surface (issue 16)
# One or two rows per primitive of the numpy surface (part A) here, for the registry's
# coverage; every numpy function, method and operator, compositions included, has its own
# rows in test_numpy_surface.py.


def uniform(lo: float, hi: float, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    return lambda r: r.uniform(lo, hi, size=shape)


def quotient_away(sa: tuple[int, ...], sb: tuple[int, ...]) -> Callable[[np.random.Generator], Any]:
    """(a, b) with a / b an integer plus a fraction in [0.2, 0.8] (remainder, floor_divide:
    away from the jumps), b of either sign."""
    def gen(r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        b = away(*sb)(r) * 1.5
        out = np.broadcast_shapes(sa, sb)
        q = r.integers(-3, 3, size=out) + r.uniform(0.2, 0.8, size=out)
        a = (q * b)[tuple(slice(0, 1) if d == 1 else slice(None)
                          for d in (1,) * (len(out) - len(sa)) + sa)]
        return a.reshape(sa), b
    return gen


MATHS_UNARY = [
    ("sin", jg.sin, np.sin, normal), ("cos", jg.cos, np.cos, normal),
    ("tan", jg.tan, np.tan, lambda *s: uniform(-1.2, 1.2, *s)),
    ("arcsin", jg.arcsin, np.arcsin, lambda *s: uniform(-0.8, 0.8, *s)),
    ("arccos", jg.arccos, np.arccos, lambda *s: uniform(-0.8, 0.8, *s)),
    ("arctan", jg.arctan, np.arctan, normal), ("sinh", jg.sinh, np.sinh, normal),
    ("cosh", jg.cosh, np.cosh, normal), ("arcsinh", jg.arcsinh, np.arcsinh, normal),
    ("arccosh", jg.arccosh, np.arccosh, lambda *s: uniform(1.2, 3.0, *s)),
    ("arctanh", jg.arctanh, np.arctanh, lambda *s: uniform(-0.8, 0.8, *s)),
    ("exp2", jg.exp2, np.exp2, normal), ("expm1", jg.expm1, np.expm1, normal),
    ("log2", jg.log2, np.log2, pos), ("log10", jg.log10, np.log10, pos),
    ("log1p", jg.log1p, np.log1p, pos),
    ("erf", jg.erf, lambda x: np.vectorize(math.erf)(x), normal),
]
for _name, _fn, _ref, _gen in MATHS_UNARY:
    for _shape in [(3, 4), (2, 3, 2)]:
        add(_name, "x".join(map(str, _shape)), _fn, _ref, mk(_gen(*_shape)))

for _name, _fn, _ref, _gen in [
        ("minimum", jg.minimum, np.minimum, lambda sa, sb: mk(separated(sa, sb))),
        ("fmin", jg.fmin, np.fmin, lambda sa, sb: mk(separated(sa, sb))),
        ("fmax", jg.fmax, np.fmax, lambda sa, sb: mk(separated(sa, sb))),
        ("logaddexp", jg.logaddexp, np.logaddexp, lambda sa, sb: mk(normal(*sa), normal(*sb))),
        ("logaddexp2", jg.logaddexp2, np.logaddexp2,
         lambda sa, sb: mk(normal(*sa), normal(*sb))),
        ("arctan2", jg.arctan2, np.arctan2, lambda sa, sb: mk(away(*sa), away(*sb))),
        ("hypot", jg.hypot, np.hypot, lambda sa, sb: mk(away(*sa), away(*sb))),
        ("remainder", jg.remainder, np.remainder, lambda sa, sb: mk(quotient_away(sa, sb)))]:
    for _sa, _sb in [((3, 4), (4,)), ((3, 1), (1, 4))]:
        add(_name, f"{'x'.join(map(str, _sa))}-{'x'.join(map(str, _sb))}", _fn, _ref,
            _gen(_sa, _sb))
FLOOR_DIVISOR = np.array([1.5, -0.75, 2.25, -1.25])
add("floor_divide", "3x4-4", lambda x: jg.floor_divide(x, FLOOR_DIVISOR),
    lambda x: np.floor_divide(x, FLOOR_DIVISOR),
    mk(lambda r: FLOOR_DIVISOR * near_int(0.2, 0.8, 3, 4)(r)), kind="undefined",
    f32=False)  # a float64 divisor makes the result float64, as in numpy
add("floor_divide", "operator", lambda x: x // 0.75, lambda x: x // 0.75,
    mk(lambda r: quotient_away((2, 3), ())(r)[0] * 0.5), kind="undefined")
add("fmax", "nan-operand", lambda a: jg.fmax(a, np.array([np.nan, 0.5, np.nan, -0.5])),
    lambda a: np.fmax(a, np.array([np.nan, 0.5, np.nan, -0.5])),
    mk(lambda r: separated((3, 4), ())(r)[0]), f32=False)


def with_zeros(count: int, *shape: int) -> Callable[[np.random.Generator], np.ndarray]:
    """Normal values with `count` exact zeros in the first row (prod's special cases)."""
    def gen(r: np.random.Generator) -> np.ndarray:
        x = r.normal(size=shape)
        x.reshape(shape[0], -1)[0, :count] = 0.0
        return x
    return gen


for _axis, _keep in [(None, False), (1, True), ((0, 2), False), (-1, False)]:
    add("prod", f"axis{_axis}-keepdims{_keep}",
        lambda x, a=_axis, k=_keep: jg.prod(x, axis=a, keepdims=k),
        lambda x, a=_axis, k=_keep: np.prod(x, axis=a, keepdims=k), mk(normal(2, 3, 4)))
    add("min", f"axis{_axis}-keepdims{_keep}",
        lambda x, a=_axis, k=_keep: jg.min(x, axis=a, keepdims=k),
        lambda x, a=_axis, k=_keep: np.min(x, axis=a, keepdims=k), mk(distinct(2, 3, 4)))
add("prod", "one-zero", lambda x: jg.prod(x, axis=1), lambda x: np.prod(x, axis=1),
    mk(with_zeros(1, 3, 4)))
add("prod", "two-zeros", lambda x: jg.prod(x, axis=1), lambda x: np.prod(x, axis=1),
    mk(with_zeros(2, 3, 4)))
for _axis in (None, 0, -1):
    add("cumsum", f"axis{_axis}", lambda x, a=_axis: jg.cumsum(x, axis=a),
        lambda x, a=_axis: np.cumsum(x, axis=a), mk(normal(3, 4)))
add("cumsum", "vjp-reverse",
    lambda g: jg.frontend.ops.reduce.cumsum_p.bind(g, axis=1, reverse=True),
    lambda g: np.flip(np.cumsum(np.flip(g, 1), axis=1), 1), mk(normal(2, 5)))
for _axis, _shape in [(-1, (3, 4)), (0, (5, 2)), (None, (2, 3))]:
    add("argsort", f"axis{_axis}", lambda x, a=_axis: jg.argsort(x, axis=a),
        lambda x, a=_axis: np.argsort(x, axis=a, kind="stable"), mk(distinct(*_shape)),
        kind="nograd")


# ---------------------------------------------------------------- convolution and pooling
# (issue 20) One or two rows per primitive here; the stride/padding/dilation/groups grid,
# torch parity and the conv net are in test_conv.py.

CONV_GEOM = {"stride": (2, 1), "padding": (1, 1, 0, 0), "dilation": (1, 2), "groups": 2}
CONV_KW = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}
POOL_POS = np.array([[[[0, 7], [9, 15]], [[5, 5], [12, 3]]]])  # into 4x4 planes, one repeated
add("conv2d", "bias-stride2-pad1", lambda x, w, b: jg.nn.conv2d(x, w, b, stride=2, padding=1),
    lambda x, w, b: np_conv2d(x, w, b, 2, 1), mk(normal(2, 3, 5, 5), normal(4, 3, 3, 3),
                                                 normal(4)))
add("conv2d", "groups-dilation", lambda x, w: jg.nn.conv2d(x, w, None, **CONV_KW),
    lambda x, w: np_conv2d(x, w, None, **CONV_KW), mk(normal(1, 4, 6, 5), normal(4, 2, 3, 2)))
add("conv2d", "relu-epilogue", lambda x, w, b: jg.relu(jg.nn.conv2d(x, w, b, padding=1)),
    lambda x, w, b: np.maximum(np_conv2d(x, w, b, 1, 1), 0.0),
    mk(normal(1, 2, 4, 4), normal(3, 2, 3, 3), normal(3)))
add("conv2d_input_grad", "direct",
    lambda g, w: CV.conv2d_input_grad_p.bind(g, w, hw=(6, 5), **CONV_GEOM),
    lambda g, w: np_conv2d_input_grad(g, w, (1, 4, 6, 5), **CONV_KW),
    mk(normal(1, 4, 3, 3), normal(4, 2, 3, 2)))
add("conv2d_weight_grad", "direct",
    lambda x, g: CV.conv2d_weight_grad_p.bind(x, g, k=(3, 2), **CONV_GEOM),
    lambda x, g: np_conv2d_weight_grad(x, g, (3, 2), **CONV_KW),
    mk(normal(1, 4, 6, 5), normal(1, 4, 3, 3)))
add("max_pool2d", "3x3-stride2-pad1", lambda x: jg.nn.max_pool2d(x, 3, 2, 1),
    lambda x: np_max_pool2d(x, 3, 2, 1), mk(distinct(2, 2, 7, 6)))
add("max_pool2d", "2x2", lambda x: jg.nn.max_pool2d(x, 2), lambda x: np_max_pool2d(x, 2),
    mk(distinct(1, 3, 4, 6)))
add("max_pool2d_grad", "direct",
    lambda g: PL.max_pool2d_grad_p.bind(g, POOL_POS, hw=(4, 4)),
    lambda g: np_max_pool2d_grad(g, POOL_POS, (4, 4)), mk(normal(1, 2, 2, 2)))
add("avg_pool2d", "3x2-stride-pad", lambda x: jg.nn.avg_pool2d(x, (3, 2), (1, 2), (1, 1)),
    lambda x: np_avg_pool2d(x, (3, 2), (1, 2), (1, 1)), mk(normal(2, 2, 5, 6)))
add("avg_pool2d_grad", "direct",
    lambda g: PL.avg_pool2d_grad_p.bind(g, hw=(5, 6), kernel=(3, 2), stride=(1, 2),
                                        padding=(1, 1)),
    lambda g: np_avg_pool2d_grad(g, (1, 2, 5, 6), (3, 2), (1, 2), (1, 1)),
    mk(normal(1, 2, 5, 4)))


# ---------------------------------------------------------------- helpers

def _seed(op: Op) -> int:
    return zlib.crc32(op.id.encode())


def _args(op: Op, dtype: Any = np.float64) -> tuple:
    args = op.make(np.random.default_rng(_seed(op)))
    return tuple(np.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
                 for a in args)


def _outs(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _float_argnums(args: tuple) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(args) if a.dtype.kind == "f")


def _weights(op: Op, dtype: Any = np.float64) -> list[np.ndarray]:
    """Fixed random weights, one array per output (shapes from the numpy reference)."""
    rng = np.random.default_rng(_seed(op) + 1)
    return [rng.normal(size=np.shape(o)).astype(dtype)
            for o in _outs(op.ref(*_args(op)))]


def _loss(fn: Callable[..., Any], ws: list[np.ndarray]) -> Callable[..., Any]:
    """sum_k sum(out_k * w_k), integer/boolean outputs cast to float (jitgrad or numpy)."""
    def loss(*args: Any) -> Any:
        total = 0.0
        for o, w in zip(_outs(fn(*args)), ws, strict=True):
            if np.dtype(o.dtype) != w.dtype:
                o = o.astype(w.dtype)
            total = total + jg.sum(o * w)
        return total
    return loss


def _traced_prims(fn: Callable[..., Any], args: tuple) -> set[str]:
    leaves, in_tree = tree.flatten(tuple(args))
    prog, _, _ = trace_flat(fn, in_tree, [signature_of(a) for a in leaves])
    return {ins.prim.name for ins in prog.instrs}


def _check_values(got: Any, want: Any, rtol: float, atol: float, jitted: bool = True) -> None:
    got, want = _outs(got), _outs(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        w = np.asarray(w)
        if jitted:  # compiled results are fresh ndarrays, 0-d for scalars
            assert isinstance(g, np.ndarray), f"result is a {type(g).__name__}, not an ndarray"
        g = np.asarray(g)
        assert g.shape == w.shape, f"shape {g.shape} != numpy's {w.shape}"
        if w.dtype.kind == "f":
            assert g.dtype.kind == "f"
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
        else:
            assert g.dtype == w.dtype, f"dtype {g.dtype} != numpy's {w.dtype}"
            np.testing.assert_array_equal(g, w)


def _fn_line(op: Op) -> int:
    return inspect.getsourcelines(op.fn)[1]


FILE = os.path.basename(__file__)


# ---------------------------------------------------------------- the tests

def test_every_primitive_has_a_row():
    covered = {op.prim for op in OPS}
    missing = sorted(set(registry) - covered)
    assert not missing, f"primitives without a row in the gradcheck table: {missing}"
    unknown = sorted(covered - set(registry))
    assert not unknown, f"rows about primitives that do not exist: {unknown}"
    ids = [op.id for op in OPS]
    assert len(ids) == len(set(ids)), "duplicate row ids"


def test_row_kinds_match_the_registry():
    for op in OPS:
        p = registry[op.prim]
        if op.kind == "undefined":
            assert p.grad == "undefined", op.id
        elif op.kind == "nograd":
            assert p.grad == "zero", op.id
    for name, p in registry.items():
        if p.grad == "undefined":
            assert any(op.prim == name and op.kind == "undefined" for op in OPS), name


def _rows(ops: list[Op]) -> list[Any]:
    """Every row on the interpreter; on Numba the first row of each primitive, unless
    JITGRAD_TEST_FULL=1 (see conftest.py)."""
    first: dict[str, str] = {}
    for op in ops:
        first.setdefault(op.prim, op.id)
    return [pytest.param(op, id=op.id,
                         marks=() if first[op.prim] == op.id else pytest.mark.numba_full)
            for op in ops]


def _skip_without(op: Op, backend: str) -> None:
    if backend == "numba" and op.requires is not None and not op.requires():
        pytest.skip(f"{op.id} needs MKL's bfloat16 GEMM and a CPU with bfloat16 instructions")


@pytest.mark.parametrize("op", _rows(OPS))
def test_op(op: Op, backend: str) -> None:
    _skip_without(op, backend)
    args = _args(op)
    want = op.ref(*args)

    # the row is about its primitive
    assert op.prim in _traced_prims(op.fn, args), f"{op.prim} not in the traced program"

    # values: eager and jitted equal numpy
    _check_values(op.fn(*args), want, rtol=1e-10, atol=1e-12, jitted=False)
    cf = jg.jit(op.fn)
    _check_values(cf(*args), want, rtol=1e-10, atol=1e-12)
    validate(cf.program)

    fnums = _float_argnums(args)
    ws = _weights(op)
    loss, ref_loss = _loss(op.fn, ws), _loss(op.ref, ws)
    np.testing.assert_allclose(jg.jit(loss)(*args), ref_loss(*args), rtol=1e-10, atol=1e-12)

    if op.kind == "undefined":
        _check_undefined(op, args)
        return

    # order 1
    gcf = jg.jit(jg.grad(loss, argnums=fnums))
    grads = gcf(*args)
    validate(gcf.program)
    assert isinstance(grads, tuple) and len(grads) == len(fnums)
    for n, g in zip(fnums, grads, strict=True):
        assert g.shape == args[n].shape and g.dtype == np.float64
    if op.kind == "nograd":
        for g in grads:
            np.testing.assert_array_equal(g, 0.0)
    if op.expected_grad is not None:
        for g, e in zip(grads, op.expected_grad(args, ws), strict=True):
            assert_grads_close(g, e)
    else:
        for n, g in zip(fnums, grads, strict=True):
            assert_grads_close(g, numeric_grad(ref_loss, args, n), what=f"d/d(arg {n})")
    # the eager path of jg.grad agrees with the jitted one
    for g, e in zip(jg.grad(loss, argnums=fnums)(*args), grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-14)

    # order 2: Hessian-vector product against finite differences of the gradient
    if op.kind != "diff" or not op.order2:
        return
    rng = np.random.default_rng(_seed(op) + 2)
    v = tuple(rng.normal(size=args[n].shape) for n in fnums)

    def directional(*a: Any) -> Any:
        return vdot(jg.grad(loss, argnums=fnums)(*a), v)

    hcf = jg.jit(jg.grad(directional, argnums=fnums))
    hvp = hcf(*args)
    validate(hcf.program)
    assert_grads_close(hvp, numeric_hvp(gcf, args, v, fnums), what="Hessian-vector product")


def _check_undefined(op: Op, args: tuple) -> None:
    x = args[0]
    with pytest.raises(jg.UndefinedGradientError) as info:
        jg.grad(lambda x: jg.sum(op.fn(x) * x))(x)
    msg = str(info.value)
    assert op.prim in msg
    assert f"{FILE}:{_fn_line(op)}" in msg, msg
    assert isinstance(info.value, jg.JitgradError) and isinstance(info.value, ValueError)
    # inside jit as well
    with pytest.raises(jg.UndefinedGradientError, match=re.escape(op.prim)):
        jg.jit(jg.grad(lambda x: jg.sum(jg.tanh(op.fn(x)))))(x)
    # a constant on purpose: fine
    g = jg.jit(jg.grad(lambda x: jg.sum(jg.stop_gradient(op.fn(x)) * x)))(x)
    np.testing.assert_array_equal(g, op.ref(x))
    # a gradient that does not flow through it: fine
    y = np.linspace(-1.0, 1.0, x.size).reshape(x.shape)
    g = jg.grad(lambda x, y: jg.sum(op.fn(x) * y), argnums=1)(x, y)
    np.testing.assert_array_equal(g, op.ref(x))


@pytest.mark.parametrize("op", _rows([op for op in OPS if op.f32]))
def test_float32_stays_float32(op: Op, backend: str) -> None:
    _skip_without(op, backend)
    args = _args(op, np.float32)
    want = op.ref(*_args(op))
    outs = _outs(jg.jit(op.fn)(*args))
    for o, w in zip(outs, _outs(want), strict=True):
        w = np.asarray(w)
        if w.dtype.kind == "f":
            assert o.dtype == np.float32, f"output is {o.dtype}"
            np.testing.assert_allclose(o, w, rtol=1e-4, atol=1e-5)
        else:
            assert o.dtype == w.dtype
    if op.kind == "undefined":
        return
    fnums = _float_argnums(args)
    ws = _weights(op, np.float32)
    gcf = jg.jit(jg.grad(_loss(op.fn, ws), argnums=fnums))
    grads = gcf(*args)
    for v in gcf.program.inputs + [o for i in gcf.program.instrs for o in i.outputs]:
        assert v.dtype != np.float64, f"a float64 value in a float32 program: {v!r}"
    grads64 = jg.grad(_loss(op.fn, [w.astype(np.float64) for w in ws]), argnums=fnums)(
        *(a.astype(np.float64) if a.dtype.kind == "f" else a for a in args))
    for g, g64 in zip(grads, grads64, strict=True):
        assert g.dtype == np.float32, f"gradient is {g.dtype}"
        assert_grads_close(g, g64, rtol=1e-3, atol=1e-4, what="float32 gradient")


def test_float32_cast_to_float64_and_back(backend: str) -> None:
    """An explicit cast is the one way to change precision; its gradient casts back."""
    x = np.linspace(-1.0, 1.5, 6, dtype=np.float32)
    cf = jg.jit(jg.value_and_grad(lambda x: jg.sum(jg.tanh(x.astype(np.float64)))))
    value, g = cf(x)
    assert value.dtype == np.float64 and g.dtype == np.float32
    np.testing.assert_allclose(value, np.sum(np.tanh(x.astype(np.float64))), rtol=1e-12)
    np.testing.assert_allclose(g, dtanh(x.astype(np.float64)), rtol=1e-6)
    assert "cast" in {i.prim.name for i in cf.program.instrs}


def test_stop_gradient_stops_every_order(backend: str) -> None:
    """stop_gradient is a constant to differentiation at every order (as in JAX): the
    gradient of x * stop(x*x) is x*x, and the derivative of that gradient is zero."""
    x = np.array([0.5, -1.5, 2.0])
    f = lambda x: jg.sum(x * jg.stop_gradient(x * x))  # noqa: E731
    np.testing.assert_allclose(jg.jit(jg.grad(f))(x), x * x, rtol=1e-15)
    hess_diag = jg.jit(jg.grad(lambda x: jg.sum(jg.grad(f)(x))))(x)
    np.testing.assert_array_equal(hess_diag, np.zeros(3))
