"""Recomputation checkpointing: what is saved, what is recomputed, budgets, and identical bits."""

import itertools
import re

import numpy as np
import pytest
from plancheck import assert_plan_sound

import jitgrad as jg
from jitgrad.compiler import remat
from jitgrad.compiler.backend import plan_program
from jitgrad.frontend import tree


def _chain_params(rng, widths, dtype=np.float32):
    return [((rng.normal(size=(a, b)) / np.sqrt(a)).astype(dtype), np.full(b, 0.01, dtype))
            for a, b in itertools.pairwise(widths)]


def _chain_loss(params, x, y):
    h = x
    for w, b in params:
        h = jg.relu(h @ w + b)
    return jg.softmax_cross_entropy(h, y)


def _residual_loss(params, x, y):
    # a DAG: every block adds its input back (the skip path) and uses tanh
    h = x
    for w, b in params[:-1]:
        h = h + jg.tanh(h @ w + b)
    w, b = params[-1]
    return jg.softmax_cross_entropy(h @ w + b, y) + 1e-3 * jg.sum(params[0][0] ** 2)


def _data(rng, widths, batch, dtype=np.float32):
    return (_chain_params(rng, widths, dtype), rng.normal(size=(batch, widths[0])).astype(dtype),
            rng.integers(0, widths[-1], batch))


def _arena(prog):
    return plan_program(prog).plan.arena_bytes


def _lowered(fn, args, **options):
    cf = jg.jit(jg.value_and_grad(fn), backend="interpret", **options)
    entry = cf.lower(*args)
    return entry.program, entry.remat


def _same_bits(a, b):
    la, lb = tree.flatten(a)[0], tree.flatten(b)[0]
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


# ---------------------------------------------------------------- what backward keeps

def test_relu_chain_saves_one_activation_per_layer():
    rng = np.random.default_rng(0)
    widths = [32] * 9
    args = _data(rng, widths, 64)
    prog, report = _lowered(_chain_loss, args)
    producer = prog.producers()
    # relu's backward reads its output: the pre-activations (matmul, add) are not kept
    assert report.saved and all(producer[v].prim.name == "relu" for v in report.saved)
    assert len(report.saved) == len(widths) - 1
    act = 64 * 32 * 4
    # the arena holds about one activation per layer (plus gradients, which are 32x32)
    assert _arena(prog) < (len(widths) + 2) * act


def test_plan_prints_saved_and_recomputed_values():
    rng = np.random.default_rng(1)
    args = _data(rng, [16] * 7, 8)
    cf = jg.jit(jg.value_and_grad(_chain_loss), remat="sqrt")
    cf(*args)
    text = str(cf.plan)
    assert "recomputation (sqrt)" in text and "(recomputed)" in text
    assert "saved for backward:" in text and "flops" in text
    assert "# ---- recompute" in str(cf.program)


# ---------------------------------------------------------------- identical results

POLICIES = [{}, {"remat": "sqrt"}, {"memory_budget": "tight"}, {"remat": "full"}]


@pytest.mark.parametrize("loss", [_chain_loss, _residual_loss], ids=["chain", "residual"])
def test_every_policy_gives_identical_bits_compiled(loss):
    rng = np.random.default_rng(2)
    args = _data(rng, [24] * 10, 48)
    results, arenas = [], []
    for options in POLICIES:
        if options.get("memory_budget") == "tight":
            prog, _ = _lowered(loss, args)
            options = {"memory_budget": int(_arena(prog) * 0.85)}
        cf = jg.jit(jg.value_and_grad(loss), backend="numba", **options)
        results.append(cf(*args))
        arenas.append(cf.plan.arena_bytes)
        if "memory_budget" in options:
            assert cf.plan.arena_bytes <= options["memory_budget"]
        assert_plan_sound(cf.plan)
    assert all(_same_bits(results[0], r) for r in results[1:])
    assert arenas[1] < arenas[0] and arenas[2] < arenas[0]
    expected = jg.jit(jg.value_and_grad(loss), backend="interpret")(*args)
    np.testing.assert_allclose(results[1][0], expected[0], rtol=1e-5)


def test_recomputation_is_exact_in_the_interpreter_and_for_second_order():
    rng = np.random.default_rng(3)
    params, x, y = _data(rng, [6] * 6, 5, np.float64)

    def f(params, x, y):
        return _residual_loss(params, x, y)

    def hvp_like(params, x, y):  # a gradient of a gradient: d/dx of |d loss / d params|^2
        g = jg.grad(f)(params, x, y)
        return sum(jg.sum(w * w) + jg.sum(b * b) for w, b in g)

    for fn in (f, hvp_like):
        base = jg.jit(jg.grad(fn, argnums=(0, 1)), backend="interpret")(params, x, y)
        sqrt = jg.jit(jg.grad(fn, argnums=(0, 1)), backend="interpret", remat="sqrt")
        assert _same_bits(base, sqrt(params, x, y))
    assert any(i.role == "recompute" for i in sqrt.program.instrs)


