"""The conv-net benchmark configs (issue 20): the same float32 SGD step in every
implementation (forward, softmax cross-entropy mean over the batch, backward, p -= lr·g).

- lenet5: LeNet-5 on 1×28×28, batch 64 (conv5×5 6 pad 2 → relu → maxpool2 → conv5×5 16 →
  relu → maxpool2 → linear 120 → relu → linear 84 → relu → linear 10);
- widecnn: 3×3 convs of 32 and 64 channels (pad 1), each → relu → maxpool2, then linear 10,
  on 1×28×28, batch 128.

Parameters are jitgrad's layout (conv weights OIHW, linear weights [in, out]); the torch and
JAX steps take the same arrays. Plain tuples here (not jg.nn's objects), so the torch and
JAX workers never import jitgrad; the jitgrad worker checks they are jg.nn's nets.
"""

from __future__ import annotations

import numpy as np

LR = 0.01
# name -> (conv blocks (out, kernel, pad), hidden linear widths, side, batch, jg.nn name)
CNN_CONFIGS = {
    "lenet5": (((6, 5, 2), (16, 5, 0)), (120, 84), 28, 64, "LENET5"),
    "widecnn": (((32, 3, 1), (64, 3, 1)), (), 28, 128, "WIDE_CNN"),
}
CLASSES = 10


def _layers(config: str):
    """Per conv block (in, out, k, pad, side in, side out of the conv); the linear widths."""
    convs, hidden, side, _, _ = CNN_CONFIGS[config]
    blocks, c = [], 1
    for out, k, pad in convs:
        conv_side = side + 2 * pad - k + 1
        blocks.append((c, out, k, pad, side, conv_side))
        c, side = out, conv_side // 2
    widths = [c * side * side, *hidden, CLASSES]
    return blocks, widths


def make_params(config: str, dtype="float32", seed: int = 0) -> list[np.ndarray]:
    """[conv0_w, conv0_b, ..., fc0_W, fc0_b, ...]: PyTorch's default initialisation."""
    rng = np.random.default_rng(seed)
    blocks, widths = _layers(config)
    params = []
    for c, out, k, _, _, _ in blocks:
        bound = 1 / np.sqrt(c * k * k)
        params += [rng.uniform(-bound, bound, (out, c, k, k)).astype(dtype),
                   rng.uniform(-bound, bound, out).astype(dtype)]
    for i, o in zip(widths[:-1], widths[1:], strict=True):
        bound = 1 / np.sqrt(i)
        params += [rng.uniform(-bound, bound, (i, o)).astype(dtype),
                   rng.uniform(-bound, bound, o).astype(dtype)]
    return params


def make_batch(config: str, dtype="float32", seed: int = 1):
    _, _, side, batch, _ = CNN_CONFIGS[config]
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 1, side, side)).astype(dtype),
            rng.integers(0, CLASSES, batch).astype(np.int64))


def step_flops(config: str) -> int:
    """Multiply-adds ×2 of the step's convolutions and products: forward, weight gradient and
    input gradient of every layer (none for the first conv: its input is data)."""
    blocks, widths = _layers(config)
    batch = CNN_CONFIGS[config][3]
    total = 0
    for j, (c, out, k, _, _, conv_side) in enumerate(blocks):
        fwd = 2 * batch * out * conv_side * conv_side * c * k * k
        total += fwd * (2 if j == 0 else 3)
    return total + sum(6 * batch * i * o for i, o in zip(widths[:-1], widths[1:], strict=True))


def gemm_shapes(config: str) -> list[tuple[int, int, int, bool, bool]]:
    """(m, n, k, ta, tb) of the step's GEMMs as jitgrad's im2col kernels make them."""
    blocks, widths = _layers(config)
    batch = CNN_CONFIGS[config][3]
    shapes = []
    for j, (c, out, k, _, _, conv_side) in enumerate(blocks):
        rows, kk = batch * conv_side * conv_side, c * k * k
        shapes.append((rows, out, kk, False, True))      # forward: col · Wᵀ
        shapes.append((out, kk, rows, True, False))      # weight gradient: gᵀ · col
        if j:
            shapes.append((rows, kk, out, False, False))  # input gradient: g · W
    for j, (i, o) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        shapes.append((batch, o, i, False, False))
        shapes.append((i, o, batch, True, False))
        if j or blocks:
            shapes.append((batch, i, o, False, True))
    return shapes


# ---------------------------------------------------------------- the implementations

