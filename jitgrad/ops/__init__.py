"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import elementwise, linalg, nn, reduce, shape
from . import layout, maths, sort  # the numpy surface (issue 16)

__all__ = ["registry", "elementwise", "linalg", "nn", "reduce", "shape", "layout", "maths",
           "sort"]
