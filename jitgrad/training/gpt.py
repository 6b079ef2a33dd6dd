"""A GPT (decoder-only transformer) as nanoGPT builds it, for character-level language models.

Token and position embeddings, ``n_layer`` pre-LayerNorm blocks (multi-head causal
self-attention, then a GELU MLP of width 4·n_embd, each added to the residual stream), a
final LayerNorm and a head tied to the token embedding (logits = x·wteᵀ). Parameters are a
flat dict of numpy arrays named as nanoGPT's modules (``h.0.attn.c_attn.w``); linear
weights are laid out [fan_in, fan_out] (x @ w + b), the transpose of torch.nn.Linear's.
nanoGPT's initialisation: weights and embeddings N(0, 0.02²), the residual projections
(``attn.c_proj``, ``mlp.c_proj``) N(0, (0.02/sqrt(2·n_layer))²), biases 0, LayerNorm 1 and 0.
Dropout is not part of it (the baby GPT trains without).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from ..errors import JitgradError
from ..frontend.api import checkpoint
from ..frontend.ops import shape as S
from ..frontend.ops.attention import scaled_dot_product_attention
from ..frontend.ops.gelu import gelu
from ..frontend.ops.nn import softmax_cross_entropy
from ..frontend.ops.norm import layer_norm

INIT_STD = 0.02


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The shape of a GPT (nanoGPT's GPTConfig, without dropout)."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise JitgradError(f"GPT {name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise JitgradError(f"GPT n_embd {self.n_embd} is not a multiple of n_head "
                               f"{self.n_head}")

    def n_params(self) -> int:
        """Parameters, the tied head counted once (as nanoGPT counts, with wpe)."""
        c = self.n_embd
        block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) \
            + (4 * c * c + c)
        return self.vocab_size * c + self.block_size * c + self.n_layer * block + 2 * c

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward, 3x the forward): the matrix
        products, 2 per multiply-add, attention over the whole block."""
        c, t = self.n_embd, self.block_size
        per_layer = 2 * (c * 3 * c + c * c + 2 * 4 * c * c) + 2 * 2 * t * c
        return 3 * (self.n_layer * per_layer + 2 * c * self.vocab_size)


def _linear_names(i: int) -> list[str]:
    return [f"h.{i}.attn.c_attn", f"h.{i}.attn.c_proj", f"h.{i}.mlp.c_fc", f"h.{i}.mlp.c_proj"]


