"""A new primitive costs one file: two are defined here, outside jitgrad, and compile.

- `test_softplus` declares a scalar expression (with a helper of its own), so fusion
  inlines it into one loop with its neighbours;
- `test_row_sum` lowers to a call of an existing library kernel (the float sum).

Each runs compiled, fused where it can be, and is gradchecked at orders 1 and 2 both
eagerly and compiled.
"""

import numpy as np
import pytest
from gradcheck import assert_grads_close, check_grads, numeric_grad, vdot

import jitgrad as jg
from jitgrad.frontend.core import primitive, registry
from jitgrad.frontend.ir import Var
from jitgrad.frontend.ops import elementwise as E
from jitgrad.frontend.ops import reduce as R
from jitgrad.frontend.ops import shape as S

# ---------------------------------------------------------------- from a scalar expression

_SOFTPLUS_HELPER = '''
@njit(inline="always")
def _test_softplus(x, zero):
    # log(1 + e^x) without overflow: max(x, 0) + log1p(e^-|x|)
    return (x if x > zero else zero) + np.log1p(np.exp(-abs(x)))
'''


def _define_softplus():
    p = primitive("test_softplus", "elementwise")
    p.def_impl(lambda x: np.logaddexp(0, x).astype(x.dtype))
    p.def_shape(lambda x: x)
    p.def_vjp(lambda cts, outs, ins: [cts[0] * E.sigmoid(ins[0])])
    p.def_scalar("_test_softplus({0}, {zero})", helpers=_SOFTPLUS_HELPER)
    return p


def softplus(x):
    return PRIMS["test_softplus"].bind(E.asdtype(x, E._float_dtype(x)))


# ---------------------------------------------------------------- calling a library kernel

def _define_row_sum():
    p = primitive("test_row_sum", "reduce")
    p.def_impl(lambda x: x.sum(axis=1))

    @p.def_shape
    def _row_sum_shape(x):
        if len(x[0]) != 2 or x[1].kind != "f":
            raise jg.JitgradError(f"expects a 2-d float array, got {x[0]} {x[1]}")
        return x[0][:1], x[1]

    @p.def_vjp
    def _row_sum_vjp(cts, outs, ins):
        rows, cols = ins[0].shape
        return [S.broadcast_to(S.reshape(cts[0], (rows, 1)), (rows, cols))]

    @p.def_lowering
    def _row_sum_lowering(low, ins):
        x, y = ins.inputs[0], ins.outputs[0]
        rows, cols = x.shape
        acc = Var((1,), np.dtype(np.float64))  # the kernel's running sum: arena scratch
        # the sum kernel reduces an (outer, n, inner) view over its middle axis
        low.call(R.SUM, x.dtype, [x, y, acc, rows, cols, 1], [y, acc], [x], ins)

    return p


def row_sum(x):
    return PRIMS["test_row_sum"].bind(x)


PRIMS = {}


@pytest.fixture(scope="module", autouse=True)
def primitives():
    """Defined for this file's tests only, then taken out of the registry: registry-wide
    tests elsewhere (every primitive has a gradcheck row, a non-finite case) list what
    jitgrad itself defines, and pytest collects every file before running any."""
    for define in (_define_softplus, _define_row_sum):
        p = define()
        PRIMS[p.name] = p
    yield
    for name in list(PRIMS):
        del registry[name]
        del PRIMS[name]


# ---------------------------------------------------------------- tests

def loss(x, w):
    """softplus between an affine map and a product (fused), then the row sums."""
    return jg.sum(row_sum(softplus(x * 2.0 - 0.5) * w) ** 2) * 0.25


@pytest.fixture(scope="module")
def args():
    rng = np.random.default_rng(3)
    return rng.normal(size=(4, 5)), rng.normal(size=(4, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_both_compile_and_match_numpy(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7)).astype(dtype) * 30  # |x| large: the stable form matters
    f = jg.jit(lambda x: row_sum(softplus(x * 0.5 + 1.0)), backend="numba")
    want = np.logaddexp(0, x * dtype(0.5) + dtype(1)).sum(axis=1)
    got = f(x)
    assert got.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-12)


def test_the_scalar_primitive_fuses_with_its_neighbours(args):
    source = jg.jit(loss, backend="numba").lower(*args).source
    fused = [ln for ln in source.splitlines() if "# fused[" in ln and "test_softplus" in ln]
    assert len(fused) == 1, source
    assert all(op in fused[0] for op in ("mul", "sub", "test_softplus")), fused[0]
    assert any("test_row_sum at" in ln and "jg_sum_f64(" in ln for ln in source.splitlines())


def test_orders_1_and_2_eagerly(args):
    check_grads(loss, args, argnums=(0, 1), order=2)


def test_orders_1_and_2_compiled(args):
    grad = jg.grad(loss, argnums=(0, 1))
    compiled = jg.jit(grad, backend="numba")
    for g, n, got in zip(grad(*args), (numeric_grad(loss, args, 0), numeric_grad(loss, args, 1)),
                         compiled(*args), strict=True):
        assert_grads_close(got, n)
        np.testing.assert_allclose(got, g, rtol=1e-12)
    v = tuple(np.random.default_rng(5).normal(size=a.shape) for a in args)
    hvp = jg.grad(lambda x, w: vdot(grad(x, w), v), argnums=(0, 1))
    for want, got in zip(hvp(*args), jg.jit(hvp, backend="numba")(*args), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
