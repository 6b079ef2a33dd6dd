"""The Numba backend's own contracts: the memory plan, in-place updates, generated code,
the on-disk cache, and kernels against numpy."""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from plancheck import assert_plan_sound

import jitgrad as jg


def _mlp_loss(p, x, y):
    h = jg.relu(x @ p["W1"] + p["b1"])
    return jg.softmax_cross_entropy(h @ p["W2"], y) + 1e-3 * jg.sum(p["W1"] * p["W1"])


def _mlp(rng, dtype=np.float32):
    return ({"W1": rng.normal(size=(12, 16)).astype(dtype) * 0.3,
             "b1": np.zeros(16, dtype),
             "W2": rng.normal(size=(16, 5)).astype(dtype) * 0.3},
            rng.normal(size=(8, 12)).astype(dtype), rng.integers(0, 5, 8))


@pytest.fixture(scope="module")
def mlp_grad():
    rng = np.random.default_rng(0)
    params, x, y = _mlp(rng)
    cf = jg.jit(jg.value_and_grad(_mlp_loss), backend="numba")
    cf(params, x, y)
    return cf, params, x, y


def test_plan_never_overlaps_live_buffers(mlp_grad):
    plan = mlp_grad[0].plan
    assert plan.unique_buffers()
    assert_plan_sound(plan)
    assert "arena_bytes" in str(plan)


def test_dying_inputs_are_updated_in_place(mlp_grad):
    plan = mlp_grad[0].plan
    # relu's backward (where(y > 0, g, 0)) may overwrite g or y: at least one value in place
    assert plan.in_place >= 1
    assert plan.arena_bytes < sum(b.nbytes for b in plan.unique_buffers()) + 1


def test_compiled_equals_interpreted(mlp_grad):
    cf, params, x, y = mlp_grad
    value, grads = cf(params, x, y)
    ref_value, ref_grads = jg.jit(jg.value_and_grad(_mlp_loss), backend="interpret")(params, x, y)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


# a float32 GEMM call of whichever provider was chosen (compiler/blas.py)
PLAIN_GEMM = re.compile(r"jg_gemm_(mkl_)?f32\(")
ACC_GEMM = re.compile(r"jg_gemm_acc_(mkl_)?f32\(")


def test_transposed_matmuls_reach_gemm_without_a_copy(mlp_grad):
    source = mlp_grad[0].source
    assert PLAIN_GEMM.search(source)
    # the weight gradient X.T @ G and the input gradient G @ W.T carry flags, not copies
    assert ", 1, 0)" in source and ", 0, 1)" in source
    assert "jg_copy" not in source


def test_results_never_alias_the_arena(mlp_grad):
    cf, params, x, y = mlp_grad
    first = cf(params, x, y)[1]["W1"]
    saved = first.copy()
    cf(params, x * 2, y)
    np.testing.assert_array_equal(first, saved)


@pytest.mark.parametrize("opt", [jg.optim.SGD(lr=0.1, momentum=0.9),
                                 jg.optim.Adam(lr=0.01, weight_decay=1e-3)],
                         ids=["sgd-momentum", "adam"])
def test_train_step_updates_params_in_place_like_the_interpreter(opt):
    rng = np.random.default_rng(1)
    p_numba, x, y = _mlp(rng, np.float64)
    p_interp = {k: v.copy() for k, v in p_numba.items()}
    ids = {k: id(v) for k, v in p_numba.items()}
    step = jg.train_step(_mlp_loss, p_numba, opt, backend="numba")
    ref = jg.train_step(_mlp_loss, p_interp, opt, backend="interpret")
    for _ in range(3):
        np.testing.assert_allclose(step(x, y), ref(x, y), rtol=1e-12)
    for k in p_numba:
        assert id(p_numba[k]) == ids[k]
        np.testing.assert_allclose(p_numba[k], p_interp[k], rtol=1e-10, atol=1e-14)
    # the update kernels wrote the parameters directly: nothing was copied back
    executable = step.compiled._last.executable
    assert executable._donate_copy == []


def test_failed_step_leaves_params_and_state_untouched():
    rng = np.random.default_rng(2)
    params, x, y = _mlp(rng)
    step = jg.train_step(_mlp_loss, params, jg.optim.SGD(lr=0.1, momentum=0.9),
                         backend="numba")
    step(x, y)
    before = {k: v.copy() for k, v in params.items()}
    momentum = {k: v.copy() for k, v in step.state["momentum"].items()}
    bad = y.copy()
    bad[3] = 7
    with pytest.raises(jg.JitgradError, match="label 7 at index 3"):
        step(x, bad)
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        np.testing.assert_array_equal(step.state["momentum"][k], momentum[k])


@pytest.mark.parametrize("update", [lambda b, a: 0.9 * b + a.T @ a,   # GEMM accumulating
                                    lambda b, a: b - 0.1 * jg.sum(a, axis=0)],  # a fused loop
                         ids=["matmul+add", "fused"])
