"""Memory-bound work in one pass: sums fused into the loops producing their input, the
weight-decay term fused into the update, large loops parallel and still bitwise reproducible."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import codegen

BIG = (1024, 1024)  # above codegen.PARALLEL_MIN_ELEMENTS: these loops run in parallel
assert BIG[0] * BIG[1] >= codegen.PARALLEL_MIN_ELEMENTS


def steps(cf, *args):
    return cf.lower(*args).executable._planned.low.steps


def buffer_shapes(cf, *args):
    return [v.shape for v in cf.lower(*args).executable.plan.buffers]


def interpreted(fn, *args):
    return jg.jit(fn, backend="interpret")(*args)


@pytest.mark.parametrize("shape", [(37, 23), BIG])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_sum_of_squares_never_writes_the_squares(shape, dtype):
    w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    cf = jg.jit(lambda w: jg.sum(w * w))
    got = cf(w)
    (step,) = steps(cf, w)
    assert "; sum]" in step.label
    assert shape not in buffer_shapes(cf, w)  # no W * W anywhere in the arena
    np.testing.assert_allclose(got, interpreted(lambda w: jg.sum(w * w), w),
                               rtol=1e-6 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("shape", [(48, 33), BIG])
def test_a_column_sum_runs_in_the_pass_of_the_relu_backward_that_feeds_it(shape):
    rng = np.random.default_rng(1)
    a, g, w = (rng.standard_normal(s).astype(np.float32) for s in (shape, shape, shape[::-1]))

    def f(a, g, w):
        d = jg.where(a > 0, g, 0.0)
        return jg.sum(d, axis=0), d @ w  # the bias gradient, and d read again by GEMM
    cf = jg.jit(f)
    bias, dx = cf(a, g, w)
    fused = [s for s in steps(cf, a, g, w) if s.group is not None]
    assert len(fused) == 1 and fused[0].label.startswith("fused[where, gt; sum]")
    _, want_dx = interpreted(f, a, g, w)
    # columns summed in float64 (as the plain sum kernel does), then rounded once
    want_bias = np.where(a > 0, g, 0).astype(np.float64).sum(axis=0)
    np.testing.assert_allclose(bias, want_bias, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-3)  # k = 1024 float32 terms


def test_keepdims_sums_over_several_leading_axes_and_scalar_leaves():
    x = np.random.default_rng(2).standard_normal((3, 5, 4, 2))

    def f(x, c):
        return jg.sum(jg.tanh(x * c + 1.0), axis=(0, 1), keepdims=True)
    cf = jg.jit(f)
    got = cf(x, 0.5)
    assert got.shape == (1, 1, 4, 2)
    assert [s.label.split(" at ")[0] for s in steps(cf, x, 0.5)] == ["fused[tanh, add, mul; sum]"]
    np.testing.assert_allclose(got, interpreted(f, x, 0.5), rtol=1e-13)


def test_the_sgd_update_with_l2_reads_the_weight_and_its_gemm_gradient_once():
    rng = np.random.default_rng(3)
    params = {"W": rng.standard_normal((96, 64)).astype(np.float32) * 0.1}
    x = rng.standard_normal((32, 96)).astype(np.float32)

    def loss(p, x):
        return jg.sum(jg.tanh(x @ p["W"])) + 1e-3 * jg.sum(p["W"] * p["W"])
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1))
    ref = jg.train_step(loss, {"W": params["W"].copy()}, jg.optim.SGD(lr=0.1),
                        backend="interpret")
    for _ in range(2):
        np.testing.assert_allclose(step(x), ref(x), rtol=1e-5)
    np.testing.assert_allclose(params["W"], ref.params["W"], rtol=1e-5, atol=1e-6)
    writes_w = [s for s in step.lower(x).executable._planned.low.steps
                if any(getattr(v, "shape", None) == (96, 64) for v in s.writes)]
    # the GEMM writes dW; one loop then reads W and dW and writes W: no weight-decay buffer
    assert [s.sym.startswith("jg_gemm") for s in writes_w] == [True, False]
    assert (96, 64) not in [v.shape for v in step.lower(x).executable.program.consts.values()]


def test_a_uniform_cotangent_is_a_scalar_not_a_captured_array():
    w = np.ones((50, 40), np.float32)
    cf = jg.jit(jg.grad(lambda w: 3.0 * jg.sum(w * w)))
    np.testing.assert_allclose(cf(w), 6.0 * w)
    assert not cf.lower(w).executable.program.consts  # 5e-5 * ones(W.shape) was stored before


def test_parallel_sums_are_bitwise_the_same_at_every_thread_count():
    rng = np.random.default_rng(4)
    w = rng.standard_normal(BIG).astype(np.float32)
    a = rng.standard_normal(BIG).astype(np.float32)

    def f(w, a):
        return jg.sum(w * w), jg.sum(jg.where(a > 0, w, 0.0), axis=0), w - 0.1 * (a + 1e-4 * w)
    cf = jg.jit(f)
    before = numba.get_num_threads()
    try:
        runs = []
        for n in (1, before, 1, before):
            numba.set_num_threads(n)
            runs.append([np.asarray(r).tobytes() for r in cf(w, a)])
    finally:
        numba.set_num_threads(before)
    assert all(r == runs[0] for r in runs)
    want = interpreted(f, w, a)
    for got, ref in zip(cf(w, a), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
