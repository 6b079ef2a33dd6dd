"""Convolution and pooling (issue 20): torch parity, gradients, kernels, models, training.

- PyTorch's float64 results stored in reference/conv_refs.npz (written by
  reference/make_conv_refs.py) are compared on every run, on both backends; with torch
  importable, the same comparisons run live on fresh inputs, float32 included;
- conv2d over a stride/padding/dilation/groups grid, both poolings and the digits conv
  net are gradchecked in float64 at orders 1 and 2 on both backends (a representative
  subset of the grid on Numba; JITGRAD_TEST_FULL=1 runs all of it);
- ten SGD-momentum steps of the digits conv net equal torch's parameters to 1e-9;
- relu is absorbed into the convolution's epilogue, the im2col scratch is in the plan,
  remat gives bitwise-equal steps, bad arguments raise clear errors;
- `jitgrad train --model cnn` on tiny IDX files with the MLP's flags.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re

import numpy as np
import pytest
from convref import (
    np_avg_pool2d,
    np_avg_pool2d_grad,
    np_conv2d,
    np_conv2d_input_grad,
    np_conv2d_weight_grad,
    np_max_pool2d,
)
from gradcheck import assert_grads_close, check_grads, numeric_hvp, vdot

import jitgrad as jg
from jitgrad.compiler import blas
from jitgrad.frontend.ops import conv as CV
from jitgrad.frontend.ops import pool as PL

REFS = np.load(pathlib.Path(__file__).with_name("reference") / "conv_refs.npz")
CASES = json.loads(str(REFS["cases"]))
F = jg.nn


def _conv_call(case):
    _, _, _, stride, padding, dilation, groups = case
    return lambda x, w, *b: F.conv2d(x, w, b[0] if b else None, _tup(stride), _tup(padding),
                                     _tup(dilation), groups)


def _tup(v):
    return tuple(v) if isinstance(v, list) else v


def _value_and_grads(fn, args, g):
    """fn(*args) and the gradients of sum(fn(*args) * g), compiled with jit's default
    backend."""
    loss = jg.jit(jg.grad(lambda *a: jg.sum(fn(*a) * g), argnums=tuple(range(len(args)))))
    return jg.jit(fn)(*args), loss(*args)


# ---------------------------------------------------------------- torch parity (stored)

@pytest.mark.parametrize("i", range(len(CASES["conv"])))
def test_conv2d_matches_stored_torch(i, backend):
    r = {k.split("/")[1]: REFS[k] for k in REFS.files if k.startswith(f"conv{i}/")}
    args = (r["x"], r["w"]) + ((r["b"],) if "b" in r else ())
    y, grads = _value_and_grads(_conv_call(CASES["conv"][i]), args, r["g"])
    np.testing.assert_allclose(y, r["y"], rtol=1e-10, atol=1e-12)
    for got, name in zip(grads, ("gx", "gw", "gb"), strict=False):
        np.testing.assert_allclose(got, r[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("i", range(len(CASES["pool"])))
def test_pooling_matches_stored_torch(i, backend):
    kind, _, kernel, stride, padding = CASES["pool"][i]
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    r = {k.split("/")[1]: REFS[k] for k in REFS.files if k.startswith(f"pool{i}/")}
    y, (gx,) = _value_and_grads(lambda x: pool(x, _tup(kernel), _tup(stride), _tup(padding)),
                                (r["x"],), r["g"])
    np.testing.assert_allclose(y, r["y"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gx, r["gx"], rtol=1e-12, atol=1e-14)


def _sgd_steps(params, opt_steps=None):
    cfg = CASES["sgd"]
    step = jg.train_step(F.DIGITS_CNN.loss, params,
                         jg.optim.SGD(lr=cfg["lr"], momentum=cfg["momentum"]))
    x, y = REFS["sgd/x"], REFS["sgd/y"]
    for s in range(opt_steps or cfg["steps"]):
        rows = slice(s * cfg["batch"], (s + 1) * cfg["batch"])
        step(x[rows], y[rows])
    return step.params


def test_ten_sgd_momentum_steps_match_torch(backend):
    init = {k.split("/")[2]: REFS[k].copy() for k in REFS.files if k.startswith("sgd/init/")}
    ours = jg.nn.DIGITS_CNN.init(8, 10, np.random.default_rng(0), np.float64)
    for k, v in init.items():  # the stored start is jg.nn's initialisation
        np.testing.assert_array_equal(ours[k], v)
    final = _sgd_steps(init)
    for k in init:
        np.testing.assert_allclose(final[k], REFS[f"sgd/final/{k}"], rtol=0, atol=1e-9,
                                   err_msg=k)


# ---------------------------------------------------------------- torch parity (live)

def test_live_torch_parity(rng):
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 2e-4)):
        for stride, padding, dilation, groups in [(1, 1, 1, 1), (2, (0, 1), (2, 1), 3),
                                                  (1, "same", 2, 1)]:
            x = rng.normal(size=(2, 6, 9, 8)).astype(dtype)
            w = rng.normal(size=(3, 6 // groups, 3, 2)).astype(dtype)
            b = rng.normal(size=3).astype(dtype)
            tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
            ty = tf.conv2d(tx, tw, tb, stride, padding, dilation, groups)
            g = rng.normal(size=tuple(ty.shape)).astype(dtype)
            (ty * torch.tensor(g)).sum().backward()
            y, grads = _value_and_grads(
                lambda x, w, b, s=stride, p=padding, d=dilation, gr=groups:
                F.conv2d(x, w, b, s, p, d, gr), (x, w, b), g)
            assert y.dtype == dtype
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
            for got, t in zip(grads, (tx, tw, tb), strict=True):
                np.testing.assert_allclose(got, t.grad.numpy(), rtol=tol, atol=tol * 10)
        x = rng.normal(size=(2, 3, 9, 7)).astype(dtype)
        for ours, theirs in ((F.max_pool2d, tf.max_pool2d), (F.avg_pool2d, tf.avg_pool2d)):
            tx = torch.tensor(x, requires_grad=True)
            ty = theirs(tx, 3, 2, 1)
            g = rng.normal(size=tuple(ty.shape)).astype(dtype)
            (ty * torch.tensor(g)).sum().backward()
            y, (gx,) = _value_and_grads(lambda x, f=ours: f(x, 3, 2, 1), (x,), g)
            np.testing.assert_allclose(y, ty.detach().numpy(), rtol=tol, atol=tol)
            np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=tol, atol=tol)


# ---------------------------------------------------------------- gradients: the grid

GRID = list(itertools.product((1, 2), (0, 1), (1, 2), (1, 2)))  # stride padding dilation groups
# On Numba by default: each value of each parameter at least once
SUBSET = {(1, 0, 1, 1), (2, 1, 2, 2), (1, 1, 1, 2), (2, 0, 2, 1)}


def _grid_params():
    return [pytest.param(p, id="s{}-p{}-d{}-g{}".format(*p),
                         marks=() if p in SUBSET else pytest.mark.numba_full) for p in GRID]


@pytest.mark.parametrize("geom", _grid_params())
def test_conv2d_gradcheck_grid(geom, backend):
    stride, padding, dilation, groups = geom
    rng = np.random.default_rng(sum(geom))
    x = rng.normal(size=(2, 2 * groups, 6, 5))
    w = rng.normal(size=(2 * groups, 2, 3, 2))
    b = rng.normal(size=2 * groups)
    g = rng.normal(size=np_conv2d(x, w, b, stride, padding, dilation, groups).shape)

    def loss(x, w, b):
        return jg.sum(jg.tanh(F.conv2d(x, w, b, stride, padding, dilation, groups)) * g)

    def ref(x, w, b):
        return np.sum(np.tanh(np_conv2d(x, w, b, stride, padding, dilation, groups)) * g)

    check_grads(jg.jit(loss), (x, w, b), argnums=(0, 1, 2), order=2, ref=ref)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_gradcheck(kind, backend):
    rng = np.random.default_rng(7)
    # distinct values: no ties in a max-pooling window
    x = (rng.permutation(2 * 3 * 7 * 6) * 0.1).reshape(2, 3, 7, 6) - 12.0
    pool, ref = (F.max_pool2d, np_max_pool2d) if kind == "max" else (F.avg_pool2d,
                                                                      np_avg_pool2d)
    g = rng.normal(size=ref(x, 3, 2, 1).shape)
    check_grads(jg.jit(lambda x: jg.sum(jg.tanh(pool(x, 3, 2, 1)) ** 2 * g)), (x,), order=2,
                ref=lambda x: np.sum(np.tanh(ref(x, 3, 2, 1)) ** 2 * g))


def test_conv_net_gradcheck(backend):
    """The digits conv net (conv-relu-pool twice, then linear) at orders 1 and 2. A relu net's
    gradient jumps where a pre-activation or a pooling choice changes: order 2's finite
    differences take a step (1e-7) small enough not to cross one here."""
    rng = np.random.default_rng(3)
    net = jg.nn.ConvNet("tiny", ((3, 3, 1), (4, 3, 1)))
    params = net.init(8, 5, rng, np.float64, init="he")
    x = rng.normal(size=(3, 64))
    y = np.array([0, 4, 2])
    names = sorted(params)
    args = tuple(params[k] for k in names)
    nums = tuple(range(len(names)))

    def loss(*ps):
        return net.loss(dict(zip(names, ps, strict=True)), x, y)

    check_grads(jg.jit(loss), args, argnums=nums, order=1)
    grad = jg.jit(jg.grad(loss, argnums=nums))
    v = tuple(rng.normal(size=a.shape) for a in args)
    hvp = jg.jit(jg.grad(lambda *a: vdot(jg.grad(loss, argnums=nums)(*a), v), argnums=nums))
    assert_grads_close(hvp(*args), numeric_hvp(grad, args, v, nums, eps=1e-7), rtol=1e-5,
                       atol=1e-6, what="Hessian-vector product")


def test_gradient_primitives_against_direct_references(rng):
    """The gradient primitives themselves, bound directly, against sums written from the
    definitions (convref.py)."""
    geom = {"stride": (2, 1), "padding": (1, 1, 0, 0), "dilation": (1, 2), "groups": 2}
    x, w = rng.normal(size=(2, 4, 7, 6)), rng.normal(size=(6, 2, 3, 2))
    y = CV.conv2d_p.bind(x, w, relu=False, **geom)
    g = rng.normal(size=y.shape)
    kw = {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2), "groups": 2}
    for backend in ("interpret", "numba"):
        gx = jg.jit(lambda g, w: CV.conv2d_input_grad_p.bind(g, w, hw=(7, 6), **geom),
                    backend=backend)(g, w)
        np.testing.assert_allclose(gx, np_conv2d_input_grad(g, w, x.shape, **kw), rtol=1e-12)
        gw = jg.jit(lambda x, g: CV.conv2d_weight_grad_p.bind(x, g, k=(3, 2), **geom),
                    backend=backend)(x, g)
        np.testing.assert_allclose(gw, np_conv2d_weight_grad(x, g, (3, 2), **kw), rtol=1e-12)
        ga = rng.normal(size=(2, 4, 4, 4))
        gxa = jg.jit(lambda g: PL.avg_pool2d_grad_p.bind(
            g, hw=(7, 6), kernel=(3, 2), stride=(2, 2), padding=(1, 1)), backend=backend)(ga)
        np.testing.assert_allclose(gxa, np_avg_pool2d_grad(ga, (2, 4, 7, 6), (3, 2), 2, 1),
                                   rtol=1e-12)


# ---------------------------------------------------------------- kernels and plans

@pytest.mark.parametrize("path", ["direct", "im2col"])
def test_relu_and_bias_fuse_into_the_convolution_and_scratch_is_planned(rng, path,
                                                                         monkeypatch):
    if path == "im2col":
        monkeypatch.setattr(CV, "DIRECT_MAX_M", 0)
    monkeypatch.setattr(CV, "DIRECT_MIN_RUN", 0)  # its 10x10 planes are below the default
    x = rng.normal(size=(4, 3, 10, 10)).astype(np.float32)
    w = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    cf = jg.jit(lambda x, w, b: jg.relu(F.conv2d(x, w, b, padding=1)), backend="numba")
    y = cf(x, w, b)
    np.testing.assert_allclose(y, np.maximum(np_conv2d(x, w, b, 1, 1), 0), rtol=1e-5,
                               atol=1e-5)
    calls = [ln for ln in cf.source.splitlines() if re.match(r"\s+jg_\w+\(", ln)]
    convs = [i for i in cf.program.instrs if i.prim is CV.conv2d_p]
    gemm = blas.choose(CV.gemm_shape(convs[0])).name
    kernel = "jg_conv2d_direct_f32(" if path == "direct" else f"jg_conv2d_{gemm}_f32("
    assert len(calls) == 1 and kernel in calls[0], cf.source
    assert len(convs) == 1 and convs[0].kw["relu"] and len(convs[0].inputs) == 3
    if path == "im2col":
        # the unrolled images (rows x C*KH*KW) and the product (rows x O) live in the arena
        assert cf.plan.arena_bytes >= 4 * 10 * 10 * (27 + 8) * 4
    else:  # one padded image (3 x 12 x 12, 2 surplus) and one output plane (10 x 12)
        assert cf.plan.arena_bytes >= (3 * 12 * 12 + 2 + 10 * 12) * 4


# stride 1 (the direct kernels' domain): padding (top, bottom, left, right), dilation, groups
DIRECT_GEOMS = [((0, 0, 0, 0), (1, 1), 1), ((2, 2, 1, 1), (1, 1), 1), ((1, 2, 0, 1), (2, 1), 2),
                ((3, 0, 2, 4), (1, 2), 1)]  # the last pads beyond the kernel: im2col input grad


@pytest.mark.parametrize("path", ["direct", "direct-slots", "im2col"])
@pytest.mark.parametrize("geom", DIRECT_GEOMS, ids=lambda g: "p{}-d{}-g{}".format(*g))
def test_both_kernel_paths_match_the_references(geom, path, monkeypatch):
    """The convolution and its two gradients, each through the direct kernels (serial, and
    in parallel slots of unequal blocks of images) and through im2col + GEMM, against
    conv.py's numpy references; float32 and an odd-sized input."""
    if path == "im2col":
        monkeypatch.setattr(CV, "DIRECT_MAX_M", 0)
    monkeypatch.setattr(CV, "DIRECT_MIN_RUN", 0)  # small planes, to keep the test fast
    if path == "direct-slots":
        monkeypatch.setattr(CV, "PARALLEL_MIN", 0)
    padding, dilation, groups = geom
    kw = {"stride": (1, 1), "padding": padding, "dilation": dilation, "groups": groups}
    rng = np.random.default_rng(len(str(geom)))
    x = rng.normal(size=(6, 2 * groups, 7, 9)).astype(np.float32)
    w = rng.normal(size=(3 * groups, 2, 3, 2)).astype(np.float32)
    b = rng.normal(size=3 * groups).astype(np.float32)
    fwd = jg.jit(lambda x, w, b: jg.relu(CV.conv2d_p.bind(x, w, b, relu=False, **kw)))
    y = fwd(x, w, b)
    ref = np.maximum(CV._conv_ref(x, w, **kw) + b[:, None, None], 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    g = rng.normal(size=y.shape).astype(np.float32)
    ig = jg.jit(lambda g, w: CV.conv2d_input_grad_p.bind(g, w, hw=(7, 9), **kw))
    np.testing.assert_allclose(ig(g, w), CV._input_grad_ref(g, w, (7, 9), **kw), rtol=1e-5,
                               atol=1e-5)
    wg = jg.jit(lambda x, g: CV.conv2d_weight_grad_p.bind(x, g, k=(3, 2), **kw))
    np.testing.assert_allclose(wg(x, g), CV._weight_grad_ref(x, g, (3, 2), **kw), rtol=1e-4,
                               atol=1e-4)
    direct = path != "im2col"
    assert ("jg_conv2d_direct_f32(" in fwd.source) == direct
    assert ("jg_conv2d_direct_weight_grad_f32(" in wg.source) == direct
    direct_input_grad = direct and geom != DIRECT_GEOMS[-1]
    assert ("jg_conv2d_direct_input_grad_f32(" in ig.source) == direct_input_grad


def test_direct_weight_gradient_with_non_finite_inputs(monkeypatch):
    """The direct weight gradient sums over the padded width; its surplus columns must not
    turn an inf of the input into NaN (0 · inf) where the true sum is finite or inf."""
    monkeypatch.setattr(CV, "DIRECT_MIN_RUN", 0)
    rng = np.random.default_rng(3)
    kw = {"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1}
    x, g = rng.normal(size=(2, 2, 5, 6)), rng.normal(size=(2, 3, 5, 6))
    x[0, 1, 2, 5] = np.inf   # at a row's end: surplus columns of the next row read it
    x[1, 0, 0, 0] = -np.inf
    x[1, 1, 3, 2] = np.nan
    wg = jg.jit(lambda x, g: CV.conv2d_weight_grad_p.bind(x, g, k=(3, 3), **kw))
    got, ref = wg(x, g), CV._weight_grad_ref(x, g, (3, 3), **kw)
    assert "jg_conv2d_direct_weight_grad_f64(" in wg.source
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[~np.isnan(ref)], ref[~np.isnan(ref)], rtol=1e-12)


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 7, 9), (3, 3, 6, 5)])
def test_max_pool_2x2_path_ties_and_nans(shape, slots, monkeypatch):
    """2x2 windows at stride 2 take their own loops: the same maxima and positions as the
    reference (the first in window order on ties, the first NaN), on small integers (many
    ties), NaNs and -inf; serially and in parallel blocks of planes."""
    if slots:
        monkeypatch.setattr(PL, "PARALLEL_MIN", 0)
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, size=shape).astype(np.float32)
    x.flat[rng.choice(x.size, 6, replace=False)] = np.nan
    x.flat[rng.choice(x.size, 6, replace=False)] = -np.inf
    x[0, 0, :2, :2] = -np.inf  # a window of -inf: its first position
    cf = jg.jit(lambda x: PL.max_pool2d_p.bind(x, kernel=(2, 2), stride=(2, 2),
                                               padding=(0, 0)))
    y, idx = cf(x)
    ry, ridx = PL._max_pool_impl(x, kernel=(2, 2), stride=(2, 2), padding=(0, 0))
    np.testing.assert_array_equal(y, ry)
    np.testing.assert_array_equal(idx, ridx)
    assert idx[0, 0, 0, 0] == 0


