"""Transformers: layer_norm, gelu, the masked softmax, attention and a GPT, against PyTorch.

PyTorch's float64 results are committed (tests/reference/transformer_torch.npz, written by
tests/reference/torch_transformer.py): every comparison runs against them, and against
torch itself when it is importable. Orders 1 and 2 against finite differences run on both
backends; the per-primitive rows are in test_gradcheck.py.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from gradcheck import check_grads

import jitgrad as jg
from jitgrad.training import gpt as G

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "reference"))
import torch_transformer as REF  # noqa: E402


@pytest.fixture(scope="module")
def committed():
    with np.load(REF.PATH) as z:
        return {k: z[k] for k in z.files}


def _references(committed):
    """The committed references, and torch's own when torch is installed."""
    yield "committed", committed
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    yield "live torch", REF.compute()


@pytest.fixture(scope="module")
def live():
    pytest.importorskip("torch")
    return REF.compute()


def _check_parts(ref: dict[str, np.ndarray]) -> None:
    x = REF.inputs()

    def ln(a, w, b):
        return jg.sum(jg.nn.layer_norm(a, 8, w, b) * x["ln_g"])
    y = jg.jit(lambda a, w, b: jg.nn.layer_norm(a, 8, w, b))(x["ln_x"], x["ln_w"], x["ln_b"])
    np.testing.assert_allclose(y, ref["ln_y"], rtol=1e-12, atol=1e-13)
    grads = jg.jit(jg.grad(ln, argnums=(0, 1, 2)))(x["ln_x"], x["ln_w"], x["ln_b"])
    for got, key in zip(grads, ("ln_dx", "ln_dw", "ln_db"), strict=True):
        np.testing.assert_allclose(got, ref[key], rtol=1e-11, atol=1e-13, err_msg=key)

    for approx in ("none", "tanh"):
        y, dx = jg.jit(jg.value_and_grad(
            lambda a, ap=approx: jg.sum(jg.gelu(a, approximate=ap) * x["gelu_g"])))(x["gelu_x"])
        np.testing.assert_allclose(jg.jit(lambda a, ap=approx: jg.gelu(a, ap))(x["gelu_x"]),
                                   ref[f"gelu_{approx}_y"], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(dx, ref[f"gelu_{approx}_dx"], rtol=1e-12, atol=1e-14)

    def sm(s, m):
        return jg.nn.masked_softmax(s, m, scale=REF.SCALE, causal=True)
    np.testing.assert_allclose(jg.jit(sm)(x["sm_s"], x["sm_mask"]), ref["sm_p"], rtol=1e-12,
                               atol=1e-15)
    ds, dm = jg.jit(jg.grad(lambda s, m: jg.sum(sm(s, m) * x["sm_g"]), argnums=(0, 1)))(
        x["sm_s"], x["sm_mask"])
    np.testing.assert_allclose(ds, ref["sm_ds"], rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(dm, ref["sm_dmask"], rtol=1e-11, atol=1e-14)


def _ten_gpt_steps() -> tuple[dict[str, np.ndarray], list[float]]:
    params = G.gpt_init(REF.GPT, 0, np.float64)
    opt = jg.optim.AdamW(**REF.ADAMW, schedule=REF.SCHEDULE, mask=G.decay_mask(params),
                         clip_norm=REF.CLIP)
    step = jg.train_step(lambda p, t, y: G.gpt_loss(p, t, y, REF.GPT.n_head), params, opt)
    tokens = REF.inputs()["tokens"]
    losses = [float(step(b[:, :-1], b[:, 1:])) for b in tokens]
    return params, losses


def _check_gpt(params, losses, ref) -> None:
    np.testing.assert_allclose(losses, ref["gpt_losses"], rtol=1e-12)
    for k, v in params.items():
        np.testing.assert_allclose(v, ref[f"gpt/{k}"], rtol=0, atol=1e-9, err_msg=k)


def test_parts_match_torch(committed, backend):
    for _, ref in _references(committed):
        _check_parts(ref)


def test_ten_adamw_steps_of_a_small_gpt_match_torch(committed, backend):
    """2 layers, 2 heads, width 32, block 16; warm-up + cosine, decay on matrices only,
    clipping at norm 1 (active at every step: torch's norms are all above 1)."""
    assert (committed["gpt_grad_norms"] > REF.CLIP).all()
    params, losses = _ten_gpt_steps()
    for _, ref in _references(committed):
        _check_gpt(params, losses, ref)


def test_the_committed_references_are_torchs(committed, live):
    for k, v in live.items():
        np.testing.assert_allclose(committed[k], v, rtol=1e-13, atol=1e-15, err_msg=k)


# ---------------------------------------------------------------- orders 1 and 2

def _block(x, w1, b1, w2, wq):
    """A transformer block in miniature: layer norm, causal attention, a GELU MLP."""
    h = jg.nn.layer_norm(x, x.shape[-1], w1, b1)
    q = h @ wq
    a = jg.nn.scaled_dot_product_attention(q, h, h, is_causal=True)
    out = x + jg.gelu(a @ w2, approximate="tanh") + jg.gelu(h * 2.0)
    return jg.sum(jg.tanh(out))


def test_block_orders_1_and_2(backend):
    rng = np.random.default_rng(4)
    args = (rng.normal(size=(2, 4, 3)), rng.normal(size=3) + 1.0, rng.normal(size=3),
            rng.normal(size=(3, 3)), rng.normal(size=(3, 3)))
    check_grads(_block, args, argnums=(0, 1, 2, 3, 4), order=2)


def test_layer_norm_statistics_reach_order_2(backend):
    """The second derivative with respect to x goes through the saved mean and rstd."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(3, 5)), rng.normal(size=5)
    check_grads(lambda x, w: jg.sum(jg.nn.layer_norm(x, 5, w) ** 3), (x, w), argnums=(0, 1))


def test_additive_mask_orders_1_and_2(backend):
    rng = np.random.default_rng(6)
    s, m = rng.normal(size=(2, 3, 4)), rng.normal(size=(3, 4))
    check_grads(lambda s, m: jg.sum(jg.nn.masked_softmax(s, m, scale=0.7) ** 2), (s, m),
                argnums=(0, 1))


# ---------------------------------------------------------------- masks written by hand

def _np_softmax(z):
    with np.errstate(invalid="ignore"):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")  # numpy's, on the NaN row
def test_softmax_of_where_by_hand_stays_numpys(backend):
    """jg.softmax(jg.where(mask, s, -inf)) is numpy's softmax: a fully masked row is NaN
    (the masked_softmax primitive makes it zeros); the other rows and their gradients are
    right."""
    rng = np.random.default_rng(7)
    s = rng.normal(size=(3, 4))
    mask = np.array([[True, False, True, True], [False] * 4, [True, True, False, False]])
    f = jg.jit(lambda s: jg.softmax(jg.where(mask, s, -np.inf)))
    want = _np_softmax(np.where(mask, s, -np.inf))
    np.testing.assert_allclose(f(s), want, rtol=1e-13)
    assert np.isnan(f(s)[1]).all()
    rows = [0, 2]
    g = jg.jit(jg.grad(lambda s: jg.sum(jg.softmax(jg.where(mask, s, -np.inf))[rows] ** 2)))(s)
    fused = jg.jit(jg.grad(lambda s: jg.sum(jg.nn.masked_softmax(s, mask)[rows] ** 2)))(s)
    np.testing.assert_allclose(g, fused, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(jg.jit(lambda s: jg.nn.masked_softmax(s, mask))(s)[1], 0.0)


def test_boolean_causal_and_additive_masks_agree(backend):
    rng = np.random.default_rng(8)
    s = rng.normal(size=(2, 5, 5))
    causal = np.tril(np.ones((5, 5), bool))
    by_flag = jg.jit(lambda s: jg.nn.masked_softmax(s, causal=True, scale=0.5))(s)
    by_bool = jg.jit(lambda s: jg.nn.masked_softmax(s, causal, scale=0.5))(s)
    by_add = jg.jit(lambda s: jg.nn.masked_softmax(s, np.where(causal, 0.0, -np.inf),
                                                   scale=0.5))(s)
    np.testing.assert_allclose(by_bool, by_flag, rtol=1e-14)
    np.testing.assert_allclose(by_add, by_flag, rtol=1e-14)
    np.testing.assert_allclose(by_flag, _np_softmax(np.where(causal, 0.5 * s, -np.inf)),
                               rtol=1e-13)


# ---------------------------------------------------------------- what the program is

def _kernel_calls(cf, name: str) -> int:
    return sum(1 for ln in cf.source.splitlines() if f"# {name} at" in ln)


def test_attention_is_gemms_around_one_fused_pass_each_way():
    rng = np.random.default_rng(9)
    q, k, v = (rng.normal(size=(2, 2, 6, 4)).astype(np.float32) for _ in range(3))
    f = jg.value_and_grad(lambda q, k, v: jg.sum(
        jg.nn.scaled_dot_product_attention(q, k, v, is_causal=True) ** 2), argnums=(0, 1, 2))
    cf = jg.jit(f, backend="numba").lower(q, k, v)
    prims = [i.prim.name for i in cf.program.instrs]
    assert prims.count("masked_softmax") == 1 and prims.count("masked_softmax_grad") == 1
    assert not {"exp", "logsumexp", "max"} & set(prims), prims
    assert _kernel_calls(cf, "masked_softmax") == 1
    assert _kernel_calls(cf, "masked_softmax_grad") == 1


def test_layer_norm_is_one_kernel_each_way_and_gelu_fuses():
    rng = np.random.default_rng(10)
    x, w, b = rng.normal(size=(4, 6, 8)), rng.normal(size=8), rng.normal(size=8)
    cf = jg.jit(jg.grad(lambda x, w, b: jg.sum(jg.gelu(jg.nn.layer_norm(x, 8, w, b) + b) * w),
                        argnums=(0, 1, 2)), backend="numba").lower(x, w, b)
    assert _kernel_calls(cf, "layer_norm") == 1
    assert _kernel_calls(cf, "layer_norm_grad") == 1
    fused = [ln for ln in cf.source.splitlines() if "# fused[" in ln and "gelu" in ln]
    assert fused and all("add" in ln or "mul" in ln for ln in fused), fused


def test_embedding_gradient_is_the_same_on_any_number_of_threads():
    import numba
    rng = np.random.default_rng(11)
    wte = rng.normal(size=(9, 40)).astype(np.float32)
    tokens = rng.integers(0, 9, size=(6, 50))
    g = rng.normal(size=(6, 50, 40)).astype(np.float32)
    f = jg.jit(jg.grad(lambda e: jg.sum(e[tokens] * g)), backend="numba")
    want = np.zeros_like(wte)
    np.add.at(want, tokens, g)  # the same order of terms for every element
    before = numba.get_num_threads()
    try:
        results = []
        for n in (1, before):
            numba.set_num_threads(n)
            results.append(f(wte))
    finally:
        numba.set_num_threads(before)
    for r in results:
        np.testing.assert_array_equal(r, want)


def test_float32_gpt_stays_float32():
    cfg = G.GPTConfig(vocab_size=7, block_size=8, n_layer=1, n_head=2, n_embd=8)
    params = G.gpt_init(cfg, 1, np.float32)
    tokens = np.random.default_rng(0).integers(0, 7, size=(2, 9))
    cf = jg.jit(jg.value_and_grad(lambda p: G.gpt_loss(p, tokens[:, :-1], tokens[:, 1:], 2)))
    loss, grads = cf(params)
    assert loss.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())
    for v in cf.program.inputs + [o for i in cf.program.instrs for o in i.outputs]:
        assert v.dtype != np.float64, v
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    want = G.gpt_loss(p64, tokens[:, :-1], tokens[:, 1:], 2)  # eagerly, on numpy arrays
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_gpt_init_is_nanogpts():
    cfg = G.GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
    p = G.gpt_init(cfg, 0, np.float64)
    assert abs(p["h.0.attn.c_attn.w"].std() - 0.02) < 1e-3
    assert abs(p["h.3.mlp.c_proj.w"].std() - 0.02 / np.sqrt(8)) < 2e-4
    assert (p["h.1.ln_2.w"] == 1).all() and (p["h.2.mlp.c_fc.b"] == 0).all()
    assert sum(v.size for v in p.values()) == cfg.n_params()
    mask = G.decay_mask(p)
    assert mask["wte"] and mask["h.0.mlp.c_fc.w"] and not mask["h.0.mlp.c_fc.b"]
    assert not mask["ln_f.w"]
    assert G.config_of(p, 4) == cfg


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, match", [
    (lambda x: jg.nn.layer_norm(x, 5), "normalized_shape"),
    (lambda x: jg.nn.layer_norm(x, 4, np.ones(3)), "weight of shape"),
    (lambda x: jg.nn.layer_norm(x.astype(np.int64), 4), "float"),
    (lambda x: jg.gelu(x, approximate="erf"), "approximate"),
    (lambda x: jg.nn.masked_softmax(x, np.ones((2, 4), bool)), "does not broadcast"),
    (lambda x: jg.nn.masked_softmax(x, np.ones(4, np.int64)), "boolean or float"),
    (lambda x: jg.nn.masked_softmax(x[0, 0], causal=True), "causal"),
    (lambda x: jg.nn.scaled_dot_product_attention(x, x[..., :2], x), "do not fit"),
])
def test_bad_input_names_the_problem(call, match):
    x = np.ones((2, 3, 4))
    with pytest.raises(jg.JitgradError, match=match):
        call(x)
    with pytest.raises(jg.JitgradError, match=match):
        jg.jit(call)(x)


def test_bad_gpt_and_optimizer_settings():
    with pytest.raises(jg.JitgradError, match="multiple of n_head"):
        G.GPTConfig(n_embd=10, n_head=4)
    cfg = G.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4)
    p = G.gpt_init(cfg)
    with pytest.raises(jg.JitgradError, match="longer than the GPT's block size"):
        G.gpt_apply(p, np.zeros((1, 5), np.int64), 1)
    with pytest.raises(jg.JitgradError, match="clip_norm"):
        jg.optim.AdamW(clip_norm=0.0)
    with pytest.raises(jg.JitgradError, match="warm-up"):
        jg.optim.WarmupCosine(10, 5)
    bad = jg.optim.AdamW(mask={"wte": True})
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(jg.JitgradError, match="mask"):
        jg.train_step(lambda q, t, y: G.gpt_loss(q, t, y, 1), p, bad)(
            np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
    assert all((p[k] == before[k]).all() for k in p)


# ---------------------------------------------------------------- the command line

TINY = ["--iters", "8", "--warmup", "2", "--eval-interval", "4", "--eval-batches", "2",
        "--block-size", "8", "--batch-size", "4", "--n-layer", "1", "--n-head", "2",
        "--n-embd", "16"]


def test_train_gpt_and_sample_from_the_command_line(tmp_path, capsys):
    import json

    from jitgrad.tools import cli
    ckpt = tmp_path / "gpt.npz"
    assert cli.main(["train", "--model", "gpt", *TINY, "--save", str(ckpt), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    m = json.loads(out[-1])
    assert [h["iter"] for h in m["history"]] == [4, 8]
    assert m["val_loss"] < np.log(65) and m["dataset"] == "tinyshakespeare"
    assert any(ln.startswith("iter 8/8") and "val loss" in ln for ln in out)
    assert m["tokens_per_s"] > 0 and ckpt.exists()
    assert cli.main(["sample", str(ckpt), "--tokens", "12", "--prompt", "KING:", "--top-k",
                     "5", "--seed", "3"]) == 0
    io = capsys.readouterr()
    assert io.out.startswith("KING:") and len(io.out.rstrip("\n")) >= len("KING:") + 10
    assert "tokens/s" in io.err
    # the same seed, the same text; a compiled forward of one shape
    assert cli.main(["sample", str(ckpt), "--tokens", "12", "--prompt", "KING:", "--top-k",
                     "5", "--seed", "3"]) == 0
    assert capsys.readouterr().out == io.out


def test_a_text_file_corpus_and_bad_flags(tmp_path, capsys):
    from jitgrad.tools import cli
    from jitgrad.training import text
    data = tmp_path / "tiny.txt"
    data.write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    corpus = text.load_text(data)
    assert corpus.chars == "".join(sorted(set(data.read_text())))
    assert len(corpus.train) == int(0.9 * 820) and corpus.decode(corpus.val[:3]) == "to "
    x, y = text.windows(corpus.train, np.array([0, 5]), 4)
    assert corpus.decode(x[0]) == "to b" and corpus.decode(y[0]) == "o be"
    (tmp_path / "short.txt").write_text("abc", encoding="utf-8")
    assert cli.main(["train", "--model", "gpt", *TINY, "--data", str(tmp_path / "short.txt")]) \
        == 2
    assert "too short" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", *TINY, "--hidden", "32"]) == 2
    assert "--hidden is a flag of the MLP recipe" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--iters", "50"]) == 2
    assert "--warmup" in capsys.readouterr().err
    assert cli.main(["sample", str(data)]) == 2
    assert "error" in capsys.readouterr().err


def test_sampling_compiles_one_shape_and_reads_only_the_context():
    """Contexts shorter and longer than the block run through the one compiled shape, and
    the padding after the context never changes the next character's logits."""
    from jitgrad.training.gpt_recipe import Sampler
    cfg = G.GPTConfig(vocab_size=5, block_size=6, n_layer=1, n_head=1, n_embd=8)
    sampler = Sampler(G.gpt_init(cfg, 2), cfg, "abcde")
    text, rate = sampler.generate("ab", 9, temperature=0.7, top_k=3, seed=1)
    assert len(text) == 9 and set(text) <= set("abcde") and rate > 0
    assert len(sampler._forward._cache) == 1
    p = sampler.params
    for pad in (0, 4):
        tokens = np.array([[1, 3, 2, pad, pad, pad]])
        logits = G.gpt_apply(p, tokens, 1)  # eagerly
        np.testing.assert_allclose(logits[0, 2], G.gpt_apply(p, tokens[:, :3], 1)[0, 2],
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(jg.JitgradError, match="does not know"):
        sampler.generate("xyz", 3)


def test_warmup_cosine_is_nanogpts_get_lr():
    def get_lr(it, lr=1e-3, warmup=100, decay=2000, min_lr=1e-4):  # nanoGPT's train.py
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (lr - min_lr)
    sched = jg.optim.WarmupCosine(100, 2000, 1e-4)
    for it in (0, 1, 99, 100, 101, 1000, 1999, 2000, 2001, 5000):
        assert sched(1e-3, it + 1) == pytest.approx(get_lr(it), rel=1e-12)


def test_clipping_scales_to_the_global_norm_only_above_it():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}  # global norm 5
    clipped = jg.optim.clip_by_global_norm(grads, 1.0)
    np.testing.assert_allclose(clipped["a"], [3.0 / (5 + 1e-6), 0.0], rtol=1e-12)
    kept = jg.optim.clip_by_global_norm(grads, 10.0)
    np.testing.assert_array_equal(kept["b"], grads["b"])


def test_train_gpt_under_bf16_mixed_precision(capsys):
    import json

    from jitgrad.tools import cli
    assert cli.main(["train", "--model", "gpt", *TINY, "--precision", "bf16", "--json"]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert m["config"]["precision"] == "bf16" and np.isfinite(m["val_loss"])
    assert m["val_loss"] < np.log(65)
