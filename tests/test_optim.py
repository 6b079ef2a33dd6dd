"""Optimizers and schedules against PyTorch's definitions.

The reference implementations below are torch.optim.SGD / Adam / AdamW and the
StepLR / CosineAnnealingLR schedules written out in numpy, step for step as in
PyTorch's documentation; when torch is importable the same trajectories are
also checked against torch itself.
"""

import math

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.training import optim

N_STEPS = 6
SHAPES = {"w": (3, 4), "v": (4,)}


def loss_fn(p, x):
    # d/dw = x (a new gradient each step), d/dv = v (depends on the trajectory).
    return jg.sum(p["w"] * x) + 0.5 * jg.sum(p["v"] * p["v"])


def numpy_grads(p, x):
    return {"w": x.copy(), "v": p["v"].copy()}


def init_params(dtype=np.float64):
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def batches(dtype=np.float64):
    rng = np.random.default_rng(2)
    return [rng.standard_normal(SHAPES["w"]).astype(dtype) for _ in range(N_STEPS)]


# ------------------------------------------------------------- PyTorch formulas in numpy


def torch_step_lr(base, t, step_size, gamma):
    """StepLR after t-1 scheduler.step() calls (stepping once per optimizer step)."""
    return base * gamma ** ((t - 1) // step_size)


def torch_cosine_lr(base, t, t_max, eta_min=0.0):
    """CosineAnnealingLR, closed form, at scheduler epoch t-1."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (t - 1) / t_max)) / 2


def ref_sgd(p, xs, lrs, momentum=0.0, weight_decay=0.0, nesterov=False):
    p = {k: v.copy() for k, v in p.items()}
    buf = {}
    for x, lr in zip(xs, lrs, strict=True):
        g = numpy_grads(p, x)
        for k in p:
            d = g[k]
            if weight_decay:
                d = d + weight_decay * p[k]
            if momentum:
                buf[k] = d.copy() if k not in buf else momentum * buf[k] + d  # dampening 0
                d = d + momentum * buf[k] if nesterov else buf[k]
            p[k] = p[k] - lr * d
    return p, buf


def ref_adam(p, xs, lrs, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    b1, b2 = betas
    p = {k: v.copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (x, lr) in enumerate(zip(xs, lrs, strict=True), start=1):
        g = numpy_grads(p, x)
        for k in p:
            d = g[k]
            if decoupled:
                p[k] = p[k] * (1 - lr * weight_decay)
            elif weight_decay:
                d = d + weight_decay * p[k]
            m[k] = b1 * m[k] + (1 - b1) * d
            v[k] = b2 * v[k] + (1 - b2) * d * d
            step_size = lr / (1 - b1 ** t)
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2 ** t) + eps
            p[k] = p[k] - step_size * m[k] / denom
    return p, {"m": m, "v": v}


# --------------------------------------------------------------------------- running


def run_jitgrad(opt, backend, dtype=np.float64):
    params = init_params(dtype)
    step = jg.train_step(loss_fn, params, opt, backend=backend)
    for x in batches(dtype):
        step(x)
    return params, step.state


SGD_CASES = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
}
ADAM_CASES = {
    "adam": (optim.Adam, dict(lr=0.01), False),
    "adam_l2": (optim.Adam, dict(lr=0.01, weight_decay=0.1), False),
    "adamw": (optim.AdamW, dict(lr=0.01, weight_decay=0.1), True),
}
BACKENDS = ["numba", "interpret"]


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch_formula(case, backend):
    kw = SGD_CASES[case]
    params, state = run_jitgrad(optim.SGD(**kw), backend)
    ref, buf = ref_sgd(init_params(), batches(), [kw["lr"]] * N_STEPS,
                       kw.get("momentum", 0.0), kw.get("weight_decay", 0.0),
                       kw.get("nesterov", False))
    assert_close(params, ref)
    if kw.get("momentum"):
        assert_close(state["momentum"], buf)
    else:
        assert state == {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_torch_formula(case, backend):
    cls, kw, decoupled = ADAM_CASES[case]
    params, state = run_jitgrad(cls(**kw), backend)
    ref, ref_state = ref_adam(init_params(), batches(), [kw["lr"]] * N_STEPS,
                              weight_decay=kw.get("weight_decay", 0.0), decoupled=decoupled)
    assert_close(params, ref)
    assert_close(state["m"], ref_state["m"])
    assert_close(state["v"], ref_state["v"])


def test_adamw_default_weight_decay_is_torchs():
    assert optim.AdamW().weight_decay == 0.01
    assert optim.Adam().weight_decay == 0.0


def test_float32_tracks_the_formula():
    params, _ = run_jitgrad(optim.Adam(lr=0.01), "numba", np.float32)
    ref, _ = ref_adam(init_params(), batches(), [0.01] * N_STEPS)
    for k in params:
        assert params[k].dtype == np.float32
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- schedules


def test_constant_schedule():
    opt = optim.SGD(lr=0.3)
    assert [opt.hyper(t)["lr"] for t in range(1, 5)] == [0.3] * 4


def test_step_decay_matches_steplr():
    sched = optim.StepDecay(step_size=3, gamma=0.5)
    got = [sched(0.2, t) for t in range(1, 11)]
    want = [torch_step_lr(0.2, t, 3, 0.5) for t in range(1, 11)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert got[:3] == [0.2] * 3 and got[3] == 0.1


def test_cosine_matches_cosineannealinglr():
    sched = optim.Cosine(total_steps=8, min_lr=0.01)
    got = [sched(0.5, t) for t in range(1, 10)]
    want = [torch_cosine_lr(0.5, t, 8, 0.01) for t in range(1, 10)]
    np.testing.assert_allclose(got, want, rtol=1e-14)
    assert got[0] == 0.5 and got[-1] == pytest.approx(0.01)
    assert sched(0.5, 100) == pytest.approx(0.01)  # held at min_lr past the end


@pytest.mark.parametrize("schedule,lrs", [
    (optim.StepDecay(step_size=2, gamma=0.1),
     [torch_step_lr(0.1, t, 2, 0.1) for t in range(1, N_STEPS + 1)]),
    (optim.Cosine(total_steps=N_STEPS),
     [torch_cosine_lr(0.1, t, N_STEPS) for t in range(1, N_STEPS + 1)]),
])
def test_schedule_drives_the_compiled_step(schedule, lrs):
    # The scheduled rate is an input of the program: same compiled step, new values.
    params, _ = run_jitgrad(optim.SGD(lr=0.1, momentum=0.9, schedule=schedule), "numba")
    ref, _ = ref_sgd(init_params(), batches(), lrs, momentum=0.9)
    assert_close(params, ref)


@pytest.mark.parametrize("schedule", [
    optim.StepDecay(step_size=2, gamma=0.5), optim.Cosine(total_steps=N_STEPS)])
def test_adam_bias_correction_with_schedule(schedule):
    params, _ = run_jitgrad(optim.Adam(lr=0.05, schedule=schedule), "numba")
    lrs = [schedule(0.05, t) for t in range(1, N_STEPS + 1)]
    ref, _ = ref_adam(init_params(), batches(), lrs)
    assert_close(params, ref)


def test_bad_hyperparameters():
    with pytest.raises(jg.JitgradError, match="learning rate"):
        optim.SGD(lr=0)
    with pytest.raises(jg.JitgradError, match="Nesterov"):
        optim.SGD(lr=0.1, nesterov=True)


# ------------------------------------------------------------------ against torch itself


def torch_trajectory(make_opt, make_sched=None, steps=N_STEPS):
    torch = pytest.importorskip("torch")
    p0 = init_params()
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p0.items()}
    opt = make_opt(torch, list(tp.values()))
    sched = make_sched(torch, opt) if make_sched else None
    for x in batches()[:steps]:
        opt.zero_grad()
        loss = (tp["w"] * torch.tensor(x)).sum() + 0.5 * (tp["v"] * tp["v"]).sum()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return {k: v.detach().numpy() for k, v in tp.items()}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_matches_torch(case):
    kw = SGD_CASES[case]
    want = torch_trajectory(lambda torch, ps: torch.optim.SGD(ps, **kw))
    got, _ = run_jitgrad(optim.SGD(**kw), "numba")
    assert_close(got, want)


@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam_matches_torch(case):
    cls, kw, decoupled = ADAM_CASES[case]
    name = "AdamW" if decoupled else "Adam"
    want = torch_trajectory(lambda torch, ps: getattr(torch.optim, name)(ps, **kw))
    got, _ = run_jitgrad(cls(**kw), "numba")
    assert_close(got, want, rtol=1e-9)


def test_schedules_match_torch():
    want_step = torch_trajectory(
        lambda torch, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda torch, o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1))
    got, _ = run_jitgrad(optim.SGD(lr=0.1, momentum=0.9,
                                   schedule=optim.StepDecay(2, 0.1)), "numba")
    assert_close(got, want_step)
    want_cos = torch_trajectory(
        lambda torch, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda torch, o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=N_STEPS))
    got, _ = run_jitgrad(optim.SGD(lr=0.1, momentum=0.9,
                                   schedule=optim.Cosine(N_STEPS)), "numba")
    assert_close(got, want_cos)
