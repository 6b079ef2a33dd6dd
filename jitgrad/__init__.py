"""jitgrad: reverse-mode autodiff for the CPU, traced once and compiled with Numba."""

from . import (  # distributed imports mpi4py only when used
    distributed,
    nn,
    numpy,  # jitgrad.numpy: numpy's namespace for traced values
    optim,
)
from . import numpy_surface as _numpy_surface  # noqa: F401  (numpy's functions on Tracer)
from . import trace as _trace  # noqa: F401  (attaches operators to Tracer)
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
from .ops.maths import (  # the numpy surface (issue 16)
    arccos,
    arccosh,
    arcsin,
    arcsinh,
    arctan,
    arctan2,
    arctanh,
    clip,
    cos,
    cosh,
    erf,
    exp2,
    expm1,
    floor_divide,
    fmax,
    fmin,
    hypot,
    log1p,
    log2,
    log10,
    logaddexp,
    logaddexp2,
    minimum,
    remainder,
    sin,
    sinh,
    square,
    tan,
)
from .ops.nn import softmax, softmax_cross_entropy
from .ops.reduce import (
    argmax,
    average,
    cumsum,
    logsumexp,
    max,
    max_argmax,
    mean,
    min,
    prod,
    std,
    sum,
    var,
)
from .ops.shape import concatenate, reshape, take_along_axis, transpose
from .ops.sort import argsort, sort
from .train import TrainStep, train_step

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
