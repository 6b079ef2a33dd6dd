"""Back-propagation as in Deep Learning (Goodfellow, Bengio & Courville), ch. 6.5, and
the calling conventions of docs/design.md.

The chain rule on a chain (eqs. 6.49-6.52), the MLP with ReLU, cross-entropy and
weight decay (fig. 6.11) against hand-derived formulas, a graph with 2^depth
paths whose gradient program grows linearly, second derivatives, undefined and
integer gradients, multi-output primitives, pytrees, traced Python scalars,
error messages, numpy dispatch, the printed IR and the optimisation passes.
"""

from __future__ import annotations

import collections
import inspect
import os
import re

import numpy as np
import pytest
from gradcheck import (
    assert_grads_close,
    check_grads,
    numeric_grad,
    numeric_hvp,
    random_like,
    vdot,
)

import jitgrad as jg
from jitgrad.compiler import interp, passes
from jitgrad.frontend import tree
from jitgrad.frontend.ir import validate
from jitgrad.frontend.trace import signature_of, trace_flat

FILE = os.path.basename(__file__)


def prims(cf) -> list[str]:
    return [ins.prim.name for ins in cf.program.instrs]


def raw_program(fn, *args):
    """The traced program before any optimisation pass."""
    leaves, in_tree = tree.flatten(tuple(args))
    prog, _, _ = trace_flat(fn, in_tree, [signature_of(a) for a in leaves])
    return prog


def line_of(fn, offset: int = 0) -> str:
    return f"{FILE}:{inspect.getsourcelines(fn)[1] + offset}"


# ---------------------------------------------------------------- 6.5.2: the chain rule on a chain

CHAIN = {
    "tanh": (jg.tanh, np.tanh, lambda u: 1.0 - np.tanh(u) ** 2),
    "exp": (jg.exp, np.exp, np.exp),
}


@pytest.mark.parametrize("name", sorted(CHAIN))
@pytest.mark.parametrize("w", [np.array(0.3), np.array([-0.7, 0.1, 0.45])],
                         ids=["scalar", "vector"])
def test_chain_eq_6_49_to_6_52(name, w, backend):
    f, f_np, df_np = CHAIN[name]

    def z_of(w):
        return jg.sum(f(f(f(w))))  # x = f(w), y = f(x), z = f(y)

    x = f_np(w)
    y = f_np(x)
    z = f_np(y)
    cf = jg.jit(jg.value_and_grad(z_of))
    value, g = cf(w)
    np.testing.assert_allclose(value, np.sum(z), rtol=1e-13)
    # eq. 6.52: dz/dw = f'(y) f'(x) f'(w), each factor evaluated once at a stored value
    np.testing.assert_allclose(g, df_np(y) * df_np(x) * df_np(w), rtol=1e-12)
    if name == "exp":
        np.testing.assert_allclose(g, z * y * x, rtol=1e-12)  # f' = f: the stored values
    assert g.shape == w.shape and g.dtype == np.float64
    validate(cf.program)
    # The gradient program reuses the forward values (6.52) instead of recomputing
    # f(w) and f(f(w)) inside each derivative (6.51): f is applied exactly three times.
    assert prims(cf).count(name) == 3
    check_grads(z_of, (w,))


# ---------------------------------------------------------------- 6.5.7: the MLP of fig. 6.11

def mlp_data(rng, b=8, d=5, h=6, c=4, dtype=np.float64):
    X = rng.normal(size=(b, d)).astype(dtype)
    W1 = (rng.normal(size=(d, h)) * 0.5).astype(dtype)
    W2 = (rng.normal(size=(h, c)) * 0.5).astype(dtype)
    y = rng.integers(0, c, size=b)
    return W1, W2, X, y


def mlp_cost(W1, W2, X, y, lam):
    """J = cross_entropy(relu(X W1) W2, y) + lam (sum W1^2 + sum W2^2), fig. 6.11."""
    H = jg.relu(X @ W1)
    U2 = H @ W2
    return jg.softmax_cross_entropy(U2, y) + lam * (jg.sum(W1 ** 2) + jg.sum(W2 ** 2))


