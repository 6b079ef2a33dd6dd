"""jg.random and jg.nn.dropout: known answers, JAX's values, both backends, statistics.

Every sampler is checked three ways: against published or JAX values (Random123's
known-answer vectors always; jax.random when jax is installed), compiled against
interpreted (bitwise, normal within 2 ULP), and statistically, with fixed keys and bounds
of about five standard errors, so a failure means a real defect, not bad luck.
"""

import threading
import warnings

import numpy as np
import pytest
from gradcheck import assert_grads_close, check_grads, numeric_grad

import jitgrad as jg
from jitgrad.frontend.ops import random as R

M = 0xFFFFFFFF
# Random123's kat_vectors for threefry2x32_20: key, counter, result.
KAT = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
       ((M, M), (M, M), (0x1CB996FC, 0xBB002BE7)),
       ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]


EPS32 = float(np.finfo(np.float32).eps)


def ulps(a, b):
    """|a - b| in units in the last place, elementwise (same-sign floats)."""
    ints = {4: np.int32, 8: np.int64}[a.dtype.itemsize]
    return np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64))


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("key, counter, want", KAT)
def test_threefry_known_answers(key, counter, want):
    k = np.array(key, np.uint32)
    got = R.threefry2x32(k, np.array([counter[0]], np.uint32), np.array([counter[1]], np.uint32))
    assert (int(got[0][0]), int(got[1][0])) == want
    # the compiled kernels' hash, on a 64-bit counter
    c = np.int64(np.uint64((counter[0] << 32) | counter[1]).view(np.int64))
    hi, lo = R._threefry(np.uint32(key[0]), np.uint32(key[1]), c)
    assert (int(hi), int(lo)) == want


def test_keys_are_jax_keys():
    np.testing.assert_array_equal(jg.random.key(0), [0, 0])
    np.testing.assert_array_equal(jg.random.key(42), [0, 42])
    np.testing.assert_array_equal(jg.random.key(2**40 + 5), [256, 5])
    np.testing.assert_array_equal(jg.random.key(-1), [M, M])
    assert jg.random.key(np.int64(7)).dtype == np.uint32


# Values of jax 0.10.2 (jax_threefry_partitionable, its default) for key(0): they pin the
# layout even where jax is not installed.
def test_values_of_jax_for_key_0(backend):
    def draws(key):
        k1, k2 = jg.random.split(key)
        return (jg.random.bits(key, (4,)), jg.random.uniform(key, (4,)), k1, k2,
                jg.random.fold_in(key, 7), jg.random.randint(key, (4,), 0, 10))

    bits, unif, k1, k2, folded, ints = jg.jit(draws)(jg.random.key(0))
    np.testing.assert_array_equal(bits, [4070199207, 4202968722, 1427181096, 2012915765])
    np.testing.assert_array_equal(unif, np.float32([0.947667, 0.9785799, 0.33229148, 0.46866846]))
    np.testing.assert_array_equal(k1, [1797259609, 2579123966])
    np.testing.assert_array_equal(k2, [928981903, 3453687069])
    np.testing.assert_array_equal(folded, [2716826189, 292468403])
    np.testing.assert_array_equal(ints, [9, 0, 2, 3])
    assert ints.dtype == np.int32 and unif.dtype == np.float32 and bits.dtype == np.uint32


