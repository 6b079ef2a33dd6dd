"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import (
           attention,
           contract,
           diagonal,
           elementwise,
           gelu,
           layout,
           linalg,
           maths,
           nn,
           norm,
           random,
           reduce,
           shape,
           sort,
)

__all__ = ["registry", "attention", "contract", "diagonal", "elementwise", "gelu", "layout",
           "linalg", "maths", "nn", "norm", "random", "reduce", "shape", "sort"]