def test_max_pool_is_one_pass_with_positions(rng):
    x = rng.normal(size=(2, 3, 6, 6))
    cf = jg.jit(jg.grad(lambda x: jg.sum(F.max_pool2d(x, 2) ** 2)), backend="numba")
    g = cf(x)
    want = np.zeros_like(x)
    win = x.reshape(2, 3, 3, 2, 3, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 3, 3, 3, 4)
    at = win.argmax(-1)
    for n, c, i, j in np.ndindex(at.shape):
        a = at[n, c, i, j]
        want[n, c, 2 * i + a // 2, 2 * j + a % 2] = 2 * win[n, c, i, j, a]
    np.testing.assert_allclose(g, want, rtol=1e-14)
    pools = [ln for ln in cf.source.splitlines() if "jg_max_pool2d_f64(" in ln]
    assert len(pools) == 1
    pool = next(i for i in cf.program.instrs if i.prim is PL.max_pool2d_p)
    assert len(pool.outputs) == 2 and pool.outputs[1].dtype == np.int64


def test_max_pool_gradient_rejects_bad_positions():
    g = np.ones((1, 1, 1, 2))
    bad = np.array([[[[0, 9]]]])
    for backend in ("interpret", "numba"):
        with pytest.raises(jg.JitgradError):
            jg.jit(lambda g, i: PL.max_pool2d_grad_p.bind(g, i, hw=(2, 2)), backend=backend)(
                g, bad)


def test_unbatched_inputs_and_float32(rng):
    x = rng.normal(size=(3, 6, 6)).astype(np.float32)
    w = rng.normal(size=(2, 3, 3, 3)).astype(np.float32)
    y = jg.jit(lambda x, w: F.max_pool2d(F.conv2d(x, w, padding="same"), 2))(x, w)
    assert y.shape == (2, 3, 3) and y.dtype == np.float32
    np.testing.assert_allclose(y, np_max_pool2d(np_conv2d(x[None], w, None, 1, 1), 2)[0],
                               rtol=1e-5, atol=1e-5)


def test_remat_gives_bitwise_equal_steps():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 64))
    y = rng.integers(0, 10, 16)
    results = []
    for remat in (None, "sqrt"):  # float64: the kernels the SGD test compiled
        params = F.DIGITS_CNN.init(8, 10, np.random.default_rng(1), np.float64)
        opts = {} if remat is None else {"remat": remat}
        step = jg.train_step(F.DIGITS_CNN.loss, params, jg.optim.SGD(0.05, momentum=0.9),
                             **opts)
        losses = [float(step(x, y)) for _ in range(2)]
        recomputed = [i.prim.name for i in step.compiled.program.instrs
                      if i.role == "recompute"]
        results.append((losses, step.params, recomputed))
    (l0, p0, r0), (l1, p1, r1) = results
    assert l0 == l1
    for k in p0:
        np.testing.assert_array_equal(p0[k], p1[k])
    # the sqrt policy recomputes pooled activations instead of storing them (the arena's
    # peak here is the backward's im2col scratch, which recomputation cannot lower)
    assert not r0 and "max_pool2d" in r1


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,match", [
    (lambda x, w: F.conv2d(x, w[:, :2]), "3 channels but the weight"),
    (lambda x, w: F.conv2d(x, w, groups=2), "expects 6"),
    (lambda x, w: F.conv2d(x[:, :, :2, :2], w), "larger than the padded input"),
    (lambda x, w: F.conv2d(x, w, dilation=4), "larger than the padded input"),
    (lambda x, w: F.conv2d(x, w, stride=0), "stride must be >= 1"),
    (lambda x, w: F.conv2d(x, w, padding=-1), "padding must be >= 0"),
    (lambda x, w: F.conv2d(x, w, dilation=(1, 2, 3)), "dilation must be an int or a pair"),
    (lambda x, w: F.conv2d(x, w, stride=2, padding="same"), "not supported for strided"),
    (lambda x, w: F.conv2d(x, w, padding="full"), "'valid' or 'same'"),
    (lambda x, w: F.conv2d(x, w, np.zeros(3)), r"bias must have shape \(4,\)"),
    (lambda x, w: F.conv2d(x, w.astype(np.float32)), "input is float64 but weight is float32"),
    (lambda x, w: F.conv2d(x[None], w), "must be 4-d"),
    (lambda x, w: F.conv2d(x.astype(np.int64), w.astype(np.int64)), "float32 or float64"),
    (lambda x, w: F.conv2d(x, w, groups=0), "groups must be a positive int"),
    (lambda x, w: F.max_pool2d(x, 3, padding=2), "at most half of the kernel"),
    (lambda x, w: F.avg_pool2d(x, 9), "larger than the padded input"),
    (lambda x, w: F.max_pool2d(x, 0), "kernel_size must be >= 1"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    x, w = np.zeros((2, 3, 5, 5)), np.zeros((4, 3, 3, 3))
    for run in (lambda: call(x, w), lambda: jg.jit(call)(x, w)):
        with pytest.raises(jg.JitgradError, match=match) as info:
            run()
        assert "test_conv.py" in str(info.value)


# ---------------------------------------------------------------- training and tools

def test_cli_trains_the_cnn_on_idx_files_with_the_mlp_flags(tmp_path, capsys):
    from test_train import run_cli, write_mnist_like
    d = write_mnist_like(tmp_path / "mnist", n_train=64, n_test=16)
    ckpt = tmp_path / "cnn.npz"
    flags = ["--model", "cnn", "--data", str(d), "--batch-size", "16", "--optimizer", "adam",
             "--schedule", "step", "--dropout", "0.2", "--remat", "--json", "--quiet"]
    code, out, err = run_cli(capsys, *flags, "--epochs", "1", "--save", str(ckpt))
    assert code == 0, err
    m = json.loads(out.splitlines()[-1])
    assert m["sizes"] == [64, 16, 32, 10] and m["config"]["model"] == "cnn"
    assert m["steps"] == 4
    code, out, err = run_cli(capsys, "--resume", str(ckpt), "--epochs", "2", "--json",
                             "--quiet")
    assert code == 0, err
    m = json.loads(out.splitlines()[-1])
    assert m["steps"] == 8 and m["config"]["model"] == "cnn"


def test_lenet5_shapes_and_model_errors():
    params = F.LENET5.init(28, 10, 0)
    assert params["conv0_w"].shape == (6, 1, 5, 5) and params["fc0_W"].shape == (400, 120)
    logits = jg.jit(F.LENET5.apply)(params, np.zeros((2, 1, 28, 28), np.float32))
    assert logits.shape == (2, 10)
    with pytest.raises(jg.JitgradError, match="larger input"):
        F.LENET5.init(8, 10, 0)
    with pytest.raises(jg.JitgradError, match="square images"):
        F.DIGITS_CNN.side(60)


def test_conv_initialisers_follow_pytorch():
    w, b = F.conv_init(0, 64, 32, 3)
    bound = 1 / np.sqrt(32 * 9)
    assert w.shape == (64, 32, 3, 3) and b.shape == (64,) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert np.abs(b).max() <= bound
    w, b = F.conv_init(0, 256, 64, 3, init="he", dtype=np.float64)
    assert_grads_close(np.array(w.std()), np.array(np.sqrt(2 / (64 * 9))), rtol=0.02, atol=0)
    np.testing.assert_array_equal(b, 0)
    with pytest.raises(jg.JitgradError, match="divisible by groups"):
        F.conv_init(0, 6, 4, 3, groups=3)


def test_show_draws_conv_and_pool_nodes():
    from jitgrad.tools.show import inspect_function
    params = F.DIGITS_CNN.init(8, 10, 0)
    x, y = np.zeros((4, 64), np.float32), np.zeros(4, np.int64)
    dot = inspect_function(F.DIGITS_CNN.loss, (params, x, y), argnums=[0]).dot("optimized")
    for label in ("conv2d", "max_pool2d", "conv2d_input_grad", "conv2d_weight_grad",
                  "max_pool2d_grad"):
        assert f'label="{label}' in dot, label
    assert "pad 1,1,1,1" in dot and "+relu" in dot
