"""asv: jitgrad's kernels at the MLP shapes, each beside its numpy counterpart.

* matmul in the three layouts of a training step — NN (X @ W), TN (X.T @ G, the weight
  gradient), NT (G @ W.T, the input gradient) — through jitgrad's gemm kernel symbol (BLAS
  via Numba's np.dot into a preallocated output) vs numpy's `np.matmul(..., out=)`;
* fused relu-backward g·(a > 0) and fused softmax-cross-entropy forward+backward, as the
  bare native call of a jitted function vs the numpy expression.

jitgrad and numpy use different OpenBLAS copies (scipy's vs numpy's), so each side is a
separate benchmark method (asv runs each in its own process).
"""

import numpy as np

from . import _common as C

# (rows = batch, in, out) of MLP layers: small, medium (first and hidden), large
MATMUL_SHAPES = ["64x784x128", "128x784x512", "128x512x512", "256x2048x2048"]
LAYOUTS = ["NN", "TN", "NT"]


def _operands(shape, layout, dtype="float32"):
    b, i, o = map(int, shape.split("x"))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((b, i)).astype(dtype)
    W = rng.standard_normal((i, o)).astype(dtype)
    G = rng.standard_normal((b, o)).astype(dtype)
    if layout == "NN":    # Z = X @ W
        return X, W, np.empty((b, o), dtype), (b, o, i, 0, 0)
    if layout == "TN":    # dW = X.T @ G
        return X, G, np.empty((i, o), dtype), (i, o, b, 1, 0)
    return G, W, np.empty((b, i), dtype), (b, i, o, 0, 1)  # dX = G @ W.T


class MatmulJitgrad:
    params = (MATMUL_SHAPES, LAYOUTS)
    param_names = ["shape", "layout"]

    def setup(self, shape, layout):
        C.pin_threads()
        self.a, self.b, self.c, (m, n, k, ta, tb) = _operands(shape, layout)
        self.call = C.gemm_kernel("float32")
        self.spec = np.array([[self.a.ctypes.data, self.b.ctypes.data, self.c.ctypes.data,
                               m, n, k, ta, tb]], np.int64)
        self.call(self.spec)

    def time_matmul(self, shape, layout):
        self.call(self.spec)


class MatmulNumpy:
    params = (MATMUL_SHAPES, LAYOUTS)
    param_names = ["shape", "layout"]

    def setup(self, shape, layout):
        C.pin_threads()
        a, b, self.c, _ = _operands(shape, layout)
        self.a = a.T if layout == "TN" else a
        self.b = b.T if layout == "NT" else b

    def time_matmul(self, shape, layout):
        np.matmul(self.a, self.b, out=self.c)


ELEM_SHAPES = ["128x512", "256x2048"]
SCE_SHAPES = ["128x10", "256x10", "1024x1000"]


def _relu_backward(g, a):
    return g * (a > 0)


def _sce_value_and_grad(z, labels):
    import jitgrad as jg
    return jg.value_and_grad(jg.softmax_cross_entropy)(z, labels)


def _rand(shape, seed=0):
    r, c = map(int, shape.split("x"))
    rng = np.random.default_rng(seed)
    return rng.standard_normal((r, c)).astype(np.float32), rng.integers(0, c, r).astype(np.int64)


