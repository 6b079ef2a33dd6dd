"""The fixed kernel library: array kernels as @njit helpers, exported as C-ABI symbols.

Generated code never calls these helpers directly. Each kernel is wrapped in a
`numba.cfunc` with an all-integer C signature (addresses as intp, sizes as
int64, scalars as float64) and registered with LLVM by name
(`llvmlite.binding.add_symbol`); generated glue declares it as an external
function. LLVM therefore cannot inline kernels into the glue, which keeps the
glue's compile time linear in program length (NUMBA_NOTES.md: an inlined glue
of 200 calls compiled in 21 s, an external-call glue in 0.8 s), and the glue
stays cacheable because it binds symbols by name, not by address.

The wrapper module is generated (one cfunc per kernel and dtype, each with its
own name so Numba caches each) and loaded through cache.load_module; its key
includes this file's hash, so a changed kernel is never served stale. Both the
wrappers' and the helpers' Numba files live in the sealed cache directory.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# numba.njit, except that cache=True keeps the helpers' Numba files in jitgrad's sealed
# cache directory (checked, checksummed, cleared by `jitgrad cache clear`), not in the
# installed package's __pycache__.
from .cache import njit
from .errors import NoLoweringError

# ---------------------------------------------------------------- matmul

# np.dot inside Numba calls BLAS (scipy's OpenBLAS) with transpose flags for .T views,
# so no transpose is ever materialised.


@njit(cache=True)
def gemm(a, b, c, ta, tb):
    if ta and tb:
        np.dot(a.T, b.T, c)
    elif ta:
        np.dot(a.T, b, c)
    elif tb:
        np.dot(a, b.T, c)
    else:
        np.dot(a, b, c)


@intrinsic
def _xxgemm_accumulate(typingctx, c, transa, transb, m, n, k, pa, lda, pb, ldb, ldc):
    """Column-major C += op(A)·op(B) (alpha = beta = 1) through Numba's own BLAS binding
    (`numba_xxgemm`, scipy's BLAS): np.dot has no way to accumulate into its output."""
    def codegen(context, builder, signature, args):
        from numba.np.linalg import get_blas_kind, make_constant_slot
        c_arr, ta, tb, m_, n_, k_, pa_, lda_, pb_, ldb_, ldc_ = args
        dtype = signature.args[0].dtype
        char, vp = ir.IntType(8), cgutils.voidptr_t
        intp = context.get_value_type(types.intp)
        fnty = ir.FunctionType(ir.IntType(32), [char, char, char, intp, intp, intp, vp, vp,
                                                intp, vp, intp, vp, vp, intp])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        one = make_constant_slot(context, builder, dtype, 1.0)

        def trans(flag):
            return builder.select(builder.icmp_unsigned("!=", flag, flag.type(0)),
                                  char(ord("t")), char(ord("n")))

        data_c = context.make_array(signature.args[0])(context, builder, c_arr).data
        res = builder.call(fn, (char(ord(get_blas_kind(dtype))), trans(ta), trans(tb),
                                m_, n_, k_, builder.bitcast(one, vp),
                                builder.inttoptr(pa_, vp), lda_, builder.inttoptr(pb_, vp),
                                ldb_, builder.bitcast(one, vp), builder.bitcast(data_c, vp),
                                ldc_))
        return builder.sext(res, context.get_value_type(types.int64))
    return types.int64(c, transa, transb, m, n, k, pa, lda, pb, ldb, ldc), codegen


@njit(cache=True)
def gemm_accumulate(pa, pb, c, x, m, n, k, ta, tb):
    """C = op(A)·op(B) + X, row-major, with X possibly C's own memory: a gradient
    contribution from a matmul is added into the gradient's one buffer as it is computed
    (Deep Learning 6.5), never materialised on its own and summed."""
    if x.ctypes.data != c.ctypes.data:
        for i in range(c.size):
            c[i] = x[i]
    if m == 0 or n == 0 or k == 0:
        return 0
    # Row-major C = op(A)·op(B) is column-major C^T = op(B)^T·op(A)^T.
    return _xxgemm_accumulate(c, tb, ta, n, m, k, pb, k if tb else n, pa, m if ta else k, n)


# ---------------------------------------------------------------- reductions over (outer, n, inner)

@njit(cache=True)
def reduce_sum(x, y, acc):
    # Accumulate in float64 whatever the dtype: a float32 running sum over millions of
    # terms (a weight-decay term) drifts by ~0.1%. acc (inner float64s) is scratch in the
    # arena: kernels allocate nothing.
    outer, n, inner = x.shape
    if inner == 1:
        for o in range(outer):
            # eight partial sums let LLVM vectorise without reassociating one accumulator
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            k = 0
            while k + 8 <= n:
                a0 += x[o, k, 0]
                a1 += x[o, k + 1, 0]
                a2 += x[o, k + 2, 0]
                a3 += x[o, k + 3, 0]
                a4 += x[o, k + 4, 0]
                a5 += x[o, k + 5, 0]
                a6 += x[o, k + 6, 0]
                a7 += x[o, k + 7, 0]
                k += 8
            total = 0.0
            while k < n:
                total += x[o, k, 0]
                k += 1
            y[o, 0] = total + (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))
        return
    for o in range(outer):
        acc[:] = 0.0
        for k in range(n):  # row by row: contiguous, vectorised over the columns
            for i in range(inner):
                acc[i] += x[o, k, i]
        for i in range(inner):
            y[o, i] = acc[i]