def mlp_by_hand(W1, W2, X, y, lam):
    """The gradients derived in section 6.5.7, in numpy."""
    B = X.shape[0]
    U1 = X @ W1
    H = np.maximum(U1, 0.0)
    U2 = H @ W2
    P = np.exp(U2 - U2.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    onehot = np.eye(W2.shape[1])[y]
    J = (-np.log(P[np.arange(B), y]).mean()
         + lam * (np.sum(W1 ** 2) + np.sum(W2 ** 2)))
    G = (P - onehot) / B                      # dJ/dU2
    dW2 = H.T @ G + 2 * lam * W2
    G1 = (G @ W2.T) * (U1 > 0)                # through the ReLU
    dW1 = X.T @ G1 + 2 * lam * W1
    return J, dW1, dW2


def test_mlp_gradients_match_the_hand_derivation(backend, rng):
    W1, W2, X, y = mlp_data(rng)
    lam = 1e-2
    cf = jg.jit(jg.value_and_grad(mlp_cost, argnums=(0, 1)))
    J, (dW1, dW2) = cf(W1, W2, X, y, lam)
    J_ref, dW1_ref, dW2_ref = mlp_by_hand(W1, W2, X, y, lam)
    np.testing.assert_allclose(J, J_ref, rtol=1e-12)
    np.testing.assert_allclose(dW1, dW1_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dW2, dW2_ref, rtol=1e-10, atol=1e-14)
    validate(cf.program)
    names = prims(cf)
    # the fused cross-entropy gradient; transposes folded into matmul flags (simplify)
    assert "softmax_cross_entropy_grad" in names
    assert "transpose" not in names
    # ... and finite differences agree too (labels and lam are not differentiated)
    check_grads(mlp_cost, (W1, W2, X, y, lam), argnums=(0, 1), order=1)


def test_mlp_float32_end_to_end(backend, rng):
    W1, W2, X, y = mlp_data(rng, dtype=np.float32)
    J, (dW1, dW2) = jg.jit(jg.value_and_grad(mlp_cost, argnums=(0, 1)))(W1, W2, X, y, 1e-2)
    assert J.dtype == dW1.dtype == dW2.dtype == np.float32
    J_ref, dW1_ref, dW2_ref = mlp_by_hand(*(a.astype(np.float64) for a in (W1, W2, X)), y, 1e-2)
    np.testing.assert_allclose(J, J_ref, rtol=1e-5)
    np.testing.assert_allclose(dW1, dW1_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dW2, dW2_ref, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------- 6.5.6: linear cost, exponential paths

def paths(depth):
    def f(x, a, b):
        for _ in range(depth):
            x = jg.tanh(x) * a + x * b  # two paths from each level to the next: 2^depth in all
        return jg.sum(x)
    return f


def grad_program_size(depth):
    cf = jg.jit(jg.grad(paths(depth), argnums=(0, 1, 2)))
    x = np.array([0.3, -0.8, 1.1])
    cf(x, np.array(0.7), np.array(0.6))
    validate(cf.program)
    return len(cf.program.instrs)


def test_gradient_program_grows_linearly_with_depth(backend):
    n4, n8, n16 = grad_program_size(4), grad_program_size(8), grad_program_size(16)
    per_level = (n8 - n4) / 4
    assert per_level > 0
    assert n16 - n8 == 8 * per_level, (n4, n8, n16)
    # O(1) per forward edge: a level has 4 forward instructions (tanh, 2 mul, add)
    assert per_level <= 20, f"{per_level} instructions per level of 4 forward instructions"


def test_exponential_paths_gradient_matches_finite_differences(backend):
    x = np.array([0.3, -0.8, 1.1])
    check_grads(paths(8), (x, np.array(0.7), np.array(0.6)), argnums=(0, 1, 2))


# ---------------------------------------------------------------- second derivatives

SECOND = {
    "tanh": (jg.tanh, lambda x: -2 * np.tanh(x) * (1 - np.tanh(x) ** 2)),
    "exp": (jg.exp, np.exp),
    "log": (jg.log, lambda x: -1.0 / x ** 2),
    "sigmoid": (jg.sigmoid, lambda x: (s := 1 / (1 + np.exp(-x))) * (1 - s) * (1 - 2 * s)),
    "sqrt": (jg.sqrt, lambda x: -0.25 * x ** -1.5),
    "cube": (lambda x: x ** 3, lambda x: 6 * x),
    "x*x*x": (lambda x: x * x * x, lambda x: 6 * x),
    "reciprocal": (lambda x: 1.0 / x, lambda x: 2.0 / x ** 3),
    "gauss": (lambda x: x * jg.exp(-x * x), lambda x: np.exp(-x * x) * (4 * x ** 3 - 6 * x)),
    "logsumexp": (lambda x: jg.logsumexp(jg.concatenate([jg.reshape(x, (1,)), 2.0 * x[None]])),
                  lambda x: np.exp(3 * x) / (np.exp(x) + np.exp(2 * x)) ** 2),
    "relu": (jg.relu, lambda x: 0.0 * x),
    "abs": (jg.abs, lambda x: 0.0 * x),
    "maximum": (lambda x: jg.maximum(x, 0.5 * x * x), lambda x: np.where(x > 0.5 * x * x, 0, 1)),
}


@pytest.mark.parametrize("name", sorted(SECOND))
def test_second_derivative_of_scalar_functions(name, backend):
    f, d2 = SECOND[name]
    for x in (0.7, 1.3, 3.1):
        got = jg.jit(jg.grad(jg.grad(f)))(np.array(x))
        assert got.shape == () and got.dtype == np.float64
        np.testing.assert_allclose(got, d2(x), rtol=1e-12, atol=1e-14)
        # a Python float argument works the same
        np.testing.assert_allclose(jg.grad(jg.grad(f))(x), d2(x), rtol=1e-12, atol=1e-14)


def test_third_derivative_of_tanh(backend):
    t = np.tanh(0.4)
    got = jg.jit(jg.grad(jg.grad(jg.grad(jg.tanh))))(np.array(0.4))
    np.testing.assert_allclose(got, -2 * (1 - t ** 2) * (1 - 3 * t ** 2), rtol=1e-12)


def small_mlp(params, X, y):
    h = jg.tanh(X @ params["W1"] + params["b1"])
    logits = h @ params["W2"]
    return jg.softmax_cross_entropy(logits, y) + 1e-3 * vdot(params, params)


def test_hessian_vector_product_of_an_mlp(backend, rng):
    params = {"W1": rng.normal(size=(4, 5)), "b1": rng.normal(size=5),
              "W2": rng.normal(size=(5, 3))}
    X, y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    v = random_like(rng, params)

    def hvp(params, v, X, y):
        return jg.grad(lambda p: vdot(jg.grad(small_mlp)(p, X, y), v))(params)

    cf = jg.jit(hvp)
    got = cf(params, v, X, y)
    validate(cf.program)
    assert isinstance(got, dict) and sorted(got) == ["W1", "W2", "b1"]
    expected = numeric_hvp(jg.jit(jg.grad(small_mlp)), (params, X, y), v, 0)
    assert_grads_close(got, expected, what="Hessian-vector product")
    # eager (un-jitted) nesting agrees
    assert_grads_close(hvp(params, v, X, y), expected)


# ---------------------------------------------------------------- undefined and integer gradients

def test_gradient_wrt_integer_input_raises(backend):
    n, x = np.arange(3), np.ones(3)
    with pytest.raises(jg.UndefinedGradientError, match="integer"):
        jg.grad(lambda n, x: jg.sum(n * x))(n, x)
    with pytest.raises(jg.UndefinedGradientError):
        jg.grad(lambda n, x: jg.sum(n * x), argnums=(0, 1))(n, x)
    with pytest.raises(jg.UndefinedGradientError):
        jg.jit(jg.grad(lambda n: n * 2.0))(3)  # a Python int is an integer input too
    # ... but with respect to the float argument it is fine, and integer inputs are welcome
    np.testing.assert_array_equal(jg.grad(lambda n, x: jg.sum(n * x), argnums=1)(n, x), n)


def test_integer_labels_and_indices_are_inputs_not_differentiated(backend, rng):
    logits, y = rng.normal(size=(4, 3)), np.array([2, 0, 1, 1])
    idx = np.array([3, 3, 0])
    f = lambda z, y, idx: jg.softmax_cross_entropy(z, y) + jg.sum(z[idx])  # noqa: E731
    g = jg.jit(jg.grad(f))(logits, y, idx)
    assert_grads_close(g, numeric_grad(f, (logits, y, idx), 0))


def test_floor_raises_but_stop_gradient_of_floor_is_fine(backend):
    x = np.array([0.3, 1.6, -2.2])

    def bad(x):
        return jg.sum(jg.floor(x) * x)

    with pytest.raises(jg.UndefinedGradientError) as info:
        jg.jit(jg.grad(bad))(x)
    assert "floor" in str(info.value) and line_of(bad, 1) in str(info.value)
    g = jg.jit(jg.grad(lambda x: jg.sum(jg.stop_gradient(jg.floor(x)) * x)))(x)
    np.testing.assert_array_equal(g, np.floor(x))
    # sign in the middle of a chain: still named, still located
    with pytest.raises(jg.UndefinedGradientError, match=r"sign.*test_textbook\.py:\d+"):
        jg.grad(lambda x: jg.sum(jg.tanh(jg.sign(jg.exp(x)) * x)))(x)


def test_relu_second_derivative_is_defined_and_zero(backend):
    for x in (-1.5, 0.0, 2.0):
        assert jg.jit(jg.grad(jg.grad(jg.relu)))(np.array(x)) == 0.0
    for x, d in ((-1.5, 0.0), (2.0, 1.0), (0.0, 0.0)):  # relu'(0) = 0
        assert jg.grad(jg.relu)(np.array(x)) == d
    # Hessian of sum(relu(x) * x) is diag(2 [x > 0]): relu' is a mask, its derivative zero
    x = np.array([-1.0, 0.5, 2.0])
    v = np.array([1.0, 2.0, 3.0])
    hv = jg.grad(lambda x: jg.sum(jg.grad(lambda x: jg.sum(jg.relu(x) * x))(x) * v))(x)
    np.testing.assert_allclose(hv, 2.0 * (x > 0) * v)


def test_comparisons_and_argmax_carry_no_gradient_and_never_raise(backend, rng):
    x = rng.normal(size=(3, 4))

    def f(x):
        mask = (x > 0.1).astype(x.dtype)
        i = jg.argmax(x, axis=1)
        return jg.sum(mask * x) + jg.sum(i.astype(x.dtype)) + jg.sum(x == x)

    g = jg.jit(jg.grad(f))(x)
    np.testing.assert_array_equal(g, (x > 0.1).astype(float))


def test_conventions_at_kinks(backend):
    """docs/design.md's choices where the derivative has a kink: relu'(0) = abs'(0) = 0, a tie
    in maximum sends half to each side, tied maxima of a reduction share evenly, and
    d(a ** b)/db = 0 where a <= 0."""
    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(jg.jit(jg.grad(lambda x: jg.sum(jg.relu(x))))(x), [0, 0, 1])
    np.testing.assert_array_equal(jg.jit(jg.grad(lambda x: jg.sum(jg.abs(x))))(x), [-1, 0, 1])
    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 5.0, 0.0])
    ga, gb = jg.jit(jg.grad(lambda a, b: jg.sum(jg.maximum(a, b)), argnums=(0, 1)))(a, b)
    np.testing.assert_array_equal(ga, [0.5, 0.0, 1.0])
    np.testing.assert_array_equal(gb, [0.5, 1.0, 0.0])
    m = np.array([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]])
    g = jg.jit(jg.grad(lambda m: jg.sum(jg.max(m, axis=1) * np.array([1.0, 10.0]))))(m)
    np.testing.assert_array_equal(g, [[0.0, 0.5, 0.5], [0.0, 0.0, 10.0]])
    base = np.array([-2.0, 0.0, 2.0])
    gb = jg.jit(jg.grad(lambda a, e: jg.sum(a ** e), argnums=1))(base, np.array(2.0))
    np.testing.assert_allclose(gb, 4.0 * np.log(2.0), rtol=1e-15)


