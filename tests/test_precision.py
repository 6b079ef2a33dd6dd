"""Mixed precision (precision="bf16"): GEMM operands rounded to bfloat16, float32 elsewhere.

The oracle is numpy: a reference that rounds the same operands (with a rounding written
independently of jitgrad's, from frexp and rint) and multiplies in float32. Compiled and
interpreted programs, forward and backward, must equal it; gradients under the policy
must be within bfloat16's tolerance of float32's; training the bundled digits MLP with
--precision bf16 must reach float32's accuracy within half a point.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import bf16_provider
from jitgrad.compiler import precision as precision_mod
from jitgrad.frontend.ops import precision as PREC
from jitgrad.frontend.ops.precision import bf16_bits, round_bf16_p, round_to_bf16
from jitgrad.training.recipe import TrainConfig, run_training

F32 = np.float32


def ref_round(x: np.ndarray) -> np.ndarray:
    """bfloat16 round-to-nearest-even by arithmetic, not bits: 8 significant bits at the
    value's own binade (quantum 2**(e-8)), bfloat16's subnormal quantum 2**-133 below the
    normal range; rint rounds halves to even; what overflows float32 becomes inf."""
    x64 = np.asarray(x, np.float64)
    _, e = np.frexp(x64)
    q = np.ldexp(1.0, np.maximum(e - 8, -133))
    with np.errstate(over="ignore", invalid="ignore"):
        out = (np.rint(x64 / q) * q).astype(F32)
    return np.where(np.isfinite(x64), out, x64.astype(F32))


def ref_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ref_round(a) @ ref_round(b)


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 summation order: both sides multiply the same bfloat16 values."""
    assert got.dtype == want.dtype == F32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def _special_values() -> np.ndarray:
    fi = np.finfo(F32)
    tie_even = np.float32(1.0) + np.float32(2.0 ** -8)        # halfway, rounds down to 1
    tie_odd = np.float32(1.0) + np.float32(3 * 2.0 ** -8)     # halfway, rounds up
    return np.array([0.0, -0.0, 1.0, -1.0, tie_even, tie_odd, -tie_odd, 1 / 3, np.pi,
                     fi.max, -fi.max, fi.tiny, fi.smallest_subnormal, 3e-39, 65504.0,
                     np.inf, -np.inf, 3.3895314e38, 1e-45], F32)


def test_rounding_matches_the_arithmetic_reference(rng):
    x = np.concatenate([_special_values(),
                        rng.standard_normal(4000).astype(F32) * F32(10.0) ** rng.integers(
                            -40, 38, 4000).astype(F32)])
    np.testing.assert_array_equal(round_to_bf16(x), ref_round(x))
    assert np.all(round_to_bf16(x).view(np.uint32) & 0xFFFF == 0)  # bfloat16 values
    # ties go to even, halves above go up, and what rounds past the largest bfloat16 is inf
    assert round_to_bf16(np.float32(1 + 2 ** -8)) == 1.0
    assert round_to_bf16(np.float32(1 + 3 * 2 ** -8)) == 1 + 2 ** -6
    assert np.isposinf(round_to_bf16(np.finfo(F32).max))


def test_nan_stays_a_nan_of_its_sign():
    nans = np.array([np.nan, -np.nan], F32)
    nans = np.concatenate([nans, np.array([0x7F800001, 0xFF800001], np.uint32).view(F32)])
    for x in (round_to_bf16(nans), jg.jit(lambda v: round_bf16_p.bind(v))(nans)):
        assert np.all(np.isnan(x))
        np.testing.assert_array_equal(np.signbit(x), np.signbit(nans))
    assert bf16_bits(np.array([np.nan], F32))[0] == 0x7FC0


def test_compiled_rounding_equals_the_interpreter(rng):
    x = np.concatenate([_special_values(), rng.standard_normal(333).astype(F32)])
    got = jg.jit(lambda v: round_bf16_p.bind(v) * 2.0)(x)  # fused with its neighbour
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, ref_round(x) * F32(2.0))


