"""Small functional building blocks for neural networks: initialisers, layers, losses,
and two model families (MLPs, small convolutional networks).

Parameters are plain pytrees of numpy arrays (an MLP is ``{"W0", "b0", "W1", ...}``),
layers are functions of ``(params, x)``, and everything here works both on numpy
arrays and inside ``jg.jit`` / ``jg.grad`` / ``jg.train_step``. Weight matrices
are laid out ``[fan_in, fan_out]`` so a layer is ``x @ W + b``; convolution weights are
PyTorch's ``[out_channels, in_channels / groups, kH, kW]`` (``conv2d`` is
``torch.nn.functional.conv2d``'s, as are the poolings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ..errors import JitgradError
from ..frontend import random
from ..frontend.core import Tracer
from ..frontend.ops.attention import masked_softmax, scaled_dot_product_attention
from ..frontend.ops.conv import conv2d
from ..frontend.ops.elementwise import relu, tanh, where
from ..frontend.ops.gelu import gelu
from ..frontend.ops.nn import softmax_cross_entropy
from ..frontend.ops.norm import layer_norm
from ..frontend.ops.pool import avg_pool2d, max_pool2d
from ..frontend.ops.reduce import sum as _sum
from ..frontend.ops.shape import reshape
from .gpt import GPTConfig, decay_mask, gpt_apply, gpt_init, gpt_loss

__all__ = [
    "ACTIVATIONS", "CNN_MODELS", "ConvNet", "DIGITS_CNN", "GPTConfig", "LENET5", "WIDE_CNN",
    "accuracy", "avg_pool2d", "conv2d", "conv_init", "decay_mask", "dropout", "gelu",
    "glorot_uniform", "gpt_apply", "gpt_init", "gpt_loss", "he_normal", "kaiming_uniform",
    "layer_norm", "linear", "masked_softmax", "max_pool2d", "mlp_apply", "mlp_init", "mlp_loss",
    "num_layers", "scaled_dot_product_attention",
]

ACTIVATIONS = {f.__name__: f for f in (relu, tanh)}


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise JitgradError(f"initialisers need a weight shape [fan_in, fan_out, ...] with "
                           f"positive sizes, got {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[0] * receptive, shape[1] * receptive


def _float(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise JitgradError(f"parameters must have a floating-point dtype, got {dt}")
    return dt


def he_normal(rng: np.random.Generator | int | None, shape: Sequence[int],
              dtype: DTypeLike = np.float32) -> np.ndarray:
    """He (Kaiming) normal init for ReLU layers: N(0, 2 / fan_in).

    Same as ``torch.nn.init.kaiming_normal_(w, nonlinearity="relu")`` for a
    weight stored ``[fan_in, fan_out]``.
    """
    fan_in, _ = _fans(shape)
    std = np.sqrt(2.0 / fan_in)
    return (_rng(rng).standard_normal(tuple(shape)) * std).astype(_float(dtype))


def glorot_uniform(rng: np.random.Generator | int | None, shape: Sequence[int],
                   dtype: DTypeLike = np.float32) -> np.ndarray:
    """Glorot (Xavier) uniform init: U(-a, a) with a = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    a = np.sqrt(6.0 / (fan_in + fan_out))
    return _rng(rng).uniform(-a, a, size=tuple(shape)).astype(_float(dtype))


_INITS = {"he": he_normal, "glorot": glorot_uniform}


