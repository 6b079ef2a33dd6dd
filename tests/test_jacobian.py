"""jg.jacobian (reverse mode, every row in one program) and jg.hessian against finite
differences, pytrees as in JAX, and grad of a float output of size 1 (as autograd); on
both backends (the `backend` fixture)."""

from __future__ import annotations

import numpy as np
import pytest

import jitgrad as jg

EPS = 1e-6


def numeric_jacobian(f, x):
    """Central differences: shape f(x).shape + x.shape."""
    out = np.asarray(f(x))
    jac = np.zeros(out.shape + x.shape)
    for i in np.ndindex(x.shape):
        h = np.zeros_like(x)
        h[i] = EPS
        jac[(...,) + i] = (np.asarray(f(x + h)) - np.asarray(f(x - h))) / (2 * EPS)
    return jac


def f_np(x, w):
    return np.tanh(x @ w) * x[:, :1]


def f_jg(x, w):
    return jg.tanh(x @ w) * x[:, :1]


@pytest.fixture(scope="module")
def xw():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 4)), rng.normal(size=(4, 2))


def test_jacobian_matches_finite_differences(backend, xw):
    x, w = xw
    jx = jg.jacobian(f_jg)(x, w)
    assert jx.shape == (3, 2, 3, 4)
    np.testing.assert_allclose(jx, numeric_jacobian(lambda x: f_np(x, w), x), atol=1e-8)
    jx2, jw = jg.jacobian(f_jg, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(jx2, jx, rtol=1e-12)
    np.testing.assert_allclose(jw, numeric_jacobian(lambda w: f_np(x, w), w), atol=1e-8)


def test_every_row_is_in_one_program_after_one_forward_pass(xw):
    x, w = xw
    traces = []

    def f(x, w):
        traces.append(1)
        return f_jg(x, w)

    cf = jg.jit(jg.jacobian(f), backend="numba")
    np.testing.assert_allclose(cf(x, w), jg.jacobian(f_jg)(x, w), rtol=1e-12)
    assert len(traces) == 1 and len(cf._cache) == 1
    names = [i.prim.name for i in cf.program.instrs]
    assert names.count("tanh") == 1  # the forward pass, once for the 6 sweeps
    assert names.count("concatenate") == 1  # the 6 rows, stacked


def test_pytrees_nest_as_in_jax(backend):
    params = {"a": np.array([1.0, 2.0]), "b": np.array(0.5)}

    def f(p, x):
        return {"y": p["a"] * x * p["b"], "s": jg.sum(p["a"] ** 2)}

    jac = jg.jacobian(f)(params, 3.0)
    assert set(jac) == {"y", "s"} and set(jac["y"]) == {"a", "b"}
    np.testing.assert_allclose(jac["y"]["a"], np.diag([1.5, 1.5]))
    np.testing.assert_allclose(jac["y"]["b"], [3.0, 6.0])
    np.testing.assert_allclose(jac["s"]["a"], [2.0, 4.0])
    np.testing.assert_allclose(jac["s"]["b"], 0.0)
    jac_aux, aux = jg.jacobian(lambda x: (x * 2.0, jg.sum(x)), has_aux=True)(params["a"])
    np.testing.assert_allclose(jac_aux, 2.0 * np.eye(2))
    np.testing.assert_allclose(aux, 3.0)


def test_hessian(backend):
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 3))

    def f(x, y):
        return 0.5 * jg.sum(x * (a @ x)) + jg.sum(x ** 3) * y

    x, y = rng.normal(size=3), 0.7
    np.testing.assert_allclose(jg.hessian(f)(x, y), 0.5 * (a + a.T) + np.diag(6 * x * y),
                               rtol=1e-12)
    (hxx, hxy), (hyx, hyy) = jg.hessian(f, argnums=(0, 1))(x, y)
    np.testing.assert_allclose(hxy, 3 * x ** 2, rtol=1e-12)
    np.testing.assert_allclose(hyx, 3 * x ** 2, rtol=1e-12)
    np.testing.assert_allclose(hyy, 0.0)
    assert hxx.shape == (3, 3) and np.shape(hyy) == ()


def test_grad_of_a_float_output_of_size_one(backend):
    x = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(jg.grad(lambda x: x[1:2] * x[2:])(x), [0.0, 3.0, 2.0])
    value, g = jg.value_and_grad(lambda x: jg.reshape(jg.sum(x * x), (1, 1)))(x)
    assert value.shape == (1, 1)
    np.testing.assert_allclose(g, 2 * x)
    with pytest.raises(jg.JitgradError, match=r"grad needs a function returning a float "
                       r"scalar, got f64\[2\]"):
        jg.grad(lambda x: x[:2])(x)


def test_jacobian_of_an_integer_output_is_refused():
    with pytest.raises(jg.JitgradError, match=r"jacobian needs a function returning float "
                       r"values, got i64\[2\]"):
        jg.jacobian(lambda x: jg.argmax(jg.reshape(x, (2, 2)), axis=1))(np.ones(4))