@pytest.mark.parametrize("n", [37, PREC.PARALLEL_MIN + 5])
def test_bfloat16_storage_serial_and_parallel(rng, n):
    x = rng.standard_normal(n).astype(F32)
    x[:len(_special_values())] = _special_values()
    got = jg.jit(lambda v: PREC.to_bf16_p.bind(v))(x)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, bf16_bits(x))
    np.testing.assert_array_equal(got.astype(np.uint32) << 16, ref_round(x).view(np.uint32))


@pytest.mark.parametrize("shapes", [((7, 33), (33, 5)), ((4, 6, 9), (9, 3)),
                                    ((2, 5, 8), (2, 8, 3)), ((3, 1, 4, 6), (2, 6, 5))])
def test_forward_equals_numpy_rounding_the_operands(backend, rng, shapes):
    a, b = (rng.standard_normal(s).astype(F32) for s in shapes)
    cf = jg.jit(lambda a, b: a @ b, precision="bf16")
    close(cf(a, b), ref_matmul(a, b))
    assert [i.prim.name for i in cf.program.instrs].count("round_bf16") == 2
    # the default is float32 throughout
    f32 = jg.jit(lambda a, b: a @ b)
    np.testing.assert_allclose(f32(a, b), a @ b, rtol=1e-5, atol=1e-5)
    assert "round_bf16" not in str(f32.program)


def test_transposed_operands_are_rounded_where_gemm_reads_them(backend, rng):
    x = rng.standard_normal((16, 8)).astype(F32)
    w = rng.standard_normal((16, 4)).astype(F32)
    cf = jg.jit(lambda x, w: x.T @ w, precision="bf16")
    close(cf(x, w), ref_round(x).T @ ref_round(w))
    names = [i.prim.name for i in cf.program.instrs]
    assert "transpose" not in names  # still folded into GEMM's flags
    assert "matmul[ta=True" in str(cf.program)


def _mlp_loss(p, x, y):
    h = jg.relu(x @ p["W1"] + p["b1"])
    return jg.softmax_cross_entropy(h @ p["W2"] + p["b2"], y)


def _mlp_reference(p, x, y):
    """Loss and gradients of _mlp_loss with every GEMM operand rounded, forward and
    backward (as torch.autocast computes them), in float32."""
    r = ref_round
    z1 = r(x) @ r(p["W1"]) + p["b1"]
    h = np.maximum(z1, 0)
    logits = r(h) @ r(p["W2"]) + p["b2"]
    m = logits.max(1, keepdims=True)
    e = np.exp(logits - m)
    prob = e / e.sum(1, keepdims=True)
    n = len(y)
    loss = np.mean(np.log(e.sum(1)) + m[:, 0] - logits[np.arange(n), y])
    g = prob.copy()
    g[np.arange(n), y] -= 1
    g = (g / n).astype(F32)
    gh = (r(g) @ r(p["W2"]).T) * (z1 > 0)
    return loss, {"W1": r(x).T @ r(gh), "b1": gh.sum(0), "W2": r(h).T @ r(g), "b2": g.sum(0)}


def _mlp(rng, sizes=(20, 32, 5), n=16):
    p = {"W1": rng.standard_normal(sizes[:2]).astype(F32) / F32(4),
         "b1": rng.standard_normal(sizes[1]).astype(F32) / F32(10),
         "W2": rng.standard_normal(sizes[1:]).astype(F32) / F32(5),
         "b2": np.zeros(sizes[2], F32)}
    x = rng.standard_normal((n, sizes[0])).astype(F32)
    return p, x, rng.integers(0, sizes[2], n)