def test_results_are_fresh_arrays_and_inputs_may_be_strided(backend, rng):
    x = rng.normal(size=(4, 6))
    strided = x[:, ::2]  # not contiguous
    cf = jg.jit(lambda x: (x, jg.tanh(x), jg.sum(x)))
    same, t, total = cf(strided)
    np.testing.assert_array_equal(same, strided)
    np.testing.assert_allclose(t, np.tanh(strided), rtol=1e-15)
    assert isinstance(total, np.ndarray) and total.shape == ()
    assert not np.shares_memory(same, x)
    same[...] = 0.0  # the caller owns the result: the input is untouched ...
    assert np.all(x[:, ::2] == strided) and np.any(strided != 0.0)
    again, t2, _ = cf(strided)  # ... and so is the next call's result
    np.testing.assert_array_equal(again, strided)
    assert not np.shares_memory(t, t2)
    np.testing.assert_allclose(cf(x.T.copy().T[:, ::2])[1], np.tanh(x[:, ::2]), rtol=1e-15)


# ---------------------------------------------------------------- multi-output primitives

def test_max_argmax_values_indices_and_gradient(backend, rng):
    x = rng.permutation(20).reshape(4, 5) * 0.25 - 2.0
    cf = jg.jit(lambda x: jg.max_argmax(x, axis=1))
    vals, idx = cf(x)
    np.testing.assert_array_equal(vals, x.max(axis=1))
    np.testing.assert_array_equal(idx, x.argmax(axis=1))
    assert idx.dtype == np.int64 and vals.dtype == np.float64
    assert prims(cf) == ["max_argmax"]  # one instruction, two outputs
    assert len(cf.program.instrs[0].outputs) == 2
    eager_vals, eager_idx = jg.max_argmax(x, axis=0)
    np.testing.assert_array_equal(eager_vals, x.max(axis=0))
    np.testing.assert_array_equal(eager_idx, x.argmax(axis=0))

    w = rng.normal(size=4)
    f = lambda x: jg.sum(jg.max_argmax(x, axis=1)[0] * w)  # noqa: E731
    g = jg.jit(jg.grad(f))(x)
    expected = np.zeros_like(x)
    expected[np.arange(4), x.argmax(axis=1)] = w
    np.testing.assert_array_equal(g, expected)
    check_grads(f, (x,))