def mlp_init(sizes: Sequence[int], rng: np.random.Generator | int | None = 0,
             dtype: DTypeLike = np.float32, init: str = "he") -> dict[str, np.ndarray]:
    """Parameters of an MLP with layer widths ``sizes`` = [in, hidden..., out].

    Returns ``{"W0": [in, h1], "b0": [h1], "W1": ..., ...}``; biases start at zero,
    weights use ``init`` ("he" for ReLU networks, "glorot" for tanh).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise JitgradError(f"an MLP needs at least [in, out] positive layer sizes, got {sizes}")
    if init not in _INITS:
        raise JitgradError(f"unknown init {init!r}: use one of {sorted(_INITS)}")
    rng, dt = _rng(rng), _float(dtype)
    params: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        params[f"W{i}"] = _INITS[init](rng, (fan_in, fan_out), dt)
        params[f"b{i}"] = np.zeros(fan_out, dt)
    return params


def num_layers(params: dict[str, Any]) -> int:
    """Number of linear layers in an ``mlp_init`` parameter dict (checked to be complete)."""
    n = sum(1 for k in params if k.startswith("W"))
    expected = {f"{p}{i}" for i in range(n) for p in "Wb"}
    if n == 0 or set(params) != expected:
        raise JitgradError(f"MLP parameters must be W0, b0, ..., W{max(n - 1, 0)}, "
                           f"b{max(n - 1, 0)}; got {sorted(params)}")
    return n


def linear(W: Any, b: Any, x: Any) -> Any:
    """An affine layer ``x @ W + b`` (W is [fan_in, fan_out])."""
    return x @ W + b


def dropout(key: Any, x: Any, rate: float) -> Any:
    """Inverted dropout, as PyTorch's ``F.dropout`` in training: each element of x is
    zeroed with probability ``rate`` and the others are scaled by ``1 / (1 - rate)``, so
    the expected value is x. The mask depends only on the key and x's shape (draw a new
    key per step, e.g. ``jg.random.fold_in(key, step)``), and the gradient flows through
    the same mask. ``rate`` 0 returns x itself."""
    if isinstance(rate, Tracer) or not isinstance(rate, (int, float)) or isinstance(rate, bool) \
            or not 0 <= rate <= 1:
        raise JitgradError(f"dropout rate must be a number in [0, 1], got {rate!r}")
    dtype = x.dtype if isinstance(x, Tracer) else np.asarray(x).dtype
    if dtype.kind != "f":
        raise JitgradError(f"dropout applies to float arrays, got {dtype}")
    if rate == 0:
        return x
    keep = random.bernoulli(key, 1.0 - rate, np.shape(x))
    return where(keep, x * (1.0 / (1.0 - rate) if rate < 1 else 0.0), 0.0)


def mlp_apply(params: dict[str, Any], x: Any, activation: str = "relu", *,
              dropout_rate: float = 0.0, key: Any = None) -> Any:
    """Logits of the MLP: linear layers with ``activation`` between them, none after the last.

    With ``dropout_rate``, every hidden activation goes through :func:`dropout`, layer i
    with the key ``jg.random.fold_in(key, i)``."""
    if activation not in ACTIVATIONS:
        raise JitgradError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
    if dropout_rate and key is None:
        raise JitgradError("mlp_apply with dropout_rate needs a key (jg.random.key(seed))")
    act = ACTIVATIONS[activation]
    n = num_layers(params)
    for i in range(n):
        x = linear(params[f"W{i}"], params[f"b{i}"], x)
        if i < n - 1:
            x = act(x)
            if dropout_rate:
                x = dropout(random.fold_in(key, i), x, dropout_rate)
    return x


def mlp_loss(params: dict[str, Any], x: Any, y: Any, weight_decay: float = 0.0,
             activation: str = "relu", *, dropout_rate: float = 0.0, key: Any = None) -> Any:
    """Mean softmax cross-entropy of the MLP on (x, y), plus ``weight_decay/2 * sum(W**2)``.

    The L2 term covers weights only (not biases); its gradient is
    ``weight_decay * W``, the same as the optimizers' ``weight_decay`` option. With
    ``dropout_rate`` (and a key: ``jg.train_step(..., key=...)`` passes one per step),
    hidden activations go through dropout (see :func:`mlp_apply`).
    """
    logits = mlp_apply(params, x, activation, dropout_rate=dropout_rate, key=key)
    loss = softmax_cross_entropy(logits, y)
    if weight_decay:
        for i in range(num_layers(params)):
            W = params[f"W{i}"]
            loss = loss + (0.5 * weight_decay) * _sum(W * W)
    return loss


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max logit equals the label (numpy, not traced)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise JitgradError(f"accuracy needs logits [n, classes] and labels [n], got "
                           f"{logits.shape} and {labels.shape}")
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


# ---------------------------------------------------------------- convolutional networks

def _conv_fan_in(shape: Sequence[int]) -> int:
    """fan_in of a torch-layout weight [out, in, kH, kW] (or [out, in]): in · kH · kW."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise JitgradError(f"initialisers need a weight shape [out, in, ...] with positive "
                           f"sizes, got {shape}")
    return int(np.prod(shape[1:]))


def kaiming_uniform(rng: np.random.Generator | int | None, shape: Sequence[int],
                    dtype: DTypeLike = np.float32, fan_in: int | None = None) -> np.ndarray:
    """PyTorch's default initialisation of ``nn.Conv2d`` and ``nn.Linear`` weights
    (``kaiming_uniform_(w, a=sqrt(5))``): U(-b, b) with b = 1 / sqrt(fan_in), fan_in
    = in · kH · kW of a weight [out, in, kH, kW] unless given."""
    fan_in = _conv_fan_in(shape) if fan_in is None else int(fan_in)
    bound = 1.0 / np.sqrt(fan_in)
    return _rng(rng).uniform(-bound, bound, size=tuple(shape)).astype(_float(dtype))