def jitgrad_step(config: str, dtype="float32", precision: str | None = None):
    """(step, params, x, y): a jg.train_step of jg.nn's net, not yet compiled."""
    import jitgrad as jg
    convs, hidden, _, _, name = CNN_CONFIGS[config]
    net = getattr(jg.nn, name)
    assert net.convs == convs and net.hidden == hidden, f"{name} differs from {config}"
    params = make_params(config, dtype)
    names = [f"conv{i}_{s}" for i in range(len(convs)) for s in "wb"] + [
        f"fc{i}_{s}" for i in range(len(hidden) + 1) for s in "Wb"]
    tree = dict(zip(names, params, strict=True))
    x, y = make_batch(config, dtype)
    step = jg.train_step(net.loss, tree, jg.optim.SGD(lr=LR), precision=precision)
    return step, tree, x, y


def torch_step(config: str, compiled: bool = False, bf16: bool = False):
    """A torch SGD step (bf16: the forward under torch.autocast's bfloat16 policy)."""
    import torch
    import torch.nn.functional as F
    convs, _, _, _, _ = CNN_CONFIGS[config]
    params = [torch.tensor(p, requires_grad=True) for p in make_params(config)]
    xn, yn = make_batch(config)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    opt = torch.optim.SGD(params, lr=LR)
    n_conv = len(convs)

    def loss_fn(x, y):
        h = x
        for i, (_, _, pad) in enumerate(convs):
            h = F.max_pool2d(F.relu(F.conv2d(h, params[2 * i], params[2 * i + 1], padding=pad)),
                             2)
        h = h.reshape(h.shape[0], -1)
        fcs = params[2 * n_conv:]
        for i in range(len(fcs) // 2):
            h = torch.addmm(fcs[2 * i + 1], h, fcs[2 * i])
            if i < len(fcs) // 2 - 1:
                h = F.relu(h)
        return F.cross_entropy(h, y)

    def train(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        train = torch.compile(train)
    return lambda: train(x, y).item()


def jax_step(config: str):
    import warnings
    warnings.filterwarnings("ignore", message=".*donat.*")
    import jax
    import jax.numpy as jnp
    convs, _, _, _, _ = CNN_CONFIGS[config]
    n_conv = len(convs)

    def loss_fn(params, x, y):
        h = x
        for i, (_, _, pad) in enumerate(convs):
            h = jax.lax.conv_general_dilated(h, params[2 * i], (1, 1), [(pad, pad)] * 2,
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
            h = jax.nn.relu(h + params[2 * i + 1][None, :, None, None])
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2),
                                      "VALID")
        h = h.reshape(h.shape[0], -1)
        fcs = params[2 * n_conv:]
        for i in range(len(fcs) // 2):
            h = h @ fcs[2 * i] + fcs[2 * i + 1]
            if i < len(fcs) // 2 - 1:
                h = jax.nn.relu(h)
        lse = jax.nn.logsumexp(h, axis=1)
        return jnp.mean(lse - jnp.take_along_axis(h, y[:, None], axis=1)[:, 0])

    def step_fn(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return loss, [p - LR * g for p, g in zip(params, grads, strict=True)]

    step_jit = jax.jit(step_fn, donate_argnums=0)
    xn, yn = make_batch(config)
    x, y = jnp.asarray(xn), jnp.asarray(yn.astype("int32"))
    state = {"p": [jnp.asarray(p) for p in make_params(config)]}

    def step():
        loss, state["p"] = step_jit(state["p"], x, y)
        return loss.block_until_ready()

    return step


def gemm_floor_fn(config: str, dtype="float32"):
    """The step's GEMMs alone (gemm_shapes), through the strided GEMM of the provider the
    convolutions use, in one native call on buffers of those shapes."""
    import ctypes

    from numba import njit

    from jitgrad.compiler import blas, kernels

    rng = np.random.default_rng(0)
    keep, rows = [], []
    for m, n, k, ta, tb in gemm_shapes(config):
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
        c = np.zeros((m, n), dtype)
        keep += [a, b, c]
        rows.append((a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], c.ctypes.data, n,
                     m, n, k, int(ta), int(tb)))
    spec = np.array(rows, np.int64)
    dt = np.dtype(dtype)
    sym = blas.choose(blas.GemmShape(1, 1, 1, False, False, dt, dt)).strided.symbol(dt)
    kernels.require([sym])
    gemm = ctypes.cast(kernels.function(sym), ctypes.c_void_p).value

    @njit
    def run(spec, gemm):
        for i in range(spec.shape[0]):
            s = spec[i]
            blas.call_strided(gemm, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8],
                              s[9], s[10], 0)
        return 0

    run(spec, gemm)
    return (lambda: run(spec, gemm)), keep