# ---------------------------------------------------------------- pytrees and calling conventions

def test_dict_and_nested_params_get_gradients_of_the_same_structure(backend, rng):
    params = {"layer1": {"W": rng.normal(size=(3, 4)), "b": rng.normal(size=4)},
              "layer2": [rng.normal(size=(4, 2)), rng.normal(size=2)]}
    X = rng.normal(size=(5, 3))

    def loss(p, X):
        h = jg.tanh(X @ p["layer1"]["W"] + p["layer1"]["b"])
        W, b = p["layer2"]
        return jg.sum((h @ W + b) ** 2)

    g = jg.jit(jg.grad(loss))(params, X)
    assert isinstance(g, dict) and sorted(g) == ["layer1", "layer2"]
    assert isinstance(g["layer1"], dict) and isinstance(g["layer2"], list)
    assert tree.flatten(g)[1] == tree.flatten(params)[1]
    assert_grads_close(g, numeric_grad(loss, (params, X), 0))


def test_list_params_tuple_argnums_and_python_scalars(backend, rng):
    ws = [rng.normal(size=3), rng.normal(size=(3, 3))]
    x = rng.normal(size=3)

    def f(ws, x, scale):
        return scale * jg.sum(jg.tanh(ws[1] @ (ws[0] * x)))

    gws, gx, gscale = jg.jit(jg.grad(f, argnums=(0, 1, 2)))(ws, x, 1.5)
    assert isinstance(gws, list) and len(gws) == 2
    assert gx.shape == (3,) and np.shape(gscale) == ()
    assert_grads_close(gws, numeric_grad(f, (ws, x, 1.5), 0))
    assert_grads_close(gx, numeric_grad(f, (ws, x, 1.5), 1))
    assert_grads_close(gscale, numeric_grad(f, (ws, x, 1.5), 2))
    # a negative argnum counts from the end, as in Python
    np.testing.assert_allclose(jg.grad(f, argnums=-2)(ws, x, 1.5), gx, rtol=1e-14)