def conv_init(rng: np.random.Generator | int | None, out_channels: int, in_channels: int,
              kernel_size: int | tuple[int, int], groups: int = 1,
              dtype: DTypeLike = np.float32, init: str = "kaiming_uniform"
              ) -> tuple[np.ndarray, np.ndarray]:
    """(weight [out, in / groups, kH, kW], bias [out]) of a convolution.

    init="kaiming_uniform": ``torch.nn.Conv2d``'s defaults, weight and bias both U(-b, b),
    b = 1 / sqrt(fan_in); init="he": weight N(0, 2 / fan_in) (He et al. 2015, for ReLU
    networks: ``kaiming_normal_(w, nonlinearity="relu")``), bias zero."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    if in_channels % groups or out_channels % groups:
        raise JitgradError(f"in_channels {in_channels} and out_channels {out_channels} must "
                           f"be divisible by groups={groups}")
    shape = (out_channels, in_channels // groups, kh, kw)
    rng, dt = _rng(rng), _float(dtype)
    fan_in = _conv_fan_in(shape)
    if init == "kaiming_uniform":
        w = kaiming_uniform(rng, shape, dt)
        return w, kaiming_uniform(rng, (out_channels,), dt, fan_in=fan_in)
    if init == "he":
        w = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dt)
        return w, np.zeros(out_channels, dt)
    raise JitgradError(f"unknown conv init {init!r}: use 'kaiming_uniform' or 'he'")


@dataclasses.dataclass(frozen=True)
class ConvNet:
    """Conv blocks (conv → relu → 2×2 max-pool), then linear layers with relu between.

    convs: (out_channels, kernel, padding) per block; hidden: the widths of the linear
    layers before the classifier. Parameters: ``conv{i}_w`` [out, in, k, k], ``conv{i}_b``,
    ``fc{i}_W`` [fan_in, fan_out], ``fc{i}_b``; all PyTorch's default initialisation
    (``init="he"``: He normal weights, zero biases). Inputs are NCHW, or rows of
    in_channels · side² features (a flattened square image, as the digits are)."""

    name: str
    convs: tuple[tuple[int, int, int], ...]
    hidden: tuple[int, ...] = ()
    in_channels: int = 1

    def feature_shape(self, side: int) -> tuple[int, int, int]:
        """(channels, height, width) after the conv blocks of a side × side input."""
        c, h = self.in_channels, side
        for out, k, pad in self.convs:
            h = (h + 2 * pad - k + 1) // 2
            if h < 1:
                raise JitgradError(f"{self.name} needs a larger input than {side}x{side}: its "
                                   f"conv blocks reduce it to nothing")
            c = out
        return c, h, h

    def side(self, n_features: int) -> int:
        side = int(round(np.sqrt(n_features / self.in_channels)))
        if side * side * self.in_channels != n_features:
            raise JitgradError(f"{self.name} takes square images of {self.in_channels} "
                               f"channel(s): {n_features} features are not C·side²")
        return side

    def init(self, side: int, n_classes: int, rng: np.random.Generator | int | None = 0,
             dtype: DTypeLike = np.float32, init: str = "kaiming_uniform"
             ) -> dict[str, np.ndarray]:
        rng = _rng(rng)
        params: dict[str, np.ndarray] = {}
        c = self.in_channels
        for i, (out, k, _) in enumerate(self.convs):
            params[f"conv{i}_w"], params[f"conv{i}_b"] = conv_init(rng, out, c, k, 1, dtype,
                                                                   init)
            c = out
        width = int(np.prod(self.feature_shape(side)))
        for i, out in enumerate((*self.hidden, n_classes)):
            w, b = conv_init(rng, out, width, 1, 1, dtype, init)  # a linear layer is a 1x1 conv
            params[f"fc{i}_W"], params[f"fc{i}_b"] = np.ascontiguousarray(w[:, :, 0, 0].T), b
            width = out
        return params

    def apply(self, params: dict[str, Any], x: Any, *, dropout_rate: float = 0.0,
              key: Any = None) -> Any:
        """Logits; with ``dropout_rate`` (and a key), dropout before each linear layer."""
        if dropout_rate and key is None:
            raise JitgradError(f"{self.name} with dropout_rate needs a key (jg.random.key)")
        if len(x.shape) == 2:
            side = self.side(x.shape[1])
            x = reshape(x, (x.shape[0], self.in_channels, side, side))
        for i, (_, _, pad) in enumerate(self.convs):
            x = relu(conv2d(x, params[f"conv{i}_w"], params[f"conv{i}_b"], padding=pad))
            x = max_pool2d(x, 2)
        x = reshape(x, (x.shape[0], -1))
        n_fc = len(self.hidden) + 1
        for i in range(n_fc):
            if dropout_rate:
                x = dropout(random.fold_in(key, i), x, dropout_rate)
            x = linear(params[f"fc{i}_W"], params[f"fc{i}_b"], x)
            if i < n_fc - 1:
                x = relu(x)
        return x

    def loss(self, params: dict[str, Any], x: Any, y: Any, *, dropout_rate: float = 0.0,
             key: Any = None) -> Any:
        """Mean softmax cross-entropy of the logits on (x, y)."""
        return softmax_cross_entropy(self.apply(params, x, dropout_rate=dropout_rate, key=key),
                                     y)


# The digits conv net (8×8 inputs; any square input works), LeNet-5 (28×28, relu and
# max-pooling), and the wider net of the benchmarks (3×3 convs of 32 and 64 channels).
DIGITS_CNN = ConvNet("cnn", ((16, 3, 1), (32, 3, 1)))
LENET5 = ConvNet("lenet5", ((6, 5, 2), (16, 5, 0)), (120, 84))
WIDE_CNN = ConvNet("wide_cnn", ((32, 3, 1), (64, 3, 1)))
CNN_MODELS = {m.name: m for m in (DIGITS_CNN, LENET5, WIDE_CNN)}