@njit(cache=True)
def reduce_sum_int(x, y):
    # 64-bit integers sum exactly (wrapping around as numpy's do): no float accumulator
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = 0
        for k in range(n):
            for i in range(inner):
                y[o, i] += x[o, k, i]


@njit(cache=True)
def reduce_max(x, y, idx):
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            y[o, i] = x[o, 0, i]
            idx[o, i] = 0
        for k in range(1, n):
            for i in range(inner):
                v = x[o, k, i]
                # NaN wins, as in numpy's max/argmax
                if v > y[o, i] or (v != v and y[o, i] == y[o, i]):
                    y[o, i] = v
                    idx[o, i] = k


@njit(cache=True)
def reduce_logsumexp(x, y, m):
    # m (inner values of x's dtype): the running maxima, scratch in the arena
    outer, n, inner = x.shape
    for o in range(outer):
        for i in range(inner):
            m[i] = x[o, 0, i]
            y[o, i] = 0
        for k in range(1, n):
            for i in range(inner):
                if x[o, k, i] > m[i]:
                    m[i] = x[o, k, i]
        for i in range(inner):
            if not np.isfinite(m[i]):
                m[i] = 0
        for k in range(n):
            for i in range(inner):
                y[o, i] += np.exp(x[o, k, i] - m[i])
        for i in range(inner):
            y[o, i] = np.log(y[o, i]) + m[i]


# ---------------------------------------------------------------- softmax cross-entropy

@njit(cache=True)
def softmax_xent(z, labels, loss, dz, want_loss, want_grad):
    """Loss (mean over rows) and/or its gradient (softmax - onehot) / rows, fused."""
    rows, cols = z.shape
    for r in range(rows):
        if labels[r] < 0 or labels[r] >= cols:
            return r + 1
    total = 0.0
    inv_rows = 1.0 / max(rows, 1)
    for r in range(rows):
        m = z[r, 0]
        for j in range(1, cols):
            if z[r, j] > m:
                m = z[r, j]
        s = 0.0
        for j in range(cols):
            e = np.exp(z[r, j] - m)
            if want_grad:
                dz[r, j] = e
            s += e
        if want_grad:
            scale = inv_rows / s
            for j in range(cols):
                dz[r, j] *= scale
            dz[r, labels[r]] -= inv_rows
        total += np.log(s) + m - z[r, labels[r]]
    if want_loss:
        loss[0] = total * inv_rows
    return 0


# ---------------------------------------------------------------- data movement (by itemsize)

