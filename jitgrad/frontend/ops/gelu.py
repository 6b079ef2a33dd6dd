"""GELU, as torch.nn.functional.gelu: exact x·Φ(x) through erf, or its tanh approximation.

Two elementwise primitives with scalar expressions, so fusion puts each into one loop with
its neighbours (the bias add before it, the product with the incoming gradient after):
`gelu` and its derivative `gelu_grad`. The derivative of `gelu_grad` is written with
primitives, so every order of differentiation works.

  exact: gelu(x) = x·Φ(x),  gelu'(x) = Φ(x) + x·φ(x),  gelu''(x) = φ(x)·(2 - x²)
  tanh:  gelu(x) = x/2·(1 + t), t = tanh(u), u = c·(x + a·x³), c = √(2/π), a = 0.044715
         gelu'(x) = (1 + t)/2 + x/2·(1 - t²)·u',  u' = c·(1 + 3a·x²)
         gelu''(x) = (1 - t²)·(u' - x·t·u'² + 3a·c·x²)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer, primitive
from ..ir import literal
from . import elementwise as E
from . import maths as M
from . import vecmath as V

APPROXIMATIONS = ("none", "tanh")
_RSQRT2 = 1.0 / math.sqrt(2.0)
_RSQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _erf_ref(x: np.ndarray) -> np.ndarray:
    return M.erf_p.impl(x)


def _gelu_ref(x: np.ndarray, *, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        return (0.5 * x * (1.0 + np.tanh(_C * (x + _A * x ** 3)))).astype(x.dtype)
    return (0.5 * x * (1.0 + _erf_ref(x * _RSQRT2))).astype(x.dtype)


def _gelu_grad_ref(x: np.ndarray, *, approximate: str) -> np.ndarray:
    if approximate == "tanh":
        t = np.tanh(_C * (x + _A * x ** 3))
        du = _C * (1.0 + 3.0 * _A * x * x)
        return (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du).astype(x.dtype)
    return (0.5 * (1.0 + _erf_ref(x * _RSQRT2)) + x * np.exp(-0.5 * x * x) * _RSQRT_2PI
            ).astype(x.dtype)


def _float_shape(x, *, approximate):
    if x[1].kind != "f":
        raise JitgradError(f"expects a float input, got {x[1]}")
    return x


gelu_p = primitive("gelu", "elementwise")
gelu_p.def_impl(_gelu_ref)
gelu_p.def_shape(_float_shape)
gelu_p.def_vjp(lambda cts, outs, ins, *, approximate: [
    cts[0] * gelu_grad_p.bind(ins[0], approximate=approximate)])

gelu_grad_p = primitive("gelu_grad", "elementwise")
gelu_grad_p.def_impl(_gelu_grad_ref)
gelu_grad_p.def_shape(_float_shape)


@gelu_grad_p.def_vjp
def _gelu_grad_vjp(cts, outs, ins, *, approximate):
    x = ins[0]
    if approximate == "tanh":
        t = E.tanh((x + x * x * x * _A) * _C)
        du = (x * x * (3.0 * _A) + 1.0) * _C
        second = (1.0 - t * t) * (du - x * t * du * du + x * x * (3.0 * _A * _C))
    else:
        second = E.exp(x * x * -0.5) * _RSQRT_2PI * (2.0 - x * x)
    return [cts[0] * second]


# The scalar helpers take their constants as arguments, literals of the loop's dtype, so a
# float32 loop stays float32.
_HELPERS = V.helper("vm_erf", "vm_exp") + '''

@njit(inline="always")
def _gelu_erf(x, half, one, rsqrt2):
    return half * x * (one + vm_erf(x * rsqrt2))


@njit(inline="always")
def _gelu_erf_grad(x, half, one, rsqrt2, rsqrt2pi):
    return half * (one + vm_erf(x * rsqrt2)) + x * vm_exp(-half * x * x) * rsqrt2pi


@njit(inline="always")
def _gelu_tanh(x, half, one, c, a):
    return half * x * (one + np.tanh(c * (x + a * x * x * x)))


@njit(inline="always")
def _gelu_tanh_grad(x, half, one, c, a, three):
    t = np.tanh(c * (x + a * x * x * x))
    return half * (one + t) + half * x * (one - t * t) * (c * (one + three * a * x * x))
'''


def _scalar(grad: bool):
    def render(ins, args) -> str:
        dt = ins.outputs[0].dtype

        def lits(*vs: float) -> str:
            return ", ".join(literal(v, dt) for v in vs)
        if ins.kw["approximate"] == "tanh":
            name, consts = "_gelu_tanh", (0.5, 1.0, _C, _A) + ((3.0,) if grad else ())
        else:
            name, consts = "_gelu_erf", (0.5, 1.0, _RSQRT2) + ((_RSQRT_2PI,) if grad else ())
        return f"{name}{'_grad' if grad else ''}({args[0]}, {lits(*consts)})"
    return render


gelu_p.def_scalar(_scalar(grad=False), _HELPERS)
gelu_grad_p.def_scalar(_scalar(grad=True), _HELPERS)


def gelu(x: Any, approximate: str = "none") -> Any:
    """The Gaussian error linear unit, as ``torch.nn.functional.gelu``: ``x·Φ(x)`` with
    ``approximate="none"`` (through erf), ``x/2·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` with
    ``"tanh"``."""
    if approximate not in APPROXIMATIONS:
        raise JitgradError(f"gelu: approximate must be one of {APPROXIMATIONS}, got "
                           f"{approximate!r}")
    if not isinstance(x, Tracer):
        x = np.asarray(x)
    return gelu_p.bind(E.asdtype(x, E._float_dtype(x)), approximate=approximate)
