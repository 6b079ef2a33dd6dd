"""Elementwise primitives: constants, casts, unary maths, binary arithmetic, comparisons, where.

Conventions at kinks, written once (docs/design.md: VJP rules use masks and `where`):
- relu'(0) = 0 and abs'(0) = 0 (PyTorch's choice);
- maximum(a, b) at a tie sends half of the gradient to each argument
  (autograd's balanced_eq; JAX does the same);
- max over an axis splits the gradient evenly among tied maxima (reduce.py);
- pow(a, b): the gradient with respect to b is 0 where a <= 0;
- floor, ceil, round, sign: gradient undefined (UndefinedGradientError).
Binary operations broadcast as numpy does; their VJPs sum over broadcast axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer, cast, is_const, primitive
from . import reduce as R
from . import shape as S

# ---------------------------------------------------------------- dtype promotion

def _is_weak(x: Any) -> bool:
    return isinstance(x, (bool, int, float)) or (isinstance(x, Tracer) and x.weak)


def _dtype_of(x: Any) -> np.dtype:
    if isinstance(x, Tracer):
        return x.dtype
    if isinstance(x, (bool, int, float)):
        return np.result_type(x)
    return np.asarray(x).dtype


def _py_scalar_like(x: Any) -> Any:
    """A Python scalar of x's kind: what numpy's weak-scalar promotion (NEP 50) expects."""
    kind = _dtype_of(x).kind
    return {"b": False, "i": 0, "u": 0, "f": 0.0}.get(kind, 0.0)


def result_dtype(*xs: Any) -> np.dtype:
    strong = [_dtype_of(x) for x in xs if not _is_weak(x)]
    weak = [_py_scalar_like(x) for x in xs if _is_weak(x)]
    if not strong:
        return np.result_type(*weak)
    return np.result_type(*strong, *weak)


def asdtype(x: Any, dtype: np.dtype) -> Any:
    """x as an array-like of dtype: a cast instruction for tracers, a constant otherwise."""
    if isinstance(x, Tracer):
        return x if x.dtype == dtype else cast(x, dtype)
    if isinstance(x, (bool, int, float)):
        return np.asarray(x, dtype=dtype)
    arr = np.asarray(x)
    if arr.dtype == object:
        raise JitgradError(f"cannot use a {type(x).__name__} as an array")
    return arr if arr.dtype == dtype else arr.astype(dtype)


def promote(*xs: Any) -> list[Any]:
    dtype = result_dtype(*xs)
    return [asdtype(x, dtype) for x in xs]


def _float_dtype(x: Any) -> np.dtype:
    d = result_dtype(x)
    return d if d.kind == "f" else np.dtype(np.float64)


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise JitgradError(
            f"shapes {' and '.join(map(str, shapes))} cannot be broadcast together") from None


def unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum g over the axes that broadcasting added or stretched, back to `shape`."""
    if g.shape == shape:
        return g
    lead = len(g.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    out = R.sum(g, axis=axes) if axes else g
    return S.reshape(out, shape) if out.shape != shape else out


# ---------------------------------------------------------------- constants and casts

stop_gradient_p = primitive("stop_gradient", "elementwise", grad="zero")
stop_gradient_p.def_impl(lambda x: x)
stop_gradient_p.def_shape(lambda x: x)
stop_gradient_p.def_scalar("{0}")
# it only matters to differentiation: compiled code reads x itself
stop_gradient_p.def_simplify(lambda ins, producer: ins.inputs[0])


def stop_gradient(x: Any) -> Any:
    """x, treated as a constant by differentiation (JAX's lax.stop_gradient)."""
    return stop_gradient_p.bind(x)


# ---------------------------------------------------------------- unary

def _unary(name: str, ref: Any, *, grad: str = "rule", float_only: bool = True):
    p = primitive(name, "elementwise", grad=grad)
    p.def_impl(ref)

    @p.def_shape
    def _shape(x):
        if float_only and x[1].kind != "f":
            raise JitgradError(f"expects a float input, got {x[1]}")
        return x

    def fn(x: Any) -> Any:
        if float_only:
            x = asdtype(x, _float_dtype(x))
        elif not isinstance(x, Tracer):
            x = np.asarray(x)
        return p.bind(x)

    fn.__name__ = name
    fn.__doc__ = f"Elementwise {name} (numpy semantics)."
    return p, fn


def _sigmoid_ref(x):
    return np.exp(-np.logaddexp(0, -x))


neg_p, neg = _unary("neg", np.negative, float_only=False)
exp_p, exp = _unary("exp", np.exp)
log_p, log = _unary("log", np.log)
tanh_p, tanh = _unary("tanh", np.tanh)
sigmoid_p, sigmoid = _unary("sigmoid", _sigmoid_ref)
sqrt_p, sqrt = _unary("sqrt", np.sqrt)
abs_p, abs = _unary("abs", np.abs, float_only=False)
relu_p, relu = _unary("relu", lambda x: np.maximum(x, 0).astype(x.dtype), float_only=False)
floor_p, floor = _unary("floor", np.floor, grad="undefined")
ceil_p, ceil = _unary("ceil", np.ceil, grad="undefined")
round_p, round = _unary("round", np.round, grad="undefined")
sign_p, sign = _unary("sign", np.sign, grad="undefined", float_only=False)

neg_p.def_vjp(lambda cts, outs, ins: [neg(cts[0])])
exp_p.def_vjp(lambda cts, outs, ins: [cts[0] * outs[0]])
log_p.def_vjp(lambda cts, outs, ins: [cts[0] / ins[0]])
tanh_p.def_vjp(lambda cts, outs, ins: [cts[0] * (1.0 - outs[0] * outs[0])])
sigmoid_p.def_vjp(lambda cts, outs, ins: [cts[0] * (outs[0] * (1.0 - outs[0]))])
sqrt_p.def_vjp(lambda cts, outs, ins: [cts[0] * 0.5 / outs[0]])
relu_p.def_vjp(lambda cts, outs, ins: [where(outs[0] > 0, cts[0], 0.0)])
abs_p.def_vjp(lambda cts, outs, ins: [
    where(ins[0] > 0, cts[0], where(ins[0] < 0, neg(cts[0]), 0.0))])


# ---------------------------------------------------------------- binary

def _binary(name: str, ref: Any, *, out_bool: bool = False, grad: str = "rule"):
    p = primitive(name, "elementwise", grad=grad)
    p.def_impl(ref)

    @p.def_shape
    def _shape(a, b):
        if a[1] != b[1]:
            raise JitgradError(f"operands have different dtypes {a[1]} and {b[1]}")
        return broadcast_shapes(a[0], b[0]), (np.dtype(bool) if out_bool else a[1])

    return p


add_p = _binary("add", np.add)
add_p.absorbs_accumulation = True  # x + A@B: one GEMM accumulating into the sum's buffer
sub_p = _binary("sub", np.subtract)
mul_p = _binary("mul", np.multiply)
div_p = _binary("div", np.divide)
pow_p = _binary("pow", np.power)
maximum_p = _binary("maximum", np.maximum)
lt_p = _binary("lt", np.less, out_bool=True, grad="zero")
le_p = _binary("le", np.less_equal, out_bool=True, grad="zero")
gt_p = _binary("gt", np.greater, out_bool=True, grad="zero")
ge_p = _binary("ge", np.greater_equal, out_bool=True, grad="zero")
eq_p = _binary("eq", np.equal, out_bool=True, grad="zero")
ne_p = _binary("ne", np.not_equal, out_bool=True, grad="zero")


def _arith(p):
    def fn(a: Any, b: Any) -> Any:
        return p.bind(*promote(a, b))
    fn.__name__ = p.name
    return fn


add, sub, mul, maximum = _arith(add_p), _arith(sub_p), _arith(mul_p), _arith(maximum_p)
lt, le, gt, ge, eq, ne = map(_arith, (lt_p, le_p, gt_p, ge_p, eq_p, ne_p))


def div(a: Any, b: Any) -> Any:
    """True division; integers divide to float64 as in numpy."""
    a, b = promote(a, b)
    dtype = _dtype_of(a)
    if dtype.kind != "f":
        a, b = asdtype(a, np.dtype(np.float64)), asdtype(b, np.dtype(np.float64))
    return div_p.bind(a, b)


def power(a: Any, b: Any) -> Any:
    a, b = promote(a, b)
    if _dtype_of(a).kind != "f":
        raise JitgradError("power of integers is not supported; cast to float first")
    return pow_p.bind(a, b)


def _binary_vjp(p, rule):
    @p.def_vjp
    def _vjp(cts, outs, ins):
        a, b = ins
        ga, gb = rule(cts[0], outs[0], a, b)
        return [None if ga is None else unbroadcast(ga, a.shape),
                None if gb is None else unbroadcast(gb, b.shape)]


_binary_vjp(add_p, lambda g, y, a, b: (g, g))
_binary_vjp(sub_p, lambda g, y, a, b: (g, neg(g)))
_binary_vjp(mul_p, lambda g, y, a, b: (g * b, g * a))
_binary_vjp(div_p, lambda g, y, a, b: (g / b, neg(g) * y / b))
_binary_vjp(pow_p, lambda g, y, a, b: (
    g * b * power(a, b - 1.0),
    g * y * where(a > 0, log(where(a > 0, a, 1.0)), 0.0)))


def _maximum_rule(g, y, a, b):
    half = g * 0.5
    tie = eq(a, b)
    return (where(gt(a, b), g, where(tie, half, 0.0)),
            where(gt(b, a), g, where(tie, half, 0.0)))


_binary_vjp(maximum_p, _maximum_rule)


# ---------------------------------------------------------------- where

where_p = primitive("where", "elementwise")
where_p.def_impl(np.where)


@where_p.def_shape
def _where_shape(c, a, b):
    if c[1] != np.dtype(bool):
        raise JitgradError(f"condition must be boolean, got {c[1]}")
    if a[1] != b[1]:
        raise JitgradError(f"branches have different dtypes {a[1]} and {b[1]}")
    return broadcast_shapes(c[0], a[0], b[0]), a[1]


@where_p.def_vjp
def _where_vjp(cts, outs, ins):
    c, a, b = ins
    g = cts[0]
    return [None, unbroadcast(where(c, g, 0.0), a.shape),
            unbroadcast(where(c, 0.0, g), b.shape)]


def where(cond: Any, a: Any, b: Any) -> Any:
    """Elementwise cond ? a : b, broadcasting all three (numpy's where)."""
    c = asdtype(cond, np.dtype(bool))
    a, b = promote(a, b)
    return where_p.bind(c, a, b)


# ---------------------------------------------------------------- scalar expressions

# A branch-free select: `a if c else b` compiles to a branch that a random mask
# (relu's backward) mispredicts half the time, ~4x slower.
_SELECT = '''
@intrinsic
def _select(typingctx, c, a, b):
    def codegen(context, builder, signature, args):
        cond = context.cast(builder, args[0], signature.args[0], types.boolean)
        other = context.cast(builder, args[2], signature.args[2], signature.return_type)
        return builder.select(cond, args[1], other)
    return a(c, a, b), codegen
'''

# relu and maximum are numpy's maximum: NaN propagates (`x if x > 0 else 0` made relu(NaN)
# 0, hiding a NaN from the loss and from check_finite) and on a tie the second operand wins.
# relu is `0 if x < 0 else x` (one maxss/maxps, NaN passing through) plus 0, which turns
# -0.0 into numpy's 0.0 (so 1/relu(-0.0) is +inf) and changes nothing else; LLVM keeps the
# addition (no fast-math). Measured as fast as the old form, vectorised or not.
_RELU = '''
@njit(inline="always")
def _relu(x, zero):
    return (zero if x < zero else x) + zero
'''

_MAXIMUM = '''
@njit(inline="always")
def _maximum(a, b):
    return a if (a > b or a != a) else b
'''

_SIGMOID = '''
@njit(inline="always")
def _sigmoid(x):
    if x >= 0:
        return 1 / (1 + np.exp(-x))
    e = np.exp(x)
    return e / (1 + e)
'''

for _p, _op in ((add_p, "+"), (sub_p, "-"), (mul_p, "*"), (div_p, "/"), (pow_p, "**"),
                (lt_p, "<"), (le_p, "<="), (gt_p, ">"), (ge_p, ">="), (eq_p, "=="),
                (ne_p, "!=")):
    _p.def_scalar(f"({{0}} {_op} {{1}})")
for _p, _fn in ((exp_p, "np.exp"), (log_p, "np.log"), (tanh_p, "np.tanh"),
                (sqrt_p, "np.sqrt"), (abs_p, "abs"), (floor_p, "np.floor"),
                (ceil_p, "np.ceil"), (round_p, "np.rint")):
    _p.def_scalar(f"{_fn}({{0}})")
neg_p.def_scalar("(-{0})")
# Numba's np.sign(-0.0) is -0.0, numpy's 0.0: adding 0 gives numpy's (NaN stays NaN).
sign_p.def_scalar("(np.sign({0}) + {zero})")
relu_p.def_scalar("_relu({0}, {zero})", _RELU)
sigmoid_p.def_scalar("_sigmoid({0})", _SIGMOID)
maximum_p.def_scalar("_maximum({0}, {1})", _MAXIMUM)
where_p.def_scalar("_select({0}, {1}, {2})", _SELECT)


def _read_unbroadcast(ins, producer):
    """ins reading the sources of its broadcast_to operands (an elementwise operation
    broadcasts them itself, in its loop, without the copy) where the result's shape stays."""
    inputs = tuple(producer[v].inputs[0] if producer.get(v) is not None
                   and producer[v].prim is S.broadcast_to_p else v for v in ins.inputs)
    if inputs == ins.inputs:
        return None
    if broadcast_shapes(*(v.shape for v in inputs)) != ins.outputs[0].shape:
        return None
    return dataclasses.replace(ins, inputs=inputs)


@mul_p.def_simplify
def _times_one(ins, producer):
    """x for `x * 1` (the seed of every gradient) when that changes no shape or dtype;
    else broadcasts read in the loop."""
    for one, x in (ins.inputs, ins.inputs[::-1]):
        p = producer.get(one)
        if (is_const(p) and p.kw["value"] == 1
                and x.shape == ins.outputs[0].shape and x.dtype == ins.outputs[0].dtype):
            return x
    return _read_unbroadcast(ins, producer)


for _p in (add_p, sub_p, div_p, pow_p, maximum_p, lt_p, le_p, gt_p, ge_p, eq_p, ne_p, where_p):
    _p.def_simplify(_read_unbroadcast)
