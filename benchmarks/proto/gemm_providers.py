"""GEMM providers as cached C-ABI kernels, all with one signature:

    void gemm(int64 ta, int64 tb, intp A, intp B, intp C, int64 M, int64 N, int64 K)
    C[M,N] (row-major, contiguous) = op(A) @ op(B);  op(X) = X.T if flag.
    A is stored M x K (K x M if ta), B is stored K x N (N x K if tb).

Providers (kernel symbol jgk_gemm_<prov>_<f32|f64>):
  f77   scipy's OpenBLAS ?gemm via scipy.linalg.cython_blas capsules
        (Fortran ABI, column-major, every argument by pointer)
  npdot numba's np.dot(a, b, out) on carray views (.T views, no copies)
  mkl   cblas_?gemm from PyPI mkl's libmkl_rt (row-major CBLAS, by value)
  pmm / smm  hand-written prange / serial loops (tiny shapes only)
Call register_f77() / register_mkl() BEFORE importing code that calls them.
"""
import ctypes
import glob
import os
import sys

import numpy as np
import llvmlite.binding as llb

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import kernels  # noqa: E402  (launches the omp layer, registers jg_* kernels)
from kernels import _vp, _mm_nn, _mm_tn, _mm_nt  # noqa: E402
from numba import njit, cfunc, carray, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

P, I, V = types.intp, types.int64, types.void
I32, F32, F64, VP = types.int32, types.float32, types.float64, types.voidptr
GEMM_SIG = V(I, I, P, P, P, I, I, I)


# ---------------------------------------------------------------- symbols
def capsule_address(capsule):
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
    get_ptr.restype = ctypes.c_void_p
    get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
    return get_ptr(capsule, get_name(capsule))


def register_f77():
    from scipy.linalg import cython_blas
    capi = cython_blas.__pyx_capi__
    for n in ("sgemm", "dgemm"):
        llb.add_symbol(f"jg_f77_{n}", capsule_address(capi[n]))


MKL_THREADING = {"intel": 0, "sequential": 1, "gnu": 3}
_mkl = None


def find_mkl_rt():
    cands = []
    for d in {sys.prefix, sys.base_prefix, os.path.dirname(sys.executable) + "/.."}:
        cands += glob.glob(os.path.join(d, "lib", "libmkl_rt.so*"))
    if not cands:
        raise OSError("libmkl_rt.so not found (pip install mkl)")
    return sorted(cands)[0]


def register_mkl(threading="gnu", nthreads=2):
    """threading='gnu' makes MKL use libgomp, the same OpenMP runtime (and
    thread pool) as numba's 'omp' layer; 'intel' uses libiomp5."""
    global _mkl
    _mkl = ctypes.CDLL(find_mkl_rt(), mode=ctypes.RTLD_GLOBAL)
    _mkl.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    _mkl.MKL_Set_Threading_Layer(MKL_THREADING[threading])   # before any call
    _mkl.MKL_Set_Num_Threads.argtypes = [ctypes.c_int]
    _mkl.MKL_Set_Num_Threads(nthreads)
    for n in ("sgemm", "dgemm"):
        llb.add_symbol(f"jg_cblas_{n}",
                       ctypes.cast(getattr(_mkl, "cblas_" + n), ctypes.c_void_p).value)
    return _mkl


# symbols must be registered before the cfuncs below compile or load
register_f77()
try:
    register_mkl(os.environ.get("JG_MKL_THREADING", "gnu"),
                 int(os.environ.get("JG_MKL_THREADS", "2")))
    HAVE_MKL = True
except OSError:
    HAVE_MKL = False


