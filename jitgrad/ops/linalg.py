"""Matrix multiplication: C = op(A) @ op(B), op = transpose when the flag says so.

The flags let the VJP (and the fusion pass) express `A.T @ G` and `G @ W.T`
without materialising a transpose: the kernels hand them to GEMM.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import Tracer, primitive
from ..errors import JitgradError
from . import elementwise as E
from . import shape as S

matmul_p = primitive("matmul", "linalg")


def _op(x: np.ndarray, t: bool) -> np.ndarray:
    return x.T if t else x


matmul_p.def_impl(lambda a, b, *, ta, tb: _op(a, ta) @ _op(b, tb))


@matmul_p.def_shape
def _matmul_shape(a, b, *, ta, tb):
    if len(a[0]) != 2 or len(b[0]) != 2:
        raise JitgradError(f"matmul primitive takes 2-d operands, got {a[0]} and {b[0]}")
    if a[1] != b[1]:
        raise JitgradError(f"operands have different dtypes {a[1]} and {b[1]}")
    (m, k), (k2, n) = a[0][::-1] if ta else a[0], b[0][::-1] if tb else b[0]
    if k != k2:
        raise JitgradError(f"shapes {a[0]}{'.T' if ta else ''} and {b[0]}{'.T' if tb else ''} "
                           f"are not aligned: {k} (dim 1) != {k2} (dim 0)")
    return (m, n), a[1]


@matmul_p.def_vjp
def _matmul_vjp(cts, outs, ins, *, ta, tb):
    # d op(A) = G op(B)^T and d op(B) = op(A)^T G, each written as one flagged matmul.
    g, (a, b) = cts[0], ins
    ga = (matmul_p.bind(b, g, ta=tb, tb=True) if ta
          else matmul_p.bind(g, b, ta=False, tb=not tb))
    gb = (matmul_p.bind(g, a, ta=True, tb=ta) if tb
          else matmul_p.bind(a, g, ta=not ta, tb=False))
    return [ga, gb]


def matmul(a: Any, b: Any) -> Any:
    """numpy's matmul for 1-d and 2-d operands."""
    a, b = E.promote(a, b)
    if not isinstance(a, Tracer) and not isinstance(b, Tracer):
        a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise JitgradError("matmul of a 0-d array; use * for scalars")
    if a.ndim > 2 or b.ndim > 2:
        raise JitgradError(f"batched matmul is not supported (shapes {a.shape} and {b.shape})")
    if a.dtype.kind not in "f":
        raise JitgradError(f"matmul expects float operands, got {a.dtype}")
    a2 = S.reshape(a, (1, a.shape[0])) if a.ndim == 1 else a
    b2 = S.reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b
    out = matmul_p.bind(a2, b2, ta=False, tb=False)
    shape = a.shape[:-1] + b.shape[1:]
    return S.reshape(out, shape) if out.shape != shape else out
