"""Write tests/reference/conv_refs.npz: PyTorch's float64 results for the convolution,
pooling and conv-net tests (tests/test_conv.py), so they run without torch.

Run from the repository with a Python that has torch (the results do not depend on its
version beyond rounding):

    PYTHONPATH=. /tmp/bench/bin/python tests/reference/make_conv_refs.py

Each case draws its inputs from its own seed; the file stores inputs and results, and
the case list itself as JSON (`cases`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

import jitgrad as jg
from jitgrad.training.data import load_dataset

OUT = pathlib.Path(__file__).with_name("conv_refs.npz")

# (x shape, weight shape, bias, stride, padding, dilation, groups)
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), True, 1, 0, 1, 1),
    ((2, 3, 7, 6), (4, 3, 3, 3), True, 2, 1, 1, 1),
    ((1, 4, 8, 7), (6, 2, 3, 2), False, (2, 1), (1, 2), (1, 2), 2),
    ((2, 4, 6, 6), (4, 1, 3, 3), True, 1, 1, 1, 4),
    ((1, 2, 9, 9), (3, 2, 3, 3), True, 3, 0, 2, 1),
    ((2, 2, 5, 6), (3, 2, 4, 2), True, 1, "same", 1, 1),
    ((2, 2, 5, 6), (3, 2, 3, 3), False, 1, "same", 2, 1),
    ((1, 3, 6, 5), (2, 3, 2, 2), True, 1, "valid", 1, 1),
]
# (kind, x shape, kernel, stride, padding)
POOL_CASES = [
    ("max", (2, 3, 8, 8), 2, None, 0),
    ("max", (2, 2, 9, 7), 3, 2, 1),
    ("max", (1, 2, 7, 8), (3, 2), (1, 2), (1, 1)),
    ("avg", (2, 3, 8, 8), 2, None, 0),
    ("avg", (2, 2, 9, 7), 3, 2, 1),
    ("avg", (1, 2, 7, 8), (3, 2), (1, 2), (1, 1)),
]
SGD = {"lr": 0.05, "momentum": 0.9, "steps": 10, "batch": 16}


def _t(a: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def conv_refs(out: dict[str, np.ndarray]) -> None:
    for i, (xs, ws, bias, stride, padding, dilation, groups) in enumerate(CONV_CASES):
        rng = np.random.default_rng(100 + i)
        x, w = rng.normal(size=xs), rng.normal(size=ws)
        b = rng.normal(size=ws[0]) if bias else None
        tx, tw = _t(x, True), _t(w, True)
        tb = None if b is None else _t(b, True)
        y = F.conv2d(tx, tw, tb, stride, padding, dilation, groups)
        g = rng.normal(size=tuple(y.shape))
        (y * _t(g)).sum().backward()
        out.update({f"conv{i}/x": x, f"conv{i}/w": w, f"conv{i}/y": y.detach().numpy(),
                    f"conv{i}/g": g, f"conv{i}/gx": tx.grad.numpy(),
                    f"conv{i}/gw": tw.grad.numpy()})
        if b is not None:
            out[f"conv{i}/b"], out[f"conv{i}/gb"] = b, tb.grad.numpy()


def pool_refs(out: dict[str, np.ndarray]) -> None:
    for i, (kind, xs, kernel, stride, padding) in enumerate(POOL_CASES):
        rng = np.random.default_rng(200 + i)
        x = rng.normal(size=xs)
        tx = _t(x, True)
        fn = F.max_pool2d if kind == "max" else F.avg_pool2d
        y = fn(tx, kernel, stride, padding)
        g = rng.normal(size=tuple(y.shape))
        (y * _t(g)).sum().backward()
        out.update({f"pool{i}/x": x, f"pool{i}/y": y.detach().numpy(), f"pool{i}/g": g,
                    f"pool{i}/gx": tx.grad.numpy()})


def torch_cnn(params: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], callable]:
    """The digits conv net (jg.nn.DIGITS_CNN) in torch, from jitgrad-layout parameters."""
    tp = {k: _t(v.T.copy() if k.startswith("fc") and k.endswith("_W") else v, True)
          for k, v in params.items()}

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        for i in range(2):
            x = F.max_pool2d(F.relu(F.conv2d(x, tp[f"conv{i}_w"], tp[f"conv{i}_b"],
                                             padding=1)), 2)
        return F.linear(x.reshape(x.shape[0], -1), tp["fc0_W"], tp["fc0_b"])
    return tp, forward


def sgd_refs(out: dict[str, np.ndarray]) -> None:
    params = jg.nn.DIGITS_CNN.init(8, 10, np.random.default_rng(0), np.float64)
    ds = load_dataset(None, np.float64)
    n = SGD["steps"] * SGD["batch"]
    x, y = ds.x_train[:n], ds.y_train[:n]
    tp, forward = torch_cnn(params)
    opt = torch.optim.SGD(list(tp.values()), lr=SGD["lr"], momentum=SGD["momentum"])
    for s in range(SGD["steps"]):
        rows = slice(s * SGD["batch"], (s + 1) * SGD["batch"])
        opt.zero_grad()
        F.cross_entropy(forward(_t(x[rows])), torch.tensor(y[rows])).backward()
        opt.step()
    out.update({f"sgd/init/{k}": v for k, v in params.items()})
    out.update({f"sgd/final/{k}": (t.detach().numpy().T if k.startswith("fc") and
                                   k.endswith("_W") else t.detach().numpy())
                for k, t in tp.items()})
    out["sgd/x"], out["sgd/y"] = x, y


def main() -> None:
    torch.set_default_dtype(torch.float64)
    out: dict[str, np.ndarray] = {}
    conv_refs(out)
    pool_refs(out)
    sgd_refs(out)
    out["cases"] = np.array(json.dumps({"conv": CONV_CASES, "pool": POOL_CASES, "sgd": SGD}))
    out["torch_version"] = np.array(torch.__version__)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({len(out)} arrays)")


if __name__ == "__main__":
    main()
