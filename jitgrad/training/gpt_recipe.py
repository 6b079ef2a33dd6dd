"""The recipe behind ``jitgrad train --model gpt`` and ``jitgrad sample``: a character GPT.

nanoGPT's "baby GPT" on the bundled tiny Shakespeare (or any UTF-8 text): block 64, batch
12, 4 layers of 4 heads, width 128, 2000 iterations of AdamW (β2 0.99, weight decay 0.1 on
matrices, gradients clipped at norm 1), learning rate 1e-3 after 100 warm-up steps,
cosine-decayed to 1e-4, no dropout. One compiled program per step (forward, backward,
clipping, update). The validation loss is the mean over a fixed set of validation batches
(the same ones at every evaluation, so evaluations compare); the training loss printed is
the mean of the steps since the last evaluation.

Sampling runs one compiled forward pass of shape [1, block] per token: a shorter context
sits at the start of the block, the rest padded, and the causal mask keeps the padding out
of every position that is read, so generation never compiles a second shape.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import typing
from typing import Any, TextIO

import numpy as np

from ..compiler.precision import check_precision
from ..errors import JitgradError
from ..frontend.api import jit
from . import checkpoint_io, optim, text
from .gpt import GPTConfig, config_of, decay_mask, gpt_apply, gpt_init, gpt_loss
from .recipe import _say
from .train import train_step

MODEL = "gpt"


@dataclasses.dataclass
class GPTTrainConfig:
    """Everything that defines a GPT training run (nanoGPT's baby-GPT defaults)."""

    data: str | None = None
    block_size: int = 64
    batch_size: int = 12
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    beta2: float = 0.99
    weight_decay: float = 0.1
    clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 200
    dtype: str = "float32"
    precision: str = "f32"  # "bf16": GEMM operands rounded to bfloat16 (compiler/precision.py)
    seed: int = 0

    def checked(self) -> GPTTrainConfig:
        checks = [
            (self.iters >= 1, f"--iters must be at least 1, got {self.iters}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.eval_interval >= 1, "--eval-interval must be at least 1"),
            (self.eval_batches >= 1, "--eval-batches must be at least 1"),
            (0 <= self.warmup < self.iters, f"--warmup must be in [0, --iters), got "
                                            f"{self.warmup}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, --lr], got {self.min_lr}"),
            (0 <= self.beta2 < 1, f"--beta2 must be in [0, 1), got {self.beta2}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.clip > 0, f"--clip must be positive, got {self.clip}"),
            (self.dtype in ("float32", "float64"), f"unknown dtype {self.dtype!r}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_precision(self.precision)
        self.model(1)  # the shape checks of GPTConfig
        return self

    def model(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd)

    def optimizer(self, params: dict[str, np.ndarray]) -> optim.AdamW:
        return optim.AdamW(lr=self.lr, betas=(0.9, self.beta2), weight_decay=self.weight_decay,
                           schedule=optim.WarmupCosine(self.warmup, self.iters, self.min_lr),
                           mask=decay_mask(params), clip_norm=self.clip)

    @classmethod
    def from_json(cls, d: Any) -> GPTTrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"the config is a {type(d).__name__}, not a JSON object")
        hints = typing.get_type_hints(cls)
        kw = {k: v for k, v in d.items() if k in hints}
        for k, v in kw.items():
            want = (int, float) if hints[k] is float else hints[k]  # JSON writes 1.0 as 1.0
            if isinstance(v, bool) or not isinstance(v, want):
                raise ValueError(f"config field {k!r} is {v!r}, not of type {hints[k]}")
        return cls(**kw)


def _loss_of(n_head: int) -> Any:
    def loss(params: Any, tokens: Any, targets: Any) -> Any:
        return gpt_loss(params, tokens, targets, n_head)
    return loss


def validation_starts(corpus: text.CharCorpus, cfg: GPTTrainConfig) -> np.ndarray:
    """The fixed validation windows: [eval_batches, batch_size] start positions."""
    text.check_fits(corpus.val, cfg.block_size, f"{corpus.name}'s validation part")
    rng = np.random.default_rng([cfg.seed, 1])
    return rng.integers(0, len(corpus.val) - cfg.block_size,
                        size=(cfg.eval_batches, cfg.batch_size))


def evaluate(loss_fn: Any, params: Any, data: np.ndarray, starts: np.ndarray,
             block: int) -> float:
    """Mean loss of params over the batches of windows at starts."""
    return float(np.mean([float(loss_fn(params, *text.windows(data, s, block)))
                          for s in starts]))


def run(cfg: GPTTrainConfig, *, save: str | os.PathLike[str] | None = None,
        out: TextIO | None = sys.stdout, progress: bool = False) -> dict[str, Any]:
    """Train a GPT as cfg says; returns the metrics ``jitgrad train --model gpt`` prints."""
    wall0 = time.perf_counter()
    cfg.checked()
    corpus = text.load_text(cfg.data)
    text.check_fits(corpus.train, cfg.block_size, f"{corpus.name}'s training part")
    model = cfg.model(corpus.vocab_size)
    params = gpt_init(model, np.random.default_rng(cfg.seed), np.dtype(cfg.dtype))
    loss_fn = _loss_of(cfg.n_head)
    step = train_step(loss_fn, params, cfg.optimizer(params), precision=cfg.precision)
    val_loss_fn = jit(loss_fn, precision=cfg.precision)  # scored as it trains, as autocast
    val_starts = validation_starts(corpus, cfg)
    rng = np.random.default_rng([cfg.seed, 0])
    tokens_per_step = cfg.batch_size * cfg.block_size

    def checkpoint(val_loss: float) -> None:
        if save is not None:
            checkpoint_io.save(save, step.params, step.state, {
                "model": MODEL, "config": dataclasses.asdict(cfg), "chars": corpus.chars,
                "dataset": corpus.name, "val_loss": val_loss, **checkpoint_io.step_meta(step)})

    _say(out, None, f"gpt: {model.n_params():,} parameters ({model.n_layer} layers, "
                    f"{model.n_head} heads, width {model.n_embd}, block {model.block_size}); "
                    f"{corpus.name}: {len(corpus.train):,} training and {len(corpus.val):,} "
                    f"validation characters, vocabulary {corpus.vocab_size}")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.iters, unit="step", file=sys.stderr, dynamic_ncols=True,
                   leave=False)
    history: list[dict[str, Any]] = []
    step_times: list[float] = []
    compile_time = None
    since, window_losses, last_postfix, last_k = time.perf_counter(), [], 0.0, 0
    train_loss = val_loss = float("nan")
    try:
        for k in range(1, cfg.iters + 1):
            xb, yb = text.random_batch(corpus.train, cfg.batch_size, cfg.block_size, rng)
            t0 = time.perf_counter()
            loss = float(step(xb, yb))
            dt = time.perf_counter() - t0
            if compile_time is None:
                compile_time, last_postfix, last_k = dt, time.perf_counter(), k
            else:
                step_times.append(dt)
            if not math.isfinite(loss):
                raise JitgradError(f"non-finite training loss ({loss}) at step {k}; try a "
                                   f"smaller --lr")
            window_losses.append(loss)
            if bar is not None:
                bar.update(1)
                now = time.perf_counter()
                if now - last_postfix > 0.5 and k > last_k:
                    rate = (k - last_k) * tokens_per_step / (now - last_postfix)
                    last_postfix, last_k = now, k
                    bar.set_postfix_str(f"loss={loss:.4f}, {rate:,.0f} tokens/s", refresh=False)
            if k % cfg.eval_interval == 0 or k == cfg.iters:
                train_loss = float(np.mean(window_losses))
                val_loss = evaluate(val_loss_fn, step.params, corpus.val, val_starts,
                                    cfg.block_size)
                seconds = time.perf_counter() - since
                history.append({"iter": k, "train_loss": train_loss, "val_loss": val_loss,
                                "time_s": seconds})
                _say(out, bar, f"iter {k:>{len(str(cfg.iters))}}/{cfg.iters}  train loss "
                               f"{train_loss:.4f}  val loss {val_loss:.4f}  {seconds:6.1f}s")
                checkpoint(val_loss)
                since, window_losses = time.perf_counter(), []
    finally:
        if bar is not None:
            bar.close()
    step_time = float(np.median(step_times)) if step_times else compile_time
    return {
        "model": MODEL, "val_loss": val_loss, "train_loss": train_loss, "iters": cfg.iters,
        "step_time_s": step_time, "compile_time_s": compile_time,
        "tokens_per_s": tokens_per_step / step_time if step_time else None,
        "gflops_per_s": (model.flops_per_token() * tokens_per_step / step_time / 1e9
                         if step_time else None),
        "planned_peak_bytes": step.compiled.plan.arena_bytes,
        "n_params": model.n_params(), "dataset": corpus.name,
        "wall_time_s": time.perf_counter() - wall0, "history": history,
        "config": dataclasses.asdict(cfg),
    }


def summary_lines(m: dict[str, Any]) -> list[str]:
    from ..tools.options import format_bytes
    return [f"val loss {m['val_loss']:.4f}  train loss {m['train_loss']:.4f} "
            f"({m['iters']} iterations, {m['n_params']:,} parameters)",
            f"step time {1e3 * m['step_time_s']:.2f} ms ({m['tokens_per_s']:,.0f} tokens/s, "
            f"{m['gflops_per_s']:.1f} GFLOP/s)  compile time {m['compile_time_s']:.2f} s "
            f"(first step)  planned memory {format_bytes(m['planned_peak_bytes'])}  "
            f"wall time {m['wall_time_s']:.1f} s"]


# ---------------------------------------------------------------- sampling

@dataclasses.dataclass
class Sampler:
    """Generates characters from a trained GPT with one compiled forward shape."""

    params: dict[str, np.ndarray]
    model: GPTConfig
    chars: str

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Sampler:
        params, _, meta = checkpoint_io.load(path)
        if meta.get("model") != MODEL or not isinstance(meta.get("chars"), str):
            raise checkpoint_io.CheckpointError(
                f"checkpoint {str(path)!r} was not written by `jitgrad train --model gpt`")
        try:
            cfg = GPTTrainConfig.from_json(meta.get("config"))
        except (TypeError, ValueError) as e:
            raise checkpoint_io.CheckpointError(
                f"checkpoint {str(path)!r} holds an invalid GPT config: {e}") from None
        model = config_of(params, cfg.n_head)
        if model.vocab_size != len(meta["chars"]):
            raise checkpoint_io.CheckpointError(
                f"checkpoint {str(path)!r}: {len(meta['chars'])} characters for a vocabulary "
                f"of {model.vocab_size}")
        return cls(params, model, meta["chars"])

    def __post_init__(self) -> None:
        n_head = self.model.n_head
        self._forward = jit(lambda p, t: gpt_apply(p, t, n_head))
        self._index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, prompt: str) -> list[int]:
        missing = sorted({c for c in prompt if c not in self._index})
        if missing:
            raise JitgradError(f"the prompt has characters the model does not know: "
                               f"{''.join(missing)!r}")
        return [self._index[c] for c in prompt]

    def generate(self, prompt: str, n_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> tuple[str, float]:
        """(the n_tokens characters generated after prompt, tokens per second)."""
        if n_tokens < 0:
            raise JitgradError(f"--tokens must be >= 0, got {n_tokens}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise JitgradError(f"--temperature must be positive, got {temperature}")
        if top_k is not None and top_k < 1:
            raise JitgradError(f"--top-k must be at least 1, got {top_k}")
        ids = self.encode(prompt) if prompt else [self._index.get("\n", 0)]
        block = self.model.block_size
        window = np.zeros((1, block), np.int64)
        rng = np.random.default_rng(seed)
        out: list[int] = []
        self._forward.lower(self.params, window)  # compiled before the clock starts
        start = time.perf_counter()
        for _ in range(n_tokens):
            context = ids[-block:]
            window[0, :len(context)] = context
            window[0, len(context):] = 0  # padding: after every position that is read
            logits = np.asarray(self._forward(self.params, window)[0, len(context) - 1],
                                np.float64) / temperature
            if top_k is not None and top_k < len(logits):
                cut = np.partition(logits, -top_k)[-top_k]
                logits = np.where(logits < cut, -np.inf, logits)
            p = np.exp(logits - logits.max())
            nxt = int(rng.choice(len(p), p=p / p.sum()))
            ids.append(nxt)
            out.append(nxt)
        seconds = time.perf_counter() - start
        return "".join(self.chars[i] for i in out), n_tokens / seconds if seconds else 0.0
