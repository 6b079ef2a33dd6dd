"""jg.custom_vjp: a user's derivative rule, as jax.custom_vjp. It replaces an unstable
default, is gradchecked at orders 1 and 2, and compiles, fuses and is planned like any
code (the instruction that carries the rule is gone before lowering); on both backends."""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import check_grads

import jitgrad as jg


@jg.custom_vjp
def log1pexp(x):
    return jg.log(1.0 + jg.exp(x))


def log1pexp_fwd(x):
    return log1pexp(x), x  # calling the function inside its own fwd runs it plainly


def log1pexp_bwd(x, g):
    return (g * jg.sigmoid(x),)  # d/dx log(1 + e^x) = sigmoid(x), without e^x / (1 + e^x)


log1pexp.defvjp(log1pexp_fwd, log1pexp_bwd)


def naive(x):
    return jg.log(1.0 + jg.exp(x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.mark.parametrize("dtype, big", [
    (np.float32, 100.0),
    pytest.param(np.float64, 1000.0, marks=pytest.mark.numba_full)])
def test_a_user_rule_replaces_an_unstable_default(backend, dtype, big):
    x = np.array([-5.0, 0.0, 3.0, big], dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # the interpreter computes e^big
        default = jg.grad(lambda x: jg.sum(naive(x)))(x)
        got = jg.grad(lambda x: jg.sum(log1pexp(x)))(x)
        hess = jg.hessian(lambda x: jg.sum(log1pexp(x)))(x)  # order 2: bwd differentiated
    assert np.isnan(default[-1])  # e^x / (1 + e^x) = inf / inf
    assert got.dtype == dtype
    np.testing.assert_allclose(got, sigmoid(x.astype(np.float64)), rtol=1e-6)
    s = sigmoid(x.astype(np.float64))
    np.testing.assert_allclose(hess, np.diag(s * (1 - s)), rtol=1e-5, atol=1e-30)


@jg.custom_vjp
def scaled_tanh(x, w, scale=2.0):
    return jg.tanh(x @ w) * scale


def scaled_tanh_fwd(x, w, scale):
    t = jg.tanh(x @ w)  # a residual computed by fwd: order 2 differentiates through it
    return t * scale, (t, x, w, scale, x.shape)


def scaled_tanh_bwd(res, g):
    t, x, w, scale, shape = res
    assert isinstance(shape, tuple)  # residuals that are not arrays stay Python values
    gz = g * scale * (1.0 - t * t)
    return gz @ w.T, x.T @ gz, jg.sum(g * t)


scaled_tanh.defvjp(scaled_tanh_fwd, scaled_tanh_bwd)


@pytest.fixture(scope="module")
def xw():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 4)), rng.normal(size=(4, 2)) * 0.5


@pytest.mark.numba_full  # the gradcheck table's row runs compiled
def test_gradchecked_at_orders_1_and_2(backend, xw):
    x, w = xw
    check_grads(lambda x, w, s: jg.sum(scaled_tanh(x, w, s) ** 2), (x, w, 1.5),
                argnums=(0, 1, 2), order=2)
    # keyword arguments are bound to positions, the default included: bwd returns three
    check_grads(lambda x, w: jg.sum(scaled_tanh(x, w=w)), (x, w), argnums=(0, 1), order=2)


def test_compiled_the_rule_is_gone_and_the_code_fuses(xw):
    x, w = xw
    cf = jg.jit(jg.grad(lambda x, w: jg.sum(log1pexp(x @ w * 2.0)), argnums=1),
                backend="numba")
    got = cf(x, w)
    np.testing.assert_allclose(got, x.T @ (2.0 * sigmoid(x @ w * 2.0)))
    names = [i.prim.name for i in cf.program.instrs]
    assert "custom_vjp_call" not in names and "log" not in names  # value unused: dead
    traced = jg.jit(lambda x, w: log1pexp(x @ w), backend="numba")
    np.testing.assert_allclose(traced(x, w), np.log1p(np.exp(x @ w)))
    fused = [ln for ln in traced.source.splitlines() if "# fused[" in ln]
    assert len(fused) == 1 and "exp" in fused[0] and "log" in fused[0], traced.source
    assert cf.plan.arena_bytes > 0


def test_under_recomputation(backend, xw):
    x, w = xw
    f = jg.jit(jg.grad(lambda x, w: jg.sum(scaled_tanh(x, w) ** 2), argnums=(0, 1)),
               remat="full")
    want = jg.grad(lambda x, w: jg.sum(scaled_tanh(x, w) ** 2), argnums=(0, 1))(x, w)
    for a, b in zip(f(x, w), want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_concrete_calls_run_fun(xw):
    x, w = xw
    np.testing.assert_allclose(scaled_tanh(x, w), np.tanh(x @ w) * 2.0)


@pytest.mark.parametrize("bwd, message", [
    (lambda res, g: g, r"bwd must return a tuple of 1 cotangent\(s\), one per argument of "
                       r"bad, got a Tracer"),
    (lambda res, g: (g, g), r"bwd must return a tuple of 1 .*got 2 cotangents"),
    (lambda res, g: (jg.sum(g),), r"bwd returned a cotangent of float64\(\) for an argument "
                                  r"of float64\(3,\)"),
    (lambda res, g: ([g],), r"bwd's cotangent for argument 0 has structure \[\*\], the "
                            r"argument \*"),
])
def test_a_bad_rule_is_named(bwd, message):
    @jg.custom_vjp
    def bad(x):
        return x * 2.0

    bad.defvjp(lambda x: (x * 2.0, None), bwd)
    with pytest.raises(jg.JitgradError, match=rf"custom_vjp bad: {message}.*test_custom_vjp"):
        jg.grad(lambda x: jg.sum(bad(x)))(np.ones(3))


def test_missing_rule_and_bad_fwd_are_named():
    @jg.custom_vjp
    def f(x):
        return x

    with pytest.raises(jg.JitgradError, match=r"f has no rule: call f.defvjp\(fwd, bwd\)"):
        jg.grad(lambda x: jg.sum(f(x)))(np.ones(2))
    f.defvjp(lambda x: x, lambda r, g: (g,))
    with pytest.raises(jg.JitgradError, match=r"fwd must return \(output, residuals\)"):
        jg.grad(lambda x: jg.sum(f(x)))(np.ones(2))
