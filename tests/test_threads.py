"""One compiled function called from several Python threads at once.

Every call must return the right values in arrays of its own, whatever the
other threads do meanwhile (each thread runs in an arena of its own).
"""

import threading

import numpy as np
import pytest

import jitgrad as jg

N_THREADS, N_CALLS = 4, 20


def model(x, W, b):
    h = jg.tanh(x @ W + b)
    return h, jg.sum(h * h, axis=1), jg.max_argmax(h, axis=1)[1]


def reference(x, W, b):
    h = np.tanh(x @ W + b)
    return h, np.sum(h * h, axis=1), np.argmax(h, axis=1)


def run_threads(work):
    """Run work(thread_index) in N_THREADS threads released together; re-raise failures."""
    start = threading.Barrier(N_THREADS)
    errors = []

    def target(t):
        try:
            start.wait()
            work(t)
        except BaseException as e:  # noqa: BLE001 (reported in the main thread)
            errors.append(e)

    threads = [threading.Thread(target=target, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("first_call_in_threads", [False, True])
def test_threads_get_correct_results_in_arrays_of_their_own(backend, first_call_in_threads):
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(16, 8)), rng.normal(size=8)
    inputs = [[rng.normal(size=(5, 16)) for _ in range(N_CALLS)] for _ in range(N_THREADS)]
    f = jg.jit(model)
    if not first_call_in_threads:  # else the threads race to trace and compile it
        f(inputs[0][0], W, b)
    results = [[None] * N_CALLS for _ in range(N_THREADS)]

    def work(t):
        for i, x in enumerate(inputs[t]):
            results[t][i] = f(x, W, b)

    run_threads(work)
    # checked only now: a result must survive every later call of every thread
    seen = set()
    for t in range(N_THREADS):
        for i, x in enumerate(inputs[t]):
            for got, want in zip(results[t][i], reference(x, W, b), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
                assert got.flags.owndata and id(got) not in seen
                seen.add(id(got))


def test_gradients_from_threads(backend):
    rng = np.random.default_rng(1)
    W = rng.normal(size=(6, 3))
    xs = [[rng.normal(size=(4, 6)) for _ in range(N_CALLS)] for _ in range(N_THREADS)]
    g = jg.jit(jg.grad(lambda W, x: jg.sum(jg.tanh(x @ W) ** 2)))
    results = [[None] * N_CALLS for _ in range(N_THREADS)]

    def work(t):
        for i, x in enumerate(xs[t]):
            results[t][i] = g(W, x)

    run_threads(work)
    for t in range(N_THREADS):
        for i, x in enumerate(xs[t]):
            h = np.tanh(x @ W)
            np.testing.assert_allclose(results[t][i], x.T @ (2 * h * (1 - h * h)), rtol=1e-12)


@pytest.mark.parametrize("check_finite", [False, True])
def test_train_steps_from_threads_apply_one_after_the_other(backend, check_finite):
    """train_step calls take turns: every step is applied whole, none is lost."""
    rng = np.random.default_rng(2)
    params = {"W": rng.normal(size=(3, 2))}
    x = rng.normal(size=(5, 3))

    def loss(p, x):
        return jg.sum(x @ p["W"])  # gradient x.T @ 1, independent of W: updates add up

    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.01), check_finite=check_finite)
    start = params["W"].copy()
    run_threads(lambda t: [step(x) for _ in range(N_CALLS)])
    grad = x.T @ np.ones((5, 2))
    np.testing.assert_allclose(params["W"], start - 0.01 * N_THREADS * N_CALLS * grad,
                               rtol=1e-12)
    assert step.t == N_THREADS * N_CALLS


def test_train_steps_from_threads_that_come_and_go():
    """Each short-lived thread gets a new arena, whose pointer table may take the memory of a
    finished thread's: it still needs the parameters' pointers (they were tracked by the
    table's id, and such a step read address 0: a segfault)."""
    rng = np.random.default_rng(2)
    params = {"W": rng.normal(size=(3, 2))}
    x = rng.normal(size=(5, 3))
    step = jg.train_step(lambda p, x: jg.sum(x @ p["W"]), params, jg.optim.SGD(lr=0.01))
    start = params["W"].copy()
    for _ in range(30):
        th = threading.Thread(target=lambda: [step(x) for _ in range(2)])
        th.start()
        th.join(timeout=600)
    np.testing.assert_allclose(params["W"], start - 0.01 * 60 * (x.T @ np.ones((5, 2))),
                               rtol=1e-12)
    assert step.t == 60
