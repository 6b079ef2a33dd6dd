"""PyTorch's results for the transformer parts, as float64 references for the tests.

Run with an interpreter that has torch (``/tmp/bench/bin/python`` here, torch 2.13):

    python tests/reference/torch_transformer.py

writes ``transformer_torch.npz`` beside this file: layer_norm, gelu (both forms) and the
masked softmax with their gradients, and the parameters of a small GPT (2 layers, 2 heads,
width 32, block 16) after ten AdamW steps with nanoGPT's recipe (warm-up then cosine
decay, weight decay on matrices only, gradient clipping at global norm 1). The tests
compare jitgrad against this file always, and against torch itself when it is importable
(`compute()` is what both use). Inputs come from numpy generators and jitgrad's own
gpt_init, so both sides start from the same numbers.
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from benchmarks._gpt import torch_gpt_loss  # noqa: E402  (the benchmarks' torch GPT)
from jitgrad.training import gpt as G  # noqa: E402
from jitgrad.training import optim  # noqa: E402

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transformer_torch.npz")

GPT = G.GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)
BATCH = 4
STEPS = 10
ADAMW = {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}
SCHEDULE = optim.WarmupCosine(warmup=3, total=STEPS, min_lr=1e-4)
CLIP = 1.0
SCALE = 0.35  # of the masked softmax


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(21)
    return {
        "ln_x": rng.normal(size=(2, 5, 8)), "ln_w": rng.normal(size=8),
        "ln_b": rng.normal(size=8), "ln_g": rng.normal(size=(2, 5, 8)),
        "gelu_x": rng.normal(size=(3, 7)) * 2, "gelu_g": rng.normal(size=(3, 7)),
        "sm_s": rng.normal(size=(2, 3, 5, 5)), "sm_mask": rng.normal(size=(5, 5)),
        "sm_g": rng.normal(size=(2, 3, 5, 5)),
        "tokens": rng.integers(0, GPT.vocab_size, size=(STEPS, BATCH, GPT.block_size + 1)),
    }


def compute() -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    torch.use_deterministic_algorithms(True)
    x = inputs()
    out: dict[str, np.ndarray] = {}

    def leaf(a):
        return torch.tensor(a, dtype=torch.float64, requires_grad=True)

    lx, lw, lb = leaf(x["ln_x"]), leaf(x["ln_w"]), leaf(x["ln_b"])
    y = F.layer_norm(lx, (8,), lw, lb, 1e-5)
    (y * torch.tensor(x["ln_g"])).sum().backward()
    out.update(ln_y=y.detach().numpy(), ln_dx=lx.grad.numpy(), ln_dw=lw.grad.numpy(),
               ln_db=lb.grad.numpy())

    for approx in ("none", "tanh"):
        gx = leaf(x["gelu_x"])
        y = F.gelu(gx, approximate=approx)
        (y * torch.tensor(x["gelu_g"])).sum().backward()
        out[f"gelu_{approx}_y"], out[f"gelu_{approx}_dx"] = y.detach().numpy(), gx.grad.numpy()

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    s, m = leaf(x["sm_s"]), leaf(x["sm_mask"])
    z = (s * SCALE + m).masked_fill(~causal, float("-inf"))
    p = torch.softmax(z, dim=-1)
    (p * torch.tensor(x["sm_g"])).sum().backward()
    out.update(sm_p=p.detach().numpy(), sm_ds=s.grad.numpy(), sm_dmask=m.grad.numpy())

    params = {k: torch.tensor(v, requires_grad=True)
              for k, v in G.gpt_init(GPT, 0, np.float64).items()}
    mask = G.decay_mask(params)
    groups = [{"params": [v for k, v in params.items() if mask[k]], "weight_decay": 0.1},
              {"params": [v for k, v in params.items() if not mask[k]], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, **ADAMW, foreach=False)
    losses, norms = [], []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = SCHEDULE(ADAMW["lr"], step + 1)
        batch = torch.tensor(x["tokens"][step])
        loss = torch_gpt_loss(params, batch[:, :-1], batch[:, 1:], GPT.n_layer, GPT.n_head)
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)))
        opt.step()
        losses.append(float(loss.detach()))
    out["gpt_losses"], out["gpt_grad_norms"] = np.array(losses), np.array(norms)
    out.update({f"gpt/{k}": v.detach().numpy() for k, v in params.items()})
    return out


if __name__ == "__main__":
    import torch

    result = compute()
    np.savez_compressed(PATH, torch_version=np.array(torch.__version__), **result)
    print(f"wrote {PATH}: {len(result)} arrays (torch {torch.__version__}); gradient norms "
          f"{np.round(result['gpt_grad_norms'], 3)}")
