"""jitgrad: reverse-mode autodiff for the CPU, traced once and compiled with Numba."""

from . import distributed, nn, optim  # distributed imports mpi4py only when used
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
from .ops.contract import dot, einsum, inner, kron, outer, tensordot
from .ops.diagonal import diag, diagonal, trace, tril, triu
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
from .ops.indexing import at
from .ops.linalg import matmul
from .ops.nn import softmax, softmax_cross_entropy
from .ops.reduce import argmax, logsumexp, max, max_argmax, mean, sum
from .ops.shape import concatenate, reshape, take_along_axis, transpose
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
    "at", "diag", "diagonal", "dot", "einsum", "inner", "kron", "outer", "tensordot", "trace",
    "tril", "triu",
]
