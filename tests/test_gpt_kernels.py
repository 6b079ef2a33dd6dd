"""The kernel paths a GPT step spends its time in, against numpy, finite differences and the
interpreter: fused loops computed in place of a dying input (and of a donated parameter),
column sums over partial blocks, the layer-norm and masked-softmax row kernels (odd
shapes, non-finite rows, one thread or two), unit-stride layout copies, and AdamW's
float32 update."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gradcheck import check_grads

import jitgrad as jg
from jitgrad.compiler import codegen
from jitgrad.frontend.ops import attention as A
from jitgrad.frontend.ops import norm as N
from jitgrad.frontend.ops import shape as S

BIG = (1024, 1024)  # above the parallel threshold of fused loops and row kernels
assert BIG[0] * BIG[1] >= codegen.PARALLEL_MIN_ELEMENTS


def steps(cf, *args):
    return cf.lower(*args).executable._planned.low.steps


def interpreted(fn, *args):
    return jg.jit(fn, backend="interpret")(*args)


def on_threads(fn, *args):
    """fn's results (as bytes) on one thread and on all of them, twice each."""
    before = numba.get_num_threads()
    try:
        runs = []
        for n in (1, before, 1, before):
            numba.set_num_threads(n)
            runs.append([np.asarray(r).tobytes() for r in fn(*args)])
    finally:
        numba.set_num_threads(before)
    return runs


# ---------------------------------------------------------------- fused loops in place

@pytest.mark.parametrize("shape", [(37, 29), BIG])
def test_a_loop_computed_in_place_of_its_dying_input_is_that_array(shape):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((shape[0], 16)).astype(np.float32)
    b = rng.standard_normal((16, shape[1])).astype(np.float32)

    def f(a, b):
        return jg.gelu(a @ b) * 2.0 - 1.0  # the product dies in the loop reading it
    cf = jg.jit(f)
    got = cf(a, b)
    (loop,) = [s for s in steps(cf, a, b) if s.group is not None]
    assert loop.alias == 0 and "y = x0" in loop.loop[1]
    np.testing.assert_allclose(got, interpreted(f, a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(37, 300), (5, 7), (1100, 1000)])
def test_a_column_sum_in_place_over_partial_column_blocks(shape):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((shape[0], 8)).astype(np.float32)
    w = rng.standard_normal((8, shape[1])).astype(np.float32)
    w2 = rng.standard_normal((shape[1], 3)).astype(np.float32)

    def f(a, w, w2):
        d = jg.gelu(a @ w) * 3.0
        return jg.sum(d, axis=0), d @ w2  # d is read again: the loop writes it, in place
    cf = jg.jit(f)
    total, out = cf(a, w, w2)
    (loop,) = [s for s in steps(cf, a, w, w2) if s.group is not None]
    assert "; sum]" in loop.label and loop.alias == 0
    want_total, want_out = interpreted(f, a, w, w2)
    np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-4)
    if shape[0] * shape[1] >= codegen.PARALLEL_MIN_ELEMENTS:
        runs = on_threads(cf, a, w, w2)
        assert all(r == runs[0] for r in runs)


def test_adamw_updates_float32_parameters_in_float32_in_place():
    rng = np.random.default_rng(2)
    params = {"w": rng.standard_normal((13, 7)).astype(np.float32),
              "b": np.zeros(7, np.float32)}
    x = rng.standard_normal((5, 13)).astype(np.float32)

    def loss(p, x):
        return jg.sum(jg.tanh(x @ p["w"] + p["b"]) ** 2)
    opt = dict(lr=1e-2, weight_decay=0.1, mask={"w": True, "b": False}, clip_norm=1.0)
    step = jg.train_step(loss, params, jg.optim.AdamW(**opt))
    ref = jg.train_step(loss, {k: v.copy() for k, v in params.items()}, jg.optim.AdamW(**opt),
                        backend="interpret")
    for _ in range(3):
        np.testing.assert_allclose(step(x), ref(x), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    ex = step.lower(x).executable
    assert all(v.dtype == np.float32 for v in ex.program.outputs if v.ndim)
    updates = [s for s in ex._planned.low.steps if s.group is not None
               and s.group.out.shape == (13, 7) and "sqrt" in s.label]
    assert updates and all(s.alias is not None for s in updates)  # into the donated w


# ---------------------------------------------------------------- layer norm

def _layer_norm_kernels(x, w, b, g, eps=1e-5):
    rows, n = x.shape
    y, dx = np.empty_like(x), np.empty_like(x)
    mean, rstd = np.empty(rows, x.dtype), np.empty(rows, x.dtype)
    dw, db = np.empty(n, x.dtype), np.empty(n, x.dtype)
    N.layer_norm_rows(x, w, b, y, mean, rstd, eps)
    N.layer_norm_grad_rows(g, x, w, mean, rstd, dx, dw, db, np.full((2, n), np.nan))
    return y, mean, rstd, dx, dw, db


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 300), (33, 513), (1030, 1031)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_kernels_against_numpy(shape, dtype):
    rng = np.random.default_rng(3)
    x, g = (rng.standard_normal(shape).astype(dtype) * 3 + 1 for _ in range(2))
    w, b = (rng.standard_normal(shape[1]).astype(dtype) for _ in range(2))
    y, mean, rstd, dx, dw, db = _layer_norm_kernels(x, w, b, g)
    want = N._layer_norm_impl(x, w, b, eps=1e-5)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    for got, ref in zip((y, mean, rstd), want, strict=True):
        np.testing.assert_allclose(got, ref, **tol)
    for got, ref in zip((dx, dw, db), N._layer_norm_grad_impl(g, x, w, mean, rstd),
                        strict=True):
        np.testing.assert_allclose(got, ref, **tol)
    if x.size >= N.PARALLEL_MIN:  # column sums down the rows in order, on any thread count
        runs = on_threads(lambda: _layer_norm_kernels(x, w, b, g))
        assert all(r == runs[0] for r in runs)


