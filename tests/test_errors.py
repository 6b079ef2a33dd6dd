"""Bad input: every error names the problem and the user's file:line, and changes nothing
the user owns (train_step's parameters and optimizer state stay as they were).

Each test states the line it expects with a `# <- here` marker on the offending line.
"""

import inspect
import os
import re

import numpy as np
import pytest

import jitgrad as jg

FILE = os.path.basename(__file__)


def here(fn) -> str:
    """file:line of the line of fn's source marked `# <- here`."""
    lines, start = inspect.getsourcelines(fn)
    k = next(i for i, line in enumerate(lines) if "# <- here" in line)
    return f"{FILE}:{start + k}"


def raises(exc, fn, *args, match=None):
    with pytest.raises(exc) as info:
        fn(*args)
    msg = str(info.value)
    if match is not None:
        assert re.search(match, msg), msg
    return msg


# ---------------------------------------------------------------- shapes and dtypes

def test_shape_mismatch_names_shapes_and_line(backend):
    def f(a, b):
        h = jg.tanh(a)
        return h + b  # <- here

    msg = raises(jg.JitgradError, jg.jit(f), np.ones((3, 4)), np.ones(5), match=r"\(3, 4\)")
    assert "(5,)" in msg and "broadcast" in msg and here(f) in msg


@pytest.mark.parametrize("bad,what", [
    (lambda: np.ones(3, complex), "complex128"),
    (lambda: np.array(["a", "b"]), "<U1"),
    (lambda: np.array([object()]), "object"),
    (lambda: "text", "str"),
    (lambda: {1, 2}, "set"),
])
def test_unsupported_argument_is_named_by_its_place_and_the_call(backend, bad, what):
    def call():
        return jg.jit(lambda p: p["w"][1] * 2)({"w": [np.ones(2), bad()]})  # <- here

    msg = raises(jg.JitgradError, call)
    assert "args[0]['w'][1]" in msg and what in msg and here(call) in msg


def test_new_shapes_retrace_and_errors_still_name_the_line(backend):
    def f(x, W):
        return jg.sum(x @ W)  # <- here

    cf = jg.jit(f)
    cf(np.ones((2, 3)), np.ones((3, 4)))
    msg = raises(jg.JitgradError, cf, np.ones((2, 5)), np.ones((3, 4)), match="matmul")
    assert "(2, 5)" in msg and here(f) in msg


@pytest.mark.parametrize("op,match", [
    (lambda x: jg.sum(x, axis=3), "axis 3 is out of range"),
    (lambda x: jg.transpose(x, (0, 0)), "not a permutation"),
    (lambda x: jg.reshape(x, (7,)), "cannot reshape"),
    (lambda x: x[5], "out of bounds"),
    (lambda x: x.astype(str), "unsupported dtype"),
    (lambda x: x * "a", "unsupported dtype <U"),
])
def test_bad_static_arguments_name_the_line(backend, op, match):
    def f(x):
        return op(x)

    msg = raises(jg.JitgradError, jg.jit(f), np.ones((2, 3)), match=match)
    assert f"{FILE}:" in msg, msg


# ---------------------------------------------------------------- structure

def test_grad_of_non_scalar_and_structures(backend):
    x = np.ones(3)

    def vector():
        return jg.grad(lambda a: a * 2)(x)  # <- here

    def mapping():
        return jg.grad(lambda a: {"loss": jg.sum(a)})(x)  # <- here

    def aux():
        return jg.grad(lambda a: jg.sum(a), has_aux=True)(x)  # <- here

    def argnums():
        return jg.grad(lambda a: jg.sum(a), argnums=2)(x)  # <- here

    def returns_text():
        return jg.jit(lambda a: (a, "done"))(x)  # <- here

    for call, match in ((vector, "scalar"), (mapping, r"scalar.*\{'loss'"),
                        (aux, "has_aux"), (argnums, "argnums 2"),
                        (returns_text, "cannot use a str")):
        msg = raises(jg.JitgradError, call, match=match)
        assert here(call) in msg, msg


def test_integer_input_gradient_names_the_argument(backend):
    msg = raises(jg.UndefinedGradientError, jg.grad(lambda i: jg.sum(i * 2.0)), np.arange(3))
    assert "integer" in msg and "argument 0" in msg


# ---------------------------------------------------------------- data: labels and indices

def test_labels_and_indices_out_of_range(backend):
    def loss(logits, y):
        return jg.softmax_cross_entropy(logits, y)  # <- here

    msg = raises(jg.JitgradError, jg.jit(loss), np.zeros((4, 3)), np.array([0, 1, 3, 2]),
                 match="label 3 at index 2 is out of range for 3 classes")
    assert here(loss) in msg
    msg = raises(jg.JitgradError, jg.jit(loss), np.zeros((4, 3)), np.array([0, -1, 1, 2]),
                 match="label -1")
    msg = raises(jg.JitgradError, jg.jit(loss), np.zeros((4, 3)), np.zeros(4),
                 match="labels must be integers")

    def pick(x, i):
        return x[i] * 2  # <- here

    msg = raises(jg.JitgradError, jg.jit(pick), np.ones(3), np.array([0, 7]),
                 match="index 7 is out of bounds")
    assert here(pick) in msg


# ---------------------------------------------------------------- NaN and Inf

