"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import (
           bf16_gemm,
           contract,
           conv,
           diagonal,
           elementwise,
           layout,
           linalg,
           maths,
           nn,
           pool,
           precision,
           random,
           reduce,
           shape,
           sort,
)

__all__ = ["registry", "bf16_gemm", "contract", "conv", "diagonal", "elementwise", "layout",
           "linalg", "maths", "nn", "pool", "precision", "random", "reduce", "shape", "sort"]