def test_matches_jax_when_installed():
    jax = pytest.importorskip("jax")
    jr = jax.random
    for seed in (0, 1, 123456789):
        key = jg.random.key(seed)
        jkey = jr.PRNGKey(seed)
        np.testing.assert_array_equal(jg.random.key(seed), np.asarray(jkey))
        for shape in ((), (5,), (3, 7), (1001,)):
            for dt in (np.uint8, np.uint16, np.uint32):
                np.testing.assert_array_equal(jg.random.bits(key, shape, dt),
                                              jr.bits(jkey, shape, dt))
            np.testing.assert_array_equal(jg.random.uniform(key, shape),
                                          jr.uniform(jkey, shape))
            # XLA contracts u * (max - min) + min into one FMA: a last-bit difference (of
            # the operands' scale: near 0 the result cancels)
            np.testing.assert_allclose(jg.random.uniform(key, shape, minval=-2.5, maxval=4),
                                       jr.uniform(jkey, shape, minval=-2.5, maxval=4),
                                       rtol=0, atol=4 * EPS32)
            np.testing.assert_array_equal(jg.random.bernoulli(key, 0.3, shape),
                                          jr.bernoulli(jkey, 0.3, shape))
            # ... which erf_inv amplifies a little (3 ulp at most over 10^5 values)
            np.testing.assert_allclose(jg.random.normal(key, shape), jr.normal(jkey, shape),
                                       rtol=4 * EPS32, atol=4 * EPS32)
            for lo, hi in ((0, 10), (-5, 3), (0, 2**31 - 1), (7, 7), (-2**31, 2**31 - 1)):
                np.testing.assert_array_equal(jg.random.randint(key, shape, lo, hi),
                                              jr.randint(jkey, shape, lo, hi))
            np.testing.assert_array_equal(jg.random.randint(key, shape, 0, 256, np.uint8),
                                          jr.randint(jkey, shape, 0, 256, np.uint8))
        np.testing.assert_array_equal(jg.random.split(key, 5), jr.split(jkey, 5))
        np.testing.assert_array_equal(jg.random.split(key, (2, 3)), jr.split(jkey, (2, 3)))
        for d in (0, 1, 99, 2**32 - 1):
            np.testing.assert_array_equal(jg.random.fold_in(key, d), jr.fold_in(jkey, d))
    with jax.enable_x64(True):
        for seed in (-1, 2**40 + 5):
            np.testing.assert_array_equal(jg.random.key(seed), np.asarray(jr.PRNGKey(seed)))
        key, jkey = jg.random.key(3), jr.PRNGKey(3)
        np.testing.assert_array_equal(jg.random.bits(key, (9,), np.uint64),
                                      jr.bits(jkey, (9,), np.uint64))
        np.testing.assert_array_equal(jg.random.uniform(key, (9,), np.float64),
                                      jr.uniform(jkey, (9,), np.float64))
        np.testing.assert_array_equal(jg.random.randint(key, (9,), -10**12, 10**12, np.int64),
                                      jr.randint(jkey, (9,), -10**12, 10**12, np.int64))
        # XLA's float64 erf_inv is another rational approximation: 30 ulp apart at most
        np.testing.assert_allclose(jg.random.normal(key, (999,), np.float64),
                                   jr.normal(jkey, (999,), np.float64), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------- compiled == interpreted

def draws(key, x):
    """One of each sampler, from keys split inside the program."""
    ks = jg.random.split(key, 8)
    return {
        "u8": jg.random.bits(ks[0], (7, 3), np.uint8),
        "u16": jg.random.bits(ks[0], (5,), np.uint16),
        "u32": jg.random.bits(ks[0], (33,)),
        "u64": jg.random.bits(ks[0], (9,), np.uint64),
        "uniform": jg.random.uniform(ks[1], (64, 3), minval=x[0], maxval=x[0] + 2),
        "uniform64": jg.random.uniform(ks[1], (17,), np.float64, -1.0, 3.0),
        "bernoulli": jg.random.bernoulli(ks[2], x[:3] * 0 + 0.25, (10, 3)),
        "randint": jg.random.randint(ks[3], (40,), -3, 12),
        "randint_traced": jg.random.randint(ks[3], (40,), x[1].astype(np.int64), 100),
        "randint8": jg.random.randint(ks[4], (40,), 0, 256, np.uint8),
        "dropout": jg.nn.dropout(ks[5], x, 0.25),
        "fold_in": jg.random.fold_in(key, (x[0] > 0).astype(np.int32) + 5),
        "normal": jg.random.normal(ks[6], (300,)),
        "normal64": jg.random.normal(ks[7], (300,), np.float64),
    }


@pytest.fixture(scope="module")
def compiled_draws():
    return jg.jit(draws, backend="numba")


X = np.linspace(-1.0, 1.0, 40).astype(np.float32)


def test_compiled_equals_interpreted(compiled_draws):
    for seed in (0, 7):
        key = jg.random.key(seed)
        got = compiled_draws(key, X)
        want = jg.jit(draws, backend="interpret")(key, X)
        eager = draws(key, X)
        for name in want:
            assert got[name].dtype == want[name].dtype == eager[name].dtype, name
            np.testing.assert_array_equal(want[name], eager[name], err_msg=name)
            if name.startswith("normal"):  # libm's log1p may differ in the last bit
                assert ulps(got[name], want[name]).max() <= 2, name
            else:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_new_key_never_recompiles(compiled_draws):
    a = compiled_draws(jg.random.key(1), X)
    b = compiled_draws(jg.random.key(2), X)
    c = compiled_draws(jg.random.key(1), X)
    assert len(compiled_draws._cache) == 1
    for name in a:
        np.testing.assert_array_equal(a[name], c[name])  # deterministic
    assert not np.array_equal(a["u32"], b["u32"]) and not np.array_equal(a["normal"], b["normal"])
    # the key is an input of the program, not a constant
    prog = compiled_draws.program
    assert prog.inputs[0].shape == (2,) and prog.inputs[0].dtype == np.uint32
    assert not any(v.shape == (2,) and v.dtype == np.uint32 for v in prog.consts)


@pytest.mark.parametrize("shape, dtype", [((1100, 1000), np.float32), ((1 << 20) + 3, np.uint32)])
def test_large_draws_run_in_parallel_and_agree(shape, dtype):
    # past R.PARALLEL_MIN the kernels run their prange loop
    size = int(np.prod(shape))
    assert size >= R.PARALLEL_MIN
    draw = jg.random.uniform if dtype == np.float32 else jg.random.bits
    f = jg.jit(lambda k: draw(k, shape, dtype), backend="numba")
    key = jg.random.key(5)
    np.testing.assert_array_equal(f(key), draw(key, shape, dtype))


def test_bits_are_positions_of_one_stream(backend):
    # element n depends only on (key, n): a longer draw extends a shorter one
    key = jg.random.key(11)
    f = jg.jit(lambda k: (jg.random.bits(k, (10,)), jg.random.bits(k, (4, 5))))
    short, long = f(key)
    np.testing.assert_array_equal(long.ravel()[:10], short)
    # split's keys are the 64-bit draws' two words
    wide = jg.random.bits(key, (3,), np.uint64)
    keys = jg.random.split(key, 3)
    np.testing.assert_array_equal((keys[:, 0].astype(np.uint64) << np.uint64(32)) | keys[:, 1],
                                  wide)


def test_split_unpacks_inside_jit(backend):
    def f(key):
        k1, k2 = jg.random.split(key)
        return k1, k2, jg.random.split(key, (2, 2))
    k1, k2, grid = jg.jit(f)(jg.random.key(3))
    keys = jg.random.split(jg.random.key(3))
    np.testing.assert_array_equal(k1, keys[0])
    np.testing.assert_array_equal(k2, keys[1])
    np.testing.assert_array_equal(grid.reshape(4, 2), jg.random.split(jg.random.key(3), 4))


def test_fold_in_takes_traced_steps(backend):
    f = jg.jit(lambda key, t: jg.random.fold_in(key, t))
    key = jg.random.key(0)
    for t in (0, 1, 1000):
        np.testing.assert_array_equal(f(key, np.uint32(t)), jg.random.fold_in(key, t))
    np.testing.assert_array_equal(f(key, np.uint32(0)), [0x6B200159, 0x99BA4EFE])  # KAT 1
    np.testing.assert_array_equal(jg.random.fold_in(key, np.int64(-1)),
                                  jg.random.fold_in(key, 2**32 - 1))


# ---------------------------------------------------------------- statistics

N = 1 << 18


@pytest.fixture(scope="module")
def samples():
    """Large draws from fixed keys, compiled once."""
    def f(key):
        ks = jg.random.split(key, 6)
        return (jg.random.uniform(ks[0], (N,)), jg.random.normal(ks[1], (N,)),
                jg.random.bernoulli(ks[2], 0.3, (N,)), jg.random.randint(ks[3], (N,), -4, 6),
                jg.random.uniform(ks[4], (N,)), jg.random.bits(ks[5], (N,)))
    return jg.jit(f, backend="numba")(jg.random.key(2024))


def test_uniform_moments_and_chi_square(samples):
    u = samples[0].astype(np.float64)
    assert u.min() >= 0 and u.max() < 1
    se = 1 / np.sqrt(N)
    assert abs(u.mean() - 0.5) < 5 * se * np.sqrt(1 / 12)
    assert abs(u.var() - 1 / 12) < 5 * se * np.sqrt(1 / 180)  # var of (u - 1/2)^2 is 1/180
    counts = np.bincount((u * 100).astype(int), minlength=100)
    chi2 = ((counts - N / 100) ** 2 / (N / 100)).sum()
    assert abs(chi2 - 99) < 5 * np.sqrt(2 * 99)


def test_normal_moments_and_tails(samples):
    z = samples[1].astype(np.float64)
    assert np.isfinite(z).all()
    se = 1 / np.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * se * np.sqrt(2)
    assert abs(np.mean(z ** 3)) < 5 * se * np.sqrt(15)
    assert abs(np.mean(z ** 4) - 3) < 5 * se * np.sqrt(96)
    tail = np.mean(np.abs(z) > 2)  # 4.55% beyond two standard deviations
    assert abs(tail - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / N)


def test_bernoulli_and_randint_frequencies(samples):
    b, r = samples[2], samples[3]
    assert b.dtype == np.bool_ and abs(b.mean() - 0.3) < 5 * np.sqrt(0.21 / N)
    assert r.min() == -4 and r.max() == 5
    counts = np.bincount(r + 4, minlength=10)
    chi2 = ((counts - N / 10) ** 2 / (N / 10)).sum()
    assert abs(chi2 - 9) < 5 * np.sqrt(2 * 9)


def test_split_keys_are_independent(samples):
    u1, u2, bits = samples[0], samples[4], samples[5]
    assert abs(np.corrcoef(u1, u2)[0, 1]) < 5 / np.sqrt(N)
    # consecutive values of one stream, and each bit position, look independent too
    assert abs(np.corrcoef(u1[:-1], u1[1:])[0, 1]) < 5 / np.sqrt(N)
    ones = np.unpackbits(bits.view(np.uint8)).reshape(N, 32).mean(axis=0)
    assert np.abs(ones - 0.5).max() < 5 * 0.5 / np.sqrt(N)
    # no two of many derived keys coincide, and children differ from their parent
    key = jg.random.key(0)
    children = jg.random.split(key, 1000)
    grandchildren = np.concatenate([jg.random.split(k, 3) for k in children[:300]])
    family = np.concatenate([children, grandchildren, key[None]])
    assert len({tuple(k) for k in family}) == len(family)
    # as in JAX's partitionable layout, split(key, n)[i] is fold_in(key, i)
    np.testing.assert_array_equal(children[:50], [jg.random.fold_in(key, i) for i in range(50)])


# ---------------------------------------------------------------- erf_inv and normal

def test_erf_inv_against_scipy():
    special = pytest.importorskip("scipy.special")
    x = np.linspace(-1, 1, 20001)[1:-1]
    np.testing.assert_allclose(R.erf_inv(x), special.erfinv(x), rtol=3e-14, atol=0)
    x32 = x.astype(np.float32)
    want = special.erfinv(x32.astype(np.float64))
    # float32: about 1 ulp in the middle; near ±1, the rounding of 1 - x² is amplified
    middle = np.abs(x32) <= 0.99
    np.testing.assert_allclose(R.erf_inv(x32)[middle], want[middle], rtol=5e-7, atol=0)
    np.testing.assert_allclose(R.erf_inv(x32), want, rtol=1e-5, atol=0)
    np.testing.assert_array_equal(R.erf_inv(np.array([-1.0, 1.0])), [-np.inf, np.inf])


def test_erf_inv_gradient_and_kernel():
    x = np.linspace(-0.9, 0.95, 7)
    check_grads(lambda v: jg.sum(R.erf_inv(v) ** 2), (x,), order=2)
    v = np.linspace(-1, 1, 4001, dtype=np.float32)
    for dtype in (np.float32, np.float64):
        got = jg.jit(R.erf_inv, backend="numba")(v.astype(dtype))
        want = R.erf_inv(v.astype(dtype))
        assert np.array_equal(np.isinf(got), np.isinf(want))
        assert ulps(got[1:-1], want[1:-1]).max() <= 2


# ---------------------------------------------------------------- dropout

def test_dropout_rates():
    key = jg.random.key(9)
    x = np.arange(1.0, 40001.0, dtype=np.float32)
    assert jg.nn.dropout(key, x, 0.0) is x
    np.testing.assert_array_equal(jg.nn.dropout(key, x, 1.0), np.zeros_like(x))
    y = jg.nn.dropout(key, x, 0.2)
    kept = y != 0
    assert abs(kept.mean() - 0.8) < 5 * np.sqrt(0.16 / x.size)
    np.testing.assert_array_equal(y[kept], x[kept] * np.float32(1 / 0.8))  # inverted dropout
    np.testing.assert_array_equal(kept, jg.random.bernoulli(key, 0.8, x.shape))


def test_dropout_gradient_uses_the_same_mask(backend):
    key = jg.random.key(4)
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))

    def loss(x):
        return jg.sum(jg.nn.dropout(key, jg.tanh(x), 0.4) * w)

    # finite differences see the same mask: the key is fixed
    assert_grads_close(jg.jit(jg.grad(loss))(x), numeric_grad(loss, (x,)))
    keep = jg.random.bernoulli(key, 0.6, x.shape)
    np.testing.assert_allclose(jg.jit(jg.grad(loss))(x),
                               np.where(keep, w / 0.6 * (1 - np.tanh(x) ** 2), 0), rtol=1e-12)


