"""numpy's elementwise maths beyond arithmetic: one declaration per primitive.

Each row below declares a primitive whole: numpy reference, shape rule, VJP (written in
primitives, so every order works) and scalar expression (so fusion inlines it into one
loop with its neighbours). Functions that are as fast composed from existing primitives
are compositions (they fuse the same way): square, reciprocal, negative, positive, fabs,
absolute, deg2rad/radians, rad2deg/degrees, nan_to_num, clip (true_divide is numpy's
divide). The libm functions are called through vecmath.py, so that fused loops vectorise.

Conventions at kinks (as elementwise.py's):
- minimum, fmin, fmax at a tie send half of the gradient to each argument (autograd's
  balanced_eq, as maximum does); fmin/fmax send all of it to the argument that is not NaN;
- remainder(a, b) = a - floor(a / b) * b: its gradient is (1, -floor(a / b)), the floor
  behind stop_gradient (its own derivative is zero where it is defined);
- floor_divide is piecewise constant: a requested gradient raises UndefinedGradientError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer
from . import elementwise as E
from . import vecmath as V

_LN2 = math.log(2.0)
_LN10 = math.log(10.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _unary_math(name: str, ref: Any, libm: str, vjp: Any):
    """A float-valued unary primitive computed by libm's `libm` (vectorised by libmvec in
    fused loops, see vecmath.py): vjp(g, y, x) -> the gradient (y the result)."""
    p, fn = E._unary(name, ref)
    p.def_vjp(lambda cts, outs, ins: [vjp(cts[0], outs[0], ins[0])])
    p.def_scalar(f"vm_{libm}({{0}})", V.helper(f"vm_{libm}"))
    return p, fn


def _erf_ref(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[x.dtype])(x)


# ---------------------------------------------------------------- unary

sin_p, sin = _unary_math("sin", np.sin, "sin", lambda g, y, x: g * cos(x))
cos_p, cos = _unary_math("cos", np.cos, "cos", lambda g, y, x: E.neg(g * sin(x)))
tan_p, tan = _unary_math("tan", np.tan, "tan", lambda g, y, x: g * (1.0 + y * y))
arcsin_p, arcsin = _unary_math("arcsin", np.arcsin, "asin",
                               lambda g, y, x: g / E.sqrt(1.0 - x * x))
arccos_p, arccos = _unary_math("arccos", np.arccos, "acos",
                               lambda g, y, x: E.neg(g) / E.sqrt(1.0 - x * x))
arctan_p, arctan = _unary_math("arctan", np.arctan, "atan",
                               lambda g, y, x: g / (1.0 + x * x))
sinh_p, sinh = _unary_math("sinh", np.sinh, "sinh", lambda g, y, x: g * cosh(x))
cosh_p, cosh = _unary_math("cosh", np.cosh, "cosh", lambda g, y, x: g * sinh(x))
arcsinh_p, arcsinh = _unary_math("arcsinh", np.arcsinh, "asinh",
                                 lambda g, y, x: g / E.sqrt(x * x + 1.0))
arccosh_p, arccosh = _unary_math("arccosh", np.arccosh, "acosh",
                                 lambda g, y, x: g / E.sqrt(x * x - 1.0))
arctanh_p, arctanh = _unary_math("arctanh", np.arctanh, "atanh",
                                 lambda g, y, x: g / (1.0 - x * x))
exp2_p, exp2 = _unary_math("exp2", np.exp2, "exp2", lambda g, y, x: g * y * _LN2)
expm1_p, expm1 = _unary_math("expm1", np.expm1, "expm1",
                             lambda g, y, x: g * (y + 1.0))
log2_p, log2 = _unary_math("log2", np.log2, "log2",
                           lambda g, y, x: g / (x * _LN2))
log10_p, log10 = _unary_math("log10", np.log10, "log10",
                             lambda g, y, x: g / (x * _LN10))
log1p_p, log1p = _unary_math("log1p", np.log1p, "log1p",
                             lambda g, y, x: g / (1.0 + x))
erf_p, erf = _unary_math("erf", _erf_ref, "erf",
                         lambda g, y, x: g * _TWO_OVER_SQRT_PI * E.exp(E.neg(x * x)))
erf.__doc__ = "The error function 2/sqrt(pi) * integral of exp(-t^2) from 0 to x."


# ---------------------------------------------------------------- unary compositions

def _float(x: Any) -> Any:
    return E.asdtype(x, E._float_dtype(x))


def square(x: Any) -> Any:
    """x * x (numpy's square): one multiplication, fused with its neighbours."""
    x = x if isinstance(x, Tracer) else np.asarray(x)
    return E.mul(x, x)


def reciprocal(x: Any) -> Any:
    x = x if isinstance(x, Tracer) else np.asarray(x)
    if E._dtype_of(x).kind != "f":
        raise JitgradError(f"reciprocal of {E._dtype_of(x)} truncates in numpy; cast to "
                           "float first")
    return E.div(1.0, x)


def positive(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def fabs(x: Any) -> Any:
    """|x| as a float (numpy's fabs casts integers to float64)."""
    return E.abs(_float(x))


def deg2rad(x: Any) -> Any:
    return E.mul(_float(x), math.pi / 180.0)


def rad2deg(x: Any) -> Any:
    return E.mul(_float(x), 180.0 / math.pi)


def nan_to_num(x: Any, copy: bool = True, nan: float = 0.0, posinf: float | None = None,
               neginf: float | None = None) -> Any:
    """NaN -> nan, +inf -> posinf, -inf -> neginf (default: the dtype's extremes); the
    gradient flows where x is finite."""
    x = x if isinstance(x, Tracer) else np.asarray(x)
    if x.dtype.kind != "f":
        return x
    info = np.finfo(x.dtype)
    hi = float(info.max) if posinf is None else float(posinf)
    lo = float(info.min) if neginf is None else float(neginf)
    out = E.where(E.eq(x, math.inf), hi, E.where(E.eq(x, -math.inf), lo, x))
    return E.where(E.ne(x, x), float(nan), out)


def clip(a: Any, a_min: Any = None, a_max: Any = None, out: Any = None, *,
         min: Any = None, max: Any = None) -> Any:
    """numpy's clip: minimum(maximum(a, a_min), a_max); either bound may be None, a scalar
    or an array (broadcast). At a bound the gradient is shared as maximum/minimum share it."""
    if out is not None:
        raise JitgradError("clip(out=...) is not supported on traced values")
    lo = a_min if a_min is not None else min
    hi = a_max if a_max is not None else max
    if lo is None and hi is None:
        raise JitgradError("clip needs a_min or a_max")
    result = a if isinstance(a, Tracer) else np.asarray(a)
    if lo is not None:
        result = E.maximum(result, lo)
    if hi is not None:
        result = minimum(result, hi)
    return result


# ---------------------------------------------------------------- binary

def _selection(name: str, keeps_a: str) -> str:
    """The scalar helper choosing a where `keeps_a` holds, else b."""
    return f'''
@njit(inline="always")
def {name}(a, b):
    return a if ({keeps_a}) else b
'''


_MINIMUM = _selection("_minimum", "a < b or a != a")  # NaN propagates, as in numpy
_FMAX = _selection("_fmax", "a > b or b != b")  # NaN is ignored
_FMIN = _selection("_fmin", "a < b or b != b")


def _binary_math(name: str, ref: Any, scalar: str, rule: Any, *, helpers: str = "",
                 grad: str = "rule", floats: bool = True, bools: bool = True):
    """A binary primitive broadcasting as numpy does; rule(g, y, a, b) -> (ga, gb), summed
    back over the broadcast axes. floats: integers are computed in float64 (numpy's
    promotion for these ufuncs); bools: booleans are valid operands."""
    p = E._binary(name, ref, grad=grad)

    @p.def_shape
    def _shape(a, b):
        if a[1] != b[1]:
            raise JitgradError(f"operands have different dtypes {a[1]} and {b[1]}")
        if not bools and a[1] == np.dtype(bool):
            raise JitgradError(f"{name} of booleans is not supported")
        return E.broadcast_shapes(a[0], b[0]), a[1]

    if rule is not None:
        E._binary_vjp(p, rule)
    p.def_scalar(scalar, helpers)

    def fn(a: Any, b: Any) -> Any:
        a, b = E.promote(a, b)
        if floats and E._dtype_of(a).kind != "f":
            a, b = (E.asdtype(v, np.dtype(np.float64)) for v in (a, b))
        if not isinstance(a, Tracer) and not isinstance(b, Tracer):
            a, b = np.asarray(a), np.asarray(b)
        return p.bind(a, b)

    fn.__name__ = name
    fn.__doc__ = f"Elementwise numpy.{name}, broadcasting."
    return p, fn


def _tie_rule(pick_a, pick_b):
    """The gradient of a selection: all of it to the chosen argument, half each at a tie."""
    def rule(g, y, a, b):
        half = g * 0.5
        tie = E.eq(a, b)
        return (E.where(pick_a(a, b), g, E.where(tie, half, 0.0)),
                E.where(pick_b(a, b), g, E.where(tie, half, 0.0)))
    return rule


def _nan_aware(rule):
    """fmin/fmax: where one argument is NaN the result is the other one, with its gradient."""
    def nan_rule(g, y, a, b):
        ga, gb = rule(g, y, a, b)
        a_nan, b_nan = E.ne(a, a), E.ne(b, b)
        return (E.where(b_nan, g, E.where(a_nan, 0.0, ga)),
                E.where(a_nan, E.where(b_nan, 0.0, g), E.where(b_nan, 0.0, gb)))
    return nan_rule


minimum_p, minimum = _binary_math("minimum", np.minimum, "_minimum({0}, {1})",
                                  _tie_rule(E.lt, E.gt), helpers=_MINIMUM, floats=False)
fmax_p, fmax = _binary_math("fmax", np.fmax, "_fmax({0}, {1})",
                            _nan_aware(_tie_rule(E.gt, E.lt)), helpers=_FMAX, floats=False)
fmin_p, fmin = _binary_math("fmin", np.fmin, "_fmin({0}, {1})",
                            _nan_aware(_tie_rule(E.lt, E.gt)), helpers=_FMIN, floats=False)
# numpy's algorithm, written without branches so that the loop vectorises: the larger
# operand plus log1p(exp(-|a - b|)); where a - b is NaN (equal infinities, a NaN) a + b.
_LOGADDEXP = V.helper("vm_exp", "vm_log1p", "vm_exp2") + '''


@njit(inline="always")
def _logaddexp(a, b):
    d = a - b
    r = (a if d > 0 else b) + vm_log1p(vm_exp(-abs(d)))
    return r if d == d else a + b


@njit(inline="always")
def _logaddexp2(a, b):
    d = a - b
    r = (a if d > 0 else b) + vm_log1p(vm_exp2(-abs(d))) * 1.4426950408889634  # 1 / ln 2
    return r if d == d else a + b
'''
logaddexp_p, logaddexp = _binary_math(
    "logaddexp", np.logaddexp, "_logaddexp({0}, {1})",
    lambda g, y, a, b: (g * E.exp(a - y), g * E.exp(b - y)), helpers=_LOGADDEXP)
logaddexp2_p, logaddexp2 = _binary_math(
    "logaddexp2", np.logaddexp2, "_logaddexp2({0}, {1})",
    lambda g, y, a, b: (g * exp2(a - y), g * exp2(b - y)), helpers=_LOGADDEXP)
arctan2_p, arctan2 = _binary_math(
    "arctan2", np.arctan2, "vm_atan2({0}, {1})",
    lambda g, y, a, b: (g * b / (a * a + b * b), E.neg(g) * a / (a * a + b * b)),
    helpers=V.helper("vm_atan2"))
hypot_p, hypot = _binary_math("hypot", np.hypot, "vm_hypot({0}, {1})",
                              lambda g, y, a, b: (g * a / y, g * b / y),
                              helpers=V.helper("vm_hypot"))
# Numba's % and // follow Python's sign rule, as numpy's remainder and floor_divide do
# (integer division by zero gives 0 in both).
floor_divide_p, floor_divide = _binary_math("floor_divide", np.floor_divide, "({0} // {1})",
                                            None, grad="undefined", floats=False, bools=False)
remainder_p, remainder = _binary_math(
    "remainder", np.remainder, "({0} % {1})",
    lambda g, y, a, b: (g, E.neg(g) * E.stop_gradient(floor_divide(a, b))), floats=False,
    bools=False)


def divmod_(a: Any, b: Any) -> tuple[Any, Any]:
    """(a // b, a % b), as numpy's divmod."""
    return floor_divide(a, b), remainder(a, b)
