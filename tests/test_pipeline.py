"""The pipeline as one thing: one immutable record per specialisation, the plan remat judged
is the one compiled, and both backends behind one executable interface."""

import dataclasses
import warnings

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler import backend, memory, pipeline
from jitgrad.compiler.executable import Executable
from jitgrad.frontend import tree


def chain_loss(ws, x):
    h = x
    for w in ws:
        h = jg.relu(h @ w)
    return jg.sum(h * h)


@pytest.fixture(scope="module")
def args():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(16, 16)) * 0.3 for _ in range(6)], rng.normal(size=(512, 16))


def test_a_budget_compiles_the_plan_it_judged_without_planning_again(args, monkeypatch):
    grad = jg.value_and_grad(chain_loss)
    full = jg.jit(grad).lower(*args).plan.arena_bytes
    calls = []
    real = backend.plan_program

    def counting(prog, *a, **kw):
        planned = real(prog, *a, **kw)
        calls.append((prog, planned))
        return planned

    monkeypatch.setattr(backend, "plan_program", counting)
    entry = jg.jit(grad, memory_budget=int(full * 0.8)).lower(*args)
    # the executable was built from the plan remat chose: that program, that layout
    chosen = [planned for prog, planned in calls if prog is entry.program]
    assert len(chosen) == 1
    assert entry.plan.buffers is chosen[0].plan.buffers
    assert entry.plan.arena_bytes <= full * 0.8 and entry.plan.remat is entry.remat
    np.testing.assert_allclose(jg.jit(grad, memory_budget=int(full * 0.8))(*args)[0],
                               grad(*args)[0])


def test_the_record_and_the_plan_are_immutable(args):
    entry = jg.jit(chain_loss).lower(*args)
    assert isinstance(entry, pipeline.Compiled)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.program = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.plan.remat = None
    assert entry.plan.names and len(entry.plan.step_roles) == entry.plan.n_steps


def test_plan_names_say_what_they_are_and_the_old_ones_still_work(args):
    plan = jg.jit(chain_loss).lower(*args).plan
    assert plan.arena_bytes >= plan.peak_live_bytes == max(plan.live_bytes())
    with pytest.warns(DeprecationWarning, match="arena_bytes"):
        assert plan.peak_bytes == plan.arena_bytes
    with pytest.warns(DeprecationWarning, match="peak_live_bytes"):
        assert plan.lower_bound == plan.peak_live_bytes


@pytest.mark.parametrize("name", ["numba", "interpret"])
def test_both_backends_implement_the_executable_interface(args, name):
    cf = jg.jit(chain_loss, backend=name)
    entry = cf.lower(*args)
    ex = entry.executable
    for attr in ("program", "plan", "source"):
        assert hasattr(ex, attr)
    for method in Executable.__dict__:
        if not method.startswith("_") and callable(getattr(Executable, method)):
            assert callable(getattr(ex, method)), method
    leaves = [np.ascontiguousarray(a) for a in tree.flatten(tuple(args))[0]]
    want = chain_loss(*args)
    np.testing.assert_allclose(ex.run(leaves)[0], want)
    assert ex.pinned_region().size == 0
    ex.bare_call(leaves)()
    calls = ex.kernel_calls()
    if name == "numba":
        assert len(calls) == entry.plan.n_steps
        gemms = [c for c in calls if c.symbol.startswith("jg_gemm")]
        assert gemms and all(c.named_args()["k"] == 16 for c in gemms)
        for c in calls:  # each call runs on its own, on the arena, as profiling does
            assert c.fn(*c.args) == 0
    else:
        assert calls == []


def test_pinned_results_are_one_region_of_the_arena(args):
    cf = jg.CompiledFunction(jg.value_and_grad(chain_loss), backend="numba", pinned=[0, 1])
    value, grads = cf(*args)
    region = cf.latest.executable.pinned_region()
    assert region.size >= memory.aligned(value.nbytes) + memory.aligned(grads[0].nbytes)
    assert np.shares_memory(region, value) and np.shares_memory(region, grads[0])


def test_plan_only_compiles_nothing(args, monkeypatch):
    monkeypatch.setattr(backend, "NumbaExecutable", None)  # would fail if reached
    step = jg.train_step(lambda p, x: chain_loss(p, x), list(args[0]), jg.optim.SGD(lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = step.plan_only(args[1])
    assert entry.executable is None and entry.plan.arena_bytes > 0
    assert "jg_chunk_" in entry.source
