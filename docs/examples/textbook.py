"""Example functions for `jitgrad show` (see docs/make_pictures.sh).

mlp_weight_decay: Deep Learning fig. 6.11, a one-hidden-layer ReLU network with
cross-entropy and weight decay λ(ΣW1² + ΣW2²). deep_chain: a stack of ReLU
layers, whose memory timeline shows what recomputation buys.
"""

import numpy as np

import jitgrad as jg

LAMBDA = 1e-3


def mlp_weight_decay(W1, W2, x, y):
    h = jg.relu(x @ W1)
    cost = jg.softmax_cross_entropy(h @ W2, y)
    return cost + LAMBDA * (jg.sum(W1 ** 2) + jg.sum(W2 ** 2))


def deep_chain(params, x, y):
    h = x
    for W, b in params[:-1]:
        h = jg.relu(h @ W + b)
    W, b = params[-1]
    return jg.softmax_cross_entropy(h @ W + b, y)


def _mlp_example():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((64, 32)).astype(np.float32),
            rng.standard_normal((32, 10)).astype(np.float32),
            rng.standard_normal((128, 64)).astype(np.float32),
            rng.integers(0, 10, 128))


def _chain_example(depth=16, width=128, batch=512):
    rng = np.random.default_rng(0)
    params = [((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
               np.zeros(width, np.float32)) for _ in range(depth)]
    return params, rng.standard_normal((batch, width)).astype(np.float32), \
        rng.integers(0, width, batch)


__jitgrad_example__ = {"mlp_weight_decay": _mlp_example, "deep_chain": _chain_example}