class ReluBackwardJitgrad:
    params = (ELEM_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        import jitgrad as jg
        C.pin_threads()
        g, _ = _rand(shape, 0)
        a, _ = _rand(shape, 1)
        cf = jg.jit(_relu_backward)
        cf(g, a)
        self.run, self.keep = C.native_runner(cf, g, a)

    def time_relu_backward(self, shape):
        self.run()


class ReluBackwardNumpy:
    params = (ELEM_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        C.pin_threads()
        self.g, _ = _rand(shape, 0)
        self.a, _ = _rand(shape, 1)
        self.out = np.empty_like(self.g)

    def time_relu_backward(self, shape):
        np.multiply(self.g, self.a > 0, out=self.out)


class SoftmaxXentJitgrad:
    """Loss and gradient w.r.t. the logits in one fused pass."""

    params = (SCE_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        import jitgrad as jg
        C.pin_threads()
        z, labels = _rand(shape)
        cf = jg.jit(_sce_value_and_grad)
        cf(z, labels)
        self.run, self.keep = C.native_runner(cf, z, labels)

    def time_softmax_xent(self, shape):
        self.run()


class SoftmaxXentNumpy:
    params = (SCE_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        C.pin_threads()
        self.z, self.labels = _rand(shape)
        self.rows = np.arange(len(self.z))

    def time_softmax_xent(self, shape):
        z = self.z
        m = z.max(axis=1, keepdims=True)
        e = np.exp(z - m)
        s = e.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(s[:, 0]) + m[:, 0] - z[self.rows, self.labels])
        dz = e / s
        dz[self.rows, self.labels] -= 1
        dz /= len(z)
        return loss, dz


# Batched matmul and einsum (issue 16): the bare native call of the jitted expression vs
# numpy's into a preallocated output. benchmarks/linalg.py compares the whole calls too.
BATCHED_SHAPES = ["64x64x64x64", "16x128x128x128", "4x512x512x512"]  # batch x m x k x n
EINSUMS = ["bij,bjk->bik", "bhqd,bhkd->bhqk", "bij,jk->bik", "ibj,bjk->bik"]
_EINSUM_SHAPES = {"bij,bjk->bik": ((16, 128, 128), (16, 128, 128)),
                  "bhqd,bhkd->bhqk": ((2, 8, 128, 64), (2, 8, 128, 64)),
                  "bij,jk->bik": ((32, 64, 256), (256, 256)),
                  "ibj,bjk->bik": ((128, 16, 128), (16, 128, 128))}


def _batched_operands(shape):
    b, m, k, n = map(int, shape.split("x"))
    rng = np.random.default_rng(0)
    return (rng.standard_normal((b, m, k)).astype(np.float32),
            rng.standard_normal((b, k, n)).astype(np.float32))


def _einsum_operands(spec):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in _EINSUM_SHAPES[spec]]


def _native(fn, *xs):
    import jitgrad as jg
    cf = jg.jit(fn)
    cf(*xs)
    return C.native_runner(cf, *xs)


class BatchedMatmulJitgrad:
    params = (BATCHED_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        C.pin_threads()
        self.run, self.keep = _native(lambda a, b: a @ b, *_batched_operands(shape))

    def time_batched_matmul(self, shape):
        self.run()


class BatchedMatmulNumpy:
    params = (BATCHED_SHAPES,)
    param_names = ["shape"]

    def setup(self, shape):
        C.pin_threads()
        self.a, self.b = _batched_operands(shape)
        self.out = np.matmul(self.a, self.b)

    def time_batched_matmul(self, shape):
        np.matmul(self.a, self.b, out=self.out)


class EinsumJitgrad:
    params = (EINSUMS,)
    param_names = ["subscripts"]

    def setup(self, spec):
        C.pin_threads()
        self.run, self.keep = _native(lambda *xs: np.einsum(spec, *xs), *_einsum_operands(spec))

    def time_einsum(self, spec):
        self.run()


class EinsumNumpy:
    params = (EINSUMS,)
    param_names = ["subscripts"]

    def setup(self, spec):
        C.pin_threads()
        self.spec, self.xs = spec, _einsum_operands(spec)
        self.out = np.einsum(spec, *self.xs, optimize=True)

    def time_einsum(self, spec):
        np.einsum(self.spec, *self.xs, out=self.out, optimize=True)
# ---------------------------------------------------------------- the numpy surface (issue 16)
# Elementwise families as a user writes them (benchmarks/numpy_surface.py has the rest and
# runs each side in its own process, alternating): jitgrad fuses each into one loop.

FAMILY_SIZES = ["1000000"]


def _surface_case(family):
    from . import numpy_surface
    return numpy_surface.family_cases()[family], numpy_surface.inputs


FAMILIES = ["trig", "exp/log", "min/max", "binary maths", "remainder"]


class NumpySurfaceJitgrad:
    params = (FAMILIES, FAMILY_SIZES)
    param_names = ["family", "size"]

    def setup(self, family, size):
        import jitgrad as jg
        C.pin_threads()
        fn, inputs = _surface_case(family)
        x, y = inputs(int(size), "float32")
        cf = jg.jit(fn)
        cf(x, y)
        self.run, self.keep = C.native_runner(cf, x, y)

    def time_family(self, family, size):
        self.run()


class NumpySurfaceNumpy:
    params = (FAMILIES, FAMILY_SIZES)
    param_names = ["family", "size"]

    def setup(self, family, size):
        C.pin_threads()
        self.fn, inputs = _surface_case(family)
        self.x, self.y = inputs(int(size), "float32")

    def time_family(self, family, size):
        with np.errstate(all="ignore"):
            self.fn(self.x, self.y)
