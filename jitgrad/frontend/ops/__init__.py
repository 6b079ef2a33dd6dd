"""The primitive table: one module per family; each primitive's rules live beside it."""

from ..core import registry
from . import contract, diagonal, elementwise, linalg, nn, random, reduce, shape

__all__ = ["registry", "contract", "diagonal", "elementwise", "linalg", "nn", "random",
           "reduce", "shape"]
