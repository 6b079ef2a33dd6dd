"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import (
           attention,
           bf16_gemm,
           contract,
           conv,
           diagonal,
           elementwise,
           gelu,
           layout,
           linalg,
           maths,
           nn,
           norm,
           pool,
           precision,
           random,
           reduce,
           shape,
           sort,
)

__all__ = ["registry", "attention", "bf16_gemm", "contract", "conv", "diagonal", "elementwise",
           "gelu", "layout", "linalg", "maths", "nn", "norm", "pool", "precision", "random",
           "reduce", "shape", "sort"]