def test_has_aux_and_value_and_grad(backend, rng):
    x = rng.normal(size=(3, 4))

    def f(x):
        loss = jg.sum(jg.tanh(x) ** 2)
        return loss, {"pred": jg.argmax(x, axis=1), "act": jg.tanh(x)}

    g, aux = jg.jit(jg.grad(f, has_aux=True))(x)
    np.testing.assert_allclose(g, 2 * np.tanh(x) * (1 - np.tanh(x) ** 2), rtol=1e-12)
    np.testing.assert_array_equal(aux["pred"], x.argmax(axis=1))
    np.testing.assert_allclose(aux["act"], np.tanh(x), rtol=1e-15)
    (value, aux2), g2 = jg.value_and_grad(f, has_aux=True)(x)
    np.testing.assert_allclose(value, np.sum(np.tanh(x) ** 2), rtol=1e-13)
    np.testing.assert_allclose(g2, g, rtol=1e-15)
    assert sorted(aux2) == ["act", "pred"]
    with pytest.raises(jg.JitgradError, match="has_aux"):
        jg.grad(lambda x: (jg.sum(x), jg.sum(x)))(x)


def test_transformations_compose(backend, rng):
    x = rng.normal(size=4)
    f = jg.jit(lambda x: jg.sum(jg.tanh(x) * x))
    want = np.tanh(x) + x * (1 - np.tanh(x) ** 2)
    np.testing.assert_allclose(jg.grad(f)(x), want, rtol=1e-14)  # grad of a jitted function
    np.testing.assert_allclose(jg.jit(jg.grad(f))(x), want, rtol=1e-14)
    value, g = jg.value_and_grad(jg.jit(jg.jit(f)))(x)
    np.testing.assert_allclose(value, np.sum(np.tanh(x) * x), rtol=1e-14)
    np.testing.assert_allclose(g, want, rtol=1e-14)
    # inside jit, grad and jit applied to constant arguments may close over traced values
    inner = jg.jit(lambda x: (jg.grad(lambda s: jg.sum(jg.tanh(x * s)))(2.0),
                              jg.jit(lambda s: x * s)(3.0)))
    gs, scaled = inner(x)
    np.testing.assert_allclose(gs, np.sum(x * (1 - np.tanh(2.0 * x) ** 2)), rtol=1e-14)
    np.testing.assert_allclose(scaled, 3.0 * x, rtol=1e-15)


