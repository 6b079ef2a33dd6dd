"""Calling conventions as in JAX: static arguments hashed into the cache key, keyword
arguments traced (and never differentiated), and clear errors for what is out of scope
(jvp, jacfwd, vmap). Compiled tests run on both backends (the `backend` fixture)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import jitgrad as jg

X = np.linspace(-1.0, 1.0, 6)


def reshape_and_iterate(x, shape, n, *, double=False):
    TRACES.append((shape, n, double))
    y = jg.reshape(x, shape)
    for _ in range(n):  # a loop count: a Python value, not a traced one
        y = jg.tanh(y)
    return y * 2.0 if double else y


TRACES: list = []


def expected(x, shape, n, double=False):
    y = x.reshape(shape)
    for _ in range(n):
        y = np.tanh(y)
    return y * 2.0 if double else y


def test_a_new_static_value_traces_again_and_the_same_one_does_not(backend):
    cf = jg.jit(reshape_and_iterate, static_argnums=(1, 2), static_argnames="double")
    TRACES.clear()
    np.testing.assert_allclose(cf(X, (2, 3), 2), expected(X, (2, 3), 2))
    np.testing.assert_allclose(cf(X + 1.0, (2, 3), 2), expected(X + 1.0, (2, 3), 2))
    assert len(TRACES) == 1  # same static values, new data: no new trace
    np.testing.assert_allclose(cf(X, (3, 2), 2), expected(X, (3, 2), 2))
    np.testing.assert_allclose(cf(X, (2, 3), 3), expected(X, (2, 3), 3))
    assert len(TRACES) == 3
    np.testing.assert_allclose(cf(X, (2, 3), 2, double=True), expected(X, (2, 3), 2, True))
    cf(X, (2, 3), 2, double=True)
    assert [t[2] for t in TRACES] == [False, False, False, True]


def test_static_argnums_and_argnames_name_the_same_parameter(backend):
    """As in JAX: a static position is static when passed by keyword too, and a static
    name when passed by position."""
    by_num = jg.jit(reshape_and_iterate, static_argnums=(1, 2))
    np.testing.assert_allclose(by_num(X, shape=(3, 2), n=1), expected(X, (3, 2), 1))
    by_name = jg.jit(reshape_and_iterate, static_argnames=("shape", "n"))
    np.testing.assert_allclose(by_name(X, (6,), 3), expected(X, (6,), 3))
    negative = jg.jit(reshape_and_iterate, static_argnums=(-1, -2))  # from the end
    np.testing.assert_allclose(negative(X, (2, 3), 1), expected(X, (2, 3), 1))


def test_a_static_flag_selects_code(backend):
    def f(x, mode):
        return jg.relu(x) if mode == "relu" else jg.tanh(x)

    cf = jg.jit(f, static_argnames="mode")
    np.testing.assert_allclose(cf(X, mode="relu"), np.maximum(X, 0))
    np.testing.assert_allclose(cf(X, mode="tanh"), np.tanh(X))


def test_an_unhashable_static_argument_is_a_clear_error():
    cf = jg.jit(reshape_and_iterate, static_argnums=(1, 2))
    with pytest.raises(jg.JitgradError, match=r"static argument 1 is a list, which is not "
                       r"hashable.*tuple instead of a list.*test_calling\.py"):
        cf(X, [2, 3], 2)
    with pytest.raises(jg.JitgradError, match=r"static argument 'n' is a ndarray"):
        cf(X, (2, 3), n=np.array(2))


@pytest.mark.parametrize("options, message", [
    ({"static_argnums": 3}, r"static_argnums 3 is out of range: reshape_and_iterate takes 3"),
    ({"static_argnames": "size"}, r"static_argnames 'size' is not a parameter"),
    ({"static_argnums": "1"}, r"static_argnums must be ints"),
])
def test_bad_static_options_are_named(options, message):
    with pytest.raises(jg.JitgradError, match=message):
        jg.jit(reshape_and_iterate, **options)


def test_keyword_arguments_are_traced(backend):
    traces = []

    def scaled(x, *, scale, shift=0.0):
        traces.append(1)
        return x * scale + shift

    cf = jg.jit(scaled)
    np.testing.assert_allclose(cf(X, scale=2.0), X * 2.0)
    np.testing.assert_allclose(cf(X, scale=3.0, shift=1.0), X * 3.0 + 1.0)
    np.testing.assert_allclose(cf(X, scale=-1.0, shift=0.5), 0.5 - X)
    np.testing.assert_allclose(cf(x=X, scale=np.float64(4.0)), X * 4.0)
    assert len(traces) == 3  # a new keyword set or dtype traces again, new values do not


def test_a_keyword_argument_is_named_in_errors():
    cf = jg.jit(lambda x, y: x * y, check_finite=True)
    with pytest.raises(jg.NonFiniteError, match=r"input kwargs\['y'\] \(f64\[2\]\) holds nan"):
        cf(np.ones(2), y=np.array([1.0, np.nan]))
    with pytest.raises(jg.JitgradError, match=r"kwargs\['y'\]: unsupported argument of type str"):
        jg.jit(lambda x, y: x)(np.ones(2), y="no")


def loss(w, x, *, y, power=2):
    r = x @ w - y
    out = r
    for _ in range(power - 1):  # power must be a Python int
        out = out * r
    return jg.sum(out)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3, 2)), rng.normal(size=(4, 3)), rng.normal(size=(4, 2))


@pytest.mark.numba_full  # compiled keyword arguments: test_keyword_arguments_are_traced
def test_grad_takes_keyword_arguments_and_differentiates_only_argnums(backend, problem):
    w, x, y = problem
    want_w = x.T @ (2 * (x @ w - y))
    np.testing.assert_allclose(jg.grad(loss)(w, x, y=y), want_w)
    value, (gw, gx) = jg.value_and_grad(loss, argnums=(0, 1))(w, x, y=y)
    np.testing.assert_allclose(value, np.sum((x @ w - y) ** 2))
    np.testing.assert_allclose(gw, want_w)
    np.testing.assert_allclose(gx, 2 * (x @ w - y) @ w.T)


def test_grad_inside_jit_sees_static_arguments_as_python_values(backend, problem):
    w, x, y = problem
    step = jg.jit(jg.grad(loss), static_argnames="power")  # power: a Python int in loss
    for p in (2, 4):
        want = x.T @ (p * (x @ w - y) ** (p - 1))
        np.testing.assert_allclose(step(w, x, y=y, power=p), want, rtol=1e-12)
    assert len(step._cache) == 2
    with pytest.raises(jg.TracingError, match=r"static argument"):  # traced, it is no int
        jg.jit(jg.grad(loss))(w, x, y=y, power=3)


def test_show_of_a_function_with_static_arguments():
    cf = jg.jit(reshape_and_iterate, static_argnums=(1, 2))
    out = io.StringIO()
    inspection = cf.show(X, (2, 3), 2, file=out)
    assert [i.prim.name for i in inspection.traced.instrs].count("tanh") == 2
    assert inspection.input_names == ["x"]
    with pytest.raises(jg.JitgradError, match=r"static arguments needs its arguments"):
        cf.show()


@pytest.mark.parametrize("name, call, hint", [
    ("jvp", lambda: jg.jvp(np.tanh, (X,), (X,)), r"jg\.jacobian\(f\)\(x\) @ v"),
    ("jacfwd", lambda: jg.jacfwd(np.tanh), r"jg\.jacobian"),
    ("vmap", lambda: jg.vmap(np.tanh), r"Write the batch axis into the function"),
])
def test_out_of_scope_transformations_raise_naming_the_workaround(name, call, hint):
    with pytest.raises(jg.JitgradError, match=rf"jg\.{name} is not supported: .*{hint}.*"
                       r"test_calling\.py"):
        call()
