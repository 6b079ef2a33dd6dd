"""GEMM providers: which library computes each matrix product, chosen when a program is planned.

A provider is two library kernels with one calling convention, row-major and
C-ABI (every argument an int64: addresses, sizes, flags):

    plain       pa pb pc m n k ta tb      C = op(A)·op(B)
    accumulate  pa pb pc px m n k ta tb   C = op(A)·op(B) + X   (X may be C's own memory)

op = transpose where the flag is set; A, B and C are contiguous. A matmul's
lowering describes its product as a `GemmShape` and asks `choose` which provider
computes it; the chosen provider's kernel symbol goes into the generated glue,
so the choice is part of the program's cache key and costs nothing per call.

Providers registered here, highest priority first:
- `mkl`: Intel MKL from the `mkl` wheel when it is installed (`pip install mkl`),
  on its GNU OpenMP threading layer -- the libgomp that Numba's `omp` layer runs
  on, so BLAS and jitgrad's parallel loops share one pool of threads;
- `openblas`: scipy's OpenBLAS through Numba's own binding, always there.
Every 2-d product of a program goes to one library: two BLAS pools alternating
within a step spin against each other (a medium MLP step ran 4x slower with its
tiny products on OpenBLAS and the rest on MKL). Tiny products need no path of
their own here: both libraries take 1.4-4 us for the tiny MLP's 32x32x32
products (they run them on one thread), a plain Numba loop took 4-12 us.
Kernels that run many products per call (a convolution's per-group GEMMs over im2col
chunks, a batch of matrices at offsets) are declared once as a `GemmKernel`: one
library kernel per provider, passing the provider's `strided` GEMM (row-major with row
strides lda, ldb, ldc and a beta) to the kernel's helper, so a convolution or a batched
product of a program runs on the library its 2-d products run on, and the variant's
symbol puts the choice in the glue as theirs does.
Other modules add theirs with `register` (a mixed-precision GEMM, say). Setting
JITGRAD_GEMM=<name> makes a provider the first choice wherever it takes the shape
(tests and benchmarks compare providers this way).

MKL is loaded with ctypes (RTLD_GLOBAL) and its entry points are bound by name
(`llvmlite.binding.add_symbol`) before any kernel calling them is compiled or
loaded from the cache: Numba code calling a ctypes pointer is not cacheable.
MKL's thread count is set with `MKL_Set_Num_Threads_Local` (jitgrad's threads
only; another user of MKL in the process keeps its own setting), and a forked
child sets it to 1: GNU OpenMP's pool does not survive fork, and a child calling
a threaded GEMM would hang.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import JitgradError
from .cache import njit
from .kernels import FLOATS, Kernel

PROVIDER_VAR = "JITGRAD_GEMM"


@dataclass(frozen=True)
class GemmShape:
    """One product C[m, n] = op(A)·op(B) (+ X) as a provider sees it: row-major, no batch."""

    m: int
    n: int
    k: int
    ta: bool
    tb: bool
    dtype: np.dtype      # A's and B's
    out_dtype: np.dtype  # C's (a mixed-precision product differs)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


@dataclass(frozen=True)
class GemmProvider:
    """A library computing GEMMs, as two kernels of the calling convention above."""

    name: str
    plain: Kernel
    accumulate: Kernel
    takes: Callable[[GemmShape], bool]    # whether it computes this product
    # C-ABI `pa lda pb ldb pc ldc m n k ta tb beta`: row-major C (row stride ldc) =
    # op(A)·op(B) + beta·C (beta 0 or 1), A and B with row strides lda and ldb: what the
    # kernels of a `GemmKernel` call, by address.
    strided: Kernel
    load: Callable[[], str | None] = lambda: None  # makes it callable; why not, if it cannot
    # The products it computes, as kernel variants: (suffix, operands' numpy type, result's).
    variants: tuple[tuple[str, str, str], ...] = tuple((s, t, t) for s, t in FLOATS.items())

    def kernel(self, accumulate: bool) -> Kernel:
        return self.accumulate if accumulate else self.plain


_lock = threading.RLock()
_providers: list[tuple[int, GemmProvider]] = []
_unavailable: dict[str, str] = {}  # provider name -> why it cannot load
_loaded: set[str] = set()


def register(provider: GemmProvider, priority: int) -> None:
    """Offer a provider: `choose` tries providers by falling priority."""
    with _lock:
        if any(p.name == provider.name for _, p in _providers):
            raise JitgradError(f"a GEMM provider called {provider.name!r} is registered already")
        _providers.append((priority, provider))
        _providers.sort(key=lambda pp: -pp[0])
        for user in _gemm_kernels:
            user.declare(provider)


def providers() -> list[GemmProvider]:
    """The registered providers, first choice first."""
    return [p for _, p in _providers]


def available(provider: GemmProvider) -> bool:
    """Loads the provider's library on first asking; False (and `why_unavailable` says why)
    when it cannot be loaded."""
    with _lock:
        if provider.name in _loaded:
            return True
        if provider.name in _unavailable:
            return False
        why = provider.load()
        if why is None:
            _loaded.add(provider.name)
            return True
        _unavailable[provider.name] = why
        return False


def why_unavailable(name: str) -> str | None:
    return _unavailable.get(name)


def _preferred() -> str | None:
    name = os.environ.get(PROVIDER_VAR, "").strip().lower()
    if name in ("", "auto"):
        return None
    names = [p.name for p in providers()]
    if name not in names:
        raise JitgradError(f"{PROVIDER_VAR}={name!r}: expected one of {', '.join(names)} "
                           "or auto (unset it for the default choice)")
    return name


def choose(shape: GemmShape) -> GemmProvider:
    """The provider computing this product: JITGRAD_GEMM's if set, it loads and takes the
    shape; else the first by priority that loads and takes it."""
    preferred = _preferred()
    order = providers()
    if preferred is not None:
        order = sorted(order, key=lambda p: p.name != preferred)
    for p in order:
        if p.takes(shape) and available(p):
            return p
    raise JitgradError(f"no GEMM provider computes a {shape.dtype} product into "
                       f"{shape.out_dtype} ({', '.join(p.name for p in order)} do not)")


# ---------------------------------------------------------------- kernels calling GEMM

_gemm_kernels: list[GemmKernel] = []


class GemmKernel:
    """A library kernel running products through a provider's strided GEMM, declared once
    per provider (jg_<name>_<provider>_<dtype>): the body's `{gemm}` is the address of the
    provider's `strided` kernel (for the helper to `call_strided`), `{dt}` the operands'
    numpy type and `{out}` the products'. The helper is compiled once for every provider;
    a provider registered later gets its variant too, so a new provider is added in one
    place: its `strided` kernel."""

    def __init__(self, name: str, args: str, body: str, *, uses_blas: bool = True):
        self.name, self.args, self.body, self.uses_blas = name, args, body, uses_blas
        self.module = sys._getframe(1).f_globals["__name__"]
        self.by_provider: dict[str, Kernel] = {}
        with _lock:
            _gemm_kernels.append(self)
            for provider in providers():
                self.declare(provider)

    def __repr__(self) -> str:
        return f"GemmKernel({self.name})"

    def declare(self, provider: GemmProvider) -> None:
        gemm = f'_address_of("jg_{provider.strided.name}_{{suffix}}")'
        self.by_provider[provider.name] = Kernel(
            f"{self.name}_{provider.name.replace('-', '_')}", self.args,
            self.body.replace("{gemm}", gemm), {s: t for s, t, _ in provider.variants},
            outs={s: o for s, _, o in provider.variants}, uses_blas=self.uses_blas,
            module=self.module, calls=(provider.strided,), library=lambda: available(provider))

    def kernel(self, shape: GemmShape) -> Kernel:
        """The variant of the provider computing products of this shape (`choose`)."""
        return self.by_provider[choose(shape).name]


@intrinsic
def call_strided(typingctx, gemm, pa, lda, pb, ldb, pc, ldc, m, n, k, ta, tb, beta):
    """Calls the strided GEMM kernel at address gemm (every argument passed as an int64)."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        i64 = ir.IntType(64)
        fn = builder.inttoptr(args[0], ir.FunctionType(i64, [i64] * 12).as_pointer())
        return builder.call(fn, [context.cast(builder, v, t, types.int64)
                                 for v, t in zip(args[1:], signature.args[1:], strict=True)])
    return (types.int64(gemm, pa, lda, pb, ldb, pc, ldc, m, n, k, ta, tb, beta), codegen)