def test_python_scalar_arguments_are_traced_not_baked_in(backend, rng):
    x = rng.normal(size=4)
    cf = jg.jit(lambda x, lr: x - lr * jg.tanh(x))
    for lr in (0.1, 0.2, 0.35):
        np.testing.assert_allclose(cf(x, lr), x - lr * np.tanh(x), rtol=1e-15)
    assert len(cf._cache) == 1
    assert cf.program.inputs[1].shape == ()
    cf(x.astype(np.float32), 0.5)  # a new signature: a second specialisation
    assert len(cf._cache) == 2
    gcf = jg.jit(jg.grad(lambda x, lr: jg.sum(x - lr * jg.tanh(x)), argnums=1))
    for lr in (0.1, 0.2):
        np.testing.assert_allclose(gcf(x, lr), -np.sum(np.tanh(x)), rtol=1e-14)
    assert len(gcf._cache) == 1


def test_weak_typed_constants_keep_float32(backend, rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)

    def f(x, s):
        return jg.mean(jg.maximum(2.0 * x + 1, 0.5) / 3 - s * x ** 2)

    fwd = jg.jit(f)
    assert fwd(x, 0.25).dtype == np.float32
    # only the Python scalar argument itself is float64 (it meets float32 and becomes float32)
    values = fwd.program.inputs[:1] + [o for i in fwd.program.instrs for o in i.outputs]
    assert all(v.dtype == np.float32 for v in values if v.dtype.kind == "f"), fwd.program
    cf = jg.jit(jg.value_and_grad(f, argnums=(0, 1)))
    value, (gx, gs) = cf(x, 0.25)
    assert value.dtype == np.float32 and gx.dtype == np.float32
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(value, np.mean(np.maximum(2 * x64 + 1, 0.5) / 3 - 0.25 * x64 ** 2),
                               rtol=1e-6)
    np.testing.assert_allclose(gs, -np.mean(x64 ** 2), rtol=1e-5)
    # eagerly too
    assert jg.maximum(x, 0.5).dtype == np.float32
    assert jg.where(x > 0, x, 0.0).dtype == np.float32
    assert jg.mean(x ** 2 / 3).dtype == np.float32


