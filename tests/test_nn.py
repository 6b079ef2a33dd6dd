import numpy as np
import pytest

import jitgrad as jg
from jitgrad.training import nn


def test_he_normal_statistics():
    w = nn.he_normal(np.random.default_rng(0), (500, 400))
    assert w.shape == (500, 400) and w.dtype == np.float32
    std = np.sqrt(2.0 / 500)
    # 200k samples: the sample mean is within ~4 standard errors, the std within 1%.
    assert abs(w.mean()) < 4 * std / np.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=0.01)
    # Gaussian: about 68.3% within one standard deviation.
    assert np.mean(np.abs(w) < std) == pytest.approx(0.6827, abs=0.01)


def test_glorot_uniform_statistics():
    w = nn.glorot_uniform(np.random.default_rng(0), (300, 500), np.float64)
    assert w.dtype == np.float64
    a = np.sqrt(6.0 / 800)
    assert np.all(np.abs(w) <= a) and np.abs(w).max() > 0.99 * a
    assert abs(w.mean()) < 4 * a / np.sqrt(3 * w.size)
    assert w.var() == pytest.approx(a * a / 3, rel=0.01)  # Var U(-a, a) = a^2 / 3


@pytest.mark.parametrize("init", [nn.he_normal, nn.glorot_uniform])
def test_initialisers_are_seeded(init):
    a = init(7, (20, 30))
    b = init(np.random.default_rng(7), (20, 30))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, init(8, (20, 30)))


@pytest.mark.parametrize("shape", [(5,), (0, 3), ()])
def test_initialiser_rejects_bad_shapes(shape):
    with pytest.raises(jg.JitgradError, match="fan_in"):
        nn.he_normal(0, shape)


def test_initialiser_rejects_integer_dtype():
    with pytest.raises(jg.JitgradError, match="floating-point"):
        nn.glorot_uniform(0, (2, 2), np.int32)


def test_mlp_init_structure():
    p = nn.mlp_init([8, 16, 4, 3], rng=0, dtype=np.float64)
    assert sorted(p) == ["W0", "W1", "W2", "b0", "b1", "b2"]
    assert [p[f"W{i}"].shape for i in range(3)] == [(8, 16), (16, 4), (4, 3)]
    assert [p[f"b{i}"].shape for i in range(3)] == [(16,), (4,), (3,)]
    assert all(v.dtype == np.float64 for v in p.values())
    assert all(not p[f"b{i}"].any() for i in range(3))
    assert nn.num_layers(p) == 3
    q = nn.mlp_init([8, 16, 4, 3], rng=0, dtype=np.float64)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    g = nn.mlp_init([8, 3], rng=0, init="glorot")
    assert np.abs(g["W0"]).max() <= np.sqrt(6 / 11)


def test_mlp_init_errors():
    with pytest.raises(jg.JitgradError, match="layer sizes"):
        nn.mlp_init([8], 0)
    with pytest.raises(jg.JitgradError, match="unknown init"):
        nn.mlp_init([8, 2], 0, init="orthogonal")
    with pytest.raises(jg.JitgradError, match="W0, b0"):
        nn.mlp_apply({"W0": np.ones((2, 2)), "b1": np.ones(2)}, np.ones((1, 2)))


def numpy_mlp(p, x, act):
    n = len(p) // 2
    for i in range(n):
        x = x @ p[f"W{i}"] + p[f"b{i}"]
        if i < n - 1:
            x = np.maximum(x, 0) if act == "relu" else np.tanh(x)
    return x


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    p = nn.mlp_init([5, 7, 3], rng, np.float64)
    p["b0"][:] = rng.standard_normal(7)
    x = rng.standard_normal((4, 5))
    y = np.array([0, 2, 1, 2])
    return p, x, y


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_mlp_apply_eager_and_jitted(small, act):
    p, x, _ = small
    want = numpy_mlp(p, x, act)
    np.testing.assert_allclose(nn.mlp_apply(p, x, act), want, rtol=1e-12)
    got = jg.jit(lambda p, x: nn.mlp_apply(p, x, act))(p, x)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_linear():
    W, b, x = np.arange(6.0).reshape(2, 3), np.array([1.0, 2, 3]), np.array([[1.0, -1]])
    np.testing.assert_array_equal(nn.linear(W, b, x), x @ W + b)


def test_unknown_activation(small):
    with pytest.raises(jg.JitgradError, match="activation"):
        nn.mlp_apply(small[0], small[1], "gelu")


def numpy_xent(logits, y):
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return np.mean(lse - logits[np.arange(len(y)), y])


def test_mlp_loss_and_weight_decay_gradient(small):
    p, x, y = small
    wd = 0.3
    want = numpy_xent(numpy_mlp(p, x, "relu"), y) + 0.5 * wd * sum(
        np.sum(p[f"W{i}"] ** 2) for i in range(2))
    assert float(nn.mlp_loss(p, x, y, weight_decay=wd)) == pytest.approx(want, rel=1e-12)

    g_wd = jg.grad(lambda p, x, y: nn.mlp_loss(p, x, y, weight_decay=wd))(p, x, y)
    g0 = jg.grad(nn.mlp_loss)(p, x, y)
    for k in p:
        extra = wd * p[k] if k.startswith("W") else np.zeros_like(p[k])  # biases not decayed
        np.testing.assert_allclose(g_wd[k] - g0[k], extra, rtol=1e-9, atol=1e-12)


def test_mlp_loss_gradient_matches_finite_differences(small):
    p, x, y = small
    g = jg.grad(nn.mlp_loss)(p, x, y)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for k in ("W0", "b0", "W1"):
        i = tuple(rng.integers(0, s) for s in p[k].shape)
        hi = {n: v.copy() for n, v in p.items()}
        lo = {n: v.copy() for n, v in p.items()}
        hi[k][i] += eps
        lo[k][i] -= eps
        fd = (numpy_xent(numpy_mlp(hi, x, "relu"), y)
              - numpy_xent(numpy_mlp(lo, x, "relu"), y)) / (2 * eps)
        assert g[k][i] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_accuracy():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [3.0, 4.0]])
    assert nn.accuracy(logits, np.array([1, 0, 0, 1])) == 0.75
    with pytest.raises(jg.JitgradError, match="labels"):
        nn.accuracy(logits, np.array([1, 0]))