def gpt_init(cfg: GPTConfig, rng: np.random.Generator | int | None = 0,
             dtype: DTypeLike = np.float32) -> dict[str, np.ndarray]:
    """nanoGPT's initial parameters for cfg (see the module's docstring)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise JitgradError(f"parameters must have a floating-point dtype, got {dt}")
    c = cfg.n_embd
    proj_std = INIT_STD / math.sqrt(2 * cfg.n_layer)

    def normal(shape: tuple[int, ...], std: float = INIT_STD) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(dt)

    p = {"wte": normal((cfg.vocab_size, c)), "wpe": normal((cfg.block_size, c))}
    widths = {"attn.c_attn": (c, 3 * c), "attn.c_proj": (c, c), "mlp.c_fc": (c, 4 * c),
              "mlp.c_proj": (4 * c, c)}
    for i in range(cfg.n_layer):
        for ln in ("ln_1", "ln_2"):
            p[f"h.{i}.{ln}.w"], p[f"h.{i}.{ln}.b"] = np.ones(c, dt), np.zeros(c, dt)
        for name, (fan_in, fan_out) in widths.items():
            std = proj_std if name.endswith("c_proj") else INIT_STD
            p[f"h.{i}.{name}.w"] = normal((fan_in, fan_out), std)
            p[f"h.{i}.{name}.b"] = np.zeros(fan_out, dt)
    p["ln_f.w"], p["ln_f.b"] = np.ones(c, dt), np.zeros(c, dt)
    return p


def decay_mask(params: dict[str, Any]) -> dict[str, bool]:
    """Which parameters weight decay applies to: the matrices (embeddings and linear
    weights), not biases or LayerNorm parameters (nanoGPT's two optimizer groups)."""
    return {k: np.ndim(v) >= 2 for k, v in params.items()}


def config_of(params: dict[str, Any], n_head: int) -> GPTConfig:
    """The GPTConfig of gpt_init's parameters (n_head is not in the shapes)."""
    try:
        vocab, c = np.shape(params["wte"])
        block = np.shape(params["wpe"])[0]
    except (KeyError, ValueError):
        raise JitgradError("GPT parameters need 'wte' [vocab, n_embd] and 'wpe' "
                           "[block, n_embd]") from None
    n_layer = sum(1 for k in params if k.endswith(".ln_1.w"))
    cfg = GPTConfig(int(vocab), int(block), n_layer, int(n_head), int(c))
    want = {k: v.shape for k, v in gpt_init(cfg, 0, np.float32).items()}
    got = {k: tuple(np.shape(v)) for k, v in params.items()}
    if want != got:
        wrong = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
        raise JitgradError(f"these are not the parameters of a GPT with {n_layer} layers: "
                           f"{', '.join(wrong[:4])} differ")
    return cfg


def _ln(p: dict[str, Any], name: str, x: Any) -> Any:
    return layer_norm(x, x.shape[-1], p[f"{name}.w"], p[f"{name}.b"])


def _linear(p: dict[str, Any], name: str, x: Any) -> Any:
    return x @ p[f"{name}.w"] + p[f"{name}.b"]


def _heads(x: Any, n_head: int) -> Any:
    """[B, T, C] -> [B, n_head, T, C / n_head]."""
    b, t, c = x.shape
    return S.transpose(S.reshape(x, (b, t, n_head, c // n_head)), (0, 2, 1, 3))


def attention(p: dict[str, Any], i: int, x: Any, n_head: int) -> Any:
    """Block i's multi-head causal self-attention of x [B, T, C]."""
    b, t, c = x.shape
    qkv = _linear(p, f"h.{i}.attn.c_attn", x)
    q, k, v = (_heads(qkv[:, :, j * c:(j + 1) * c], n_head) for j in range(3))
    y = scaled_dot_product_attention(q, k, v, is_causal=True)
    y = S.reshape(S.transpose(y, (0, 2, 1, 3)), (b, t, c))
    return _linear(p, f"h.{i}.attn.c_proj", y)


def mlp(p: dict[str, Any], i: int, x: Any) -> Any:
    return _linear(p, f"h.{i}.mlp.c_proj", gelu(_linear(p, f"h.{i}.mlp.c_fc", x)))


def block(p: dict[str, Any], i: int, x: Any, n_head: int) -> Any:
    """Pre-LayerNorm block i: x + attention(ln_1(x)), then + mlp(ln_2(x))."""
    x = x + attention(p, i, _ln(p, f"h.{i}.ln_1", x), n_head)
    return x + mlp(p, i, _ln(p, f"h.{i}.ln_2", x))


def gpt_apply(params: dict[str, Any], tokens: Any, n_head: int,
              checkpoint_blocks: bool = False) -> Any:
    """Logits [B, T, vocab] of the next character after each position of tokens [B, T].

    checkpoint_blocks: each block's interior is recomputed in the backward pass
    (jg.checkpoint), only the residual stream between blocks is stored."""
    wte, wpe = params["wte"], params["wpe"]
    if len(tokens.shape) != 2:
        raise JitgradError(f"GPT tokens must be [batch, time], got shape {list(tokens.shape)}")
    t = tokens.shape[1]
    if t > wpe.shape[0]:
        raise JitgradError(f"a sequence of {t} tokens is longer than the GPT's block size "
                           f"{wpe.shape[0]}")
    x = wte[tokens] + wpe[:t]
    n_layer = sum(1 for k in params if k.endswith(".ln_1.w"))
    run_block = checkpoint(block) if checkpoint_blocks else block
    for i in range(n_layer):
        x = run_block(params, i, x, n_head)
    x = _ln(params, "ln_f", x)
    return x @ wte.T


def gpt_loss(params: dict[str, Any], tokens: Any, targets: Any, n_head: int,
             checkpoint_blocks: bool = False) -> Any:
    """Mean cross-entropy of the next-character predictions (tokens, targets [B, T])."""
    logits = gpt_apply(params, tokens, n_head, checkpoint_blocks)
    b, t, v = logits.shape
    return softmax_cross_entropy(S.reshape(logits, (b * t, v)), S.reshape(targets, (b * t,)))
