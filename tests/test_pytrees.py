"""Pytrees as JAX users write them: NamedTuples, dataclasses and registered classes beside
dicts, lists and tuples, through jg.tree.*, jit, grad, train_step and checkpoints, on both
backends (the `backend` fixture)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pytest
from gradcheck import assert_grads_close, numeric_grad

import jitgrad as jg
from jitgrad.training import checkpoint_io


class Dense(NamedTuple):
    W: np.ndarray
    b: np.ndarray


@dataclasses.dataclass
class MLP:
    hidden: Dense
    out: Dense
    activation: str = dataclasses.field(default="tanh", metadata={"static": True})


class Scaled:
    """A user class registered as a container: its value is an array, its scale is static."""

    def __init__(self, value, scale):
        self.value, self.scale = value, scale


jg.tree.register(Scaled, lambda s: ((s.value,), s.scale), lambda scale, ch: Scaled(ch[0], scale))


def make_mlp(rng, activation="tanh", dtype=np.float64):
    def dense(i, o):
        return Dense((rng.normal(size=(i, o)) * 0.5).astype(dtype), np.zeros(o, dtype) + 0.1)
    return MLP(dense(4, 5), dense(5, 3), activation)


def apply(m: MLP, x):
    act = jg.relu if m.activation == "relu" else jg.tanh  # a static field: a Python value
    h = act(x @ m.hidden.W + m.hidden.b)
    return h @ m.out.W + m.out.b


def mlp_loss(m: MLP, x, y):
    return jg.softmax_cross_entropy(apply(m, x), y)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return make_mlp(rng), rng.normal(size=(6, 4)), rng.integers(0, 3, 6)


# ---------------------------------------------------------------- jg.tree

def test_tree_functions_follow_jax_tree():
    s = Scaled(np.ones(2), 3.0)
    t = {"mlp": make_mlp(np.random.default_rng(1)), "xs": [np.zeros(1), None, (s,)]}
    leaves = jg.tree.leaves(t)
    assert len(leaves) == 4 + 1 + 1
    structure = jg.tree.structure(t)
    assert repr(structure) == ("TreeDef({'mlp': MLP(hidden=Dense(W=*, b=*), out=Dense(W=*, "
                               "b=*)), 'xs': [*, None, (Scaled(*),)]})")
    assert structure.num_leaves == 6
    doubled = jg.tree.map(lambda a: a * 2, t)
    assert isinstance(doubled["mlp"], MLP) and isinstance(doubled["mlp"].out, Dense)
    assert doubled["mlp"].activation == "tanh" and doubled["xs"][1] is None
    assert doubled["xs"][2][0].scale == 3.0
    np.testing.assert_array_equal(doubled["xs"][2][0].value, [2.0, 2.0])
    summed = jg.tree.map(lambda a, b: a + b, t, doubled)
    np.testing.assert_array_equal(summed["mlp"].hidden.W, 3 * t["mlp"].hidden.W)
    leaves, td = jg.tree.flatten(t)
    back = jg.tree.unflatten(td, leaves)
    assert jg.tree.structure(back) == structure and back["mlp"].hidden.W is leaves[0]


def test_the_structure_includes_static_fields_and_aux_data():
    a, b = make_mlp(np.random.default_rng(1)), make_mlp(np.random.default_rng(1), "relu")
    assert jg.tree.structure(a) != jg.tree.structure(b)
    assert jg.tree.structure(Scaled(1.0, 2)) != jg.tree.structure(Scaled(1.0, 3))


def test_tree_errors_are_clear():
    with pytest.raises(jg.JitgradError, match=r"jg.tree.map: structures differ: \[\*, \*\] "
                       r"and \[\*\]"):
        jg.tree.map(lambda a, b: a, [1, 2], [1])
    with pytest.raises(jg.JitgradError, match=r"Scaled is already a pytree container"):
        jg.tree.register(Scaled, lambda s: ((s.value,), None), lambda aux, ch: Scaled(*ch, 1))
    with pytest.raises(jg.JitgradError, match=r"dict is already a pytree container"):
        jg.tree.register(dict, lambda d: (d.values(), None), lambda aux, ch: dict(ch))
    with pytest.raises(jg.JitgradError, match=r"dict in a pytree must be sortable"):
        jg.tree.leaves({1: np.ones(1), "a": np.ones(1)})
    with pytest.raises(jg.JitgradError, match=r"too few leaves for the structure \[\*, \*\]"):
        jg.tree.unflatten(jg.tree.structure([1, 2]), [1])


# ---------------------------------------------------------------- jit and grad

def test_containers_round_trip_through_jit(backend, data):
    m, x, _ = data
    f = jg.jit(lambda m, s, x: (Dense(apply(m, x), m.out.b * s.scale),
                                Scaled(s.value * 2.0, s.scale)))
    out, scaled = f(m, Scaled(np.ones(3), 4.0), x)
    assert isinstance(out, Dense) and isinstance(scaled, Scaled) and scaled.scale == 4.0
    np.testing.assert_allclose(out.W, np.tanh(x @ m.hidden.W + m.hidden.b) @ m.out.W + m.out.b)
    np.testing.assert_allclose(out.b, m.out.b * 4.0)
    np.testing.assert_allclose(scaled.value, 2.0)


def test_a_new_static_field_or_aux_value_compiles_again(backend, data):
    m, x, _ = data
    traces = []

    def f(m, s, x):
        traces.append(m.activation)
        return apply(m, x) * s.scale

    cf = jg.jit(f)
    relu = dataclasses.replace(m, activation="relu")
    np.testing.assert_allclose(cf(m, Scaled(np.ones(1), 2.0), x), 2.0 * apply(m, x))
    np.testing.assert_allclose(cf(relu, Scaled(np.ones(1), 2.0), x), 2.0 * apply(relu, x))
    cf(relu, Scaled(np.zeros(1), 2.0), x)  # new leaves only: no trace
    cf(relu, Scaled(np.zeros(1), 3.0), x)
    assert traces == ["tanh", "relu", "relu"]


def test_unhashable_aux_data_is_a_clear_error():
    with pytest.raises(jg.JitgradError, match=r"structure is not hashable: the static part of "
                       r"a Scaled \(list \[1, 2\]\).*test_pytrees\.py"):
        jg.jit(lambda s: s.value)(Scaled(np.ones(1), [1, 2]))


def test_grad_mirrors_the_container(backend, data):
    m, x, y = data
    g = jg.grad(mlp_loss)(m, x, y)
    assert isinstance(g, MLP) and isinstance(g.hidden, Dense) and g.activation == "tanh"
    assert_grads_close(g, numeric_grad(mlp_loss, (m, x, y), 0))
    value, g2 = jg.jit(jg.value_and_grad(mlp_loss))(m, x, y)
    np.testing.assert_allclose(value, mlp_loss(m, x, y))
    for a, b in zip(jg.tree.leaves(g), jg.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_an_unregistered_class_is_named_with_the_way_out():
    class Opaque:
        pass

    with pytest.raises(jg.JitgradError, match=r"args\[0\]\.W: unsupported argument of type "
                       r"Opaque.*jg.tree.register"):
        jg.jit(lambda d: d.W)(Dense(Opaque(), np.ones(1)))


# ---------------------------------------------------------------- train_step and checkpoints

def test_train_step_and_checkpoints_with_containers(backend, data, tmp_path):
    m0, x, y = data
    m = jg.tree.map(np.copy, m0)
    as_dict = {"W0": m0.hidden.W.copy(), "b0": m0.hidden.b.copy(), "W1": m0.out.W.copy(),
               "b1": m0.out.b.copy()}

    def dict_loss(p, x, y):
        return mlp_loss(MLP(Dense(p["W0"], p["b0"]), Dense(p["W1"], p["b1"])), x, y)

    opt = jg.optim.SGD(lr=0.5, momentum=0.9)
    step, ref = jg.train_step(mlp_loss, m, opt), jg.train_step(dict_loss, as_dict, opt)
    assert isinstance(step.state["momentum"], MLP)
    losses = [float(step(x, y)) for _ in range(5)]
    ref_losses = [float(ref(x, y)) for _ in range(5)]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(m.out.W, as_dict["W1"], rtol=1e-12)  # updated in place

    path = checkpoint_io.save(tmp_path / "ck.npz", step.params, step.state, {"t": 5})
    params, state, meta = checkpoint_io.load(path)
    assert meta == {"t": 5} and set(params) == {"hidden", "out"}  # fields, by name
    np.testing.assert_array_equal(params["out"]["W"], m.out.W)
    typed, typed_state, _ = checkpoint_io.load(path, target=(m0, step.state))
    assert isinstance(typed, MLP) and isinstance(typed.out, Dense)
    assert isinstance(typed_state["momentum"].hidden, Dense)
    np.testing.assert_array_equal(typed.hidden.W, m.hidden.W)

    fresh = jg.train_step(mlp_loss, jg.tree.map(np.zeros_like, m0), opt)
    checkpoint_io.restore_into(fresh.params, fresh.state, params, state)
    np.testing.assert_array_equal(fresh.params.hidden.b, m.hidden.b)
    np.testing.assert_allclose(float(fresh(x, y)), float(step(x, y)), rtol=1e-12)
    wrong = MLP(m0.hidden, Dense(np.ones((5, 2)), m0.out.b))
    with pytest.raises(checkpoint_io.CheckpointError, match=r"params/out/W has shape"):
        checkpoint_io.load(path, target=(wrong, step.state))
