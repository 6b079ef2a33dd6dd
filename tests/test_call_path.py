"""train_step's thin call path: after the first step, the parameters are neither flattened
nor re-checked; anything that can differ (the batch, the hyperparameters) still is."""

from __future__ import annotations

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.frontend import tree
from jitgrad.training import train


def mlp(layers=3, width=16, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for i in range(layers):
        params[f"W{i}"] = (rng.standard_normal((width, width)) * 0.3).astype(np.float32)
        params[f"b{i}"] = np.zeros(width, np.float32)
    x = rng.standard_normal((8, width)).astype(np.float32)
    y = rng.integers(0, width, 8)
    return params, x, y


def loss(p, x, y):
    h = x
    for i in range(len(p) // 2):
        h = jg.relu(h @ p[f"W{i}"] + p[f"b{i}"])
    return jg.softmax_cross_entropy(h, y) + 1e-3 * jg.sum(p["W0"] * p["W0"])


def copies(params):
    return {k: v.copy() for k, v in params.items()}


@pytest.fixture
def flattened(monkeypatch):
    """The trees train.py flattens, by id."""
    seen: list[int] = []
    real = train.tree.flatten

    def spy(t, *a, **kw):
        seen.append(id(t))
        return real(t, *a, **kw)
    monkeypatch.setattr(train.tree, "flatten", spy)
    return seen


def test_later_steps_do_not_walk_the_parameters_and_match_the_full_path(flattened):
    params, x, y = mlp()
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1, momentum=0.9))
    full = jg.train_step(loss, copies(params), jg.optim.SGD(lr=0.1, momentum=0.9))
    step(x, y)
    full(x, y)
    flattened.clear()
    for _ in range(3):
        got = step(x, y)
        full._fast = None  # the full path every time
        want = full(x, y)
        assert got.tobytes() == want.tobytes()
    assert id(params) not in flattened and id(step.params) not in flattened
    for k in params:
        assert params[k].tobytes() == full.params[k].tobytes()
    assert step.t == full.t == 4


def test_what_can_differ_is_still_checked():
    params, x, y = mlp()
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1))
    step(x, y)
    before = copies(params)
    with pytest.raises(jg.JitgradError, match="out of range"):
        step(x, np.full_like(y, 99))  # labels: the kernel rejects them, nothing is updated
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
    step(x.astype(np.float64), y)        # another dtype: a program of its own
    step(x[:4].copy(), y[:4])            # a new shape: compiled again
    step(np.asfortranarray(x), y)        # not contiguous: copied in
    assert step.t == 4
    assert np.isfinite(step(x, y))


def test_a_schedule_reaches_the_fast_path():
    params, x, y = mlp()
    seen = []

    def schedule(lr, t):
        seen.append(t)
        return lr / t
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1, schedule=schedule))
    ref = jg.train_step(loss, copies(params), jg.optim.SGD(lr=0.1, schedule=schedule),
                        backend="interpret")
    for _ in range(3):
        np.testing.assert_allclose(step(x, y), ref(x, y), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(params[k], ref.params[k], rtol=1e-5, atol=1e-6)


def test_a_keyed_step_folds_in_each_step_count():
    params, x, y = mlp()

    def dropped(p, x, y, key):
        return loss(p, jg.nn.dropout(key, x, 0.5), y)
    step = jg.train_step(dropped, params, jg.optim.SGD(lr=0.1), key=jg.random.key(3))
    full = jg.train_step(dropped, copies(params), jg.optim.SGD(lr=0.1), key=jg.random.key(3))
    for _ in range(3):
        full._fast = None
        assert step(x, y).tobytes() == full(x, y).tobytes()
    for k in params:
        assert params[k].tobytes() == full.params[k].tobytes()


def test_new_parameter_arrays_take_the_full_path_again():
    params, x, y = mlp()
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1))
    step(x, y)
    fresh = copies(params)
    step.params = fresh
    step(x, y)
    assert not np.array_equal(fresh["W0"], params["W0"])  # the new arrays were updated


def test_an_array_replaced_inside_params_is_trained_not_the_old_one():
    params, x, y = mlp()
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1, momentum=0.9))
    step(x, y)
    step(x, y)  # the thin path from here on
    new = params["W1"] * 0.5
    params["W1"] = new          # the user's dict, as step.params holds it
    ref_params = copies(params)
    ref = jg.train_step(loss, ref_params, jg.optim.SGD(lr=0.1, momentum=0.9),
                        backend="interpret")
    ref.state = jg.tree.map(np.copy, step.state)
    ref.t = step.t
    for _ in range(2):
        np.testing.assert_allclose(step(x, y), ref(x, y), rtol=1e-5)
    assert params["W1"] is new
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6)
    step.state = jg.tree.map(np.zeros_like, step.state)  # a new state: seen as well
    ref.state = jg.tree.map(np.zeros_like, ref.state)
    np.testing.assert_allclose(step(x, y), ref(x, y), rtol=1e-5)
    for k in params:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", ["read-only", "not contiguous"])
def test_a_replaced_array_that_cannot_be_updated_in_place_is_named(bad):
    params, x, y = mlp()
    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1))
    step(x, y)
    step(x, y)
    new = params["W0"].copy()
    if bad == "read-only":
        new.flags.writeable = False
    else:
        new = np.asfortranarray(new)
    params["W0"] = new
    before = copies(params)
    with pytest.raises(jg.JitgradError, match=r"params\['W0'\] is (read-only|not)"):
        step(x, y)
    for k in params:  # nothing was updated
        np.testing.assert_array_equal(params[k], before[k])


def test_same_leaves_sees_replacements_at_every_depth():
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: np.ndarray
        b: dict
    a, b, c = np.zeros(2), np.ones(2), np.ones(3)
    t = {"x": [a, (b, None)], "y": Pair(c, {"z": a})}
    same = tree.same_leaves(t)
    assert same(t)
    t["x"][0] = a.copy()
    assert not same(t)
    t["x"][0] = a
    t["y"].b["z"] = b
    assert not same(t)
    t["y"].b["z"] = a
    t["y"].b["extra"] = a
    assert not same(t)
    del t["y"].b["extra"]
    assert same(t)
    t["x"] = tuple(t["x"])  # a list became a tuple: not the same containers
    assert not same(t)