# ------------------------------------------------------------ intrinsics
@intrinsic
def _byref(typingctx, val):
    """Pointer to a stack slot (alloca in the caller's entry block) holding val."""
    def codegen(context, builder, sig, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        return builder.bitcast(slot, cgutils.voidptr_t)
    return VP(val), codegen


_f77_sig = V(*([VP] * 13))
f77_sgemm = types.ExternalFunction("jg_f77_sgemm", _f77_sig)
f77_dgemm = types.ExternalFunction("jg_f77_dgemm", _f77_sig)
cblas_sgemm = types.ExternalFunction(
    "jg_cblas_sgemm", V(I32, I32, I32, I32, I32, I32, F32, P, I32, P, I32, F32, P, I32))
cblas_dgemm = types.ExternalFunction(
    "jg_cblas_dgemm", V(I32, I32, I32, I32, I32, I32, F64, P, I32, P, I32, F64, P, I32))

N_, T_ = np.uint8(78), np.uint8(84)          # 'N', 'T'


# ---------------------------------------------------------------- kernels
# Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T:
# call gemm(tb, ta, N, M, K, 1, B, ldb, A, lda, 0, C, N).
@cfunc(GEMM_SIG, cache=True)
def gemm_f77_f32(ta, tb, pa, pb, pc, M, N, K):
    lda = M if ta else K
    ldb = K if tb else N
    f77_sgemm(_byref(T_ if tb else N_), _byref(T_ if ta else N_),
              _byref(np.int32(N)), _byref(np.int32(M)), _byref(np.int32(K)),
              _byref(np.float32(1.0)), _vp(pb), _byref(np.int32(ldb)),
              _vp(pa), _byref(np.int32(lda)), _byref(np.float32(0.0)),
              _vp(pc), _byref(np.int32(N)))


@cfunc(GEMM_SIG, cache=True)
def gemm_f77_f64(ta, tb, pa, pb, pc, M, N, K):
    lda = M if ta else K
    ldb = K if tb else N
    f77_dgemm(_byref(T_ if tb else N_), _byref(T_ if ta else N_),
              _byref(np.int32(N)), _byref(np.int32(M)), _byref(np.int32(K)),
              _byref(1.0), _vp(pb), _byref(np.int32(ldb)),
              _vp(pa), _byref(np.int32(lda)), _byref(0.0),
              _vp(pc), _byref(np.int32(N)))


@cfunc(GEMM_SIG, cache=True)
def gemm_mkl_f32(ta, tb, pa, pb, pc, M, N, K):
    cblas_sgemm(np.int32(101), np.int32(112 if ta else 111), np.int32(112 if tb else 111),
                np.int32(M), np.int32(N), np.int32(K), np.float32(1.0),
                pa, np.int32(M if ta else K), pb, np.int32(K if tb else N),
                np.float32(0.0), pc, np.int32(N))


@cfunc(GEMM_SIG, cache=True)
def gemm_mkl_f64(ta, tb, pa, pb, pc, M, N, K):
    cblas_dgemm(np.int32(101), np.int32(112 if ta else 111), np.int32(112 if tb else 111),
                np.int32(M), np.int32(N), np.int32(K), 1.0,
                pa, np.int32(M if ta else K), pb, np.int32(K if tb else N),
                0.0, pc, np.int32(N))


@cfunc(GEMM_SIG, cache=True)
def gemm_npdot_f32(ta, tb, pa, pb, pc, M, N, K):
    c = carray(_vp(pc), (M, N), np.float32)
    if ta:
        _mm_tn(carray(_vp(pa), (K, M), np.float32), carray(_vp(pb), (K, N), np.float32), c)
    elif tb:
        _mm_nt(carray(_vp(pa), (M, K), np.float32), carray(_vp(pb), (N, K), np.float32), c)
    else:
        _mm_nn(carray(_vp(pa), (M, K), np.float32), carray(_vp(pb), (K, N), np.float32), c)


@cfunc(GEMM_SIG, cache=True)
def gemm_npdot_f64(ta, tb, pa, pb, pc, M, N, K):
    c = carray(_vp(pc), (M, N), np.float64)
    if ta:
        _mm_tn(carray(_vp(pa), (K, M), np.float64), carray(_vp(pb), (K, N), np.float64), c)
    elif tb:
        _mm_nt(carray(_vp(pa), (M, K), np.float64), carray(_vp(pb), (N, K), np.float64), c)
    else:
        _mm_nn(carray(_vp(pa), (M, K), np.float64), carray(_vp(pb), (K, N), np.float64), c)


# hand-written loops: i-k-j (nn, tn), dot-product (nt).  Written twice on
# purpose: functions made by one factory share a qualname and would share
# (and clobber) one cache entry.
@njit(parallel=True, fastmath=True, cache=True)
def _pmm(ta, tb, a, b, c):
    M, N = c.shape
    K = a.shape[0] if ta else a.shape[1]
    z = c.dtype.type(0)
    for i in prange(M):
        if tb:
            for j in range(N):
                s = z
                for k in range(K):
                    s += a[i, k] * b[j, k]
                c[i, j] = s
        else:
            for j in range(N):
                c[i, j] = z
            for k in range(K):
                aik = a[k, i] if ta else a[i, k]
                for j in range(N):
                    c[i, j] += aik * b[k, j]


@njit(fastmath=True, cache=True)
def _smm(ta, tb, a, b, c):
    M, N = c.shape
    K = a.shape[0] if ta else a.shape[1]
    z = c.dtype.type(0)
    for i in range(M):
        if tb:
            for j in range(N):
                s = z
                for k in range(K):
                    s += a[i, k] * b[j, k]
                c[i, j] = s
        else:
            for j in range(N):
                c[i, j] = z
            for k in range(K):
                aik = a[k, i] if ta else a[i, k]
                for j in range(N):
                    c[i, j] += aik * b[k, j]


@cfunc(GEMM_SIG, cache=True)
def gemm_pmm_f32(ta, tb, pa, pb, pc, M, N, K):
    dt = np.float32
    _pmm(ta, tb, carray(_vp(pa), (K, M) if ta else (M, K), dt),
         carray(_vp(pb), (N, K) if tb else (K, N), dt), carray(_vp(pc), (M, N), dt))


@cfunc(GEMM_SIG, cache=True)
def gemm_pmm_f64(ta, tb, pa, pb, pc, M, N, K):
    dt = np.float64
    _pmm(ta, tb, carray(_vp(pa), (K, M) if ta else (M, K), dt),
         carray(_vp(pb), (N, K) if tb else (K, N), dt), carray(_vp(pc), (M, N), dt))


@cfunc(GEMM_SIG, cache=True)
def gemm_smm_f32(ta, tb, pa, pb, pc, M, N, K):
    dt = np.float32
    _smm(ta, tb, carray(_vp(pa), (K, M) if ta else (M, K), dt),
         carray(_vp(pb), (N, K) if tb else (K, N), dt), carray(_vp(pc), (M, N), dt))


@cfunc(GEMM_SIG, cache=True)
def gemm_smm_f64(ta, tb, pa, pb, pc, M, N, K):
    dt = np.float64
    _smm(ta, tb, carray(_vp(pa), (K, M) if ta else (M, K), dt),
         carray(_vp(pb), (N, K) if tb else (K, N), dt), carray(_vp(pc), (M, N), dt))


GEMMS = {(p, d): globals()[f"gemm_{p}_{d}"]
         for p in ("f77", "mkl", "npdot", "pmm", "smm") for d in ("f32", "f64")}