def test_check_finite_names_the_first_instruction_and_line(backend):
    def f(x):
        y = jg.exp(x)
        z = jg.log(y - 2.0)  # <- here
        return jg.sum(z * 3.0)

    x = np.array([0.0, 1.0])  # exp(0) - 2 < 0: log gives NaN
    with np.errstate(all="ignore"):
        assert np.isnan(jg.jit(f)(x))  # off by default: no check, no cost
    msg = raises(jg.NonFiniteError, jg.jit(f, check_finite=True), x, match=r"\blog\b")
    assert here(f) in msg
    np.testing.assert_allclose(jg.jit(f, check_finite=True)(np.array([2.0, 3.0])),
                               f(np.array([2.0, 3.0])))


def test_check_finite_from_the_environment(backend, monkeypatch):
    def f(x):
        return jg.sum(1.0 / x)  # <- here

    monkeypatch.setenv("JITGRAD_CHECK_FINITE", "1")
    msg = raises(jg.NonFiniteError, jg.jit(f), np.array([1.0, 0.0]), match="div")
    assert here(f) in msg
    monkeypatch.setenv("JITGRAD_CHECK_FINITE", "0")
    with np.errstate(all="ignore"):
        assert np.isinf(jg.jit(f)(np.array([1.0, 0.0])))


def test_non_finite_input_is_reported_as_the_callers(backend):
    def call(x):
        return jg.jit(lambda a: jg.sum(a * 2), check_finite=True)(x)  # <- here

    msg = raises(jg.NonFiniteError, call, np.array([1.0, np.inf]),
                 match=re.escape("input args[0] (f64[2]) holds inf at index (1,)"))
    assert here(call) in msg


# ---------------------------------------------------------------- numpy and Python

def test_unsupported_numpy_function_names_it_and_the_line(backend):
    def f(x):
        return jg.sum(np.cumprod(x))  # <- here

    def g(x):
        return np.linalg.norm(x)  # <- here

    def h(x):
        return np.add.reduce(x)  # <- here

    for fn, name in ((f, r"numpy\.cumprod"), (g, r"numpy\.linalg\.norm"),
                     (h, r"numpy\.add\.reduce")):
        msg = raises(jg.JitgradError, jg.jit(fn), np.ones(3), match=name)
        assert "not supported" in msg and here(fn) in msg


@pytest.mark.parametrize("kind", ["if", "while", "and", "float", "index"])
def test_python_control_flow_on_traced_values_explains_tracing(backend, kind):
    def f(x):
        if kind == "if":
            if jg.sum(x) > 0:  # <- here
                return x
            return -x
        if kind == "while":
            while jg.max(x) < 10:  # <- here
                x = x * 2
            return x
        if kind == "and":
            return (jg.sum(x) > 0) and x  # <- here
        if kind == "float":
            return x * float(jg.sum(x))  # <- here
        return [1.0, 2.0, 3.0][jg.argmax(x)]  # <- here

    msg = raises(jg.TracingError, jg.jit(f), np.ones(3))
    assert "traced" in msg and "jg.where" in msg and "control flow" in msg
    lines, start = inspect.getsourcelines(f)
    marked = [start + i for i, line in enumerate(lines) if "# <- here" in line]
    assert re.search(rf"{FILE}:(\d+)", msg) and int(re.search(rf"{FILE}:(\d+)", msg)[1]) in marked


def test_iterating_a_traced_array_unrolls_over_its_rows(backend):
    # The shape is static, so iteration needs no value (as in JAX): `k1, k2 = split(key)`.
    x = np.arange(6.0).reshape(3, 2)
    rows = jg.jit(lambda x: [v * 2 for v in x])(x)
    np.testing.assert_array_equal(np.stack(rows), x * 2)
    with pytest.raises(TypeError, match="0-d"):
        jg.jit(lambda x: list(jg.sum(x)))(x)


# ---------------------------------------------------------------- train_step changes nothing

def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree.copy()


def _assert_same(a, b):
    if isinstance(a, dict):
        for k in a:
            _assert_same(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


def test_failed_train_steps_leave_params_and_state_untouched(backend):
    rng = np.random.default_rng(0)
    params = jg.nn.mlp_init([4, 5, 3], rng)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    step = jg.train_step(jg.nn.mlp_loss, params, jg.optim.Adam(lr=0.01), check_finite=True)
    step(x, y)  # a real state first
    before, state, t = _copy(params), _copy(step.state), step.t
    bad_y = y.copy()
    bad_y[4] = 3
    nan_x = x.copy()
    nan_x[2, 1] = np.nan
    for batch, exc, match in (
            ((x, bad_y), jg.JitgradError, "label 3 at index 4"),
            ((x[:, :3], y), jg.JitgradError, "matmul"),           # wrong feature count
            ((x, y[:4]), jg.JitgradError, "labels of shape"),     # batch sizes disagree
            ((x, y.astype(np.float64)), jg.JitgradError, "integers"),
            ((nan_x, y), jg.NonFiniteError, "input"),
            ((x * 1e30, y), jg.NonFiniteError, "non-finite")):
        with pytest.raises(exc, match=match):
            step(*batch)
        _assert_same(params, before)
        _assert_same(step.state, state)
        assert step.t == t
    step(x, y)  # and it still trains
    assert step.t == t + 1
