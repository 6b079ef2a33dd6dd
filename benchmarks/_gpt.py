"""The GPT training step for the benchmarks: jitgrad, PyTorch eager, torch.compile and JAX.

Every implementation computes the same float32 step of nanoGPT's model (tied head, pre-LN
blocks, causal attention, exact GELU) on one fixed batch of character ids: forward,
cross-entropy, backward, gradient clipping at global norm 1 and AdamW (β = (0.9, 0.99),
weight decay 0.1 on matrices only, lr 1e-3). The parameters are jitgrad's gpt_init, so
the losses agree. Configs: "baby" is nanoGPT's CPU baby GPT (width 128, 4 layers, 4 heads,
block 64, batch 12), "wide" a width-384, 6-layer, 6-head model at block 256, batch 8.
"""

from __future__ import annotations

import os
import time

# name -> (n_embd, n_layer, n_head, block, batch)
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "baby": (128, 4, 4, 64, 12),
    "wide": (384, 6, 6, 256, 8),
}
IMPLS = ("jitgrad", "torch", "torch_compile", "jax")
VOCAB = 65
ADAMW = {"lr": 1e-3, "b1": 0.9, "b2": 0.99, "eps": 1e-8, "wd": 0.1}
CLIP = 1.0


def model(config: str):
    from jitgrad.training.gpt import GPTConfig
    c, layers, heads, block, _ = CONFIGS[config]
    return GPTConfig(VOCAB, block, layers, heads, c)


def tokens_per_step(config: str) -> int:
    return CONFIGS[config][3] * CONFIGS[config][4]


def step_flops(config: str) -> int:
    return model(config).flops_per_token() * tokens_per_step(config)


def init(config: str):
    """(params as a dict of float32 numpy arrays, tokens, targets)."""
    import numpy as np

    from jitgrad.training.gpt import gpt_init
    _, _, _, block, batch = CONFIGS[config]
    rng = np.random.default_rng(1)
    ids = rng.integers(0, VOCAB, size=(batch, block + 1))
    return gpt_init(model(config), 0, np.float32), ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------- jitgrad

def jitgrad_step(config: str, precision: str | None = None):
    """(step, params, tokens, targets): the jg.train_step, not yet compiled."""
    import jitgrad as jg
    from jitgrad.training import gpt as G
    params, x, y = init(config)
    heads = CONFIGS[config][2]
    opt = jg.optim.AdamW(lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                         weight_decay=ADAMW["wd"], mask=G.decay_mask(params), clip_norm=CLIP)
    step = jg.train_step(lambda p, t, g: G.gpt_loss(p, t, g, heads), params, opt,
                         precision=precision)
    return step, params, x, y


# ---------------------------------------------------------------- PyTorch

