"""Property tests: random programs, run eagerly on numpy arrays and jitted, differentiated.

A hypothesis strategy draws a random DAG over 1-3 float64 inputs and, sometimes,
one integer input (indices and labels): unary and binary elementwise operations
(with broadcasting), Python-scalar operands, reductions over random axes with
keepdims, matmul (also against a transpose), reshape/transpose, slicing,
concatenation, `where` on every comparison, piecewise-constant primitives
(floor, ceil, round, sign) behind stop_gradient, casts, max_argmax (values, and
the indices reused by take_along_axis), logsumexp, softmax, integer-array
indexing and softmax_cross_entropy with integer labels, batched matmul, an einsum
through a diagonal, mixed advanced indexing, and the numpy surface (trigonometric,
hyperbolic, exponential and logarithmic functions, erf, minimum, fmin/fmax, logaddexp(2),
hypot, arctan2, cumsum, sort, min, prod, var), with values used several times. Between
them the programs reach every primitive of the IR (the backward-only ones -- scatter_add,
pad_slice, scatter_along_axis, softmax_cross_entropy_grad, broadcast_to, matmul_sum,
embed_diagonal -- through the gradients). For each
program:

- the jitted result equals the same function run eagerly on numpy arrays;
- order 1: the gradient of sum(output * fixed random weights) with respect to
  every float input equals central finite differences;
- order 2: the Hessian-vector product (jitgrad's gradient of <gradient, v>)
  equals central differences of the gradient along v.

Values stay in safe ranges by construction (exp only of bounded values, log and
sqrt of 1 + x*x, divisions by 1 + x*x), and the inputs are re-drawn until every
kink (relu, abs, maximum, where, max, the jumps of floor/ceil/round/sign) is at
least MARGIN away, so finite differences never straddle one.

Examples: JITGRAD_PROPERTY_EXAMPLES (default 200) programs on the interpreter and
a quarter of that number compiled with Numba (every new program compiles new
kernels; JITGRAD_TEST_FULL=1 compiles all of them). The search is derandomized,
so a run is reproducible. The large run (2,000 interpreted + 500 compiled):

    JITGRAD_PROPERTY_EXAMPLES=2000 python -m pytest -q tests/test_properties.py

(passed: 2,000 + 500 examples in 8 min 56 s with a cold cache on the 2-core machine,
JITGRAD_NUM_THREADS=1; the default 200 + 50 take about a minute.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from gradcheck import assert_grads_close, numeric_grad, numeric_hvp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jitgrad as jg
from jitgrad.frontend.ir import validate

MAX_EXAMPLES = int(os.environ.get("JITGRAD_PROPERTY_EXAMPLES", "200"))
# Each random program compiles new fused kernels on the Numba backend (a cold cache
# costs ~0.3 s each), so CI runs fewer there; JITGRAD_TEST_FULL=1 runs all on both.
NUMBA_EXAMPLES = MAX_EXAMPLES if os.environ.get("JITGRAD_TEST_FULL") else max(MAX_EXAMPLES // 4, 1)
MARGIN = 1e-3  # minimum distance of any kink from its argument
MAX_ABS = 1e3  # intermediate values stay below this
GRAD_RTOL = 1e-5
HVP_RTOL = 1e-4  # differences of a gradient: one order of differentiation less accurate
# Recomputation policies every property runs under: "full" recomputes every value the
# backward sweep reads (random programs are too short for "sqrt" to drop any).
REMAT_POLICIES: list[str | None] = [None, "full"]

# Input shapes come from one family, so that they broadcast against each other.
FAMILIES = [
    [(3, 4), (4,), (3, 1), (1, 4), ()],
    [(2, 3, 4), (3, 4), (4,), (2, 1, 4), (3, 1), ()],
    [(5,), (1,), ()],
    [(2, 3, 3), (3, 3), (1, 3, 3), (3, 1), (3,), ()],  # stacks of square matrices
]

UNARY = {
    "neg": lambda x: -x,
    "tanh": jg.tanh,
    "sigmoid": jg.sigmoid,
    "exp_tanh": lambda x: jg.exp(jg.tanh(x)),
    "exp_neg_sq": lambda x: jg.exp(-(x * x)),
    "log1p_sq": lambda x: jg.log(1.0 + x * x),
    "sqrt1p_sq": lambda x: jg.sqrt(1.0 + x * x),
    "square": lambda x: x * x,
    "pow_pos": lambda x: (1.0 + x * x) ** 0.75,
    "affine": lambda x: 0.5 * x - 1.0,
    "abs": jg.abs,
    "relu": jg.relu,
    # the numpy surface (issue 16), inside their domains by construction
    "sin": jg.sin, "cos": jg.cos, "arctan": jg.arctan, "arcsinh": jg.arcsinh, "erf": jg.erf,
    "sinh_tanh": lambda x: jg.sinh(jg.tanh(x)), "cosh_tanh": lambda x: jg.cosh(jg.tanh(x)),
    "tan_half_tanh": lambda x: jg.tan(0.5 * jg.tanh(x)),
    "arcsin_half_tanh": lambda x: jg.arcsin(0.5 * jg.tanh(x)),
    "arccos_half_tanh": lambda x: jg.arccos(0.5 * jg.tanh(x)),
    "arctanh_half_tanh": lambda x: jg.arctanh(0.5 * jg.tanh(x)),
    "arccosh_2p_sq": lambda x: jg.arccosh(2.0 + x * x),
    "exp2_tanh": lambda x: jg.exp2(jg.tanh(x)), "expm1_tanh": lambda x: jg.expm1(jg.tanh(x)),
    "log1p_sq_": lambda x: jg.log1p(x * x), "log2_1p_sq": lambda x: jg.log2(1.0 + x * x),
    "log10_1p_sq": lambda x: jg.log10(1.0 + x * x), "np_square": np.square,
    "cumsum": lambda x: jg.cumsum(x, axis=-1) if x.ndim else x,
    "sort": lambda x: jg.sort(x, axis=-1) if x.ndim else x,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (1.0 + b * b),
    "pow": lambda a, b: (1.0 + a * a) ** jg.tanh(b),
    "maximum": jg.maximum,
    # the numpy surface (issue 16)
    "minimum": jg.minimum, "fmax": jg.fmax, "fmin": jg.fmin,
    "logaddexp": jg.logaddexp, "logaddexp2": jg.logaddexp2,
    "hypot": lambda a, b: jg.hypot(a, 1.0 + b * b),
    "arctan2": lambda a, b: jg.arctan2(a, 1.0 + b * b),
}
# selections of one operand: the kink is where the operands are equal
TIES = ("maximum", "minimum", "fmax", "fmin")
REDUCE = {"sum": jg.sum, "mean": jg.mean, "max": jg.max, "logsumexp": jg.logsumexp,
          "min": jg.min, "prod": jg.prod, "var": jg.var}
CMP = {"lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
       "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
       "eq": lambda a, b: a == b, "ne": lambda a, b: a != b}
# Piecewise constant: used as x/2 + stop_gradient(F(x)), whose derivative is 1/2 both for
# jitgrad and for finite differences away from the jumps (at JUMPS + integers).
PIECEWISE = {"floor": jg.floor, "ceil": jg.ceil, "round": jg.round, "sign": jg.sign}
JUMPS = {"floor": 0.0, "ceil": 0.0, "round": 0.5, "sign": None}  # sign: at 0 only


@dataclass(frozen=True)
class Spec:
    in_shapes: tuple[tuple[int, ...], ...]
    int_input: tuple[int, int] | None  # (length, bound): one more input, ints in [-bound, bound)
    ops: tuple[tuple, ...]          # each op reads earlier nodes (inputs are nodes 0..n-1)
    outputs: tuple[int, ...]        # node ids returned (the last node is always one)
    argmax_out: bool                # also return argmax(last node, axis=-1) (an int output)
    seed: int

    def __repr__(self) -> str:
        lines = [f"inputs {list(self.in_shapes)} int_input={self.int_input}"]
        n = len(self.in_shapes)
        for i, op in enumerate(self.ops):
            lines.append(f"  %{n + i} = {op}")
        lines.append(f"  return {list(self.outputs)} argmax={self.argmax_out} seed={self.seed}")
        return "\n".join(lines)


# ---------------------------------------------------------------- running a spec

def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axis = (axis,) if isinstance(axis, int) else axis
    return tuple(sorted(a % ndim for a in axis))


def _top2_gap(x: np.ndarray, axes: tuple[int, ...]) -> float:
    """Smallest gap between the largest and second largest entries over `axes`."""
    if not axes:
        return np.inf
    moved = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(moved.shape[:moved.ndim - len(axes)] + (-1,))
    if flat.shape[-1] < 2:
        return np.inf
    s = np.sort(flat, axis=-1)
    return float(np.min(s[..., -1] - s[..., -2]))


def _min_abs(x: Any) -> float:
    x = np.asarray(x)
    return float(np.min(np.abs(x))) if x.size else np.inf


def _jump_distance(name: str, x: Any) -> float:
    """How far x is from the nearest jump of the piecewise-constant primitive `name`."""
    x = np.asarray(x)
    if JUMPS[name] is None:
        return _min_abs(x)
    shifted = x - JUMPS[name]
    return _min_abs(shifted - np.round(shifted))


def apply(op: tuple, vals: list[Any], margins: list[float] | None, idx: Any = None) -> Any:
    kind = op[0]
    check = margins is not None
    if kind == "unary":
        _, name, i = op
        if check and name in ("abs", "relu"):
            margins.append(_min_abs(vals[i]))
        if check and name == "sort" and np.ndim(vals[i]):  # kinks where two entries tie
            margins.append(_min_abs(np.diff(np.sort(vals[i], axis=-1), axis=-1)))
        return UNARY[name](vals[i])
    if kind == "binary":
        _, name, i, j = op
        if check and name in TIES:
            margins.append(_min_abs(np.asarray(vals[i]) - np.asarray(vals[j])))
        return BINARY[name](vals[i], vals[j])
    if kind == "scalar":
        _, name, i, c = op
        return BINARY[name](vals[i], c) if name != "rsub" else c - vals[i]
    if kind == "reduce":
        _, name, i, axis, keepdims = op
        if check and name in ("max", "min"):
            x = np.asarray(vals[i]) * (1.0 if name == "max" else -1.0)
            margins.append(_top2_gap(x, _axes(axis, np.ndim(vals[i]))))
        return REDUCE[name](vals[i], axis=axis, keepdims=keepdims)
    if kind == "matmul":
        _, i, j, transpose_b = op
        b = vals[j].T if transpose_b else vals[j]
        return vals[i] @ b
    if kind == "reshape":
        _, i, shape = op
        return jg.reshape(vals[i], shape)
    if kind == "transpose":
        _, i, perm = op
        return jg.transpose(vals[i], perm)
    if kind == "slice":
        _, i, key = op
        return vals[i][key]
    if kind == "concat":
        _, i, axis = op
        return jg.concatenate([vals[i], jg.tanh(vals[i])], axis=axis)
    if kind == "where":
        _, cmp, i, j = op
        a, b = vals[i], vals[j]
        if check:
            margins.append(_min_abs(np.asarray(a) - np.asarray(b)))
        return jg.where(CMP[cmp](a, b), a, jg.tanh(b))
    if kind == "mask":  # a comparison cast to float: a gradient-free factor
        _, cmp, i, j = op
        a, b = vals[i], vals[j]
        if check and cmp not in ("eq", "ne"):
            margins.append(_min_abs(np.asarray(a) - np.asarray(b)))
        return a * CMP[cmp](a, b).astype(np.float64) + jg.tanh(b)
    if kind == "piecewise":
        _, name, i = op
        if check:
            margins.append(_jump_distance(name, vals[i]))
        return 0.5 * vals[i] + jg.stop_gradient(PIECEWISE[name](vals[i]))
    if kind == "softmax":
        _, i, axis = op
        return jg.softmax(vals[i], axis=axis)
    if kind == "gather":  # integer-array indexing along axis 0, indices may repeat
        _, i = op
        return vals[i][idx]
    if kind == "sce":  # integer labels, one per row
        _, i = op
        return jg.softmax_cross_entropy(vals[i], idx)
    if kind == "int_scale":  # integer values cast to float, broadcast against x
        _, i = op
        return vals[i] * idx.astype(np.float64)
    if kind == "max_argmax":
        _, i, axis = op
        x = vals[i]
        if check:
            margins.append(_top2_gap(np.asarray(x), (axis % np.ndim(x),)))
        values, idx = jg.max_argmax(x, axis=axis)
        picked = jg.take_along_axis(jg.tanh(x), jg.reshape(idx, _keep_shape(x.shape, axis)), axis)
        return values + jg.reshape(picked, values.shape)
    if kind == "batched_matmul":  # a stack of matrices times a matrix or a stack
        _, i, j = op
        return vals[i] @ vals[j]
    if kind == "einsum":  # the diagonal of the last two axes times the first: a contraction
        _, i = op
        return np.einsum("i...jj,i...->...j", vals[i], jg.tanh(vals[i][..., 0, 0]))
    if kind == "adv_index":  # integer arrays on the first and last axes (numpy's rules)
        _, i = op
        return vals[i][[0, -1, 0], ..., [-1, 0, 0]]
    raise AssertionError(f"unknown op {op}")


def _keep_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    axis %= len(shape)
    return shape[:axis] + (1,) + shape[axis + 1:]


def run(spec: Spec, *inputs: Any, margins: list[float] | None = None) -> tuple:
    n = len(spec.in_shapes)
    vals = list(inputs[:n])
    idx = inputs[n] if spec.int_input else None
    for op in spec.ops:
        vals.append(apply(op, vals, margins, idx))
    if margins is not None:
        margins.append(MAX_ABS - max(float(np.max(np.abs(v), initial=0.0)) for v in vals))
    outs = tuple(vals[i] for i in spec.outputs)
    if spec.argmax_out:
        if margins is not None:
            margins.append(_top2_gap(np.asarray(vals[-1]), (np.ndim(vals[-1]) - 1,)))
        outs += (jg.argmax(vals[-1], axis=-1),)
    return outs


# ---------------------------------------------------------------- the strategy

def _operands(op: tuple) -> tuple[int, ...]:
    kind = op[0]
    if kind in ("binary", "where", "mask"):
        return op[2], op[3]
    if kind in ("unary", "scalar", "piecewise"):
        return (op[2],)
    if kind == "matmul":
        return op[1], op[2]
    return (op[1] if kind != "reduce" else op[2],)


def _broadcastable(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def _reduced(shape, axis, keepdims):
    axes = _axes(axis, len(shape))
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


@st.composite
def programs(draw) -> Spec:
    family = draw(st.sampled_from(FAMILIES))
    n_inputs = draw(st.integers(1, 3))
    shapes: list[tuple[int, ...]] = [draw(st.sampled_from(family)) for _ in range(n_inputs)]
    in_shapes = tuple(shapes)
    int_input = None
    if draw(st.booleans()):  # labels/indices: a length among the family's dimensions
        rows = {sh[0] for sh in shapes if len(sh) == 2 and sh[0] > 1}  # labels fit these
        length = draw(st.sampled_from(sorted(rows or {d for sh in family for d in sh if d > 1})))
        int_input = (length, draw(st.integers(1, 3)))
    ops = []
    kinds = ["unary", "binary", "scalar", "reduce", "matmul", "reshape", "transpose", "slice",
             "concat", "where", "max_argmax", "mask", "piecewise", "softmax"]
    if int_input:
        kinds += ["gather", "sce", "int_scale"]
    kinds += ["batched_matmul", "einsum", "adv_index"]  # issue 16: linear algebra, indexing
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(kinds))
        i = draw(st.integers(0, len(shapes) - 1))
        if kind == "sce":  # rarely drawn by chance: pick a node it applies to
            rows = [k for k, sh in enumerate(shapes)
                    if len(sh) == 2 and sh[0] == int_input[0] and sh[1] >= int_input[1]]
            i = draw(st.sampled_from(rows)) if rows else i
        s = shapes[i]
        op, out = None, None
        if kind in ("binary", "where", "mask"):
            partners = [j for j in range(len(shapes)) if _broadcastable(s, shapes[j]) is not None]
            j = draw(st.sampled_from(partners))  # i itself is always a partner
            out = _broadcastable(s, shapes[j])
            op = (("binary", draw(st.sampled_from(sorted(BINARY))), i, j) if kind == "binary"
                  else (kind, draw(st.sampled_from(sorted(CMP))), i, j))
        elif kind == "piecewise":
            op, out = ("piecewise", draw(st.sampled_from(sorted(PIECEWISE))), i), s
        elif kind == "softmax" and len(s) >= 1:
            op, out = ("softmax", i, draw(st.integers(-len(s), len(s) - 1))), s
        elif kind == "gather" and len(s) >= 1 and s[0] >= int_input[1]:
            op, out = ("gather", i), (int_input[0],) + s[1:]
        elif kind == "sce" and len(s) == 2 and s[0] == int_input[0] and s[1] >= int_input[1]:
            op, out = ("sce", i), ()
        elif kind == "int_scale" and _broadcastable(s, (int_input[0],)) is not None:
            op, out = ("int_scale", i), _broadcastable(s, (int_input[0],))
        elif kind == "scalar":
            name = draw(st.sampled_from(["add", "mul", "rsub"]))
            op, out = ("scalar", name, i, draw(st.sampled_from([0.5, -1.5, 2.0]))), s
        elif kind == "reduce":
            choices = [None] + list(range(-len(s), len(s)))
            if len(s) >= 2:
                choices.append((0, len(s) - 1))
            axis = draw(st.sampled_from(choices))
            keepdims = draw(st.booleans())
            op = ("reduce", draw(st.sampled_from(sorted(REDUCE))), i, axis, keepdims)
            out = _reduced(s, axis, keepdims)
        elif kind == "matmul" and 1 <= len(s) <= 2:
            k = s[-1]
            partners = [j for j in range(len(shapes)) if 1 <= len(shapes[j]) <= 2
                        and shapes[j][0] == k and not (len(s) == 1 and len(shapes[j]) == 1
                                                       and k == 1)]
            if partners:
                j = draw(st.sampled_from(partners))
                op, out = ("matmul", i, j, False), s[:-1] + shapes[j][1:]
            elif len(s) == 2:
                op, out = ("matmul", i, i, True), (s[0], s[0])
        elif kind == "reshape" and len(s) >= 1:
            n = int(np.prod(s))
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            d = draw(st.sampled_from(divisors))
            new = draw(st.sampled_from([(-1,), (d, n // d), (n // d, 1, d)]))
            op = ("reshape", i, new)
            out = (n,) if new == (-1,) else new
        elif kind == "transpose" and len(s) >= 2:
            perm = tuple(draw(st.permutations(range(len(s)))))
            op, out = ("transpose", i, perm), tuple(s[p] for p in perm)
        elif kind == "slice" and len(s) >= 1:
            key, out_l = [], []
            for d in s:
                options = [slice(None), slice(None, None, -1), slice(None, None, 2)]
                if d > 1:
                    options += [slice(1, None), slice(None, -1)]
                sl = draw(st.sampled_from(options))
                key.append(sl)
                out_l.append(len(range(*sl.indices(d))))
            op, out = ("slice", i, tuple(key)), tuple(out_l)
        elif kind == "concat" and len(s) >= 1:
            axis = draw(st.integers(-len(s), len(s) - 1))
            out = tuple(2 * d if k == axis % len(s) else d for k, d in enumerate(s))
            op = ("concat", i, axis)
        elif kind == "max_argmax" and len(s) >= 1:
            axis = draw(st.integers(-len(s), len(s) - 1))
            op, out = ("max_argmax", i, axis), _reduced(s, axis, False)
        elif kind == "batched_matmul" and len(s) == 3:
            partners = [j for j, t in enumerate(shapes) if 2 <= len(t) <= 3 and t[-2] == s[-1]
                        and _broadcastable(s[:-2], t[:-2]) is not None]
            if partners:
                j = draw(st.sampled_from(partners))
                t = shapes[j]
                op, out = ("batched_matmul", i, j), _broadcastable(s[:-2], t[:-2]) + (
                    s[1], t[-1])
        elif kind == "einsum" and len(s) >= 3 and s[-1] == s[-2]:
            op, out = ("einsum", i), s[1:-1]
        elif kind == "adv_index" and len(s) >= 2:
            op, out = ("adv_index", i), (3,) + s[1:-1]
        if op is None:  # the drawn kind does not apply to this node's shape
            op, out = ("unary", draw(st.sampled_from(sorted(UNARY))), i), s
        ops.append(op)
        shapes.append(out)
    # Return every computed value nobody consumes (so no operation is dead code), plus
    # possibly one more (a value that is both used and returned).
    last = len(shapes) - 1
    used = {v for op in ops for v in _operands(op)}
    outputs = tuple(k for k in range(n_inputs, last + 1) if k not in used)
    if draw(st.booleans()):
        extra = draw(st.integers(0, last))
        outputs += (extra,) if extra not in outputs else ()
    argmax_out = len(shapes[last]) >= 1 and draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 20))
    return Spec(in_shapes, int_input, tuple(ops), outputs, argmax_out, seed)


def safe_inputs(spec: Spec) -> list[np.ndarray] | None:
    """Inputs for which every kink is at least MARGIN away and values stay bounded."""
    for attempt in range(30):
        rng = np.random.default_rng(spec.seed + 7919 * attempt)
        inputs = [rng.normal(size=s) for s in spec.in_shapes]
        if spec.int_input:
            length, bound = spec.int_input
            inputs.append(rng.integers(0, bound, size=length))
        margins: list[float] = []
        with np.errstate(all="raise"):
            try:
                run(spec, *inputs, margins=margins)
            except FloatingPointError:
                continue
        if min(margins, default=np.inf) >= MARGIN:
            return inputs
    return None


# ---------------------------------------------------------------- the property

_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _jit(fn, remat):
    """jg.jit under a recomputation policy (None: store everything, the default)."""
    return jg.jit(fn) if remat is None else jg.jit(fn, remat=remat)


@pytest.mark.parametrize("remat", REMAT_POLICIES)
@settings(max_examples=MAX_EXAMPLES, **_SETTINGS)
@given(spec=programs())
def test_random_programs_interpreted(spec, remat):
    with jg.frontend.api.default_backend("interpret"):
        check_program(spec, remat)


@pytest.mark.parametrize("remat", REMAT_POLICIES)
@settings(max_examples=NUMBA_EXAMPLES, **_SETTINGS)
@given(spec=programs())
def test_random_programs_compiled(spec, remat):
    with jg.frontend.api.default_backend("numba"):
        check_program(spec, remat)


def check_program(spec, remat=None):
    """jit equals eager numpy; gradients (order 1) and Hessian-vector products (order 2)
    equal finite differences."""
    inputs = safe_inputs(spec)
    assume(inputs is not None)

    def fn(*xs):
        return run(spec, *xs)

    eager = fn(*inputs)
    cf = _jit(fn, remat)
    jitted = cf(*inputs)
    validate(cf.program)
    assert len(jitted) == len(eager)
    for got, want in zip(jitted, eager, strict=True):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray)
        assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_array_equal(got, want)

    rng = np.random.default_rng(spec.seed + 1)
    weights = [rng.normal(size=np.shape(o)) for o in eager if np.asarray(o).dtype.kind == "f"]

    def loss(*xs):
        total = 0.0
        for o, w in zip([o for o in fn(*xs) if o.dtype.kind == "f"], weights, strict=True):
            total = total + jg.sum(o * w)
        return total

    argnums = tuple(range(len(spec.in_shapes)))  # every float input; never the integer one
    grad_fn = jg.grad(loss, argnums=argnums)
    gcf = _jit(grad_fn, remat)
    grads = gcf(*inputs)
    validate(gcf.program)
    for n, g in zip(argnums, grads, strict=True):
        assert g.shape == inputs[n].shape and g.dtype == np.float64
        assert_grads_close(g, numeric_grad(loss, inputs, n), rtol=GRAD_RTOL, atol=GRAD_RTOL,
                           what=f"d/d(input {n}) of\n{spec!r}\n")

    # order 2: H v, as jitgrad's gradient of <grad, v>, against differences of the gradient
    v = tuple(rng.normal(size=inputs[n].shape) for n in argnums)

    def grad_dot_v(*xs):
        total = 0.0
        for g, d in zip(grad_fn(*xs), v, strict=True):
            total = total + jg.sum(g * d)
        return total

    hcf = _jit(jg.grad(grad_dot_v, argnums=argnums), remat)
    hvp = hcf(*inputs)
    validate(hcf.program)
    assert_grads_close(hvp, numeric_hvp(gcf, inputs, v, argnums), rtol=HVP_RTOL,
                       atol=HVP_RTOL, what=f"Hessian-vector product of\n{spec!r}\n")
