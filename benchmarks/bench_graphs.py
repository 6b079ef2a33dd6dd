"""asv: forward and gradient of non-MLP graphs — a residual block, a softmax-attention-like
matmul chain, and a graph with 2^depth paths (each value used twice per level)."""

import numpy as np

from . import _common as C


def residual_block(p, x):
    import jitgrad as jg
    h = jg.relu(x @ p["W1"] + p["b1"])
    out = jg.relu(x + h @ p["W2"] + p["b2"])
    return jg.mean(out * out)


def attention(p, x):
    import jitgrad as jg
    q, k, v = x @ p["Wq"], x @ p["Wk"], x @ p["Wv"]
    s = (q @ k.T) * float(1.0 / np.sqrt(q.shape[1]))
    a = jg.softmax(s, axis=-1)
    out = (a @ v) @ p["Wo"]
    return jg.mean(out * out)


def paths(p, x):
    import jitgrad as jg
    y = x
    for _ in range(p["depth"]):
        y = jg.tanh(y) * p["a"] + y * p["b"]  # y used twice: 2^depth paths to the output
    return jg.sum(y * y)


def _graph(name, dtype, depth=24):
    rng = np.random.default_rng(0)

    def r(*s):
        return (rng.standard_normal(s) * 0.05).astype(dtype)

    if name == "residual":
        return residual_block, {"W1": r(256, 256), "b1": r(256), "W2": r(256, 256),
                                "b2": r(256)}, r(128, 256)
    if name == "attention":
        return attention, {"Wq": r(128, 64), "Wk": r(128, 64), "Wv": r(128, 64),
                           "Wo": r(64, 128)}, r(256, 128)
    a, b = np.asarray(0.6, dtype), np.asarray(0.5, dtype)
    return (lambda p, x: paths({"depth": depth, "a": p["a"], "b": p["b"]}, x),
            {"a": a, "b": b}, r(4096))


class Graphs:
    params = (["residual", "attention", "paths24"], ["float32", "float64"])
    param_names = ["graph", "dtype"]
    timeout = 600

    def setup(self, graph, dtype):
        import jitgrad as jg
        C.pin_threads()
        fn, self.p, self.x = _graph(graph.rstrip("0123456789"), dtype)
        self.fwd = jg.jit(fn)
        self.vg = jg.jit(jg.value_and_grad(fn))
        self.fwd(self.p, self.x)  # compile outside the timed bodies
        self.vg(self.p, self.x)

    def time_forward(self, graph, dtype):
        self.fwd(self.p, self.x)

    def time_grad(self, graph, dtype):
        self.vg(self.p, self.x)


class PathsDepth:
    """The 2^depth-path graph at growing depth: time must grow linearly, not exponentially."""

    params = [8, 16, 32, 64]
    param_names = ["depth"]
    timeout = 600

    def setup(self, depth):
        import jitgrad as jg
        C.pin_threads()
        fn, self.p, self.x = _graph("paths", "float32", depth)
        self.vg = jg.jit(jg.value_and_grad(fn))
        self.vg(self.p, self.x)

    def time_grad(self, depth):
        self.vg(self.p, self.x)

    def track_instructions(self, depth):
        return len(self.vg.program.instrs)

    track_instructions.unit = "instructions"
