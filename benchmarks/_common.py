"""Shared definitions for the benchmarks: MLP configs, data, thread pinning.

Every implementation (jitgrad, numpy, PyTorch, JAX) computes the same float32 SGD step:
forward through ReLU hidden layers, softmax cross-entropy (mean over the batch) plus
L2 weight decay 0.5·λ·Σ‖W‖² on the weight matrices (λ = 1e-4), backward, and
p -= lr·grad for every weight and bias.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

THREADS = 2
WEIGHT_DECAY = 1e-4
LR = 0.01

# name -> (layer widths, batch)
CONFIGS: dict[str, tuple[tuple[int, ...], int]] = {
    "tiny": ((64, 32, 32, 10), 32),
    "small": ((784, 128, 10), 64),
    "medium": ((784, 512, 512, 10), 128),
    "deep": ((256,) + (256,) * 32 + (10,), 64),
    "large": ((784, 2048, 2048, 2048, 10), 256),
}

# Variables that slow or skew OpenBLAS on some machines here (NUMBA_NOTES.md).
BLAS_SKEW_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")

THREAD_VARS = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "MKL_NUM_THREADS", "JITGRAD_NUM_THREADS")


def thread_env(env: dict[str, str] | None = None, threads: int = THREADS) -> dict[str, str]:
    """A copy of env with every thread pool pinned to `threads` and the BLAS-skewing
    variables removed (for benchmark subprocesses only)."""
    env = dict(os.environ if env is None else env)
    for k in THREAD_VARS:
        env[k] = str(threads)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                        f"intra_op_parallelism_threads={threads}").strip()
    for k in BLAS_SKEW_VARS:
        env.pop(k, None)
    return env


def pin_env_before_import(threads: int = THREADS) -> None:
    """Set the thread variables in this process (effective only before numpy/numba load)."""
    for k in THREAD_VARS:
        os.environ.setdefault(k, str(threads))


def pin_threads(threads: int | None = None) -> None:
    """Pin already-loaded pools: Numba's and every BLAS (threadpoolctl); by default to
    JITGRAD_NUM_THREADS (as set by thread_env / pin_env_before_import)."""
    if threads is None:
        threads = int(os.environ.get("JITGRAD_NUM_THREADS", THREADS))
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except Exception:
        pass


def layer_dims(config: str) -> list[tuple[int, int]]:
    widths, _ = CONFIGS[config]
    return list(zip(widths[:-1], widths[1:], strict=False))


def step_flops(config: str) -> int:
    """6·B·Σ in·out: forward (2) + the two backward matmuls (4) per layer."""
    _, batch = CONFIGS[config]
    return 6 * batch * sum(i * o for i, o in layer_dims(config))


def make_params(config: str, dtype="float32", seed: int = 0):
    """He-initialised [W0, b0, W1, b1, ...] as numpy arrays."""
    import numpy as np
    rng = np.random.default_rng(seed)
    params = []
    for i, o in layer_dims(config):
        params.append((rng.standard_normal((i, o)) * np.sqrt(2.0 / i)).astype(dtype))
        params.append(np.zeros(o, dtype) + np.asarray(0.01, dtype))
    return params


def make_batch(config: str, dtype="float32", seed: int = 1):
    import numpy as np
    widths, batch = CONFIGS[config]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, widths[0])).astype(dtype)
    y = rng.integers(0, widths[-1], batch).astype(np.int64)
    return x, y


def jitgrad_loss(params, x, y):
    """The MLP loss written with jitgrad operations."""
    import jitgrad as jg
    n = len(params) // 2
    h = x
    for i in range(n):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n - 1:
            h = jg.relu(h)
    l2 = jg.sum(params[0] * params[0])
    for i in range(1, n):
        l2 = l2 + jg.sum(params[2 * i] * params[2 * i])
    return jg.softmax_cross_entropy(h, y) + (0.5 * WEIGHT_DECAY) * l2


def make_jitgrad_step(config: str, dtype="float32", precision: str | None = None):
    """(step, params, x, y): a jg.train_step, not yet compiled (precision="bf16": mixed
    precision, bfloat16 GEMM operands)."""
    import jitgrad as jg
    params = make_params(config, dtype)
    x, y = make_batch(config, dtype)
    step = jg.train_step(jitgrad_loss, params, jg.optim.SGD(lr=LR), precision=precision)
    return step, params, x, y


def numpy_step_factory(config: str, dtype="float32"):
    """Hand-written numpy backprop, preallocating nothing but reusing arrays where natural."""
    import numpy as np
    params = make_params(config, dtype)
    x, y = make_batch(config, dtype)
    n = len(params) // 2
    lr = np.asarray(LR, dtype)
    wd = np.asarray(WEIGHT_DECAY, dtype)
    half_wd = np.asarray(0.5 * WEIGHT_DECAY, dtype)
    rows = np.arange(len(y))

    def step(x, y):
        acts = [x]
        h = x
        for i in range(n):
            z = h @ params[2 * i]
            z += params[2 * i + 1]
            if i < n - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
            h = z
        logits = acts[-1]
        m = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - m)
        s = e.sum(axis=1, keepdims=True)
        b = len(y)
        loss = float(np.mean(np.log(s[:, 0]) + m[:, 0] - logits[rows, y]))
        loss += float(half_wd * sum(np.vdot(params[2 * i], params[2 * i]) for i in range(n)))
        g = e / s
        g[rows, y] -= 1
        g *= np.asarray(1.0 / b, dtype)
        for i in reversed(range(n)):
            w = params[2 * i]
            gw = acts[i].T @ g
            gw += wd * w
            gb = g.sum(axis=0)
            if i > 0:
                g = g @ w.T
                g *= acts[i] > 0
            w -= lr * gw
            params[2 * i + 1] -= lr * gb
        return loss

    return step, params, x, y


def native_runner(cf, *args):
    """(call, keep): the bare native call of jitgrad-compiled `cf` on args — no argument
    conversion, no copying of results out of the arena (jitgrad internals; benchmarks only).
    `keep` holds the arrays the pointers refer to."""
    from jitgrad.frontend import api, tree
    entry = cf.lower(*args)
    arrays = [api._as_input_array(v, s)
              for v, s in zip(tree.flatten(tuple(args))[0], entry.sigs, strict=True)]
    ex = entry.executable
    run = ex.bare_call(arrays)  # the executable's interface: its native call alone
    run()
    return run, (arrays, ex)


def gemm_kernel(dtype="float32"):
    """The GEMM kernel jitgrad chooses (compiler/blas.py: every 2-d product of a program goes
    to one provider) wrapped in a small njit caller: call(spec) runs every row
    (pa, pb, pc, m, n, k, ta, tb) of an int64 array."""
    import numpy as np
    from numba import njit, types

    from jitgrad.compiler import blas, kernels
    dt = np.dtype(dtype)
    provider = blas.choose(blas.GemmShape(256, 256, 256, False, False, dt, dt))
    sym = provider.plain.symbol(dt)
    kernels.require([sym])
    gemm = types.ExternalFunction(sym, types.int64(*[types.int64] * 8))

    @njit
    def call(spec):
        for i in range(spec.shape[0]):
            gemm(spec[i, 0], spec[i, 1], spec[i, 2], spec[i, 3], spec[i, 4], spec[i, 5],
                 spec[i, 6], spec[i, 7])
        return 0

    return call


def median_ns(fn: Callable[[], object], calls: int) -> float:
    """The median time of one call of fn over `calls` calls, in nanoseconds."""
    times = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times)


def json_child(cmd: list[str], env: dict[str, str], what: str, **kw) -> dict:
    """Run a benchmark child process; the last JSON line it prints."""
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, **kw)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"child {what} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def alternate(rounds: int, variants: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Each variant once per round, in turn (each run its own process); the median over
    rounds of every figure, and of the load average after each run ("load1")."""
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, run in variants.items():
            res = run()
            res["load1"] = os.getloadavg()[0]
            results[name].append(res)
            print(f"round {r} {name}: {json.dumps(res)}", file=sys.stderr)
    return {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            for name, rs in results.items()}
