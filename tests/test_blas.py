"""GEMM providers (compiler/blas.py): the choice per shape, the fallback, MKL's results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import blas
from jitgrad.errors import JitgradError

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def shape(m, n, k, dtype=F32, ta=False, tb=False):
    return blas.GemmShape(m, n, k, ta, tb, dtype, dtype)


def mkl_or_skip():
    if not blas.available(blas.MKL_PROVIDER):
        pytest.skip(f"MKL: {blas.why_unavailable('mkl')}")


def test_products_go_to_mkl_when_installed_else_openblas_all_of_them():
    big = blas.choose(shape(256, 2048, 2048))
    assert blas.choose(shape(32, 32, 64)) is big  # one BLAS pool per program
    if blas.available(blas.MKL_PROVIDER):
        assert big is blas.MKL_PROVIDER
    else:  # the fallback, and the reason it was needed
        assert big is blas.OPENBLAS_PROVIDER
        assert blas.why_unavailable("mkl")


def test_mkl_absent_is_a_reason_not_an_error(monkeypatch):
    monkeypatch.setattr(blas, "mkl_runtime_path", lambda: None)
    assert "not installed" in blas._load_mkl()


def test_the_variable_names_the_first_choice(monkeypatch):
    monkeypatch.setenv(blas.PROVIDER_VAR, "openblas")
    assert blas.choose(shape(256, 2048, 2048)) is blas.OPENBLAS_PROVIDER
    monkeypatch.setenv(blas.PROVIDER_VAR, "mkl")  # still not for products it does not take
    with pytest.raises(JitgradError, match="no GEMM provider computes a float32 product into"):
        blas.choose(blas.GemmShape(4, 4, 4, False, False, F32, F64))
    monkeypatch.setenv(blas.PROVIDER_VAR, "cublas")
    with pytest.raises(JitgradError, match="JITGRAD_GEMM='cublas': expected one of"):
        blas.choose(shape(4, 4, 4))


def test_a_registered_provider_is_chosen_by_priority_and_only_where_it_takes_the_shape(
        monkeypatch):
    monkeypatch.setattr(blas, "_providers", list(blas._providers))
    monkeypatch.setattr(blas, "_gemm_kernels", [])  # no convolution kernels for these
    square = blas.GemmProvider("square", blas.OPENBLAS, blas.OPENBLAS_ACC,
                               takes=lambda s: s.m == s.n == s.k,
                               strided=blas.OPENBLAS_STRIDED)
    missing = blas.GemmProvider("missing", blas.OPENBLAS, blas.OPENBLAS_ACC,
                                takes=lambda s: True, strided=blas.OPENBLAS_STRIDED,
                                load=lambda: "not on this machine")
    blas.register(square, priority=100)
    blas.register(missing, priority=200)
    assert blas.choose(shape(64, 64, 64)) is square
    assert blas.choose(shape(64, 64, 8)) is not square
    assert blas.why_unavailable("missing") == "not on this machine"
    with pytest.raises(JitgradError, match="registered already"):
        blas.register(square, priority=1)


def test_no_provider_for_a_dtype_is_a_clear_error():
    with pytest.raises(JitgradError, match="no GEMM provider computes a int32 product"):
        blas.choose(blas.GemmShape(2, 2, 2, False, False, np.dtype(np.int32),
                                   np.dtype(np.int32)))


def _run_matmuls(dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)).astype(dtype)
    b = rng.standard_normal((96, 72)).astype(dtype)
    c = rng.standard_normal((80, 72)).astype(dtype)

    def f(a, b, c):  # A.T @ B (a transpose flag), accumulated into c, then a plain product
        s = c + a.T @ b
        return s, s @ b.T, (b.T @ a) @ s  # and NT, TN, NN
    got = jg.jit(f)(a, b, c)
    want = f(a, b, c)
    return got, want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mkl_products_match_numpy_in_every_layout(monkeypatch, dtype):
    mkl_or_skip()
    monkeypatch.setenv(blas.PROVIDER_VAR, "mkl")
    cf = jg.jit(lambda a, b: a.T @ b)
    a = np.ones((96, 80), dtype)
    cf(a, a)
    assert "jg_gemm_mkl_" in cf.source
    got, want = _run_matmuls(dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * 10)


_FORK_CHILD = textwrap.dedent("""
    import os, numpy as np, jitgrad as jg
    from jitgrad.compiler import blas
    assert blas.available(blas.MKL_PROVIDER)
    f = jg.jit(lambda a, b: a @ b)
    a = np.ones((256, 256), np.float32)
    f(a, a)  # MKL's threads are running
    pid = os.fork()
    if pid == 0:
        os._exit(0 if float(f(a, a)[0, 0]) == 256.0 else 1)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
""")


def test_a_forked_child_computes_with_mkl_instead_of_hanging():
    mkl_or_skip()
    env = dict(os.environ, JITGRAD_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-c", _FORK_CHILD], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "child 0" in p.stdout, p.stderr[-2000:]


def test_profiles_decode_an_accumulating_gemm_by_its_own_argument_names():
    a, b, c = np.ones((6, 4), np.float32), np.ones((6, 5), np.float32), np.ones((4, 5), np.float32)
    cf = jg.jit(lambda a, b, c: c + a.T @ b)
    cf(a, b, c)
    (call,) = [k for k in cf.lower(a, b, c).executable.kernel_calls()
               if k.symbol.startswith("jg_gemm_acc")]
    args = call.named_args()
    assert (args["m"], args["n"], args["k"], args["ta"], args["tb"]) == (4, 5, 6, 1, 0)
