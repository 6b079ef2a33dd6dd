"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import (
           contract,
           conv,
           diagonal,
           elementwise,
           layout,
           linalg,
           maths,
           nn,
           pool,
           random,
           reduce,
           shape,
           sort,
)

__all__ = ["registry", "contract", "conv", "diagonal", "elementwise", "layout", "linalg", "maths",
           "nn", "pool", "random", "reduce", "shape", "sort"]