@njit(cache=True)
def copy_strided(src, dst, meta):
    """dst[dst_off + i·dst_strides] = src[src_off + i·src_strides] over an N-d index space.

    meta = [ndim, shape..., src_strides..., dst_strides..., src_off, dst_off] (elements).
    Serves transpose, broadcast_to, slice, pad_slice and concatenate.
    """
    nd = meta[0]
    shape = meta[1:1 + nd]
    ss = meta[1 + nd:1 + 2 * nd]
    ds = meta[1 + 2 * nd:1 + 3 * nd]
    so = meta[1 + 3 * nd]
    do = meta[2 + 3 * nd]
    total = 1
    for d in range(nd):
        total *= shape[d]
    if total == 0:
        return
    if nd == 0:
        dst[do] = src[so]
        return
    last = nd - 1
    n_last, s_last, d_last = shape[last], ss[last], ds[last]
    if nd == 1:
        for j in range(n_last):
            dst[do + j * d_last] = src[so + j * s_last]
        return
    # Rows of the last dim, in blocks along the dim before it. A block's start comes from
    # its number by division (no index array: kernels allocate nothing); rows within a
    # block just step.
    rows, s_row, d_row = shape[last - 1], ss[last - 1], ds[last - 1]
    for block in range(total // (n_last * rows)):
        s, t, rest = so, do, block
        for d in range(last - 2, -1, -1):
            i = rest % shape[d]
            rest //= shape[d]
            s += i * ss[d]
            t += i * ds[d]
        for _ in range(rows):
            for j in range(n_last):
                dst[t + j * d_last] = src[s + j * s_last]
            s += s_row
            t += d_row


@njit(cache=True)
def fill_zero(dst):
    for i in range(dst.size):
        dst[i] = 0


@njit(inline="always", cache=True)
def wrap_index(k, n):
    """k in [0, n), negative indices counting from the end as in numpy; -1 if out of range."""
    if k < -n or k >= n:
        return -1
    return k + n if k < 0 else k


@njit(cache=True)
def gather_rows(x, idx, y):
    n = x.shape[0]
    for r in range(idx.size):
        k = wrap_index(idx[r], n)
        if k < 0:
            return r + 1
        y[r, :] = x[k, :]
    return 0


@njit(cache=True)
def scatter_add_rows(g, idx, y):
    n = y.shape[0]
    y[:] = 0
    for r in range(idx.size):
        k = wrap_index(idx[r], n)
        if k < 0:
            return r + 1
        y[k, :] += g[r, :]
    return 0


@njit(cache=True)
def take_along(x, idx, y):
    outer, n, inner = x.shape
    m = idx.shape[1]
    for o in range(outer):
        for j in range(m):
            for i in range(inner):
                k = wrap_index(idx[o, j, i], n)
                if k < 0:
                    return 1
                y[o, j, i] = x[o, k, i]
    return 0


@njit(cache=True)
def scatter_along(g, idx, y):
    outer, n, inner = y.shape
    m = idx.shape[1]
    y[:] = 0
    for o in range(outer):
        for j in range(m):
            for i in range(inner):
                k = wrap_index(idx[o, j, i], n)
                if k < 0:
                    return 1
                y[o, k, i] += g[o, j, i]
    return 0


# ---------------------------------------------------------------- the exported C-ABI wrappers

# name -> (argument names and C types: p pointer, i int64, ({dt} is filled per dtype), body).
# A kernel returns int64: 0, or a nonzero code naming the bad index/label row.
FLOAT_KERNELS = {
    "gemm": ("pa pb pc m n k ta tb", "iiiiiiii",
             "a = carray(_vp(pa), (k, m) if ta else (m, k), {dt})\n"
             "b = carray(_vp(pb), (n, k) if tb else (k, n), {dt})\n"
             "K.gemm(a, b, carray(_vp(pc), (m, n), {dt}), ta, tb)\nreturn 0"),
    "gemm_acc": ("pa pb pc px m n k ta tb", "iiiiiiiii",
                 "return K.gemm_accumulate(pa, pb, carray(_vp(pc), m * n, {dt}), "
                 "carray(_vp(px), m * n, {dt}), m, n, k, ta, tb)"),
    "sum": ("px py pacc outer n inner", "iiiiii",
            "K.reduce_sum(carray(_vp(px), (outer, n, inner), {dt}), "
            "carray(_vp(py), (outer, inner), {dt}), carray(_vp(pacc), max(inner, 1), "
            "np.float64))\nreturn 0"),
    "max": ("px py pi outer n inner", "iiiiii",
            "K.reduce_max(carray(_vp(px), (outer, n, inner), {dt}), "
            "carray(_vp(py), (outer, inner), {dt}), carray(_vp(pi), (outer, inner), np.int64))"
            "\nreturn 0"),
    "logsumexp": ("px py pm outer n inner", "iiiiii",
                  "K.reduce_logsumexp(carray(_vp(px), (outer, n, inner), {dt}), "
                  "carray(_vp(py), (outer, inner), {dt}), carray(_vp(pm), max(inner, 1), {dt}))"
                  "\nreturn 0"),
    "sce": ("pz pl ploss pdz rows cols want_loss want_grad", "iiiiiiii",
            "return K.softmax_xent(carray(_vp(pz), (rows, cols), {dt}), "
            "carray(_vp(pl), rows, np.int64), carray(_vp(ploss), 1, {dt}), "
            "carray(_vp(pdz), (rows, cols), {dt}), want_loss, want_grad)"),
    "scatter_add": ("pg pi py nidx nrows row", "iiiiii",
                    "return K.scatter_add_rows(carray(_vp(pg), (nidx, row), {dt}), "
                    "carray(_vp(pi), nidx, np.int64), carray(_vp(py), (nrows, row), {dt}))"),
    "scatter_along": ("pg pi py outer n m inner", "iiiiiii",
                      "return K.scatter_along(carray(_vp(pg), (outer, m, inner), {dt}), "
                      "carray(_vp(pi), (outer, m, inner), np.int64), "
                      "carray(_vp(py), (outer, n, inner), {dt}))"),
}
FLOAT_DTYPES = {"f32": "np.float32", "f64": "np.float64"}

# Integer and bool reductions: codegen.prepare widens narrower integers to int64 first.
INT_KERNELS = {
    "sum": ("px py outer n inner", "iiiii",
            "K.reduce_sum_int(carray(_vp(px), (outer, n, inner), {dt}), "
            "carray(_vp(py), (outer, inner), {dt}))\nreturn 0"),
    "max": FLOAT_KERNELS["max"],  # reduce_max compares; for integers NaN never occurs
}
INT_DTYPES = {"i64": "np.int64", "u64": "np.uint64"}

# Data movement only needs the item size.
MOVE_KERNELS = {
    "copy": ("px py pmeta nmeta", "iiii",
             "K.copy_strided(carray(_vp(px), 1 << 40, {dt}), carray(_vp(py), 1 << 40, {dt}), "
             "carray(_vp(pmeta), nmeta, np.int64))\nreturn 0"),
    "zero": ("py n", "ii", "K.fill_zero(carray(_vp(py), n, {dt}))\nreturn 0"),
    "gather": ("px pi py nidx nrows row", "iiiiii",
               "return K.gather_rows(carray(_vp(px), (nrows, row), {dt}), "
               "carray(_vp(pi), nidx, np.int64), carray(_vp(py), (nidx, row), {dt}))"),
    "take_along": ("px pi py outer n m inner", "iiiiiii",
                   "return K.take_along(carray(_vp(px), (outer, n, inner), {dt}), "
                   "carray(_vp(pi), (outer, m, inner), np.int64), "
                   "carray(_vp(py), (outer, m, inner), {dt}))"),
}
MOVE_DTYPES = {"b1": "np.uint8", "b2": "np.uint16", "b4": "np.uint32", "b8": "np.uint64"}

# The start of every generated module of C-ABI functions: `_vp` turns an address
# (int64) into a pointer that numba.carray can view as an array.
CFUNC_PRELUDE = '''\
import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _vp(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(addr), codegen


I = types.int64
'''


_ARITHMETIC = ((FLOAT_KERNELS, FLOAT_DTYPES), (INT_KERNELS, INT_DTYPES))


def symbol(kernel: str, dtype: np.dtype) -> str:
    """The C symbol of a library kernel for a dtype (float kernels) or item size (moves);
    NoLoweringError if the library has no variant for it."""
    dtype = np.dtype(dtype)
    if kernel in FLOAT_KERNELS or kernel in INT_KERNELS:
        variants = [np.dtype(d.removeprefix("np.")) for table, dtypes in _ARITHMETIC
                    if kernel in table for d in dtypes.values()]
        if dtype not in variants:
            raise NoLoweringError(f"its {kernel} kernel takes "
                                  f"{', '.join(d.name for d in variants)}, not {dtype}")
        return f"jg_{kernel}_{dtype.kind}{8 * dtype.itemsize}"
    suffix = f"b{dtype.itemsize}"
    if suffix not in MOVE_DTYPES:
        sizes = ", ".join(k[1:] for k in MOVE_DTYPES)
        raise NoLoweringError(f"its {kernel} kernel moves items of {sizes} bytes, not "
                              f"{dtype}")
    return f"jg_{kernel}_{suffix}"


def library_source() -> str:
    parts = [CFUNC_PRELUDE, "from jitgrad import kernels as K\n"]
    for table, dtypes in (*_ARITHMETIC, (MOVE_KERNELS, MOVE_DTYPES)):
        for kernel, (args, sig, body) in table.items():
            for suffix, dt in dtypes.items():
                name = f"jg_{kernel}_{suffix}"
                lines = body.format(dt=dt).split("\n")
                parts.append(f"\n\n@cfunc(types.int64({', '.join(['I'] * len(sig))}), "
                             f"cache=True)\ndef {name}({', '.join(args.split())}):\n"
                             + "\n".join("    " + ln for ln in lines) + "\n")
    return "".join(parts)


def library_hash() -> str:
    """Identifies this kernel library: any change to it changes every generated key."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


_loaded = False
_lock = threading.Lock()


def ensure_loaded() -> None:
    """Compile (or load from cache) the kernel library and register its symbols."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        from . import cache, threads
        threads.init()
        mod = cache.load_module("kernels", library_source(), extra_key=library_hash())
        threads.limit_blas()  # now that Numba has loaded scipy's BLAS, threadpoolctl can see it
        import llvmlite.binding as llb
        for name in dir(mod):
            if name.startswith("jg_"):
                llb.add_symbol(name, getattr(mod, name).address)
        _loaded = True


__all__ = ["ensure_loaded", "symbol", "library_hash", "library_source"]
