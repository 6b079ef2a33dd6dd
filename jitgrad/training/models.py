"""The models ``jitgrad train --model`` trains: how each initialises from a dataset, its
loss and logits, and the defaults tuned for it on the bundled digits."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from . import nn


@dataclasses.dataclass(frozen=True)
class Model:
    """init(n_features, n_classes, hidden, rng, dtype) -> params; loss(params, x, y, *,
    dropout_rate=..., key=...) -> scalar; logits(params, x). sizes(n_features, n_classes,
    hidden): the layer widths reported and checkpointed. epochs and lr (per optimizer)
    replace TrainConfig's defaults where the flag is not given."""

    init: Callable[..., dict[str, np.ndarray]]
    loss: Callable[..., Any]
    logits: Callable[..., Any]
    sizes: Callable[[int, int, tuple[int, ...]], list[int]]
    epochs: int
    lr: dict[str, float] = dataclasses.field(default_factory=dict)


def _mlp_sizes(n_features: int, n_classes: int, hidden: tuple[int, ...]) -> list[int]:
    return [n_features, *hidden, n_classes]


def _mlp_init(n_features, n_classes, hidden, rng, dtype):
    return nn.mlp_init(_mlp_sizes(n_features, n_classes, hidden), rng, dtype)


def _mlp_loss(params, x, y, *, dropout_rate=0.0, key=None):
    return nn.mlp_loss(params, x, y, dropout_rate=dropout_rate, key=key)


def _mlp_logits(params, x):
    return nn.mlp_apply(params, x)


def _convnet(net: nn.ConvNet, epochs: int, lr: dict[str, float]) -> Model:
    def init(n_features, n_classes, hidden, rng, dtype):
        return net.init(net.side(n_features), n_classes, rng, dtype)

    def sizes(n_features, n_classes, hidden):
        return [n_features, *(c for c, _, _ in net.convs), *net.hidden, n_classes]

    def logits(params, x):
        return net.apply(params, x)

    return Model(init, net.loss, logits, sizes, epochs, lr)


# --hidden applies to the MLP only; the conv nets' architectures are fixed (jg.nn).
MODELS: dict[str, Model] = {
    "mlp": Model(_mlp_init, _mlp_loss, _mlp_logits, _mlp_sizes, epochs=40),
    "cnn": _convnet(nn.DIGITS_CNN, epochs=30, lr={"sgd": 0.05}),
    "lenet5": _convnet(nn.LENET5, epochs=30, lr={"sgd": 0.05}),
}