def test_dropout_compiled_equals_interpreted_with_recomputation():
    key = jg.random.key(1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 32)).astype(np.float32)
    W = (rng.normal(size=(32, 32)) * 0.2).astype(np.float32)

    def loss(W, x, key):
        h = x
        for i in range(3):  # a chain, so that recomputation has something to drop
            h = jg.nn.dropout(jg.random.fold_in(key, i), jg.relu(h @ W), 0.3)
        return jg.sum(h * h)

    g = jg.value_and_grad(loss)
    want = jg.jit(g, backend="interpret")(W, x, key)
    stored = jg.jit(g, backend="numba")(W, x, key)
    # the same masks: equal up to the GEMM provider's order of summation (MKL's is not
    # numpy's), and recomputation changes nothing at all
    np.testing.assert_allclose(stored[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(stored[1], want[1], rtol=1e-4, atol=1e-4)
    recomputed = jg.jit(g, backend="numba", remat="full")(W, x, key)
    np.testing.assert_array_equal(recomputed[0], stored[0])
    np.testing.assert_array_equal(recomputed[1], stored[1])


def test_mlp_dropout_option():
    params = jg.nn.mlp_init([4, 8, 8, 3], 0)
    x = np.ones((5, 4), np.float32)
    key = jg.random.key(0)
    plain = jg.nn.mlp_apply(params, x)
    dropped = jg.nn.mlp_apply(params, x, dropout_rate=0.5, key=key)
    assert dropped.shape == plain.shape and not np.array_equal(dropped, plain)
    np.testing.assert_array_equal(jg.nn.mlp_apply(params, x, dropout_rate=0.0, key=key), plain)
    with pytest.raises(jg.JitgradError, match="needs a key"):
        jg.nn.mlp_apply(params, x, dropout_rate=0.5)


# ---------------------------------------------------------------- train_step's key

def test_train_step_folds_the_step_into_the_key(backend):
    params = {"w": np.zeros(3, np.float32)}
    seen = []

    def loss_fn(params, x, key):
        # the gradient is the step's uniform draw: each update shows the key it used
        return jg.sum(params["w"] * jg.random.uniform(key, (3,))) + jg.sum(x) * 0

    key = jg.random.key(5)
    step = jg.train_step(loss_fn, params, jg.optim.SGD(lr=1.0), key=key)
    for t in range(3):
        before = params["w"].copy()
        step(np.ones(2, np.float32))
        seen.append(before - params["w"])
        np.testing.assert_array_equal(seen[-1], jg.random.uniform(jg.random.fold_in(key, t), (3,)))
    assert len(step.compiled._cache) == 1  # neither a new step nor a new key recompiles
    key[...] = 0  # train_step keeps a copy of its key
    assert step.key[1] == 5


def test_train_step_key_errors():
    params = {"w": np.zeros(3, np.float32)}
    with pytest.raises(jg.JitgradError, match="uint32 array of shape"):
        jg.train_step(lambda p, key: jg.sum(p["w"]), params, jg.optim.SGD(), key=[1, 2])


def test_resume_with_dropout_is_bitwise(tmp_path):
    from jitgrad.training import checkpoint_io, recipe
    cfg = recipe.TrainConfig(hidden=(16,), batch_size=64, epochs=2, dropout=0.3)
    full = recipe.run_training(cfg, out=None)
    ck = tmp_path / "ck.npz"

    def ctrl_c(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(recipe.TrainingInterrupted):
        recipe.run_training(cfg, out=None, save=ck, on_epoch_end=ctrl_c)
    meta = checkpoint_io.load(ck)[2]
    np.testing.assert_array_equal(meta["key"], jg.random.key(0))
    assert meta["step"] == full.step.t // 2 and meta["config"]["dropout"] == 0.3
    resumed = recipe.run_training(cfg, out=None, resume=ck)
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k])
    assert resumed.metrics["train_loss"] == full.metrics["train_loss"]
    # without dropout the same seed trains to other parameters: the masks mattered
    plain = recipe.run_training(recipe.TrainConfig(hidden=(16,), batch_size=64, epochs=1), out=None)
    assert not np.array_equal(plain.params["W0"], full.params["W0"])


def test_restore_step_checks_the_key():
    from jitgrad.training import checkpoint_io
    step = jg.train_step(lambda p, key: jg.sum(p["w"]), {"w": np.zeros(2, np.float32)},
                         jg.optim.SGD(), key=jg.random.key(1))
    checkpoint_io.restore_step(step, {"step": 4, "key": [7, 8]})
    assert step.t == 4 and list(step.key) == [7, 8]
    checkpoint_io.restore_step(step, {"step": 5})  # a checkpoint without a key keeps ours
    assert step.t == 5 and list(step.key) == [7, 8]
    with pytest.raises(checkpoint_io.CheckpointError, match="key="):
        checkpoint_io.restore_step(step, {"step": 5, "key": [1, -2]})


# ---------------------------------------------------------------- np.random in a trace

def test_np_random_in_a_traced_function_warns(backend):
    def f(x):
        mask = np.random.rand(*x.shape) < 0.5  # frozen at trace time
        rng = np.random.default_rng(0)
        return jg.where(mask, x, 0.0) + rng.random()

    with pytest.warns(jg.JitgradWarning) as record:
        jg.jit(f)(np.ones(3))
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "np.random.rand" in messages[0] and "np.random.default_rng" in messages[1]
    assert all("jg.random" in m and "test_random.py:" in m for m in messages)
    assert all(w.filename.endswith("test_random.py") for w in record)  # the user's line
    # outside tracing nothing warns, and numpy's functions are back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.random.rand(2)
        np.random.default_rng(1)
    assert not hasattr(np.random.rand, "__wrapped__")
    assert not hasattr(np.random.default_rng, "__wrapped__")


def test_np_random_guard_is_scoped_to_the_tracing_thread():
    inside, done = threading.Event(), threading.Event()

    def slow(x):
        inside.set()
        assert done.wait(10)  # hold the trace open while the other thread draws
        return x * 2

    tracer = threading.Thread(target=lambda: jg.jit(slow, backend="interpret")(np.ones(2)))
    tracer.start()
    assert inside.wait(10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.random.normal(size=3)  # another thread, while a trace is open: no warning
    finally:
        done.set()
        tracer.join()
    assert not hasattr(np.random.normal, "__wrapped__")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("call, message", [
    (lambda: jg.random.uniform(np.zeros(2, np.int64), (3,)), "jg.random.uniform: the key must"),
    (lambda: jg.random.normal(np.zeros(3, np.uint32), (3,)), "jg.random.uniform: the key must"),
    (lambda: jg.random.bits(jg.random.key(0), (-1,)), "non-negative integers"),
    (lambda: jg.random.bits(jg.random.key(0), (3,), np.int32), "unsigned integer dtype"),
    (lambda: jg.random.uniform(jg.random.key(0), (3,), np.int32), "float32 or float64"),
    (lambda: jg.random.uniform(jg.random.key(0), (3,), minval=np.zeros(4)), "do not broadcast"),
    (lambda: jg.random.bernoulli(jg.random.key(0), np.array([1, 0])), "p must be a float"),
    (lambda: jg.random.randint(jg.random.key(0), (3,), 0.5, 3), "bounds must be integers"),
    (lambda: jg.random.fold_in(jg.random.key(0), 2**32), r"in \[0, 2\*\*32\)"),
    (lambda: jg.random.fold_in(jg.random.key(0), np.arange(2)), "integer scalar"),
    (lambda: jg.random.key(1.5), "the seed must be an integer"),
    (lambda: jg.random.key(2**64), "the seed must be an integer"),
    (lambda: jg.nn.dropout(jg.random.key(0), np.ones(3), 1.5), r"a number in \[0, 1\]"),
    (lambda: jg.nn.dropout(jg.random.key(0), np.ones(3, np.int32), 0.5), "float arrays"),
])
def test_bad_input_names_the_function_and_line(call, message):
    with pytest.raises(jg.JitgradError, match=message) as info:
        call()
    if "jg.random" in message:
        assert "test_random.py:" in str(info.value)


def test_bad_key_inside_jit_names_the_line():
    with pytest.raises(jg.JitgradError, match=r"jg.random.bits: the key must .* int32\[2\].*"
                                              r"test_random.py:\d+"):
        jg.jit(lambda k: jg.random.bits(k, (2,)), backend="interpret")(np.zeros(2, np.int32))