def test_gradients_equal_numpy_rounding_every_gemm_operand(backend, rng):
    p, x, y = _mlp(rng)
    cf = jg.jit(jg.value_and_grad(_mlp_loss), precision="bf16")
    loss, grads = cf(p, x, y)
    want_loss, want = _mlp_reference(p, x, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for k in p:
        close(grads[k], want[k].astype(F32))
    # four GEMMs forward and backward, x W1 W2 h g and the relu gradient rounded once each
    prog = cf.program
    assert sum(i.prim.name == "matmul" for i in prog.instrs) == 5
    assert sum(i.prim.name == "round_bf16" for i in prog.instrs) == 6
    assert any(i.prim.name == "round_bf16" and i.role == "backward" for i in prog.instrs)


def test_gradients_within_bfloat16_tolerance_of_float32(rng):
    p, x, y = _mlp(rng, sizes=(64, 128, 10), n=64)
    loss16, g16 = jg.jit(jg.value_and_grad(_mlp_loss), precision="bf16")(p, x, y)
    loss32, g32 = jg.jit(jg.value_and_grad(_mlp_loss))(p, x, y)
    assert abs(float(loss16) - float(loss32)) < 2e-2 * abs(float(loss32))
    for k in p:
        # bfloat16 keeps 8 significant bits (2**-9 relative per operand); the backward
        # products cancel (softmax gradients sum to zero), so the first layer's gradient
        # is off by ~2%: torch.autocast's is too on this case (W1 2.2%, b1 1.3%, W2 0.44%,
        # b2 0.28%, measured with torch 2.13)
        err = np.linalg.norm(g16[k] - g32[k]) / np.linalg.norm(g32[k])
        assert err < 4e-2, (k, err)
        assert err > 1e-5, "no rounding happened"
        assert g16[k].dtype == F32


def test_train_step_under_bf16_keeps_float32_master_weights(backend, rng):
    p, x, y = _mlp(rng)
    ref = {k: v.copy() for k, v in p.items()}
    step = jg.train_step(_mlp_loss, p, jg.optim.SGD(lr=0.1), precision="bf16")
    loss = step(x, y)
    want_loss, want = _mlp_reference(ref, x, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for k in p:
        assert p[k].dtype == F32
        close(p[k], (ref[k] - F32(0.1) * want[k]).astype(F32))
    # the update reads the float32 gradient, the parameters stay unrounded float32
    assert np.any(p["W1"].view(np.uint32) & 0xFFFF)
    assert "round_bf16" in str(step.compiled.program)


def test_float64_gemms_are_left_alone_with_a_warning(rng):
    a = rng.standard_normal((4, 3))
    b = rng.standard_normal((3, 2))
    precision_mod._warn_once.cache_clear()
    cf = jg.jit(lambda a, b: a @ b, precision="bf16")
    with pytest.warns(jg.JitgradWarning, match="float64"):
        out = cf(a, b)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    assert "round_bf16" not in str(cf.program)


def test_a_cpu_without_bf16_is_told_once(monkeypatch, rng):
    bf16_provider.available()  # loaded (or not) for the real CPU first: that is cached
    monkeypatch.setattr(precision_mod, "cpu_has_bf16", lambda: False)
    precision_mod._warn_once.cache_clear()
    a = rng.standard_normal((4, 3)).astype(F32)
    with pytest.warns(jg.JitgradWarning, match="no bfloat16 instructions"):
        jg.jit(lambda a: a @ a.T, precision="bf16")(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        close(jg.jit(lambda a: a.T @ a, precision="bf16")(a), ref_round(a).T @ ref_round(a))
    precision_mod._warn_once.cache_clear()


def test_bad_precision_is_named():
    with pytest.raises(jg.JitgradError, match="unknown precision 'fp8'"):
        jg.jit(lambda a: a, precision="fp8")
    with pytest.raises(jg.JitgradError, match="unknown precision"):
        jg.train_step(_mlp_loss, _mlp(np.random.default_rng(0))[0], jg.optim.SGD(lr=0.1),
                      precision="half")
    with pytest.raises(ValueError, match="needs --dtype float32"):
        TrainConfig(precision="bf16", dtype="float64").resolved()


def test_an_inner_precision_jit_inside_a_trace_is_refused(rng):
    inner = jg.jit(lambda a: a @ a.T, precision="bf16")
    a = rng.standard_normal((3, 3)).astype(F32)
    with pytest.raises(jg.JitgradError, match="outermost jit"):
        jg.jit(lambda a: inner(a) + 1.0)(a)


def test_digits_mlp_trains_to_float32_accuracy_under_bf16():
    """The bundled digits MLP (`jitgrad train --precision bf16`), two seeds, few epochs:
    bfloat16 GEMMs cost at most half a point of accuracy on average."""
    accs = {}
    for precision in ("f32", "bf16"):
        accs[precision] = np.mean([
            run_training(TrainConfig(epochs=6, seed=seed, precision=precision),
                         out=None).metrics["test_accuracy"] for seed in (0, 1)])
    assert accs["bf16"] >= accs["f32"] - 0.005, accs
    assert accs["f32"] > 0.95


# ---------------------------------------------------------------- the bfloat16 GEMM provider

needs_provider = pytest.mark.skipif(not bf16_provider.available(),
                                    reason="needs MKL's bfloat16 GEMM (the mkl extra; "
                                           "conftest.py loads it on any x86-64 CPU)")


def _calls(cf) -> list[str]:
    return [s.sym for s in cf.latest.planned.low.steps]


def _bf16_gemms(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("jg_gemm") and c.endswith("_u16")]


def _f32_gemms(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("jg_gemm") and c.endswith("_f32")]


@needs_provider
def test_provider_accumulates_into_a_bfloat16_product(rng):
    a = rng.standard_normal((128, 256)).astype(F32)
    b = rng.standard_normal((256, 64)).astype(F32)
    c = rng.standard_normal((128, 64)).astype(F32)
    cf = jg.jit(lambda a, b, c: c + a @ b, precision="bf16")
    close(cf(a, b, c), c + ref_matmul(a, b))
    assert _calls(cf).count("jg_gemm_acc_bf16_u16") == 1


@needs_provider
def test_provider_stores_each_operand_once_as_bfloat16(rng):
    p, x, y = _mlp(rng, sizes=(128, 256, 64), n=64)  # products big enough to pay
    ref = {k: v.copy() for k, v in p.items()}
    step = jg.train_step(_mlp_loss, p, jg.optim.SGD(lr=0.1, momentum=0.9,
                                                    weight_decay=1e-2), precision="bf16")
    loss = step(x, y)
    calls = _calls(step.compiled)
    # five products, all bfloat16
    assert len(_bf16_gemms(calls)) == 5
    assert not _f32_gemms(calls)
    # x, W1, h, W2, g and the relu gradient stored once each: W2 serves both its products
    prepared = step.compiled.latest.planned.prepared
    stored = [i.inputs[0] for i in prepared.instrs if i.prim.name == "to_bf16"]
    assert len(stored) == len(set(stored)) == 6
    assert not any(i.prim.name == "round_bf16" for i in prepared.instrs)
    plan = step.compiled.plan
    assert any(b.var.dtype == np.uint16 for b in plan.buffers.values())
    assert calls.count("jg_store_bf16_u16") == 6
    # the same step interpreted (round_bf16 then the float32 GEMM)
    interp = {k: v.copy() for k, v in ref.items()}
    step_i = jg.train_step(_mlp_loss, interp, jg.optim.SGD(lr=0.1, momentum=0.9,
                                                           weight_decay=1e-2),
                           precision="bf16", backend="interpret")
    np.testing.assert_allclose(loss, step_i(x, y), rtol=1e-6)
    for k in p:
        close(p[k], interp[k])


@needs_provider
def test_small_products_stay_on_the_float32_gemm(rng):
    a = rng.standard_normal((8, 16)).astype(F32)
    cf = jg.jit(lambda a: a @ a.T, precision="bf16")
    close(cf(a), ref_round(a) @ ref_round(a).T)
    assert _f32_gemms(_calls(cf)) and not _bf16_gemms(_calls(cf))
    assert "jg_store_bf16_u16" not in _calls(cf)


@needs_provider
def test_provider_can_be_turned_off(monkeypatch, rng):
    a = rng.standard_normal((64, 128)).astype(F32)
    b = rng.standard_normal((128, 64)).astype(F32)
    on = jg.jit(lambda a, b: a @ b, precision="bf16")
    close(on(a, b), ref_matmul(a, b))
    assert _bf16_gemms(_calls(on))
    monkeypatch.setenv("JITGRAD_BF16_GEMM", "0")
    off = jg.jit(lambda a, b: a @ b, precision="bf16")
    close(off(a, b), ref_matmul(a, b))
    assert _f32_gemms(_calls(off)) and not _bf16_gemms(_calls(off))


@needs_provider
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
def test_provider_transposes_and_degenerate_shapes(monkeypatch, rng, ta, tb):
    monkeypatch.setattr(bf16_provider, "MIN_WORK", 0)  # every product on the bfloat16 GEMM
    monkeypatch.setattr(bf16_provider, "MIN_K", 0)
    for m, k, n in ((5, 7, 3), (1, 1, 1), (3, 0, 2), (0, 4, 2)):
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(F32)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(F32)

        def f(a, b):
            return (a.T if ta else a) @ (b.T if tb else b)
        cf = jg.jit(f, precision="bf16")
        got = cf(a, b)
        assert _bf16_gemms(_calls(cf))
        want = (ref_round(a).T if ta else ref_round(a)) @ (ref_round(b).T if tb else ref_round(b))
        assert got.shape == want.shape == (m, n)
        if want.size:
            close(got, want)


def test_jitgrad_train_precision_flag(capsys):
    from jitgrad.tools import cli
    assert cli.main(["train", "--precision", "bf16", "--epochs", "1", "-q", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["config"]["precision"] == "bf16" and metrics["test_accuracy"] > 0.8
    assert cli.main(["train", "--precision", "bf16", "--dtype", "float64", "-q"]) == 2
    assert "needs --dtype float32" in capsys.readouterr().err


@needs_provider
def test_an_operand_used_twice_is_stored_once(rng):
    a = rng.standard_normal((128, 96)).astype(F32)
    cf = jg.jit(lambda a: a @ a.T, precision="bf16")
    close(cf(a), ref_round(a) @ ref_round(a).T)
    assert _calls(cf).count("jg_store_bf16_u16") == 1 and _bf16_gemms(_calls(cf))


def test_convolutions_round_their_gemm_operands(backend, rng):
    """conv2d's im2col GEMMs are GEMMs too: forward and both gradients multiply bfloat16
    values (computed in float32 where no bfloat16 convolution kernel exists)."""
    from convref import np_conv2d, np_conv2d_input_grad, np_conv2d_weight_grad
    x = rng.standard_normal((2, 3, 7, 7)).astype(F32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    g = rng.standard_normal((2, 4, 7, 7)).astype(F32)

    def f(x, w):
        return jg.sum(jg.nn.conv2d(x, w, padding=1) * g)

    cf = jg.jit(jg.value_and_grad(f, argnums=(0, 1)), precision="bf16")
    value, (dx, dw) = cf(x, w)
    xr, wr, gr = ref_round(x), ref_round(w), ref_round(g)
    close(np.asarray(value, F32).reshape(1),
          np.asarray((np_conv2d(xr, wr, padding=1) * g).sum(), F32).reshape(1))
    close(dx, np_conv2d_input_grad(gr, wr, x.shape, padding=1).astype(F32))
    close(dw, np_conv2d_weight_grad(xr, gr, w.shape[2:], padding=1).astype(F32))
    assert [i.prim.name for i in cf.program.instrs].count("round_bf16") >= 3
