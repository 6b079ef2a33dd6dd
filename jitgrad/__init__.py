"""jitgrad: reverse-mode autodiff for the CPU, traced once and compiled with Numba."""

import sys as _sys

from . import numpy  # noqa: E402  (jitgrad.numpy: numpy's namespace for traced values)
from .errors import (
    CacheSecurityError,
    JitgradError,
    JitgradWarning,
    NonFiniteError,
    TracingError,
    UndefinedGradientError,
)
from .frontend import numpy_surface as _numpy_surface  # noqa: F401  (numpy's functions on Tracer)
from .frontend import random, tree
from .frontend import trace as _trace  # noqa: F401  (attaches operators to Tracer)
from .frontend.api import CompiledFunction, checkpoint, grad, jit, value_and_grad
from .frontend.custom_vjp import custom_vjp
from .frontend.ir import Instr, Program, Var
from .frontend.ops.contract import dot, einsum, inner, kron, outer, tensordot
from .frontend.ops.diagonal import diag, diagonal, trace, tril, triu
from .frontend.ops.elementwise import (
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
from .frontend.ops.gelu import gelu
from .frontend.ops.indexing import at
from .frontend.ops.linalg import matmul
from .frontend.ops.maths import (  # the numpy surface (issue 16)
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
from .frontend.ops.nn import softmax, softmax_cross_entropy
from .frontend.ops.reduce import (
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
from .frontend.ops.shape import concatenate, reshape, take_along_axis, transpose
from .frontend.ops.sort import argsort, sort
from .frontend.transforms import hessian, jacfwd, jacobian, jvp, vmap
from .tools import show as _show  # noqa: F401  (attaches cf.show to CompiledFunction)
from .tools import timeline
from .training import data, distributed, nn, optim  # distributed: mpi4py only when used
from .training.train import TrainStep, train_step

# Modules live in layer folders (frontend/, compiler/, training/, tools/); the public module
# paths stay importable as they were: `import jitgrad.nn`, `from jitgrad.data import ...`.
_PUBLIC_MODULES = {"nn": nn, "optim": optim, "distributed": distributed, "data": data,
                   "timeline": timeline, "tree": tree, "random": random}
for _name, _module in _PUBLIC_MODULES.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

__version__ = "0.1.0"

__all__ = [
    "CacheSecurityError", "CompiledFunction", "Instr", "JitgradError", "JitgradWarning",
    "NonFiniteError",
    "Program", "TracingError", "checkpoint",
    "UndefinedGradientError", "Var", "abs", "argmax", "ceil", "concatenate", "exp", "floor",
    "grad", "jit", "log", "logsumexp", "matmul", "max", "max_argmax", "maximum", "mean", "relu",
    "reshape", "round", "sigmoid", "sign", "softmax", "softmax_cross_entropy", "sqrt",
    "stop_gradient", "sum", "take_along_axis", "tanh", "transpose", "value_and_grad", "where",
    "nn", "optim", "random", "train_step", "TrainStep", "distributed", "tree", "custom_vjp",
    "jacobian", "hessian", "jvp", "jacfwd", "vmap",
    "at", "diag", "diagonal", "dot", "einsum", "inner", "kron", "outer", "tensordot", "trace",
    "tril", "triu",
    # the numpy surface (issue 16)
    "numpy", "arccos", "arccosh", "arcsin", "arcsinh", "arctan", "arctan2", "arctanh", "clip",
    "cos", "cosh", "erf", "exp2", "expm1", "fmax", "fmin", "floor_divide", "hypot", "log1p",
    "log2", "log10", "logaddexp", "logaddexp2", "minimum", "remainder", "sin", "sinh",
    "square", "tan", "average", "cumsum", "min", "prod", "std", "var", "argsort", "sort",
    # transformers (issue 21)
    "gelu",
]
