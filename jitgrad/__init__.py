"""jitgrad: reverse-mode autodiff for the CPU, traced once and compiled with Numba."""

from . import distributed, nn, optim  # distributed imports mpi4py only when used
from . import trace as _trace  # noqa: F401  (attaches operators to Tracer)
from . import numpy_surface as _numpy_surface  # noqa: F401  (numpy's functions on Tracer)
from .api import CompiledFunction, checkpoint, grad, jit, value_and_grad
from .errors import (
    CacheSecurityError,
    JitgradError,
    NonFiniteError,
    TracingError,
    UndefinedGradientError,
)
from .ir import Instr, Program, Var
from .ops.elementwise import (
    abs,
    ceil,
    exp,
    floor,
    log,
    maximum,
    relu,
    round,
    sigmoid,
    sign,
    sqrt,
    stop_gradient,
    tanh,
    where,
)
from .ops.linalg import matmul
from .ops.nn import softmax, softmax_cross_entropy
from .ops.reduce import argmax, logsumexp, max, max_argmax, mean, sum
from .ops.shape import concatenate, reshape, take_along_axis, transpose
from .train import TrainStep, train_step

# ---------------------------------------------------------------- the numpy surface (issue 16)
from . import numpy  # noqa: E402  (jitgrad.numpy: numpy's namespace for traced values)
from .ops.maths import (  # noqa: E402
    arccos, arccosh, arcsin, arcsinh, arctan, arctan2, arctanh, clip, cos, cosh, erf, exp2,
    expm1, fmax, fmin, floor_divide, hypot, log1p, log2, log10, logaddexp, logaddexp2,
    minimum, remainder, sin, sinh, square, tan,
)
from .ops.reduce import average, cumsum, min, prod, std, var  # noqa: E402
from .ops.sort import argsort, sort  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CacheSecurityError", "CompiledFunction", "Instr", "JitgradError", "NonFiniteError",
    "Program", "TracingError", "checkpoint",
    "UndefinedGradientError", "Var", "abs", "argmax", "ceil", "concatenate", "exp", "floor",
    "grad", "jit", "log", "logsumexp", "matmul", "max", "max_argmax", "maximum", "mean", "relu",
    "reshape", "round", "sigmoid", "sign", "softmax", "softmax_cross_entropy", "sqrt",
    "stop_gradient", "sum", "take_along_axis", "tanh", "transpose", "value_and_grad", "where",
    "nn", "optim", "train_step", "TrainStep", "distributed",
    # the numpy surface (issue 16)
    "numpy", "arccos", "arccosh", "arcsin", "arcsinh", "arctan", "arctan2", "arctanh", "clip",
    "cos", "cosh", "erf", "exp2", "expm1", "fmax", "fmin", "floor_divide", "hypot", "log1p",
    "log2", "log10", "logaddexp", "logaddexp2", "minimum", "remainder", "sin", "sinh",
    "square", "tan", "average", "cumsum", "min", "prod", "std", "var", "argsort", "sort",
]
