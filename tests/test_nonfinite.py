"""NaN, ±Inf, -0.0, huge and tiny values: compiled code treats them as numpy does.

The numpy reference implementation of each primitive (its `def_impl`, run by the
interpreter) is the oracle. A forward-only property test draws special values for
every registered primitive, for the fused kernels (bias + activation, GEMM
accumulation, softmax cross-entropy with its gradient in one pass) and for the
optimizer updates, and requires the same NaN and ±Inf placement compiled and
interpreted, and finite values within the tolerances of the other tests.

Each case is compiled once per dtype and shared by all its examples (only the values
change, never the signature). A last property runs tests/test_properties.py's random
programs (compositions, fused chains) on special values. Examples per case, and random
programs: JITGRAD_PROPERTY_EXAMPLES / 8 (default 25); JITGRAD_TEST_FULL=1 runs
JITGRAD_PROPERTY_EXAMPLES (default 200). Run once with 1,000 random programs: passed.

"huge" is large enough that a product of two overflows and small enough that a sum of
a few dozen does not: where a sum overflows depends on the order of its terms, which
numpy (pairwise) and the kernels (eight running sums, float64 for float32) choose
differently, and neither order is the right one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import programs
from test_properties import run as run_program

import jitgrad as jg
from jitgrad.compiler import bf16_provider
from jitgrad.frontend import tree
from jitgrad.frontend.core import registry
from jitgrad.frontend.ops.precision import round_to_bf16

FULL = bool(os.environ.get("JITGRAD_TEST_FULL"))
_PROPERTY = int(os.environ.get("JITGRAD_PROPERTY_EXAMPLES", "200"))
EXAMPLES = _PROPERTY if FULL else max(_PROPERTY // 8, 5)

HUGE = {np.float32: 1e35, np.float64: 1e300}
TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-10, 1e-12)}  # (rtol, atol) as elsewhere
FLOATS = (np.float32, np.float64)


def specials(dtype: Any) -> list[float]:
    """The values numerical code gets wrong: NaN, both infinities, both zeros, the edges of
    the normal range, a subnormal, and huge values of both signs."""
    fi = np.finfo(dtype)
    huge = HUGE[np.dtype(dtype).type]
    return [np.nan, np.inf, -np.inf, -0.0, 0.0, huge, -huge, float(fi.tiny),
            -float(fi.tiny), float(fi.smallest_subnormal), 1.0, -1.0]


# ---------------------------------------------------------------- strategies

def finite(v: float) -> bool:
    return bool(np.isfinite(v))


def moderate(v: float) -> bool:
    """Not huge: for chains of sums, where a huge value times an ordinary one, summed,
    could overflow in one order of the terms and not in another."""
    return not abs(v) >= 1e30


def not_huge(v: float) -> bool:
    """Infinities and NaN, but no huge finite value: BLAS's fused multiply-add keeps an
    overflowing product (huge · huge) exact before adding an infinity (-inf), where
    numpy's einsum and MKL's separate multiply overflow first (NaN). Cases that sum
    through a GEMM leave huge values out."""
    return not np.isfinite(v) or abs(v) < 1e30


def in_int_range(v: float) -> bool:
    return finite(v) and moderate(v)


@st.composite
def special_arrays(draw, shape: tuple[int, ...], dtype: Any,
                   keep: Callable[[float], bool] | None = None) -> np.ndarray:
    """An array mixing special values with ordinary ones; sometimes a whole line along an
    axis holds one special value (a row of -inf for logsumexp, of NaN for max). keep
    selects the special values allowed."""
    pool = [v for v in specials(dtype) if keep is None or keep(v)]
    width = 32 if dtype == np.float32 else 64
    ordinary = st.floats(-20, 20, width=width, allow_subnormal=False)
    n = int(np.prod(shape, dtype=np.int64))
    values = draw(st.lists(st.one_of(st.sampled_from(pool), ordinary), min_size=n, max_size=n))
    x = np.array(values, dtype=dtype).reshape(shape)
    if x.ndim and draw(st.booleans()):
        axis = draw(st.integers(0, x.ndim - 1))
        index = draw(st.integers(0, x.shape[axis] - 1))
        np.moveaxis(x, axis, 0)[index] = draw(st.sampled_from(pool))
    return x


def int_arrays(shape: tuple[int, ...], lo: int, hi: int, dtype: Any = np.int64):
    n = int(np.prod(shape, dtype=np.int64))
    return st.lists(st.integers(lo, hi - 1), min_size=n, max_size=n).map(
        lambda v: np.array(v, dtype=dtype).reshape(shape))


def extreme_ints(shape: tuple[int, ...]):
    """int64 values including both ends of the range (overflow wraps, as in numpy)."""
    ii = np.iinfo(np.int64)
    n = int(np.prod(shape, dtype=np.int64))
    elem = st.one_of(st.sampled_from([int(ii.min), int(ii.max), 0, -1, 1]),
                     st.integers(-1000, 1000))
    return st.lists(elem, min_size=n, max_size=n).map(
        lambda v: np.array(v, dtype=np.int64).reshape(shape))


def bools(shape: tuple[int, ...]):
    n = int(np.prod(shape, dtype=np.int64))
    return st.lists(st.booleans(), min_size=n, max_size=n).map(
        lambda v: np.array(v, dtype=bool).reshape(shape))


# ---------------------------------------------------------------- cases

@dataclass
class Case:
    """fn(*inputs) built from primitives; inputs(dtype) draws its arguments. Magnitude
    (optional) gives, for results that sum terms, the same computation on |terms|:
    rounding in another order may differ by rtol times that. zero_signs: the sign of a
    zero result must be numpy's too (1/x turns it into ±inf); not for reductions and
    matmul, where it depends on the order of the terms (numpy's max keeps the last of
    tied zeros, its sum starts from the first term)."""

    fn: Callable[..., Any]
    inputs: Callable[[Any], Any]
    dtypes: tuple[Any, ...] = FLOATS
    magnitude: Callable[..., Any] | None = None
    zero_signs: bool = True
    # an optional library the Numba lowering calls (MKL's bfloat16 GEMM): skipped without it
    requires: Callable[[], bool] | None = None
    compiled: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.magnitude is not None:  # a sum of terms
            self.zero_signs = False


P = registry
X = (3, 4)
W = (2, 40)  # rows longer than a vector register (8 or 16 lanes) times LLVM's unrolling


def floats(*shapes: tuple[int, ...], keep: Callable[[float], bool] | None = None):
    return lambda dt: st.tuples(*(special_arrays(s, dt, keep) for s in shapes))


def unary(name: str) -> Case:
    return Case(lambda x: P[name].bind(x), floats(X))


def binary(name: str) -> Case:
    return Case(lambda a, b: P[name].bind(a, b), floats(X, X[1:]))


def _abs_args(*xs: Any) -> list[Any]:
    return [np.abs(x) if np.asarray(x).dtype.kind == "f" else x for x in xs]


def summing(name: str, shape: tuple[int, ...] = X, **params: Any) -> Case:
    """A primitive that sums terms: its tolerance scales with the sum of |terms|."""
    return Case(lambda *xs: P[name].bind(*xs, **params), floats(shape),
                magnitude=lambda *xs: P[name].impl(*_abs_args(*xs), **params))


def _consts(x: Any) -> tuple[Any, ...]:
    # Constants are literals in fused loops and 0-d results of their own.
    vals = [np.asarray(v, x.dtype) for v in specials(x.dtype)]
    return tuple(x + v for v in vals) + tuple(vals)


def _cast(to: Any) -> Callable[[Any], Any]:
    return lambda x: P["cast"].bind(x, dtype=np.dtype(to))


def _labels(rows: int, classes: int):
    return int_arrays((rows,), 0, classes)


def ordered(fn: Callable[..., Any], inputs: Callable[[Any], Any]) -> Case:
    """A reduction whose zero signs depend on the order of its terms."""
    return Case(fn, inputs, zero_signs=False)


def _sce_inputs(dt):
    return st.tuples(special_arrays(X, dt), _labels(X[0], X[1]))


IDX5 = int_arrays((5,), -3, 3)     # rows of a (3, 4) array, negative ones from the end
IDX32 = int_arrays((3, 2), -4, 4)  # columns of a (3, 4) array
SLICE = ((0, 3, 2), (1, 4, 1))     # x[0:3:2, 1:4]: shape (2, 3)


def _optimizer(opt: Any) -> Case:
    """opt.update on a parameter, its gradient and state drawn with special values; the
    hyperparameters are Python floats, as train_step passes them."""
    keys = sorted(opt.init({"w": np.zeros(1)}))

    def fn(p, g, state, hyper):
        return opt.update({"w": p}, {"w": g}, {k: {"w": s} for k, s in state.items()}, hyper)

    def inputs(dt):
        # Adam's v, a running mean of squares, is never negative
        state = st.fixed_dictionaries({k: special_arrays(X, dt).map(np.abs) if k == "v"
                                       else special_arrays(X, dt) for k in keys})
        return st.tuples(special_arrays(X, dt), special_arrays(X, dt), state,
                         st.just(opt.hyper(3)))
    return Case(fn, inputs)


def _words(dtype: Any):
    """Unsigned integers of dtype, both ends of the range included."""
    top = int(np.iinfo(dtype).max)
    return st.one_of(st.sampled_from([0, 1, top - 1, top]), st.integers(0, top))


def _unsigned(shape: tuple[int, ...], dtype: Any):
    n = int(np.prod(shape, dtype=np.int64))
    return st.lists(_words(dtype), min_size=n, max_size=n).map(
        lambda v: np.array(v, dtype=dtype).reshape(shape))


KEYS = _unsigned((2,), np.uint32)  # any key: random draws hold no special values, but
UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)  # every word must hash as numpy's


def _draw(name: str, **params: Any) -> Case:
    """A random primitive of the key alone, at the width where loops vectorise; the second
    input only carries the dtype of the result."""
    return Case(lambda k, like: P[name].bind(k, shape=W, dtype=like.dtype, **params),
                lambda dt: st.tuples(KEYS, st.just(np.zeros((), dt))))
@jg.custom_vjp
def _custom_tanh(x):
    return jg.tanh(x)


# forward only here: the forward function is ordinary code, the instruction the identity
_custom_tanh.defvjp(lambda x: (jg.tanh(x), jg.tanh(x)), lambda t, g: (g * (1 - t * t),))


def _mlp(x, y, W0, b0, W1, b1):
    return jg.nn.mlp_loss({"W0": W0, "b0": b0, "W1": W1, "b1": b1}, x, y)


VECMATH_UNARY = ("sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "arcsinh",
                 "arccosh", "arctanh", "exp2", "expm1", "log2", "log10", "log1p", "erf")

def _conv_cases() -> dict[str, Case]:
    geom = {"stride": (2, 1), "padding": (1, 0, 1, 1), "dilation": (1, 2), "groups": 1}
    xs, ws, gs = (2, 2, 5, 5), (3, 2, 3, 2), (2, 3, 2, 5)

    def conv(x, w, *b, relu=False):
        return P["conv2d"].bind(x, w, *b, relu=relu, **geom)

    def summed(name: str, fn, *shapes, keep=None) -> Case:
        return Case(fn, floats(*shapes, keep=keep), magnitude=lambda *a: fn(*_abs_args(*a)))

    # every convolution sums through a GEMM (MKL where it is installed): not_huge
    pool = {"kernel": (3, 2), "stride": (2, 2), "padding": (1, 1)}
    return {
        "conv2d": summed("conv2d", conv, xs, ws, keep=not_huge),
        "conv2d/bias-relu": Case(lambda x, w, b: conv(x, w, b, relu=True),
                                 floats(xs, ws, (3,), keep=not_huge), zero_signs=False,
                                 magnitude=lambda x, w, b: conv(*_abs_args(x, w, b))),
        "conv2d_input_grad": summed("conv2d_input_grad", lambda g, w: P[
            "conv2d_input_grad"].bind(g, w, hw=xs[2:], **geom), gs, ws, keep=not_huge),
        "conv2d_weight_grad": summed("conv2d_weight_grad", lambda x, g: P[
            "conv2d_weight_grad"].bind(x, g, k=ws[2:], **geom), xs, gs, keep=not_huge),
        "max_pool2d": ordered(lambda x: P["max_pool2d"].bind(x, **pool), floats(xs)),
        "max_pool2d_grad": Case(
            lambda g, i: P["max_pool2d_grad"].bind(g, i, hw=(4, 4)),
            lambda dt: st.tuples(special_arrays((1, 2, 2, 3), dt),
                                 int_arrays((1, 2, 2, 3), 0, 16)),
            magnitude=lambda g, i: P["max_pool2d_grad"].impl(np.abs(g), i, hw=(4, 4))),
        "avg_pool2d": summed("avg_pool2d", lambda x: P["avg_pool2d"].bind(x, **pool), xs),
        "avg_pool2d_grad": summed("avg_pool2d_grad", lambda g: P["avg_pool2d_grad"].bind(
            g, hw=xs[2:], **pool), (2, 2, 3, 3)),
    }


CASES: dict[str, Case] = {
    # elementwise
    **{n: unary(n) for n in ("neg", "exp", "log", "tanh", "sigmoid", "sqrt", "abs", "relu",
                             "floor", "ceil", "round", "sign", "stop_gradient")},
    **{n: binary(n) for n in ("add", "sub", "mul", "div", "pow", "maximum",
                              "lt", "le", "gt", "ge", "eq", "ne")},
    "relu/int64": Case(lambda x: P["relu"].bind(x), lambda dt: st.tuples(extreme_ints(X)),
                       dtypes=(np.int64,)),
    "maximum/int64": Case(lambda a, b: P["maximum"].bind(a, b),
                          lambda dt: st.tuples(extreme_ints(X), extreme_ints(X[1:])),
                          dtypes=(np.int64,)),
    "where": Case(lambda c, a, b: P["where"].bind(c, a, b),
                  lambda dt: st.tuples(bools(X), special_arrays(X, dt),
                                       special_arrays((1, 4), dt))),
    "const": Case(_consts, floats(X)),
    "cast": Case(_cast(np.float32), floats(X), dtypes=(np.float64,)),  # overflows to inf
    "cast/f64": Case(_cast(np.float64), floats(X), dtypes=(np.float32,)),
    "round_bf16": Case(lambda x: P["round_bf16"].bind(x), floats(W), dtypes=(np.float32,)),
    "cast/bool": Case(_cast(bool), floats(X)),                  # NaN is true, -0.0 false
    "cast/from-bool": Case(lambda c: P["cast"].bind(c, dtype=np.dtype(np.float64)),
                           lambda dt: st.tuples(bools(X)), dtypes=(np.float64,)),
    # A float that is NaN, infinite or out of the integer range has no integer value:
    # numpy's cast says "invalid value" and its result is the platform's (C leaves it
    # undefined), so the finite values in range are the ones to agree on.
    "cast/int64": Case(_cast(np.int64), floats(X, keep=in_int_range)),
    # reductions
    "sum": summing("sum", axes=(1,), keepdims=False),
    "sum/axis0": summing("sum", axes=(0,), keepdims=True),
    "sum/all": summing("sum", axes=(0, 1), keepdims=False),
    "max": ordered(lambda x: P["max"].bind(x, axes=(1,), keepdims=False), floats(X)),
    "max/axis0": ordered(lambda x: P["max"].bind(x, axes=(0,), keepdims=False), floats(X)),
    "max/all": ordered(lambda x: P["max"].bind(x, axes=(0, 1), keepdims=True), floats(X)),
    "argmax": Case(lambda x: P["argmax"].bind(x, axis=1), floats(X)),
    "argmax/axis0": Case(lambda x: P["argmax"].bind(x, axis=0), floats(X)),
    "max_argmax": ordered(lambda x: P["max_argmax"].bind(x, axis=1), floats(X)),
    "max_argmax/axis0": ordered(lambda x: P["max_argmax"].bind(x, axis=0), floats(X)),
    "logsumexp": ordered(lambda x: P["logsumexp"].bind(x, axes=(1,), keepdims=False), floats(X)),
    "logsumexp/axis0": ordered(lambda x: P["logsumexp"].bind(x, axes=(0,), keepdims=True),
                            floats(X)),
    # transformers (issue 21): statistics and row sums depend on the order of their terms
    "layer_norm": ordered(lambda x, w, b: P["layer_norm"].bind(x, w, b, eps=1e-5),
                          floats(X, X[1:], X[1:])),
    "layer_norm_grad": ordered(lambda g, x, w, m, r: P["layer_norm_grad"].bind(g, x, w, m, r),
                               floats(X, X, X[1:], X[:1], X[:1])),
    **{f"{name}{'/tanh' if approx == 'tanh' else ''}": Case(
        lambda x, n=name, a=approx: P[n].bind(x, approximate=a), floats(X))
       for name in ("gelu", "gelu_grad") for approx in ("none", "tanh")},
    "masked_softmax": ordered(lambda s: P["masked_softmax"].bind(s, scale=0.5, causal=True),
                              floats(X)),
    "masked_softmax/mask": ordered(
        lambda s, m: P["masked_softmax"].bind(s, m, scale=1.0, causal=False), floats(X, X[1:])),
    "masked_softmax_grad": ordered(lambda g, p: P["masked_softmax_grad"].bind(g, p, scale=2.0),
                                   floats(X, X)),
    # matmul (BLAS)
    "matmul": Case(lambda a, b: P["matmul"].bind(a, b, ta=False, tb=False),
                   floats(X, (4, 2)),
                   magnitude=lambda a, b: np.abs(a) @ np.abs(b)),
    "matmul/tt": Case(lambda a, b: P["matmul"].bind(a, b, ta=True, tb=True),
                      floats((4, 3), (2, 4)),
                      magnitude=lambda a, b: np.abs(a).T @ np.abs(b).T),
    "matmul/batched": Case(lambda a, b: P["matmul"].bind(a, b, ta=False, tb=True),
                           floats((2, 3, 4), (1, 2, 4), keep=not_huge),
                           magnitude=lambda a, b: np.abs(a) @ np.swapaxes(np.abs(b), -1, -2)),
    # bfloat16 storage and GEMM (precision="bf16" on CPUs with bfloat16 instructions and MKL)
    "to_bf16": Case(lambda x: P["to_bf16"].bind(x), floats(W), dtypes=(np.float32,)),
    "matmul_bf16": Case(lambda a, b: P["matmul_bf16"].bind(P["to_bf16"].bind(a),
                                                           P["to_bf16"].bind(b), ta=False, tb=True),
                        floats(X, (2, 4)), dtypes=(np.float32,),
                        magnitude=lambda a, b: np.abs(round_to_bf16(a)) @ np.abs(
                            round_to_bf16(b)).T, requires=bf16_provider.available),
    "matmul_sum": Case(lambda a, b: P["matmul_sum"].bind(a, b, ta=True, tb=False, batch=()),
                       floats((2, 4, 3), (2, 4, 2)),
                       magnitude=lambda a, b: np.sum(np.swapaxes(np.abs(a), -1, -2)
                                                     @ np.abs(b), axis=0)),
    # softmax cross-entropy: loss, gradient, and both in one fused pass
    "softmax_cross_entropy": ordered(lambda z, y: P["softmax_cross_entropy"].bind(z, y),
                                  _sce_inputs),
    "softmax_cross_entropy_grad": ordered(
        lambda z, y: P["softmax_cross_entropy_grad"].bind(z, y), _sce_inputs),
    "softmax_cross_entropy/fused": ordered(
        lambda z, y: (P["softmax_cross_entropy"].bind(z, y),
                      P["softmax_cross_entropy_grad"].bind(z, y)), _sce_inputs),
    # data movement
    "reshape": Case(lambda x: P["reshape"].bind(x, shape=(4, 3)), floats(X)),
    "transpose": Case(lambda x: P["transpose"].bind(x, perm=(1, 0)), floats(X)),
    "broadcast_to": Case(lambda x: P["broadcast_to"].bind(x, shape=X), floats((4,))),
    "concatenate": Case(lambda a, b: P["concatenate"].bind(a, b, axis=0), floats(X, (1, 4))),
    "slice": Case(lambda x: P["slice"].bind(x, index=SLICE), floats(X)),
    "pad_slice": Case(lambda g: P["pad_slice"].bind(g, shape=X, index=SLICE), floats((2, 3))),
    "diagonal": Case(lambda x: P["diagonal"].bind(x, offset=1, axis1=0, axis2=1), floats(X)),
    "embed_diagonal": Case(lambda g: P["embed_diagonal"].bind(g, shape=X, offset=1, axis1=0,
                                                              axis2=1), floats((3,))),
    "gather": Case(lambda x, i: P["gather"].bind(x, i),
                   lambda dt: st.tuples(special_arrays(X, dt), IDX5)),
    "scatter_add": Case(lambda g, i: P["scatter_add"].bind(g, i, n=3),
                        lambda dt: st.tuples(special_arrays((5, 4), dt), IDX5),
                        magnitude=lambda g, i: P["scatter_add"].impl(np.abs(g), i, n=3)),
    "take_along_axis": Case(lambda x, i: P["take_along_axis"].bind(x, i, axis=1),
                            lambda dt: st.tuples(special_arrays(X, dt), IDX32)),
    "scatter_along_axis": Case(
        lambda g, i: P["scatter_along_axis"].bind(g, i, shape=X, axis=1),
        lambda dt: st.tuples(special_arrays((3, 2), dt), IDX32),
        magnitude=lambda g, i: P["scatter_along_axis"].impl(np.abs(g), i, shape=X, axis=1)),
    # random numbers (ops/random.py) and the elementwise primitives of their samplers
    "random_bits": Case(_draw("random_bits").fn, _draw("random_bits").inputs, dtypes=UNSIGNED),
    "random_uniform": _draw("random_uniform"),
    "random_split": Case(lambda k: P["random_split"].bind(k, num=5), lambda dt: st.tuples(KEYS),
                         dtypes=(np.uint32,)),
    "random_fold_in": Case(lambda k, d: P["random_fold_in"].bind(k, d),
                           lambda dt: st.tuples(KEYS, _unsigned((), np.uint32)),
                           dtypes=(np.uint32,)),
    "erf_inv": unary("erf_inv"),  # ±1 give ±inf, |x| > 1 NaN
    "randint_offset": Case(lambda h, lo, span: P["randint_offset"].bind(h, lo, span),
                           lambda dt: st.tuples(_unsigned(X, dt), _unsigned(X, dt),
                                                _unsigned(X[1:], dt)), dtypes=UNSIGNED),
    # the same at a width where the vectorised loop bodies run, not only their remainders
    "relu/wide": Case(lambda x: P["relu"].bind(x), floats(W)),
    "maximum/wide": Case(lambda a, b: P["maximum"].bind(a, b), floats(W, W[1:])),
    "sign/wide": Case(lambda x: P["sign"].bind(x), floats(W)),
    "where/wide": Case(lambda c, a, b: P["where"].bind(c, a, b),
                       lambda dt: st.tuples(bools(W), special_arrays(W, dt),
                                            special_arrays(W, dt))),
    "sum/wide": summing("sum", axes=(1,), keepdims=False, shape=W),
    # convolution and pooling (issue 20): BLAS over im2col, fused bias + relu epilogue
    **_conv_cases(),
    "max_argmax/wide": ordered(lambda x: P["max_argmax"].bind(x, axis=1), floats(W)),
    "logsumexp/wide": ordered(lambda x: P["logsumexp"].bind(x, axes=(1,), keepdims=False),
                              floats(W)),
    "softmax_cross_entropy/wide": ordered(
        lambda z, y: (P["softmax_cross_entropy"].bind(z, y),
                      P["softmax_cross_entropy_grad"].bind(z, y)),
        lambda dt: st.tuples(special_arrays(W, dt), _labels(*W))),
    "custom_vjp_call": Case(lambda x: _custom_tanh(x * 2.0), floats(X)),
    # the numpy surface (issue 16): libm through libmvec (vecmath.py) in the loop bodies
    **{n: unary(n) for n in VECMATH_UNARY},
    **{f"{n}/wide": Case(lambda x, n=n: P[n].bind(x), floats(W)) for n in VECMATH_UNARY},
    **{n: binary(n) for n in ("minimum", "logaddexp", "logaddexp2", "arctan2", "hypot",
                              "remainder", "floor_divide")},
    # numpy's fmin/fmax return either of two tied zeros, differently by dtype and loop
    # (fmax(0.0, -0.0) is -0.0 in float32 arrays and 0.0 in float64 ones here)
    **{n: Case(lambda a, b, n=n: P[n].bind(a, b), floats(X, X[1:]), zero_signs=False)
       for n in ("fmin", "fmax")},
    **{f"{n}/wide": Case(lambda a, b, n=n: P[n].bind(a, b), floats(W, W[1:]))
       for n in ("logaddexp", "arctan2", "hypot")},
    "prod": ordered(lambda x: P["prod"].bind(x, axes=(1,), keepdims=False), floats(X)),
    "prod/axis0": ordered(lambda x: P["prod"].bind(x, axes=(0,), keepdims=True), floats(X)),
    "min": ordered(lambda x: P["min"].bind(x, axes=(1,), keepdims=False), floats(X)),
    "min/all": ordered(lambda x: P["min"].bind(x, axes=(0, 1), keepdims=False), floats(X)),
    "cumsum": summing("cumsum", axis=1, reverse=False),
    "cumsum/reverse": summing("cumsum", axis=0, reverse=True),
    "argsort": Case(lambda x: P["argsort"].bind(x, axis=1), floats(X)),
    "argsort/axis0": Case(lambda x: P["argsort"].bind(x, axis=0), floats(X)),
    # fused kernels that are more than one primitive
    "fused/bias_relu": Case(lambda x, b: jg.relu(x * 2.0 + b), floats(X, X[1:])),
    "fused/relu_backward": Case(lambda y, g: jg.where(y > 0, g, 0.0), floats(X, X)),
    "fused/gemm_accumulate": Case(lambda c, a, b: c + a @ b, floats((3, 2), X, (4, 2)),
                                  magnitude=lambda c, a, b: np.abs(c) + np.abs(a) @ np.abs(b)),
    "fused/mlp_loss": ordered(_mlp, lambda dt: st.tuples(
        special_arrays(X, dt, moderate), _labels(3, 2),
        *(special_arrays(s, dt, moderate) for s in ((4, 5), (5,), (5, 2), (2,))))),
    **{f"optimizer/{name}": _optimizer(opt) for name, opt in (
        ("sgd", jg.optim.SGD(lr=0.1, weight_decay=1e-2)),
        ("momentum", jg.optim.SGD(lr=0.1, momentum=0.9, nesterov=True)),
        ("adam", jg.optim.Adam(lr=1e-3, weight_decay=1e-2)),
        ("adamw", jg.optim.AdamW(lr=1e-3)))},
}


def primitive_of(case_id: str) -> str:
    return case_id.split("/")[0]


def test_every_primitive_has_a_special_value_case():
    missing = sorted(set(registry) - {primitive_of(c) for c in CASES})
    assert not missing, (f"primitives without a case in {__file__}: {missing}; add one to "
                         "CASES so NaN and Inf are checked for them")


# ---------------------------------------------------------------- the property

def assert_same_specials(got: np.ndarray, want: np.ndarray, scale: Any, what: str,
                         zero_signs: bool = False) -> None:
    """Same shape and dtype; NaN and ±Inf at the same places; zeros of the same sign (if
    zero_signs); finite values within the dtype's tolerance (relative also to `scale`,
    the magnitude of summed terms)."""
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape,
                                                                 got.dtype, want.dtype)
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(got), test(want),
                                      err_msg=f"{what}: {test.__name__} differs\n"
                                              f"compiled    {got!r}\ninterpreted {want!r}")
    if zero_signs:
        zero = want == 0
        np.testing.assert_array_equal(np.signbit(got[zero]), np.signbit(want[zero]),
                                      err_msg=f"{what}: the sign of a zero differs\n"
                                              f"compiled    {got!r}\ninterpreted {want!r}")
    rtol, atol = TOL[want.dtype.type]
    fin = np.isfinite(want)
    bound = atol + rtol * np.abs(want[fin])
    if scale is not None:
        bound = bound + rtol * np.abs(np.broadcast_to(np.asarray(scale, np.float64),
                                                      want.shape)[fin])
    err = np.abs(got[fin].astype(np.float64) - want[fin].astype(np.float64))
    assert np.all(err <= bound), (f"{what}: finite values differ\ncompiled    {got!r}\n"
                                  f"interpreted {want!r}")


def _as_tuple(x: Any) -> tuple:
    return tuple(tree.flatten(x)[0])


def _compiled(case: Case, backend: str) -> Any:
    """One CompiledFunction per case and backend, shared by every example (and dtype)."""
    if backend not in case.compiled:
        case.compiled[backend] = jg.jit(case.fn, backend=backend)
    return case.compiled[backend]


_SETTINGS = dict(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PARAMS = [pytest.param(cid, dt, id=f"{cid}-{np.dtype(dt).name}")
          for cid, case in CASES.items() for dt in case.dtypes]


@pytest.mark.parametrize("case_id,dtype", PARAMS)
@settings(**_SETTINGS)
@given(data=st.data())
def test_special_values_compiled_as_interpreted(case_id, dtype, data):
    case = CASES[case_id]
    if case.requires is not None and not case.requires():
        pytest.skip(f"{case_id} needs MKL's bfloat16 GEMM and a CPU with bfloat16 instructions")
    args = data.draw(case.inputs(dtype), label="inputs")
    with np.errstate(all="ignore"):
        want = _as_tuple(_compiled(case, "interpret")(*args))
        got = _as_tuple(_compiled(case, "numba")(*args))
        scale = _as_tuple(case.magnitude(*args)) if case.magnitude else (None,) * len(want)
    assert len(got) == len(want)
    for k, (g, w, s) in enumerate(zip(got, want, scale, strict=True)):
        assert_same_specials(g, w, s, f"{case_id} result {k} on {args!r}", case.zero_signs)


# ---------------------------------------------------------------- the reported cases

def test_compiled_relu_keeps_nan(backend):
    x = np.array([np.nan, -1.0, 2.0])
    np.testing.assert_array_equal(jg.jit(jg.relu)(x), [np.nan, 0.0, 2.0])
    np.testing.assert_array_equal(jg.relu(x), [np.nan, 0.0, 2.0])  # eager: numpy's maximum


def _mlp_problem(rng):
    params = jg.nn.mlp_init([4, 8, 3], rng)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    nan_x = x.copy()
    nan_x[2, 1] = np.nan
    return params, x, nan_x, y


def test_mlp_loss_on_an_input_holding_one_nan_is_nan(rng):
    params, _, nan_x, y = _mlp_problem(rng)
    compiled = jg.jit(jg.nn.mlp_loss, backend="numba")(params, nan_x, y)
    interpreted = jg.jit(jg.nn.mlp_loss, backend="interpret")(params, nan_x, y)
    eager = jg.nn.mlp_loss(params, nan_x, y)
    assert np.isnan(compiled) and np.isnan(interpreted) and np.isnan(eager), \
        (compiled, interpreted, eager)


def test_train_step_on_a_nan_batch_reports_nan(backend, rng):
    params, _, nan_x, y = _mlp_problem(rng)
    step = jg.train_step(jg.nn.mlp_loss, params, jg.optim.SGD(lr=0.1, momentum=0.9))
    assert np.isnan(step(nan_x, y))  # unchecked: the NaN is reported, not hidden


def _here(marker_fn: Callable[..., Any]) -> str:
    import inspect
    lines, start = inspect.getsourcelines(marker_fn)
    k = next(i for i, line in enumerate(lines) if "# <- here" in line)
    return f"{os.path.basename(__file__)}:{start + k}"


def test_check_finite_rejects_a_non_finite_input_by_its_place(backend):
    # A comparison drops the NaN (NaN > 0 is false): only the input check can see it.
    f = jg.jit(lambda p, x: jg.sum(jg.where(x @ p["w"] > 0, 1.0, 0.0)), check_finite=True)
    p = {"w": np.ones((3, 2))}
    x = np.array([[np.nan, -1.0, 2.0]])
    with np.errstate(invalid="ignore"):
        assert jg.jit(f.fn)(p, x) == 0.0  # unchecked, the result is finite

    def call(p, x):
        return f(p, x)  # <- here

    with pytest.raises(jg.NonFiniteError,
                       match=re.escape("input args[1] (f64[1,3]) holds nan at index (0, 0)")
                       ) as info:
        call(p, x)
    assert _here(call) in str(info.value)
    bad_p = {"w": np.array([[1.0, np.inf], [0.0, 1.0], [1.0, 1.0]])}
    with pytest.raises(jg.NonFiniteError, match=re.escape("args[0]['w'] (f64[3,2]) holds inf")):
        f(bad_p, np.ones((1, 3)))
    assert f(p, np.ones((1, 3))) == 2.0


def test_check_finite_rejects_the_mlp_input_holding_one_nan(backend, rng):
    params, x, nan_x, y = _mlp_problem(rng)
    f = jg.jit(jg.nn.mlp_loss, check_finite=True)
    assert np.isfinite(f(params, x, y))
    with pytest.raises(jg.NonFiniteError, match=re.escape("input args[1] (f32[6,4]) holds nan "
                                                          "at index (2, 1)")):
        f(params, nan_x, y)


def test_check_finite_from_the_environment_checks_inputs(backend, monkeypatch):
    monkeypatch.setenv("JITGRAD_CHECK_FINITE", "1")
    with pytest.raises(jg.NonFiniteError, match=r"args\[0\]"):
        jg.jit(jg.relu)(np.array([np.nan, -1.0, 2.0]))


def test_integer_inputs_are_never_non_finite(backend):
    f = jg.jit(lambda x, i: (jg.sum(x), i + 1), check_finite=True)
    low = np.array([np.iinfo(np.int64).min, -1, 0])  # no integer is NaN or Inf
    total, ints = f(np.ones(3), low)
    assert total == 3.0
    np.testing.assert_array_equal(ints, low + 1)


def test_train_step_with_check_finite_rejects_a_nan_batch_and_updates_nothing(backend, rng):
    params, x, nan_x, y = _mlp_problem(rng)
    step = jg.train_step(jg.nn.mlp_loss, params, jg.optim.SGD(lr=0.1, momentum=0.9),
                         check_finite=True)
    step(x, y)
    before = {k: v.copy() for k, v in params.items()}
    state = {k: v.copy() for k, v in step.state["momentum"].items()}

    def call():
        return step(nan_x, y)  # <- here

    with pytest.raises(jg.NonFiniteError, match=r"args\[0\]") as info:
        call()
    assert _here(call) in str(info.value)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        np.testing.assert_array_equal(step.state["momentum"][k], state[k])
    assert step.t == 1
    params["b0"][3] = np.inf  # a parameter is named as the caller knows it
    with pytest.raises(jg.NonFiniteError, match=re.escape("input params['b0']")):
        step(x, y)
    assert step.t == 1


# ---------------------------------------------------------------- random programs

@settings(**_SETTINGS)
@given(spec=programs(), data=st.data())
def test_random_programs_on_special_values_compiled_as_interpreted(spec, data):
    """test_properties' random programs (fused chains, reductions, matmul, masks, softmax
    cross-entropy) on inputs holding special values: the same NaN and ±Inf placement."""
    inputs = [data.draw(special_arrays(s, np.float64, moderate), label=f"input {k}")
              for k, s in enumerate(spec.in_shapes)]
    if spec.int_input:
        length, bound = spec.int_input
        inputs.append(data.draw(int_arrays((length,), 0, bound), label="labels"))

    def fn(*xs):
        return run_program(spec, *xs)

    with np.errstate(all="ignore"):
        want = _as_tuple(jg.jit(fn, backend="interpret")(*inputs))
        got = _as_tuple(jg.jit(fn, backend="numba")(*inputs))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert_same_specials(g, w, None, f"result {k} of\n{spec!r}\non {inputs!r}")
