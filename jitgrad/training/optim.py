"""Optimizers, written with jitgrad operations so the update compiles into the training step.

The formulas follow PyTorch's definitions (torch.optim.SGD, Adam, AdamW).
Hyperparameters that change during training (the scheduled learning rate,
Adam's bias corrections) enter the program as 0-d inputs, so a schedule never
causes a recompile.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import JitgradError
from ..frontend import tree
from ..frontend.ops.elementwise import sqrt


class Schedule:
    """Learning rate as a function of the step number t = 1, 2, ..."""

    def __call__(self, base_lr: float, t: int) -> float:
        raise NotImplementedError


class Constant(Schedule):
    def __call__(self, base_lr: float, t: int) -> float:
        return base_lr


class StepDecay(Schedule):
    """lr · gamma^floor((t-1) / step_size) (torch.optim.lr_scheduler.StepLR, per step)."""

    def __init__(self, step_size: int, gamma: float = 0.1):
        self.step_size, self.gamma = int(step_size), float(gamma)

    def __call__(self, base_lr: float, t: int) -> float:
        return base_lr * self.gamma ** ((t - 1) // self.step_size)


class Cosine(Schedule):
    """Cosine annealing from lr to min_lr over total_steps (torch's CosineAnnealingLR)."""

    def __init__(self, total_steps: int, min_lr: float = 0.0):
        self.total, self.min_lr = max(int(total_steps), 1), float(min_lr)

    def __call__(self, base_lr: float, t: int) -> float:
        frac = min(t - 1, self.total) / self.total
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * frac)) / 2


def _zeros_like(params: Any) -> Any:
    leaves, td = tree.flatten(params)
    return tree.unflatten(td, [np.zeros_like(p) for p in leaves])


def _map(fn: Any, *trees: Any) -> Any:
    flat = [tree.flatten(t) for t in trees]
    td = flat[0][1]
    return tree.unflatten(td, [fn(*xs) for xs in zip(*(f[0] for f in flat), strict=True)])


class Optimizer:
    def __init__(self, lr: float, schedule: Schedule | None = None):
        if not lr > 0:
            raise JitgradError(f"learning rate must be positive, got {lr}")
        self.lr = float(lr)
        self.schedule = schedule or Constant()

    def init(self, params: Any) -> dict[str, Any]:
        return {}

    def hyper(self, t: int) -> dict[str, float]:
        return {"lr": self.schedule(self.lr, t)}

    def update(self, params: Any, grads: Any, state: dict[str, Any],
               hyper: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: g += wd·p; buf = μ·buf + g; g = g + μ·buf (Nesterov) or buf; p -= lr·g."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, schedule: Schedule | None = None):
        super().__init__(lr, schedule)
        if nesterov and momentum <= 0:
            raise JitgradError("Nesterov momentum needs momentum > 0")
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov

    def init(self, params: Any) -> dict[str, Any]:
        return {"momentum": _zeros_like(params)} if self.momentum else {}

    def update(self, params, grads, state, hyper):
        lr, mu, wd = hyper["lr"], self.momentum, self.weight_decay
        if wd:
            grads = _map(lambda g, p: g + wd * p, grads, params)
        if not mu:
            return _map(lambda p, g: p - lr * g, params, grads), state
        buf = _map(lambda b, g: mu * b + g, state["momentum"], grads)
        step = _map(lambda g, b: g + mu * b, grads, buf) if self.nesterov else buf
        return _map(lambda p, s: p - lr * s, params, step), {"momentum": buf}


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient); AdamW decouples it."""

    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 schedule: Schedule | None = None):
        super().__init__(lr, schedule)
        self.b1, self.b2 = map(float, betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def init(self, params: Any) -> dict[str, Any]:
        return {"m": _zeros_like(params), "v": _zeros_like(params)}

    def hyper(self, t: int) -> dict[str, float]:
        return {**super().hyper(t), "bc1": 1 - self.b1 ** t, "bc2": 1 - self.b2 ** t}

    def update(self, params, grads, state, hyper):
        lr, wd, b1, b2 = hyper["lr"], self.weight_decay, self.b1, self.b2
        if wd and self.decoupled:
            params = _map(lambda p: p * (1 - lr * wd), params)
        elif wd:
            grads = _map(lambda g, p: g + wd * p, grads, params)
        m = _map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = _map(lambda v, g: b2 * v + (1 - b2) * (g * g), state["v"], grads)
        new = _map(lambda p, m, v: p - lr * (m / hyper["bc1"]) /
                   (sqrt(v / hyper["bc2"]) + self.eps), params, m, v)
        return new, {"m": m, "v": v}


class AdamW(Adam):
    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 schedule: Schedule | None = None):
        super().__init__(lr, betas, eps, weight_decay, schedule)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def check_params(params: Any) -> list[np.ndarray]:
    """The parameter arrays a training step updates in place, checked: writeable, C-contiguous
    float numpy arrays."""
    leaves, _ = tree.flatten(params)
    if not leaves:
        raise JitgradError("train_step needs at least one parameter array")
    for p in leaves:
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            raise JitgradError(f"parameters must be float numpy arrays, got "
                               f"{type(p).__name__} {getattr(p, 'dtype', '')}")
        if not p.flags.writeable:
            raise JitgradError("parameter arrays must be writeable: train_step updates them")
        if not p.flags.c_contiguous:
            raise JitgradError("parameters must be C-contiguous arrays "
                               "(np.ascontiguousarray) so that they can be updated in place")
    return leaves