_STRIDED_ARGS = "pa lda pb ldb pc ldc m n k ta tb beta"
# The body of a provider's strided kernel: its helper `fn` on a view of C's dtype.
STRIDED_BODY = ("return K.%s(carray(_vp(pc), 0, {dt}), pa, lda, pb, ldb, pc, ldc, m, n, k, "
                "ta, tb, beta)")


# ---------------------------------------------------------------- shared by the kernels

@intrinsic
def address(typingctx, addr):
    """The int64 address addr as a pointer (what external C functions take)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(addr), codegen


@njit(cache=True)
def copy_into(c, x):
    """C = X before a product is added to C (nothing when X is C's memory)."""
    if x.ctypes.data != c.ctypes.data:
        for i in range(c.size):
            c[i] = x[i]


# ---------------------------------------------------------------- mkl

_I32, _VP = types.int32, types.voidptr
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums
_GNU_OPENMP = 3  # MKL_THREADING_GNU: the libgomp Numba's omp layer uses
_MKL_ENTRY_POINTS = ("cblas_sgemm", "cblas_dgemm", "MKL_Set_Num_Threads_Local",
                     "MKL_Set_Num_Threads", "MKL_Set_Threading_Layer")
_cblas = {d: types.ExternalFunction(f"cblas_{c}gemm", types.void(
    _I32, _I32, _I32, _I32, _I32, _I32, t, _VP, _I32, _VP, _I32, t, _VP, _I32))
    for d, c, t in (("float32", "s", types.float32), ("float64", "d", types.float64))}
_cblas_sgemm, _cblas_dgemm = _cblas["float32"], _cblas["float64"]
_set_local_threads = types.ExternalFunction("MKL_Set_Num_Threads_Local", _I32(_I32))
# Below this many multiply-adds a product runs on the calling thread alone: waking the
# passively waiting pool costs more than the second core saves (the small MLP's GEMMs
# took twice JAX's whole single-threaded step on two threads).
SERIAL_BELOW = 1 << 23

_mkl: ctypes.CDLL | None = None
_mkl_threads = 0  # what jitgrad last gave MKL (0: not set)


@njit(cache=True)
def mkl_strided(c, pa, lda, pb, ldb, pc, ldc, m, n, k, ta, tb, beta):
    """Row-major C (row stride ldc) = op(A)·op(B) + beta·C through MKL's CBLAS, A and B with
    row strides lda and ldb (c: a view of C's dtype)."""
    if m == 0 or n == 0:
        return 0
    opa = _TRANS if ta else _NO_TRANS
    opb = _TRANS if tb else _NO_TRANS
    serial = m * n * k < SERIAL_BELOW
    before = _set_local_threads(1) if serial else 0
    if c.itemsize == 4:  # float32 (both branches compile for either dtype)
        _cblas_sgemm(_ROW_MAJOR, opa, opb, m, n, k, np.float32(1.0), address(pa), lda,
                     address(pb), ldb, np.float32(beta), address(pc), ldc)
    else:
        _cblas_dgemm(_ROW_MAJOR, opa, opb, m, n, k, 1.0, address(pa), lda, address(pb), ldb,
                     beta, address(pc), ldc)
    if serial:
        _set_local_threads(before)
    return 0


@njit(cache=True)
def mkl_gemm(c, pa, pb, pc, m, n, k, ta, tb, beta):
    """Row-major C = op(A)·op(B) + beta·C, all three contiguous, through MKL."""
    return mkl_strided(c, pa, m if ta else k, pb, k if tb else n, pc, n, m, n, k, ta, tb, beta)


def _mkl_library() -> bool:
    return available(MKL_PROVIDER)


MKL = Kernel("gemm_mkl", "pa pb pc m n k ta tb", (
    "K.mkl_gemm(carray(_vp(pc), m * n, {dt}), pa, pb, pc, m, n, k, ta, tb, 0.0)\nreturn 0"),
    FLOATS, library=_mkl_library)
MKL_ACC = Kernel("gemm_acc_mkl", "pa pb pc px m n k ta tb", (
    "c = carray(_vp(pc), m * n, {dt})\nK.copy_into(c, carray(_vp(px), m * n, {dt}))\n"
    "K.mkl_gemm(c, pa, pb, pc, m, n, k, ta, tb, 1.0)\nreturn 0"), FLOATS, library=_mkl_library)
MKL_STRIDED = Kernel("strided_mkl", _STRIDED_ARGS, STRIDED_BODY % "mkl_strided", FLOATS,
                     library=_mkl_library)


def mkl_runtime_path() -> str | None:
    """libmkl_rt from the installed `mkl` wheel, if there is one."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith(("libmkl_rt.so", "libmkl_rt.dylib", "mkl_rt")):
            path = str(f.locate())
            if os.path.exists(path):
                return path
    return None


def _load_mkl() -> str | None:
    global _mkl
    path = mkl_runtime_path()
    if path is None:
        return "the mkl package is not installed (pip install mkl)"
    from . import threads
    threads.prefer_passive_waiting()  # before MKL's GNU layer loads libgomp
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        fns = {name: getattr(lib, name) for name in _MKL_ENTRY_POINTS}
    except (OSError, AttributeError) as e:
        return f"{path} does not load: {e}"
    for name in ("MKL_Set_Threading_Layer", "MKL_Set_Num_Threads_Local", "MKL_Set_Num_Threads"):
        fns[name].argtypes, fns[name].restype = [ctypes.c_int], ctypes.c_int
    # Only effective before MKL's first call: someone else in this process chose a layer
    # first (Intel's own OpenMP, say) and a second OpenMP pool would fight Numba's.
    layer = fns["MKL_Set_Threading_Layer"](_GNU_OPENMP)
    if layer != _GNU_OPENMP:
        return f"MKL already runs on threading layer {layer}, not GNU OpenMP"
    import llvmlite.binding as llb
    for name in _MKL_ENTRY_POINTS:
        llb.add_symbol(name, ctypes.cast(fns[name], ctypes.c_void_p).value)
    _mkl = lib
    os.register_at_fork(after_in_child=_single_threaded_after_fork)
    set_threads(threads.num_threads())
    return None


def set_threads(n: int) -> None:
    """MKL's threads for jitgrad's calls from this thread (nothing when MKL is not loaded)."""
    global _mkl_threads
    if _mkl is not None:
        _mkl.MKL_Set_Num_Threads_Local(int(n))
        _mkl_threads = int(n)


def _single_threaded_after_fork() -> None:
    # The parent's OpenMP threads do not exist in the child: a threaded GEMM would wait
    # for them forever.
    global _mkl_threads
    if _mkl is not None:
        _mkl.MKL_Set_Num_Threads(1)
        _mkl.MKL_Set_Num_Threads_Local(1)
        _mkl_threads = 1


def _float_product(shape: GemmShape) -> bool:
    """float32 or float64 operands and result of the same dtype (what BLAS computes)."""
    return shape.dtype == shape.out_dtype and shape.dtype.name in ("float32", "float64")



# ---------------------------------------------------------------- openblas: Numba's BLAS

@intrinsic
def _xxgemm(typingctx, like, transa, transb, m, n, k, pa, lda, pb, ldb, pc, ldc, beta):
    """Column-major C = op(A)·op(B) + beta·C at addresses pa, pb, pc, through Numba's own
    BLAS binding (`numba_xxgemm`, scipy's BLAS): np.dot can neither accumulate into its
    output nor take a matrix at an offset of a batch. `like` is an array of C's dtype."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir
        from numba.np.linalg import get_blas_kind, make_constant_slot
        _, ta, tb, m_, n_, k_, pa_, lda_, pb_, ldb_, pc_, ldc_, beta_ = args
        dtype = signature.args[0].dtype
        char, vp = ir.IntType(8), cgutils.voidptr_t
        intp = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, vp, vp,
                                                intp, vp, intp, vp, vp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        one = make_constant_slot(context, builder, dtype, 1.0)
        beta_slot = cgutils.alloca_once_value(
            builder, context.cast(builder, beta_, signature.args[-1], dtype))

        def trans(flag):
            return builder.select(builder.icmp_unsigned("!=", flag, flag.type(0)),
                                  char(ord("t")), char(ord("n")))

        res = builder.call(fn, (char(ord(get_blas_kind(dtype))), trans(ta), trans(tb),
                                m_, n_, k_, builder.bitcast(one, vp),
                                builder.inttoptr(pa_, vp), lda_, builder.inttoptr(pb_, vp),
                                ldb_, builder.bitcast(beta_slot, vp),
                                builder.inttoptr(pc_, vp), ldc_))
        return builder.sext(res, context.get_value_type(types.int64))
    return (types.int64(like, transa, transb, m, n, k, pa, lda, pb, ldb, pc, ldc, beta),
            codegen)


@njit(cache=True)
def openblas_strided(c, pa, lda, pb, ldb, pc, ldc, m, n, k, ta, tb, beta):
    """Row-major C (row stride ldc) = op(A)·op(B) + beta·C through OpenBLAS, A and B with
    row strides lda and ldb (c: a view of C's dtype)."""
    if m == 0 or n == 0:
        return 0
    # Row-major C = op(A)·op(B) is column-major C^T = op(B)^T·op(A)^T.
    return _xxgemm(c, tb, ta, n, m, k, pb, ldb, pa, lda, pc, ldc, beta)


@njit(cache=True)
def gemm(a, b, c, ta, tb):
    # np.dot calls BLAS with transpose flags for .T views: no transpose is materialised
    if ta and tb:
        np.dot(a.T, b.T, c)
    elif ta:
        np.dot(a.T, b, c)
    elif tb:
        np.dot(a, b.T, c)
    else:
        np.dot(a, b, c)


@njit(cache=True)
def gemm_accumulate(pa, pb, c, x, m, n, k, ta, tb):
    """C = op(A)·op(B) + X, row-major, with X possibly C's own memory: a gradient
    contribution from a matmul is added into the gradient's one buffer as it is computed
    (Deep Learning 6.5), never materialised on its own and summed."""
    copy_into(c, x)
    if m == 0 or n == 0 or k == 0:
        return 0
    return openblas_strided(c, pa, m if ta else k, pb, k if tb else n, c.ctypes.data, n, m, n, k,
                            ta, tb, 1.0)


OPENBLAS = Kernel("gemm", "pa pb pc m n k ta tb", (
    "a = carray(_vp(pa), (k, m) if ta else (m, k), {dt})\n"
    "b = carray(_vp(pb), (n, k) if tb else (k, n), {dt})\n"
    "K.gemm(a, b, carray(_vp(pc), (m, n), {dt}), ta, tb)\nreturn 0"), FLOATS, uses_blas=True)
OPENBLAS_ACC = Kernel("gemm_acc", "pa pb pc px m n k ta tb", (
    "return K.gemm_accumulate(pa, pb, carray(_vp(pc), m * n, {dt}), "
    "carray(_vp(px), m * n, {dt}), m, n, k, ta, tb)"), FLOATS, uses_blas=True)
OPENBLAS_STRIDED = Kernel("strided_openblas", _STRIDED_ARGS, STRIDED_BODY % "openblas_strided",
                          FLOATS, uses_blas=True)


OPENBLAS_PROVIDER = GemmProvider("openblas", OPENBLAS, OPENBLAS_ACC, _float_product,
                                 OPENBLAS_STRIDED)
MKL_PROVIDER = GemmProvider("mkl", MKL, MKL_ACC, _float_product, MKL_STRIDED, load=_load_mkl)
register(OPENBLAS_PROVIDER, priority=0)
register(MKL_PROVIDER, priority=10)