def test_no_in_place_write_into_a_donated_array_before_a_failing_check(update):
    # The donated result is computed before a gather that rejects its indices: writing it
    # into the caller's array there would change it although the call fails.
    def f(b, a, x, idx):
        return update(b, a), jg.sum(x[idx])

    cf = jg.frontend.api.CompiledFunction(f, donate={0: 0}, backend="numba")
    rng = np.random.default_rng(5)
    b, a = np.ones((4, 4), np.float32), rng.normal(size=(4, 4)).astype(np.float32)
    x = rng.normal(size=(6, 3)).astype(np.float32)
    before = b.copy()
    with pytest.raises(jg.JitgradError, match="index 9 is out of bounds"):
        cf(b, a, x, np.array([0, 9]))
    np.testing.assert_array_equal(b, before)
    new, _ = cf(b, a, x, np.array([0, 5]))
    np.testing.assert_allclose(new, update(before, a), rtol=1e-6)
    assert new is b  # the result still lands in the caller's array


def test_float32_sum_of_many_terms_is_accurate():
    x = np.random.default_rng(3).normal(size=(1 << 20,)).astype(np.float32) + 1
    got = jg.jit(jg.sum, backend="numba")(x)
    want = np.sum(x.astype(np.float64))
    assert abs(float(got) - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_layouts_match_numpy(ta, tb, dtype):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(7, 5) if ta else (5, 7)).astype(dtype)
    b = rng.normal(size=(3, 7) if tb else (7, 3)).astype(dtype)
    fn = jg.jit(lambda a, b: (a.T if ta else a) @ (b.T if tb else b), backend="numba")
    want = (a.T if ta else a) @ (b.T if tb else b)
    np.testing.assert_allclose(fn(a, b), want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    assert "jg_copy" not in fn.source  # the transposes became GEMM flags


_CHILD = textwrap.dedent("""
    import numpy as np, jitgrad as jg
    f = jg.jit(lambda x: jg.sum(jg.tanh(x) * 3.25), backend="numba")
    print(float(f(np.arange(6.0))))
""")


def test_second_process_loads_compiled_code_from_the_cache(tmp_path):
    cache_dir = tmp_path / "cache"  # created by jitgrad, private to the user
    env = {**os.environ, "JITGRAD_CACHE_DIR": str(cache_dir), "NUMBA_DEBUG_CACHE": "1"}
    runs = [subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                           text=True, timeout=600) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    value = float(runs[1].stdout.strip().splitlines()[-1])
    assert value == pytest.approx(np.sum(np.tanh(np.arange(6.0)) * 3.25))
    # the second process compiled nothing: every function came from the cache
    assert "[cache] data saved" in runs[0].stdout
    assert "[cache] data saved" not in runs[1].stdout
    assert "[cache] data loaded" in runs[1].stdout
    assert oct(os.stat(cache_dir).st_mode & 0o777) == "0o700"


def test_hot_path_allocates_nothing_outside_the_arena():
    """After the first call a step allocates no kernel memory (Numba's runtime counts every
    allocation) and no array-sized Python memory: the arena is all the memory it uses."""
    import tracemalloc

    from numba.core.runtime import _nrt_python, rtsys

    rng = np.random.default_rng(3)
    params = [(rng.normal(size=(32, 32)).astype(np.float32) * 0.2, np.zeros(32, np.float32))
              for _ in range(3)]
    x = rng.normal(size=(512, 32)).astype(np.float32)
    y = rng.integers(0, 32, 512)

    def loss(p, x, y):
        h = x
        for w, b in p:
            h = jg.relu(h @ w + b)
        # reductions over leading, middle and trailing axes, logsumexp and a transpose copy
        extra = jg.sum(jg.logsumexp(h, axis=0)) + jg.sum(jg.transpose(h) * 1e-3)
        return jg.softmax_cross_entropy(h, y) + 1e-4 * extra

    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1, momentum=0.9))
    step(x, y)
    was_on = _nrt_python.memsys_stats_enabled()
    _nrt_python.memsys_enable_stats()
    tracemalloc.start()
    try:
        before = rtsys.get_allocation_stats()
        for _ in range(3):
            step(x, y)
        after = rtsys.get_allocation_stats()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        if not was_on:
            _nrt_python.memsys_disable_stats()
    assert after.alloc == before.alloc and after.mi_alloc == before.mi_alloc
    assert peak < x.nbytes // 4  # the loss scalar and call overhead (~7 kB) only


def test_gradient_paths_accumulate_into_one_buffer():
    """x feeds three matmuls: its gradient's contributions are added into one buffer by
    GEMM with beta = 1 as they are computed (Deep Learning 6.5), never summed afterwards."""
    rng = np.random.default_rng(4)
    ws = [rng.normal(size=(12, 16)).astype(np.float32) * 0.3 for _ in range(3)]
    x = rng.normal(size=(8, 12)).astype(np.float32)

    def f(x, ws):
        return sum(jg.sum(jg.tanh(x @ w)) for w in ws) + jg.sum(x * x)

    cf = jg.jit(jg.grad(f), backend="numba")
    got = cf(x, ws)
    np.testing.assert_allclose(got, jg.jit(jg.grad(f), backend="interpret")(x, ws),
                               rtol=1e-5, atol=1e-6)
    calls = [ln.split("(")[1].split(",")[:4] for ln in cf.source.splitlines()
             if ACC_GEMM.search(ln) and "#" in ln]
    assert len(calls) == 3  # onto 2x, the gradient of sum(x * x)
    # each accumulates in place: the sum's buffer (3rd argument) is the running total's (4th)
    assert all(c[2].strip() == c[3].strip() for c in calls)
    # and no product of x's shape is materialised on its own
    plain = [ln.split("(")[1].split(",")[3:5] for ln in cf.source.splitlines()
             if PLAIN_GEMM.search(ln) and "#" in ln]
    assert plain and [" 8", " 12"] not in plain
