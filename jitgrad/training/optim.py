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
from ..frontend.ops.elementwise import asdtype, sqrt
from ..frontend.ops.maths import minimum
from ..frontend.ops.reduce import sum as _sum


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


class WarmupCosine(Schedule):
    """Linear warm-up over `warmup` steps, then cosine decay to min_lr at step `total`, and
    min_lr after it: nanoGPT's get_lr(it) with it = t - 1."""

    def __init__(self, warmup: int, total: int, min_lr: float = 0.0):
        self.warmup, self.total, self.min_lr = int(warmup), int(total), float(min_lr)
        if not 0 <= self.warmup < max(self.total, 1):
            raise JitgradError(f"warm-up must be shorter than the schedule: {self.warmup} "
                               f"warm-up steps of {self.total}")

    def __call__(self, base_lr: float, t: int) -> float:
        it = t - 1
        if it < self.warmup:
            return base_lr * (it + 1) / (self.warmup + 1)
        if it > self.total:
            return self.min_lr
        ratio = (it - self.warmup) / max(self.total - self.warmup, 1)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (base_lr - self.min_lr)


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


def global_norm(grads: Any) -> Any:
    """sqrt of the sum of squares of every gradient element (one 0-d value)."""
    total = None
    for g in tree.flatten(grads)[0]:
        sq = _sum(g * g)
        total = sq if total is None else total + sq
    return sqrt(total)


def clip_by_global_norm(grads: Any, max_norm: float) -> Any:
    """grads scaled by min(1, max_norm / (norm + 1e-6)), norm their global_norm: as
    torch.nn.utils.clip_grad_norm_ does it."""
    scale = minimum(max_norm / (global_norm(grads) + 1e-6), 1.0)
    return _map(lambda g: g * scale, grads)


def check_mask(mask: Any, params: Any) -> list[bool]:
    """A weight-decay mask's leaves (one bool per parameter), checked against params."""
    leaves, td = tree.flatten(mask)
    p_leaves, p_td = tree.flatten(params)
    if td != p_td:
        raise JitgradError("the weight-decay mask must have the parameters' structure (a "
                           "bool for every parameter array)")
    for m in leaves:
        if not isinstance(m, (bool, np.bool_)):
            raise JitgradError(f"weight-decay mask leaves must be bools, got "
                               f"{type(m).__name__} {m!r}")
    return [bool(m) for m in leaves]


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient); AdamW decouples it.

    mask: a pytree of bools with the parameters' structure, True where weight decay applies
    (torch's parameter groups with and without decay); None: everywhere. clip_norm: the
    gradients are first scaled to a global norm of at most clip_norm (clip_by_global_norm,
    torch.nn.utils.clip_grad_norm_), inside the compiled step.
    """

    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 schedule: Schedule | None = None, mask: Any = None,
                 clip_norm: float | None = None):
        super().__init__(lr, schedule)
        self.b1, self.b2 = map(float, betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        if clip_norm is not None and not (math.isfinite(clip_norm) and clip_norm > 0):
            raise JitgradError(f"clip_norm must be a positive number, got {clip_norm}")
        self.mask, self.clip_norm = mask, None if clip_norm is None else float(clip_norm)

    def _decays(self, params: Any) -> Any:
        """A bool per parameter: where weight decay applies."""
        leaves, td = tree.flatten(params)
        if self.mask is None:
            return tree.unflatten(td, [True] * len(leaves))
        return tree.unflatten(td, check_mask(self.mask, params))

    def init(self, params: Any) -> dict[str, Any]:
        return {"m": _zeros_like(params), "v": _zeros_like(params)}

    def hyper(self, t: int) -> dict[str, float]:
        return {**super().hyper(t), "bc1": 1 - self.b1 ** t, "bc2": 1 - self.b2 ** t}

    def update(self, params, grads, state, hyper):
        lr, wd, b1, b2 = hyper["lr"], self.weight_decay, self.b1, self.b2
        if self.clip_norm is not None:
            grads = clip_by_global_norm(grads, self.clip_norm)
        decays = self._decays(params)
        if wd and self.decoupled:
            # The factor in the parameter's dtype, as torch's p.mul_(1 - lr·wd): computed
            # from the float64 learning rate it would make the update float64 (a float64
            # result copied into the float32 parameter after the step).
            params = _map(lambda p, d: p * asdtype(1 - lr * wd, p.dtype) if d else p, params,
                          decays)
        elif wd:
            grads = _map(lambda g, p, d: g + wd * p if d else g, grads, params, decays)
        m = _map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = _map(lambda v, g: b2 * v + (1 - b2) * (g * g), state["v"], grads)
        new = _map(lambda p, m, v: p - lr * (m / hyper["bc1"]) /
                   (sqrt(v / hyper["bc2"]) + self.eps), params, m, v)
        return new, {"m": m, "v": v}


class AdamW(Adam):
    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 schedule: Schedule | None = None, mask: Any = None,
                 clip_norm: float | None = None):
        super().__init__(lr, betas, eps, weight_decay, schedule, mask, clip_norm)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def check_params(params: Any) -> list[np.ndarray]:
    """The parameter arrays a training step updates in place, checked: writeable, C-contiguous
    float numpy arrays; an error names the one that is not (params['W0'])."""
    leaves, structure = tree.flatten(params)
    if not leaves:
        raise JitgradError("train_step needs at least one parameter array")
    for i, p in enumerate(leaves):
        if not isinstance(p, np.ndarray) or p.dtype.kind != "f":
            problem = (f"parameters must be float numpy arrays, got {type(p).__name__} "
                       f"{getattr(p, 'dtype', '')} at {{}}")
        elif not p.flags.writeable:
            problem = ("parameter arrays must be writeable: train_step updates them "
                       "({} is read-only)")
        elif not p.flags.c_contiguous:
            problem = ("parameters must be C-contiguous arrays (np.ascontiguousarray) so that "
                       "they can be updated in place ({} is not)")
        else:
            continue
        # the paths only now: every slow-path step checks, and naming each leaf costs more
        raise JitgradError(problem.format(tree.leaf_paths(structure, "params")[i]))
    return leaves