# ---------------------------------------------------------------- error messages

def test_matmul_shape_error_names_shapes_and_the_users_line(backend):
    def f(a, b):
        return jg.tanh(a @ b)

    with pytest.raises(jg.JitgradError) as info:
        jg.jit(f)(np.ones((3, 4)), np.ones((5, 2)))
    msg = str(info.value)
    assert "(3, 4)" in msg and "(5, 2)" in msg and "matmul" in msg
    assert line_of(f, 1) in msg, msg
    with pytest.raises(jg.JitgradError) as info:  # eagerly as well
        jg.matmul(np.ones((3, 4)), np.ones((5, 2)))
    assert "(3, 4)" in str(info.value) and "(5, 2)" in str(info.value)
    assert re.search(rf"{re.escape(FILE)}:\d+", str(info.value))


def test_python_if_on_a_traced_value_asks_for_where(backend):
    def f(x):
        if x > 0:
            return x
        return -x

    with pytest.raises(jg.TracingError, match=r"jg\.where") as info:
        jg.jit(f)(np.array(1.0))
    assert isinstance(info.value, jg.JitgradError)
    with pytest.raises(jg.JitgradError, match=r"jg\.where"):
        jg.grad(lambda x: float(x) * x)(np.array(1.0))


def test_unsupported_numpy_function_is_named(backend):
    with pytest.raises(jg.JitgradError, match=r"numpy\.cumprod"):
        jg.jit(lambda x: jg.sum(np.cumprod(x)))(np.ones(3))
    with pytest.raises(jg.JitgradError, match=r"numpy\.fft\.fft"):
        jg.jit(lambda x: np.fft.fft(x))(np.ones(3))


# ---------------------------------------------------------------- numpy dispatch

def numpy_model(x, y, W):
    a = np.sum(np.tanh(x), axis=1)
    b = np.maximum(x, y)
    c = np.where(x > y, np.exp(x), np.log(y * y + 1.0))
    d = np.matmul(b, W)
    return np.mean(a) + np.sum(c) + np.sum(d * d)


def test_numpy_functions_dispatch_to_jitgrad(backend, rng):
    x = rng.normal(size=(3, 4))
    y = x + rng.choice([-1.0, 1.0], size=(3, 4)) * rng.uniform(0.2, 1.0, size=(3, 4))
    W = rng.normal(size=(4, 2))
    cf = jg.jit(numpy_model)
    np.testing.assert_allclose(cf(x, y, W), numpy_model(x, y, W), rtol=1e-13)  # plain numpy
    counts = collections.Counter(prims(cf))
    for name in ("tanh", "sum", "maximum", "where", "exp", "log", "matmul", "gt"):
        assert counts[name] >= 1, (name, cf.program)
    sums = [i for i in cf.program.instrs if i.prim.name == "sum"]
    assert any(i.kw["axes"] == (1,) for i in sums)
    validate(cf.program)
    # and the gradient of the numpy function is right
    check_grads(numpy_model, (x, y, W), argnums=(0, 1, 2), order=1)


# ---------------------------------------------------------------- the printed IR