def test_train_step_with_remat_updates_identically():
    widths = [20] * 8
    runs = []
    for options in ({}, {"remat": "sqrt"}):
        params, x, y = _data(np.random.default_rng(5), widths, 32)
        step = jg.train_step(_chain_loss, params, jg.optim.SGD(lr=0.1, momentum=0.9), **options)
        losses = [step(x, y) for _ in range(3)]
        runs.append((losses, params))
    assert _same_bits(runs[0], runs[1])


# ---------------------------------------------------------------- jg.checkpoint

def test_checkpoint_region_interior_is_recomputed():
    rng = np.random.default_rng(6)
    params, x, y = _data(rng, [16] * 7, 32)

    def block(h, w, b):
        return jg.relu(h @ w + b)

    def loss(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = jg.checkpoint(block)(h, w, b) if 1 <= i <= 4 else block(h, w, b)
        return jg.softmax_cross_entropy(h, y)

    prog, report = _lowered(loss, (params, x, y))
    rec = [i for i in prog.instrs if i.role == "recompute"]
    assert rec and all(i.checkpoint is not None for i in rec)
    assert len(report.stored) < len(report.saved)
    base = jg.jit(jg.value_and_grad(_chain_loss))(params, x, y)
    assert _same_bits(base, jg.jit(jg.value_and_grad(loss))(params, x, y))
    # eagerly (no trace) a checkpointed function is just the function
    np.testing.assert_array_equal(jg.checkpoint(block)(x, *params[0]), block(x, *params[0]))


# ---------------------------------------------------------------- sqrt and budgets

def test_sqrt_keeps_about_sqrt_n_activations_on_a_32_layer_chain():
    rng = np.random.default_rng(7)
    width, batch = 64, 512
    args = _data(rng, [width] * 33, batch)
    act = width * batch * 4
    prog, report = _lowered(_chain_loss, args)
    sprog, sreport = _lowered(_chain_loss, args, remat="sqrt")
    assert len(report.stored) == 32 and 4 <= len(sreport.stored) <= 9
    assert _arena(prog) >= 32 * act
    assert _arena(sprog) <= 14 * act
    # each dropped layer is recomputed once: ~3 instructions (matmul, add, relu) a layer
    dropped = len(sreport.saved) - len(sreport.stored)
    assert sreport.recompute_instrs <= 3 * dropped + 3


def test_full_is_a_checkpoint_around_the_whole_function():
    # What the README says of remat="full": nothing stored, the whole forward pass
    # recomputed once from the arguments, the same as jg.checkpoint(fn), and on a chain
    # no smaller an arena than without recomputation.
    args = _data(np.random.default_rng(12), [32] * 9, 64)
    prog, _ = _lowered(_chain_loss, args)
    fprog, freport = _lowered(_chain_loss, args, remat="full")
    cprog, creport = _lowered(jg.checkpoint(_chain_loss), args)
    assert freport.stored == []
    forward = [i.prim for i in prog.instrs if i.role == "forward" and i.prim.name != "const"]
    recomputed = [i.prim for i in fprog.instrs if i.role == "recompute"]
    assert recomputed == forward[:-1]  # all but the loss, which backward does not read
    assert [i.prim for i in fprog.instrs] == [i.prim for i in cprog.instrs]
    assert creport.recompute_flops == freport.recompute_flops
    assert _arena(fprog) >= 0.95 * _arena(prog)


def test_budget_is_respected_and_infeasible_budget_names_the_smallest():
    rng = np.random.default_rng(8)
    args = _data(rng, [32] * 13, 128)
    prog, _ = _lowered(_chain_loss, args)
    full = _arena(prog)
    with pytest.raises(jg.JitgradError, match=r"cannot be met: the smallest arena this "
                                              r"planner fits is (\d+) bytes") as err:
        _lowered(_chain_loss, args, memory_budget=full // 10)
    smallest = int(err.value.args[0].split("fits is ")[1].split(" ")[0])
    assert smallest < full
    # it says what that arena stores and what it recomputes, and the two add up
    kept, other = map(int, re.search(r"\(storing (\d+) of the 12 values saved for backward "
                                     r"and recomputing the other (\d+)\)",
                                     str(err.value)).groups())
    assert 0 < kept < 12 and kept + other == 12
    sprog, _ = _lowered(_chain_loss, args, memory_budget=smallest)
    assert _arena(sprog) <= smallest
    # a budget above the need stores everything
    same, report = _lowered(_chain_loss, args, memory_budget=full)
    assert report.recompute_instrs == 0 and _arena(same) == full


def test_the_smallest_arena_says_what_it_stores_and_recomputes():
    say = remat.stores_and_recomputes
    assert say(3, 9) == "storing 3 of the 9 values saved for backward and recomputing the other 6"
    assert say(5, 5) == "storing all 5 values saved for backward and recomputing none"
    assert say(1, 1) == "storing the 1 value saved for backward and recomputing none"
    assert say(0, 4) == "storing none of the 4 values saved for backward and recomputing them all"
    assert "nothing to recompute" in say(0, 0)


@pytest.mark.parametrize("bad", [0, -5, 1.5, "4MiB", True])
def test_bad_policies_are_refused(bad):
    with pytest.raises(jg.JitgradError, match="memory_budget"):
        jg.jit(lambda x: x, memory_budget=bad)
    with pytest.raises(jg.JitgradError, match="remat"):
        jg.jit(lambda x: x, remat="everything")


def test_budget_cost_is_within_5_percent_of_the_exhaustive_optimum():
    # An uneven chain, activations larger than weights (as in training with a real batch):
    # the best subset is not a regular pattern.
    rng = np.random.default_rng(9)
    widths = [24, 48, 16, 64, 24, 40, 16, 56, 32]
    args = _data(rng, widths, 512)
    prog, report = _lowered(_chain_loss, args)
    saved = report.saved
    cands = remat.Candidates.of(prog, saved)
    table = {}
    for stored in itertools.product([False, True], repeat=len(saved)):
        chosen = {v for v, keep in zip(saved, stored) if keep}
        table[stored] = (_arena(remat.rematerialize(prog, chosen)), cands.recompute_cost(stored))
    peaks = sorted({p for p, _ in table.values()})
    checked = 0
    for budget in peaks[:: max(1, len(peaks) // 12)]:
        optimum = min(c for p, c in table.values() if p <= budget)
        out, rep = remat.apply(prog, memory_budget=budget, plan_of=lambda p: plan_program(p).plan)
        chosen = tuple(v in rep.stored for v in saved)
        assert table[chosen][0] <= budget
        assert table[chosen][1] <= 1.05 * optimum, (budget, table[chosen], optimum)
        checked += 1
    assert checked >= 8


def test_a_checkpoint_around_a_very_deep_network():
    # 600 layers in one region: recomputation walks them without recursion
    rng = np.random.default_rng(10)
    params, x, y = _data(rng, [4] * 601, 3, np.float64)
    region = jg.checkpoint(_chain_loss)
    prog, report = _lowered(region, (params, x, y))
    assert report.recompute_instrs >= 3 * 599
    base = jg.jit(jg.grad(_chain_loss), backend="interpret")(params, x, y)
    assert _same_bits(base, jg.jit(jg.grad(region), backend="interpret")(params, x, y))


def test_a_recomputed_loss_pairs_with_its_gradient():
    # The loss is read by backward (abs's VJP): "full" recomputes it beside the original
    # on the same inputs, and only the copy shares the fused pass with the gradient.
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(3, 4)), rng.integers(0, 4, 3)

    def f(x, y):
        return jg.abs(jg.softmax_cross_entropy(x, y)) + jg.sum(jg.abs(x))

    base = jg.jit(jg.value_and_grad(f))(x, y)
    full = jg.jit(jg.value_and_grad(f), remat="full")
    assert _same_bits(base, full(x, y))
    assert any(i.role == "recompute" for i in full.program.instrs)


# ---------------------------------------------------------------- the training step

# Every optimizer of the registry, and each update path of the ones with options
# (momentum, Nesterov, L2 weight decay added to the gradient, decoupled decay).
_OPTIMIZER_VARIANTS = {"sgd": [{}, {"momentum": 0.9}, {"weight_decay": 1e-4},
                               {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}],
                       "adam": [{}, {"weight_decay": 1e-4}]}
_OPTIMIZERS = [(name, kw) for name in jg.optim.OPTIMIZERS
               for kw in _OPTIMIZER_VARIANTS.get(name, [{}])]


def _planned_arena(entry, donate=None):
    return plan_program(entry.program, donate).plan.arena_bytes


@pytest.mark.parametrize("sizes", [[784] + [128] * 8 + [10], [64] * 33 + [10]],
                         ids=["8x128-batch1024", "32-layer-chain"])
def test_train_step_arena_is_the_gradient_arena_plus_optimizer_state(sizes):
    # Recomputation must work in the training step as in jit(grad): the update must not
    # keep activations or their gradients live (fusing a weight gradient into the
    # momentum or weight-decay sum once held every layer's until the end of the step).
    batch = 1024 if sizes[0] == 784 else 512
    x = np.zeros((batch, sizes[0]), np.float32)
    y = np.zeros(batch, np.int64)
    arenas: dict = {}
    for policy in (None, "sqrt"):
        params = jg.nn.mlp_init(sizes, 0)
        grad = _planned_arena(jg.jit(jg.grad(jg.nn.mlp_loss), remat=policy,
                                     backend="interpret").lower(params, x, y))
        for name, kw in _OPTIMIZERS:
            opt = jg.optim.OPTIMIZERS[name](**kw)
            step = jg.train_step(jg.nn.mlp_loss, params, opt, remat=policy,
                                 backend="interpret")
            state = sum(a.nbytes for a in tree.flatten(step.state)[0])
            arena = _planned_arena(step.lower(x, y), step.compiled.options["donate"])
            arenas[policy, name, str(kw)] = arena
            assert arena <= 1.05 * (grad + state), (policy, name, kw, arena, grad, state)
    # and recomputation pays off in every one of them
    for name, kw in _OPTIMIZERS:
        assert arenas["sqrt", name, str(kw)] < 0.8 * arenas[None, name, str(kw)], arenas