def test_layer_norm_orders_1_and_2_against_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 11))
    w, b, g = rng.standard_normal(11), rng.standard_normal(11), rng.standard_normal((3, 11))
    check_grads(lambda x, w, b: jg.sum(jg.nn.layer_norm(x, 11, w, b) * g), (x, w, b),
                argnums=(0, 1, 2), order=2)


# ---------------------------------------------------------------- masked softmax

def _softmax(s, mask, scale, causal):
    rows, n = s.shape[0] * s.shape[1], s.shape[-1]
    p = np.empty_like(s)
    m = np.zeros((1, n), s.dtype) if mask is None else mask.reshape(-1, n)
    A.masked_softmax_rows(s.reshape(rows, n), m, p.reshape(rows, n), s.dtype.type(scale),
                          s.shape[1], int(causal), int(mask is not None))
    return p


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (3, 7, 9), (2, 65, 65), (4, 64, 70)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_softmax_kernels_against_numpy(shape, causal, dtype):
    rng = np.random.default_rng(5)
    s, g = (rng.standard_normal(shape).astype(dtype) * 4 for _ in range(2))
    mask = np.where(rng.random(shape[1:]) < 0.2, -np.inf, rng.standard_normal(shape[1:])
                    ).astype(dtype)
    tol = dict(rtol=2e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    for m in (None, mask):
        p = _softmax(s, m, 0.3, causal)
        want = A._masked_softmax_ref(s, *(() if m is None else (m,)), scale=0.3, causal=causal)
        np.testing.assert_allclose(p, want, **tol)
        ds = np.empty_like(p)
        rows = p.size // shape[-1]
        A.masked_softmax_grad_rows(g.reshape(rows, -1), p.reshape(rows, -1),
                                   ds.reshape(rows, -1), 0.3)
        np.testing.assert_allclose(ds, A._masked_softmax_grad_ref(g, p, scale=0.3), **tol)


def test_masked_softmax_rows_with_nan_inf_and_nothing_left():
    s = np.array([[[1.0, np.nan, 2.0, 0.5],     # NaN wins within the row
                   [-np.inf, -np.inf, 3.0, 1.0],
                   [np.inf, 1.0, 0.0, 2.0],     # +inf: NaN, as numpy
                   [0.0, 1.0, 2.0, 3.0]]], np.float32)
    mask = np.array([0, 0, 0, -np.inf], np.float32)
    for causal in (False, True):
        for m in (None, mask):
            want = A._masked_softmax_ref(s, *(() if m is None else (m,)), scale=1.0,
                                         causal=causal)
            np.testing.assert_allclose(_softmax(s, m, 1.0, causal), want, rtol=1e-6)
    rows_all_masked = np.full((1, 2, 3), -np.inf, np.float32)
    assert not _softmax(rows_all_masked, None, 1.0, False).any()  # zeros, not NaN


def test_attention_orders_1_and_2_against_finite_differences():
    rng = np.random.default_rng(6)
    q, k, v, g = (rng.standard_normal((2, 5, 3)) for _ in range(4))
    check_grads(lambda q, k, v: jg.sum(
        jg.nn.scaled_dot_product_attention(q, k, v, is_causal=True) * g), (q, k, v),
        argnums=(0, 1, 2), order=2)


# ---------------------------------------------------------------- layout copies

@pytest.mark.parametrize("shape,perm", [((3, 5, 2, 7), (0, 2, 1, 3)), ((12, 64, 4, 32),
                                        (0, 2, 1, 3)), ((2, 3, 1), (1, 0, 2)),
                                       ((4, 6), (1, 0))])
def test_transposes_and_head_slices_copy_exactly(shape, perm):
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(jg.jit(lambda x: jg.transpose(x, perm))(x),
                                  np.transpose(x, perm))
    third = shape[-1] // 3 or 1
    cf = jg.jit(lambda x: x[..., third:2 * third] * 1.0)
    np.testing.assert_array_equal(cf(x), x[..., third:2 * third])


def test_copy_strided_unit_and_other_strides():
    x = np.arange(2 * 3 * 5, dtype=np.float32)
    for meta, want in [
        ([3, 2, 3, 5, 15, 5, 1, 15, 5, 1, 0, 0], x.reshape(2, 3, 5)),          # unit rows
        ([2, 3, 4, 5, 1, 4, 1, 1, 0], x.reshape(6, 5)[:3, 1:5]),               # offset rows
        ([2, 5, 3, 1, 5, 3, 1, 0, 0], x[:15].reshape(3, 5).T),                 # strided
    ]:
        y = np.full(want.size, -1, np.float32)
        S.copy_strided(x, y, np.array(meta, np.int64))
        np.testing.assert_array_equal(y.reshape(want.shape), want)
