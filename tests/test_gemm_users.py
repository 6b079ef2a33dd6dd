"""The kernels that run many GEMMs per call (convolutions over im2col chunks, batched
products) through every GEMM provider that loads (compiler/blas.py's GemmKernel), and
through the bfloat16 provider under precision="bf16"; a conv net's step calls one BLAS.

The oracle is numpy (tests/convref.py for convolutions, np.matmul for products), in
float64 on the same float32 inputs; under precision="bf16" on the same operands rounded
by test_precision's arithmetic rounding.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from convref import np_conv2d, np_conv2d_input_grad, np_conv2d_weight_grad
from test_precision import ref_round

import jitgrad as jg
from jitgrad.compiler import bf16_provider, blas
from jitgrad.frontend.ops import conv as CV

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
FLOAT_PROVIDERS = [p.name for p in blas.providers()
                   if p.takes(blas.GemmShape(1, 1, 1, False, False, F32, F32))]


@pytest.fixture(params=FLOAT_PROVIDERS)
def provider(request, monkeypatch) -> str:
    """Each provider of float32 products, forced with JITGRAD_GEMM (skipped where it does
    not load)."""
    p = next(p for p in blas.providers() if p.name == request.param)
    if not blas.available(p):
        pytest.skip(f"{p.name}: {blas.why_unavailable(p.name)}")
    monkeypatch.setenv(blas.PROVIDER_VAR, p.name)
    return p.name


def _symbols(cf) -> list[str]:
    return [s.sym for s in cf.latest.planned.low.steps]


def _provider_of() -> dict[str, str]:
    """Every GEMM-calling kernel symbol -> the provider whose library it calls."""
    owner = {}
    for p in blas.providers():
        kernels = [p.plain, p.accumulate] + [k.by_provider[p.name] for k in blas._gemm_kernels]
        for k in kernels:
            for suffix in k.variants:
                owner[f"jg_{k.name}_{suffix}"] = p.name
    return owner


def _gemm_providers(cf) -> set[str]:
    owner = _provider_of()
    return {owner[s] for s in _symbols(cf) if s in owner}


# groups, stride, padding and dilation at once; a bias
CONV = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}


def _conv_case(rng, n=3, c=4, hw=(9, 8), o=6, k=(3, 2)):
    x = rng.standard_normal((n, c, *hw)).astype(F32)
    w = rng.standard_normal((o, c // CONV["groups"], *k)).astype(F32)
    b = rng.standard_normal(o).astype(F32)
    y = np_conv2d(x.astype(F64), w.astype(F64), None, **CONV)
    g = rng.standard_normal(y.shape).astype(F32)
    return x, w, b, g


def _conv_loss(g):
    return lambda x, w, b: jg.sum(jg.nn.conv2d(x, w, b, **CONV) * g)


def test_convolutions_match_numpy_through_every_provider(provider, rng):
    x, w, b, g = _conv_case(rng)
    cf = jg.jit(jg.value_and_grad(_conv_loss(g), argnums=(0, 1, 2)))
    loss, (gx, gw, gb) = cf(x, w, b)
    x64, w64, g64 = x.astype(F64), w.astype(F64), g.astype(F64)
    y = np_conv2d(x64, w64, b.astype(F64), **CONV)
    np.testing.assert_allclose(loss, (y * g64).sum(), rtol=1e-5)
    np.testing.assert_allclose(gx, np_conv2d_input_grad(g64, w64, x.shape, **CONV),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, np_conv2d_weight_grad(x64, g64, w.shape[2:], **CONV),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, g64.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    convs = {s for s in _symbols(cf) if s.startswith("jg_conv2d")}
    assert convs == {f"jg_conv2d{part}_{provider.replace('-', '_')}_f32"
                     for part in ("", "_input_grad", "_weight_grad")}
    assert _gemm_providers(cf) == {provider}


def test_batched_products_match_numpy_through_every_provider(provider, rng):
    # a broadcast along b's missing leading dimension (b's gradient sums over it), a
    # transposed operand (GEMM's flag), and a sum into the product (GEMM accumulating)
    a = rng.standard_normal((2, 3, 5, 7)).astype(F32)
    b = rng.standard_normal((3, 4, 7)).astype(F32)
    c = rng.standard_normal((2, 3, 5, 4)).astype(F32)
    g = rng.standard_normal((2, 3, 5, 4)).astype(F32)

    def f(a, b, c):
        return jg.sum((c + a @ jg.transpose(b, (0, 2, 1))) * g)
    cf = jg.jit(jg.value_and_grad(f, argnums=(0, 1, 2)))
    loss, (ga, gb, gc) = cf(a, b, c)
    a64, bt, g64 = a.astype(F64), b.astype(F64).transpose(0, 2, 1), g.astype(F64)
    np.testing.assert_allclose(loss, ((c + a64 @ bt) * g64).sum(), rtol=1e-5)
    np.testing.assert_allclose(ga, g64 @ bt.transpose(0, 2, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gb, (a64.transpose(0, 1, 3, 2) @ g64).sum(0).transpose(0, 2, 1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(gc, g)
    accumulated = jg.jit(lambda a, b, c: c + a @ jg.transpose(b, (0, 2, 1)))
    np.testing.assert_allclose(accumulated(a, b, c), c + a64 @ bt, rtol=1e-5, atol=1e-5)
    p = provider.replace("-", "_")
    assert f"jg_gemm_batched_acc_{p}_f32" in _symbols(accumulated)
    assert f"jg_gemm_batched_{p}_f32" in _symbols(cf)
    assert _gemm_providers(cf) == _gemm_providers(accumulated) == {provider}


def test_a_conv_net_step_calls_one_blas_library(rng, monkeypatch):
    # LeNet-5's narrow convolutions take the direct kernels (no GEMM); here they take GEMMs
    monkeypatch.setattr(CV, "DIRECT_MAX_M", 0)
    model = jg.nn.LENET5
    params = model.init(28, 10, 0)
    x = rng.standard_normal((16, 1, 28, 28)).astype(F32)
    y = rng.integers(0, 10, 16)
    step = jg.train_step(model.loss, params, jg.optim.SGD(lr=0.01, momentum=0.9))
    assert np.isfinite(step(x, y))
    source = step.compiled.source
    called = set(re.findall(r"\b(jg_\w+)\(", source))
    owner = _provider_of()
    gemms = {s for s in called if s in owner}
    # the dense layers, the three convolutions and their gradients: all on one library
    assert any(s.startswith("jg_conv2d_weight_grad") for s in gemms), sorted(called)
    assert any(s.startswith("jg_gemm") for s in gemms), sorted(called)
    chosen = blas.choose(blas.GemmShape(16, 120, 400, False, False, F32, F32)).name
    assert {owner[s] for s in gemms} == {chosen}, sorted(gemms)
    assert not set(re.findall(r"\bnp\.dot\b", source))


# ---------------------------------------------------------------- precision="bf16"

needs_bf16 = pytest.mark.skipif(not bf16_provider.available(),
                                reason="needs MKL's bfloat16 GEMM (the mkl extra; "
                                       "conftest.py loads it on any x86-64 CPU)")


@needs_bf16
@pytest.mark.filterwarnings("ignore:.*no bfloat16 instructions")
def test_bf16_convolutions_multiply_the_rounded_operands_in_bfloat16(rng):
    # products big enough for the bfloat16 GEMM (bf16_provider.MIN_WORK, MIN_K) in each of
    # the three convolutions: 32x768x72, 72x768x32 and 32x72x768 per group and chunk
    x, w, b, g = _conv_case(rng, n=8, c=16, hw=(16, 16), o=64, k=(3, 3))
    cf = jg.jit(jg.value_and_grad(_conv_loss(g), argnums=(0, 1, 2)), precision="bf16")
    loss, (gx, gw, gb) = cf(x, w, b)
    rx, rw, rg = (ref_round(v).astype(F64) for v in (x, w, g))
    y = np_conv2d(rx, rw, b.astype(F64), **CONV)
    np.testing.assert_allclose(loss, (y * g.astype(F64)).sum(), rtol=1e-5)
    np.testing.assert_allclose(gx, np_conv2d_input_grad(rg, rw, x.shape, **CONV),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gw, np_conv2d_weight_grad(rx, rg, w.shape[2:], **CONV),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(gb, g.astype(F64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    convs = {s for s in _symbols(cf) if s.startswith("jg_conv2d")}
    assert convs == {f"jg_conv2d{part}_mkl_bf16_u16"
                     for part in ("", "_input_grad", "_weight_grad")}, convs
    assert _gemm_providers(cf) == {"mkl-bf16"}


@needs_bf16
@pytest.mark.filterwarnings("ignore:.*no bfloat16 instructions")
def test_bf16_batched_products_multiply_the_rounded_operands_in_bfloat16(rng):
    # attention's q·kᵀ and its two gradients (128x128x64, 128x64x128 per matrix), and a
    # product broadcast along a batch whose gradient sums over it (matmul_sum)
    q, k = (rng.standard_normal((2, 4, 128, 64)).astype(F32) for _ in range(2))
    p = rng.standard_normal((2, 4, 128, 128)).astype(F32)
    v = rng.standard_normal((4, 128, 64)).astype(F32)
    g, h = rng.standard_normal((2, 4, 128, 128)).astype(F32), rng.standard_normal(q.shape)

    def f(q, k, p, v):
        return jg.sum((q @ jg.transpose(k, (0, 1, 3, 2))) * g) + jg.sum((p @ v) * h)
    cf = jg.jit(jg.value_and_grad(f, argnums=(0, 1, 2, 3)), precision="bf16")
    loss, grads = cf(q, k, p, v)
    rq, rk, rp, rv, rg, rh = (ref_round(a.astype(F32)).astype(F64) for a in (q, k, p, v, g, h))
    t = (0, 1, 3, 2)
    want = ((rq @ rk.transpose(t) * g).sum() + (rp @ rv * h.astype(F32)).sum(),
            [rg @ rk, rg.transpose(t) @ rq, rh @ rv.transpose(0, 2, 1),
             (rp.transpose(t) @ rh).sum(0)])
    np.testing.assert_allclose(loss, want[0], rtol=1e-5)
    for got, ref in zip(grads, want[1], strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    bf16 = [s for s in _symbols(cf) if s.startswith("jg_gemm_batched") and s.endswith("_u16")]
    assert len(bf16) == 6, _symbols(cf)  # two products, four gradients
    assert _gemm_providers(cf) == {"mkl-bf16"}, _symbols(cf)