def test_printed_program_shows_primitives_and_shapes(backend, capsys):
    args = (np.zeros((64, 784), np.float32), np.zeros((784, 128), np.float32),
            np.zeros((128, 10), np.float32), np.zeros(64, np.int64))

    def f(x, W1, W2, y):
        return jg.softmax_cross_entropy(jg.relu(x @ W1) @ W2, y)

    cf = jg.jit(f)
    cf.lower(*args)
    print(cf.program)
    text = capsys.readouterr().out.rstrip("\n")
    assert text == str(cf.program) == repr(cf.program)
    lines = text.splitlines()
    assert lines[0] == "{ lambda %0:f32[64,784] %1:f32[784,128] %2:f32[128,10] %3:i64[64] ."
    assert re.match(r"\s+%4:f32\[64,128\]\s+= matmul(\[.*\])? %0 %1\s", lines[1]), lines[1]
    assert re.match(r"\s+%5:f32\[64,128\]\s+= relu %4\s", lines[2]), lines[2]
    assert re.match(r"\s+%6:f32\[64,10\]\s+= matmul(\[.*\])? %5 %2\s", lines[3]), lines[3]
    assert re.match(r"\s+%7:f32\[\]\s+= softmax_cross_entropy %6 %3\s", lines[4]), lines[4]
    assert lines[5].strip() == "return %7 }"
    assert all(line_of(f, 1) in line for line in lines[1:5])
    # the gradient program prints too, with its fused primitive
    gcf = jg.jit(jg.grad(f, argnums=(1, 2)))
    gcf.lower(*args)
    assert "softmax_cross_entropy_grad" in str(gcf.program)


# ---------------------------------------------------------------- optimisation passes

def test_dce_and_cse_remove_instructions_without_changing_results(backend, rng):
    x = rng.normal(size=(3, 4))

    def f(x):
        unused = jg.exp(x) * 2.0  # noqa: F841  (dead code)
        a = jg.tanh(x) + jg.tanh(x)  # a duplicate
        b = jg.sum(a * x, axis=1)
        return b + jg.sum(jg.tanh(x) * x, axis=1)

    prog = raw_program(f, x)
    raw = collections.Counter(i.prim.name for i in prog.instrs)
    assert raw["tanh"] == 3 and raw["exp"] == 1
    want = interp.run(prog, [x])[0]
    np.testing.assert_allclose(want, 3 * np.sum(np.tanh(x) * x, axis=1), rtol=1e-14)

    after_cse = passes.cse(prog)
    validate(after_cse)
    assert [i.prim.name for i in after_cse.instrs].count("tanh") == 1
    np.testing.assert_array_equal(interp.run(after_cse, [x])[0], want)

    after_dce = passes.dce(after_cse)
    validate(after_dce)
    assert "exp" not in [i.prim.name for i in after_dce.instrs]
    assert len(after_dce.instrs) < len(after_cse.instrs) < len(prog.instrs)
    np.testing.assert_array_equal(interp.run(after_dce, [x])[0], want)

    cf = jg.jit(f)
    np.testing.assert_allclose(cf(x), want, rtol=1e-14)
    assert prims(cf).count("tanh") == 1 and "exp" not in prims(cf)
    # no two instructions of an optimised gradient program compute the same thing
    gcf = jg.jit(jg.grad(lambda x: jg.sum(f(x))))
    gcf(x)
    keys = [(i.prim.name, tuple(v.id for v in i.inputs), i.params) for i in gcf.program.instrs]
    assert len(keys) == len(set(keys))
    validate(gcf.program)


def test_passes_keep_distinct_constants_apart(backend):
    """CSE merges equal instructions only: 0.0 and -0.0 are different constants
    (1 / 0.0 = inf but 1 / -0.0 = -inf) although Python finds them equal."""
    x = np.array([1.0, 2.0])

    def f(x):
        return 1.0 / (x * 0.0), 1.0 / (x * -0.0)

    with np.errstate(divide="ignore"):
        pos_inf, neg_inf = jg.jit(f)(x)
    np.testing.assert_array_equal(pos_inf, [np.inf, np.inf])
    np.testing.assert_array_equal(neg_inf, [-np.inf, -np.inf])
