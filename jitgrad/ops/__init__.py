"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import (  # the numpy surface (issue 16)
           elementwise,
           layout,
           linalg,
           maths,
           nn,
           reduce,
           shape,
           sort,
)

__all__ = ["registry", "elementwise", "linalg", "nn", "reduce", "shape", "layout", "maths",
           "sort"]