def torch_gpt_loss(p, tokens, targets, n_layer: int, n_head: int):
    """nanoGPT's forward and loss in torch, functionally, on jitgrad's parameter names
    ([in, out] weights): the benchmarks' PyTorch step and tests/reference's references."""
    import torch.nn.functional as F
    c = p["wte"].shape[1]
    b, t = tokens.shape

    def lin(n, h):
        return h @ p[f"{n}.w"] + p[f"{n}.b"]

    def ln(n, h):
        return F.layer_norm(h, (c,), p[f"{n}.w"], p[f"{n}.b"], 1e-5)
    h = p["wte"][tokens] + p["wpe"][:t]
    for i in range(n_layer):
        q, k, v = lin(f"h.{i}.attn.c_attn", ln(f"h.{i}.ln_1", h)).split(c, dim=2)
        q, k, v = (z.view(b, t, n_head, c // n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + lin(f"h.{i}.attn.c_proj", a.transpose(1, 2).contiguous().view(b, t, c))
        h = h + lin(f"h.{i}.mlp.c_proj", F.gelu(lin(f"h.{i}.mlp.c_fc", ln(f"h.{i}.ln_2", h))))
    logits = ln("ln_f", h) @ p["wte"].T
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def torch_step(config: str, compiled: bool, bf16: bool = False):
    """(step, seconds compiling): the eager (or torch.compile'd) forward + backward, clip and
    torch.optim.AdamW (bf16: the forward under torch.autocast's bfloat16 policy)."""
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    _, layers, heads, _, _ = CONFIGS[config]
    params_np, xn, yn = init(config)
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params_np.items()}
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)

    def loss_fn(x, y):
        return torch_gpt_loss(p, x, y, layers, heads)

    decay = [v for k, v in p.items() if v.dim() >= 2]
    no_decay = [v for k, v in p.items() if v.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ADAMW["wd"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=ADAMW["lr"],
                            betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"])
    forward = torch.compile(loss_fn) if compiled else loss_fn
    params = list(p.values())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        return loss.item()

    t = time.perf_counter()
    loss0 = step()
    return step, loss0, time.perf_counter() - t


# ---------------------------------------------------------------- JAX

def jax_step(config: str):
    """(step, loss0): the whole step (forward, backward, clip, AdamW) under one jax.jit."""
    import jax
    import jax.numpy as jnp
    c, layers, heads, _, _ = CONFIGS[config]
    params_np, xn, yn = init(config)
    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    x, y = jnp.asarray(xn.astype("int32")), jnp.asarray(yn.astype("int32"))
    decay = {k: v.ndim >= 2 for k, v in params.items()}

    def ln(p, n, h):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) * jax.lax.rsqrt(var + 1e-5) * p[f"{n}.w"] + p[f"{n}.b"]

    def loss_fn(p, x, y):
        b, t = x.shape

        def lin(n, h):
            return h @ p[f"{n}.w"] + p[f"{n}.b"]
        h = p["wte"][x] + p["wpe"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(layers):
            qkv = lin(f"h.{i}.attn.c_attn", ln(p, f"h.{i}.ln_1", h))
            q, k, v = (z.reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)
                       for z in jnp.split(qkv, 3, axis=-1))
            s = jnp.where(causal, q @ k.transpose(0, 1, 3, 2) / jnp.sqrt(c // heads), -jnp.inf)
            a = (jax.nn.softmax(s, axis=-1) @ v).transpose(0, 2, 1, 3).reshape(b, t, c)
            h = h + lin(f"h.{i}.attn.c_proj", a)
            h = h + lin(f"h.{i}.mlp.c_proj", jax.nn.gelu(lin(f"h.{i}.mlp.c_fc",
                                                             ln(p, f"h.{i}.ln_2", h)),
                                                         approximate=False))
        logits = ln(p, "ln_f", h) @ p["wte"].T
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.mean(lse - picked)

    def step_fn(p, m, v, t, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        norm = jnp.sqrt(sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(g)))
        scale = jnp.minimum(CLIP / (norm + 1e-6), 1.0)
        lr, b1, b2 = ADAMW["lr"], ADAMW["b1"], ADAMW["b2"]
        new_p, new_m, new_v = {}, {}, {}
        for k in p:
            gk = g[k] * scale
            new_m[k] = b1 * m[k] + (1 - b1) * gk
            new_v[k] = b2 * v[k] + (1 - b2) * gk * gk
            pk = p[k] * (1 - lr * ADAMW["wd"]) if decay[k] else p[k]
            new_p[k] = pk - lr * (new_m[k] / (1 - b1 ** t)) / (
                jnp.sqrt(new_v[k] / (1 - b2 ** t)) + ADAMW["eps"])
        return loss, new_p, new_m, new_v

    step_jit = jax.jit(step_fn, donate_argnums=(0, 1, 2))
    state = {"p": params, "m": {k: jnp.zeros_like(a) for k, a in params.items()},
             "v": {k: jnp.zeros_like(a) for k, a in params.items()}, "t": 1}

    def step():
        loss, state["p"], state["m"], state["v"] = step_jit(
            state["p"], state["m"], state["v"], float(state["t"]), x, y)
        state["t"] += 1
        return loss.block_until_ready()

    return step, float(step())
