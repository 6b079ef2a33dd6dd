"""Side-by-side training-step benchmark: jitgrad vs hand-written numpy, PyTorch, JAX.

    python benchmarks/compare.py [--configs tiny,small,medium,deep,large,lenet5,widecnn]
                                 [--rounds 3] [--impls jitgrad,numpy,torch,torch_compile,jax]
                                 [--precision f32|bf16] [--loaded] [--json FILE]
    python benchmarks/compare.py --markdown   # quiet + loaded -> docs/performance.md, README
    python benchmarks/compare.py --profile medium      # jitgrad per-kernel profile of one step
    python benchmarks/compare.py --precision bf16 --impls jitgrad,torch   # mixed precision

    python benchmarks/compare.py --model gpt [--configs baby,wide]
                                 [--impls jitgrad,torch,torch_compile,jax]

With --model gpt the step is a GPT's (benchmarks/_gpt.py: nanoGPT's baby GPT and a
width-384, 6-layer, block-256 model; AdamW with clipping), reported in tokens/s and
GFLOP/s against PyTorch eager, torch.compile and JAX jit, in the same alternating rounds.

--loaded runs every worker beside a fixed competing load: two Python processes spinning
`while True: pass` (as many as the threads each implementation gets), started before the
rounds and stopped after them. --markdown measures both ways and rewrites the generated
sections of docs/performance.md and the README's table (CPU model, versions, date, load).

Each implementation × config runs in its own fresh process (`--worker IMPL CONFIG`, which
prints one JSON line), and the implementations alternate over the rounds: two BLAS/OpenMP
thread pools in one process distort each other, and the shared machine drifts
(NUMBA_NOTES.md). The step is the full float32 SGD step (forward, softmax cross-entropy +
L2 weight decay 1e-4, backward, update). Every worker runs with 2 threads and without
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in its environment.

Reported per config: median µs per step over rounds (each round's figure is itself the
median of several timing repeats), ratio to numpy and to JAX (the peer to beat), GFLOP/s
(6·B·Σ in·out per step), and for jitgrad the time to first result in a fresh process
(cache hit: a warm-up process runs first), the native call alone (no Python wrapper), and
the GEMM floor: the step's matmuls alone through the GEMM provider jitgrad chose.

With --precision bf16 every step is mixed precision: jitgrad's `precision="bf16"` and
PyTorch under `torch.autocast("cpu", dtype=torch.bfloat16)` (numpy and JAX have no such
policy and are skipped); the ratio column is then to PyTorch, and to jitgrad's float32
step measured in the same rounds ("÷ f32").

The conv-net configs (lenet5, widecnn: _cnn.py) run jitgrad, PyTorch eager (oneDNN
convolutions), torch.compile and JAX jit (numpy has no conv step here; torch.compile only
runs the conv nets); their GFLOP/s count the convolutions' GEMM work and their GEMM floor
is the step's im2col GEMMs alone through the convolutions' GEMM helper.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _cnn  # noqa: E402
import _common as C  # noqa: E402
import _gpt as GPT  # noqa: E402

IMPLS = ("jitgrad", "numpy", "torch", "torch_compile", "jax")
CONFIGS = [*C.CONFIGS, *_cnn.CNN_CONFIGS]


def applicable(impl: str, config: str) -> bool:
    cnn = config in _cnn.CNN_CONFIGS
    return not ((impl == "numpy" and cnn) or (impl == "torch_compile" and not cnn))


def step_flops(config: str) -> int:
    return _cnn.step_flops(config) if config in _cnn.CNN_CONFIGS else C.step_flops(config)


PEER = "jax"
# Mixed precision: PyTorch's autocast is the peer; jitgrad's float32 step runs beside it.
BF16_IMPLS = ("jitgrad", "torch", "jitgrad-f32")
BF16_PEER = "torch"
PRECISION = os.environ.get("JITGRAD_BENCH_PRECISION", "f32")  # the workers' policy


# ---------------------------------------------------------------- timing

def measure_calls(fn, target_s: float = 0.1, repeats: int = 7, min_calls: int = 1) -> list[float]:
    """Per-call µs for `repeats` samples of n calls each, n chosen so a sample takes ~target_s."""
    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < 0.03 or n < 2:
        fn()
        n += 1
    per = (time.perf_counter() - t) / n
    calls = max(min_calls, int(target_s / per))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append(1e6 * (time.perf_counter() - t) / calls)
    return out


# ---------------------------------------------------------------- workers

def worker_numpy(config: str) -> dict:
    import numpy as np  # noqa: F401
    step, params, x, y = C.numpy_step_factory(config)
    loss0 = step(x, y)
    first = time.perf_counter() - T_START
    C.pin_threads()
    return {"loss0": float(loss0), "first_s": first, "us": measure_calls(lambda: step(x, y))}


def worker_cnn_torch(config: str, compiled: bool) -> dict:
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", C.THREADS)))
    step = _cnn.torch_step(config, compiled, bf16=PRECISION == "bf16")
    loss0 = step()
    first = time.perf_counter() - T_START
    return {"loss0": float(loss0), "first_s": first, "us": measure_calls(step),
            "version": torch.__version__}


def worker_torch_compile(config: str) -> dict:
    return worker_cnn_torch(config, True)


def worker_torch(config: str) -> dict:
    if config in _cnn.CNN_CONFIGS:
        return worker_cnn_torch(config, False)
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", C.THREADS)))
    params = [torch.tensor(p, requires_grad=True) for p in C.make_params(config)]
    xn, yn = C.make_batch(config)
    x, y = torch.from_numpy(xn), torch.from_numpy(yn)
    opt = torch.optim.SGD(params, lr=C.LR)
    n = len(params) // 2
    bf16 = PRECISION == "bf16"

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h = x
            for i in range(n):
                h = torch.addmm(params[2 * i + 1], h, params[2 * i])
                if i < n - 1:
                    h = torch.relu(h)
            l2 = sum((params[2 * i] * params[2 * i]).sum() for i in range(n))
            loss = (torch.nn.functional.cross_entropy(h.float(), y)
                    + 0.5 * C.WEIGHT_DECAY * l2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    loss0 = step()
    first = time.perf_counter() - T_START
    return {"loss0": float(loss0), "first_s": first, "us": measure_calls(step),
            "version": torch.__version__}


def worker_jax(config: str) -> dict:
    import warnings
    warnings.filterwarnings("ignore", message=".*donat.*")
    if config in _cnn.CNN_CONFIGS:
        import jax
        step = _cnn.jax_step(config)
        loss0 = step()
        first = time.perf_counter() - T_START
        return {"loss0": float(loss0), "first_s": first, "us": measure_calls(step),
                "version": jax.__version__}
    import jax
    import jax.numpy as jnp
    n = len(C.layer_dims(config))

    def loss_fn(params, x, y):
        h = x
        for i in range(n):
            h = h @ params[2 * i] + params[2 * i + 1]
            if i < n - 1:
                h = jax.nn.relu(h)
        lse = jax.nn.logsumexp(h, axis=1)
        picked = jnp.take_along_axis(h, y[:, None], axis=1)[:, 0]
        l2 = sum(jnp.sum(params[2 * i] * params[2 * i]) for i in range(n))
        return jnp.mean(lse - picked) + 0.5 * C.WEIGHT_DECAY * l2

    def step_fn(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        return loss, [p - C.LR * g for p, g in zip(params, grads, strict=False)]

    step_jit = jax.jit(step_fn, donate_argnums=0)
    params = [jnp.asarray(p) for p in C.make_params(config)]
    xn, yn = C.make_batch(config)
    x, y = jnp.asarray(xn), jnp.asarray(yn.astype("int32"))
    state = {"p": params}

    def step():
        loss, state["p"] = step_jit(state["p"], x, y)
        return loss.block_until_ready()

    loss0 = step()
    first = time.perf_counter() - T_START
    return {"loss0": float(loss0), "first_s": first, "us": measure_calls(step),
            "version": jax.__version__}


def gemm_floor_fn(config: str, dtype="float32"):
    """A function running exactly the step's matmuls (forward X@W, backward X.T@G and G@W.T,
    the latter not for the first layer) through the GEMM kernel jitgrad chooses, in one
    native call, on buffers of the step's shapes."""
    import numpy as np

    run = C.gemm_kernel(dtype)
    rng = np.random.default_rng(0)
    _, batch = C.CONFIGS[config]
    keep, rows = [], []

    def buf(*shape):
        a = (rng.standard_normal(shape) * 0.1).astype(dtype)
        keep.append(a)
        return a.ctypes.data

    for li, (i, o) in enumerate(C.layer_dims(config)):
        X, W, Z, G, dW = buf(batch, i), buf(i, o), buf(batch, o), buf(batch, o), buf(i, o)
        rows.append((X, W, Z, batch, o, i, 0, 0))          # Z = X @ W
        rows.append((X, G, dW, i, o, batch, 1, 0))         # dW = X.T @ G
        if li > 0:
            dX = buf(batch, i)
            rows.append((G, W, dX, batch, i, o, 0, 1))     # dX = G @ W.T
    spec = np.array(rows, np.int64)
    run(spec)
    return (lambda: run(spec)), keep


def worker_jitgrad(config: str, profile: bool = False, precision: str | None = None) -> dict:
    """jitgrad's train_step; plus the bare native call, the GEMM floor (and a profile)."""
    import jitgrad  # noqa: F401  (timed: part of the time to first result)
    if precision is None:
        precision = PRECISION
    cnn = config in _cnn.CNN_CONFIGS
    step, params, x, y = (_cnn.jitgrad_step if cnn else C.make_jitgrad_step)(
        config, precision=precision)
    loss0 = step(x, y)
    first = time.perf_counter() - T_START
    C.pin_threads()
    out = {"loss0": float(loss0), "first_s": first, "us": measure_calls(lambda: step(x, y))}
    try:
        call, (keep, ex) = C.native_runner(step.compiled, params, step.state,
                                           step.optimizer.hyper(1), x, y)
        out["native_us"] = measure_calls(call)
        out["peak_bytes"] = int(ex.plan.arena_bytes)
        out["n_steps"] = ex.plan.n_steps
        if profile:
            out["profile"] = profile_steps(ex)
    except Exception as e:  # internals moved: keep the headline numbers
        out["native_error"] = repr(e)
    if precision == "f32":  # the float32 GEMM floor
        floor, keep2 = (_cnn.gemm_floor_fn if cnn else gemm_floor_fn)(config)
        out["gemm_floor_us"] = measure_calls(floor)
    return out


def worker_gpt(impl: str, config: str, profile: bool = False) -> dict:
    """One GPT step implementation (benchmarks/_gpt.py) in this fresh process."""
    if impl == "jitgrad":
        import jitgrad  # noqa: F401  (timed: part of the time to first result)
        step, params, x, y = GPT.jitgrad_step(config, precision=PRECISION)
        loss0 = float(step(x, y))
        out = {"first_s": time.perf_counter() - T_START}
        C.pin_threads()
        out["us"] = measure_calls(lambda: step(x, y), repeats=5)
        if profile:
            call, (_, ex) = C.native_runner(step.compiled, params, step.state,
                                            step.optimizer.hyper(1), x, y)
            out["native_us"] = measure_calls(call, repeats=5)
            out["profile"] = profile_steps(ex, reps=5)
    elif impl in ("torch", "torch_compile"):
        import torch
        step, loss0, compile_s = GPT.torch_step(config, compiled=impl == "torch_compile",
                                                bf16=PRECISION == "bf16")
        out = {"first_s": time.perf_counter() - T_START, "compile_s": compile_s,
               "us": measure_calls(step, repeats=5), "version": torch.__version__}
    else:
        import jax
        step, loss0 = GPT.jax_step(config)
        out = {"first_s": time.perf_counter() - T_START, "us": measure_calls(step, repeats=5),
               "version": jax.__version__}
    return {"loss0": loss0, **out}


def summarize_gpt(results: dict, configs: list[str], impls: list[str]) -> list[dict]:
    rows = []
    for cfg in configs:
        med = {i: statistics.median(statistics.median(r["us"]) for r in results[(i, cfg)]
                                    if "us" in r)
               for i in impls if any("us" in r for r in results[(i, cfg)])}
        for impl in impls:
            rs = [r for r in results[(impl, cfg)] if "us" in r]
            if not rs:
                rows.append({"config": cfg, "impl": impl,
                             "error": next((r.get("error") for r in results[(impl, cfg)]),
                                           None)})
                continue
            us = med[impl]
            rows.append({"config": cfg, "impl": impl, "us": us,
                         "rounds": [statistics.median(r["us"]) for r in rs],
                         "tokens_per_s": GPT.tokens_per_step(cfg) / us * 1e6,
                         "gflops": GPT.step_flops(cfg) / us / 1e3,
                         "vs": {i: us / med[i] for i in med if i != impl},
                         "first_s": statistics.median(r["first_s"] for r in rs),
                         "loss0": rs[0]["loss0"],
                         "load1": statistics.median(r.get("load1", 0.0) for r in rs)})
    return rows


def print_gpt_table(rows: list[dict], info: dict) -> None:
    others = [i for i in GPT.IMPLS if any(r.get("impl") == i for r in rows)]
    head = ["config", "impl", "ms/step", "tokens/s", "GFLOP/s"] + \
        [f"÷ {i}" for i in others] + ["1st result s", "loss0", "load"]
    policy = "bfloat16 autocast" if PRECISION == "bf16" else "float32"
    print(f"GPT training step ({policy}, AdamW + clipping), {info['cpu']} "
          f"({info['cores']} cores), {info.get('threads', 2)} threads; "
          f"{info.get('versions', '')}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['impl']} | error: {r['error']} |")
            continue
        ratios = [fmt(r["vs"].get(i), ".2f") if i != r["impl"] else "1" for i in others]
        print("| " + " | ".join([r["config"], r["impl"], fmt(r["us"] / 1e3, ",.1f"),
                                 fmt(r["tokens_per_s"], ",.0f"), fmt(r["gflops"], ".1f"),
                                 *ratios, fmt(r["first_s"], ".1f"), fmt(r["loss0"], ".4f"),
                                 fmt(r["load1"], ".1f")]) + " |")


def compare_gpt(a, configs: list[str]) -> int:
    """--model gpt: every implementation of GPT.IMPLS in its own process, alternating."""
    impls = [i for i in (a.impls.split(",") if a.impls else GPT.IMPLS) if i]
    impls = [i for i in impls if available(i)]
    info = machine()
    info["versions"] = versions([i for i in impls if i != "torch_compile"])
    info["threads"] = a.threads
    if "jitgrad" in impls:  # warm the cache
        for cfg in configs:
            r = run_worker("jitgrad", cfg)
            print(f"warm-up jitgrad {cfg}: {r.get('first_s', r.get('error'))}", file=sys.stderr)
    results = {(i, c): [] for i in impls for c in configs}
    for rnd in range(a.rounds):
        for cfg in configs:
            for impl in impls[rnd % len(impls):] + impls[:rnd % len(impls)]:
                r = run_worker(impl, cfg)
                results[(impl, cfg)].append(r)
                print(f"round {rnd + 1} {cfg:5} {impl:13} "
                      f"{statistics.median(r['us']) / 1e3 if 'us' in r else r.get('error')}",
                      file=sys.stderr)
    rows = summarize_gpt(results, configs, impls)
    print_gpt_table(rows, info)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "rows": rows,
                       "raw": {f"{i}/{c}": v for (i, c), v in results.items()}}, f, indent=1)
    return 0


# ---------------------------------------------------------------- per-kernel profile

def profile_steps(ex, reps: int = 30) -> dict:
    """Time every kernel call of the compiled step separately (through ctypes, in program
    order, on the real arena: the executable's `kernel_calls`), minus the measured
    ctypes call overhead."""
    import numpy as np

    calls = ex.kernel_calls()
    # ctypes overhead: a zero-length call of the cheapest kernel
    from jitgrad.compiler import kernels
    kernels.require(["jg_zero_b4"])
    zero = kernels.function("jg_zero_b4")
    scratch = np.zeros(1, np.float32)
    t = time.perf_counter_ns()
    for _ in range(2000):
        zero(scratch.ctypes.data, 0)
    overhead = (time.perf_counter_ns() - t) / 2000 / 1e3
    times = np.zeros((reps, len(calls)))
    for r in range(reps + 3):
        for j, c in enumerate(calls):
            t = time.perf_counter_ns()
            c.fn(*c.args)
            dt = (time.perf_counter_ns() - t) / 1e3
            if r >= 3:
                times[r - 3, j] = dt
    med = np.median(times, axis=0) - overhead
    rows = []
    for c, us in zip(calls, med, strict=True):
        kind, label = c.symbol[3:], c.label
        if c.symbol.startswith("jg_gemm"):
            a = c.named_args()  # decoded by the kernel's declared argument names
            kind = f"gemm {'TN' if a['ta'] else ('NT' if a['tb'] else 'NN')}"
            kind += "+acc" if c.symbol.startswith("jg_gemm_acc") else ""
            label = f"{kind} m={a['m']} n={a['n']} k={a['k']} ({c.label})"
        elif c.symbol.startswith("jg_fused"):
            kind = "fused " + c.label.split(" at ")[0][len("fused"):]
        rows.append({"sym": c.symbol, "kind": kind, "label": label, "us": float(max(us, 0.0))})
    return {"overhead_us": overhead, "calls": rows}


# ---------------------------------------------------------------- parent

def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Flags") and "avx512f" in line:
                info["isa"] = "AVX-512"
    except OSError:
        pass
    return info


def available(impl: str) -> bool:
    mod = {"jitgrad": "jitgrad", "jitgrad-f32": "jitgrad", "numpy": "numpy", "torch": "torch",
           "torch_compile": "torch",
           "jax": "jax"}[impl]
    import importlib.util
    return importlib.util.find_spec(mod) is not None


WORKER_THREADS = C.THREADS


def run_worker(impl: str, config: str, extra: list[str] | None = None,
               env: dict | None = None) -> dict:
    env = env or C.thread_env(threads=WORKER_THREADS)
    env["JITGRAD_BENCH_PRECISION"] = PRECISION
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, config] + (extra or [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env,
                       timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def summarize(results: dict, configs: list[str], impls: list[str]) -> list[dict]:
    rows = []
    for cfg in configs:
        med = {}
        impls_here = [i for i in impls if applicable(i, cfg)]
        for impl in impls_here:
            rs = [r for r in results[(impl, cfg)] if "us" in r]
            if rs:
                med[impl] = statistics.median(statistics.median(r["us"]) for r in rs)
        for impl in impls_here:
            rs = [r for r in results[(impl, cfg)] if "us" in r]
            if not rs:
                err = next((r.get("error") for r in results[(impl, cfg)]), None)
                rows.append({"config": cfg, "impl": impl, "error": err})
                continue
            us = med[impl]
            row = {"config": cfg, "impl": impl, "us": us,
                   "rounds": [statistics.median(r["us"]) for r in rs],
                   "vs_numpy": us / med["numpy"] if "numpy" in med else None,
                   "vs_peer": us / med[PEER] if PEER in med else None,
                   "vs_f32": us / med["jitgrad-f32"] if "jitgrad-f32" in med else None,
                   "gflops": step_flops(cfg) / us / 1e3,
                   "first_s": statistics.median(r["first_s"] for r in rs),
                   "loss0": rs[0]["loss0"],
                   "load1": statistics.median(r.get("load1", 0.0) for r in rs)}
            if impl == "jitgrad":
                for key in ("native_us", "gemm_floor_us"):
                    if all(key in r for r in rs):
                        row[key] = statistics.median(statistics.median(r[key]) for r in rs)
                row["peak_bytes"] = rs[0].get("peak_bytes")
                row["n_steps"] = rs[0].get("n_steps")
            rows.append(row)
    return rows


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def print_table(rows: list[dict], info: dict, new_compile: dict) -> None:
    bf16 = PRECISION == "bf16"
    head = ["config", "impl", "µs/step", "÷ f32" if bf16 else "÷ numpy",
            "÷ PyTorch bf16" if bf16 else "÷ JAX", "GFLOP/s", "1st result s",
            "native µs", "GEMM floor µs"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["config"], r["impl"], f"error: {r['error']}"] + [""] * 6)
            continue
        lines.append([r["config"], r["impl"], fmt(r["us"], ",.0f"),
                      fmt(r["vs_f32" if bf16 else "vs_numpy"], ".2f"),
                      fmt(r["vs_peer"], ".2f"), fmt(r["gflops"], ".1f"),
                      fmt(r["first_s"], ".2f"), fmt(r.get("native_us"), ",.0f"),
                      fmt(r.get("gemm_floor_us"), ",.0f")])
    print(f"machine: {info['cpu']}, {info['cores']} cores; {info.get('versions', '')}")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=False)]
    for ln in [head] + lines:
        print("  ".join(str(x).rjust(w) if i > 1 else str(x).ljust(w)
                        for i, (x, w) in enumerate(zip(ln, widths, strict=False))))
    if new_compile:
        print()
        print("jitgrad time to first result in a fresh process: "
              + ", ".join(f"{c} {v:.2f} s" for c, v in new_compile.items())
              + " (warm-up process; a new program unless this cache already held it)."
              " '1st result s' above is the median over rounds, a cache hit.")


def versions(impls: list[str]) -> str:
    code = ("import importlib, json; out = {{}}\n"
            "for m in {!r}:\n"
            "    try: out[m] = importlib.import_module(m).__version__\n"
            "    except Exception: pass\n"
            "print(json.dumps(out))").format(["numpy", "numba"] + [i for i in impls
                                                             if i in ("torch", "jax")],)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=C.thread_env())
    try:
        return ", ".join(f"{k} {v}" for k, v in json.loads(p.stdout).items())
    except ValueError:
        return ""


def print_profile(config: str, res: dict) -> None:
    prof = res["profile"]
    calls = prof["calls"]
    total = sum(c["us"] for c in calls)
    by_kind: dict[str, list[float]] = {}
    for c in calls:
        by_kind.setdefault(c["kind"], []).append(c["us"])
    step_us = statistics.median(res["us"])
    native = statistics.median(res["native_us"])
    floor = statistics.median(res.get("gemm_floor_us", [float("nan")]))  # MLP configs only
    print(f"jitgrad per-kernel profile, {config}: {len(calls)} kernel calls; "
          f"train_step {step_us:,.0f} µs, native call {native:,.0f} µs, "
          f"sum of kernels {total:,.0f} µs (ctypes overhead {prof['overhead_us']:.2f} µs/call "
          f"subtracted), GEMM floor {floor:,.0f} µs")
    print(f"{'kernel kind':58} {'calls':>5} {'µs':>10} {'share':>6}")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{kind[:58]:58} {len(us):5d} {sum(us):10,.1f} {100 * sum(us) / total:5.1f}%")
    print(f"{'Python wrapper (train_step − native call)':58} {'':5} "
          f"{step_us - native:10,.1f}")
    print("\ntop 12 calls:")
    for c in sorted(calls, key=lambda c: -c["us"])[:12]:
        print(f"  {c['us']:9,.1f} µs  {c['label'][:100]}")


# ---------------------------------------------------------------- competing load, docs

SPIN = "while True: pass"


def measure_rounds(configs: list[str], impls: list[str], rounds: int) -> dict:
    results = {(i, c): [] for i in impls for c in configs}
    for rnd in range(rounds):
        for cfg in configs:
            order = impls[rnd % len(impls):] + impls[:rnd % len(impls)]  # rotate who goes first
            for impl in (i for i in order if applicable(i, cfg)):
                r = run_worker(impl, cfg)
                results[(impl, cfg)].append(r)
                print(f"round {rnd + 1} {cfg:6} {impl:7} "
                      f"{statistics.median(r['us']) if 'us' in r else r.get('error')}",
                      file=sys.stderr)
    return results


def with_competing_load(n: int, run):
    """run() beside n processes spinning on a core each (stopped afterwards, even on error)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
    try:
        return run()
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def markdown_table(rows: list[dict], info: dict, new_compile: dict) -> str:
    head = ["config", "impl", "µs/step", "÷ numpy", "÷ JAX", "GFLOP/s", "1st result s",
            "native µs", "GEMM floor µs", "load"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 8) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | {r['impl']} | error: {r['error']} |" + " |" * 7)
            continue
        out.append("| " + " | ".join([
            r["config"], r["impl"], fmt(r["us"], ",.0f"), fmt(r["vs_numpy"], ".2f"),
            fmt(r["vs_peer"], ".2f"), fmt(r["gflops"], ".1f"), fmt(r["first_s"], ".2f"),
            fmt(r.get("native_us"), ",.0f"), fmt(r.get("gemm_floor_us"), ",.0f"),
            fmt(r.get("load1"), ".1f")]) + " |")
    if new_compile:
        out.append("")
        out.append("jitgrad time to first result in a fresh process (a new program): "
                   + ", ".join(f"{c} {v:.2f} s" for c, v in new_compile.items()) + ".")
    return "\n".join(out)


def readme_table(quiet: list[dict], loaded: list[dict], configs: list[str]) -> str:
    names = {"jitgrad": "jitgrad", "numpy": "numpy", "torch": "PyTorch eager",
             "torch_compile": "torch.compile", "jax": "JAX jit"}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in quiet)]

    def us(rows, cfg, impl):
        return next((r.get("us") for r in rows if r["config"] == cfg and r["impl"] == impl), None)

    out = ["| config | " + " | ".join(names[i] for i in impls) + " | jitgrad ÷ JAX | "
           "loaded: jitgrad | loaded: JAX |",
           "|---|" + "---:|" * (len(impls) + 3)]
    for cfg in (c for c in configs if c in C.CONFIGS):  # the MLPs; the conv nets: their doc
        widths, batch = C.CONFIGS[cfg]
        j, x = us(quiet, cfg, "jitgrad"), us(quiet, cfg, PEER)
        cells = [fmt(us(quiet, cfg, i), ",.0f") for i in impls]
        cells.append(fmt(j / x if j and x else None, ".2f"))
        cells += [fmt(us(loaded, cfg, "jitgrad"), ",.0f"), fmt(us(loaded, cfg, PEER), ",.0f")]
        shape = "-".join(map(str, widths)) if len(widths) < 8 else \
            f"{widths[0]}-({widths[1]}×{len(widths) - 2})-{widths[-1]}"
        out.append(f"| {cfg} {shape}, batch {batch} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def replace_section(path: str, marker: str, text: str) -> None:
    """Replace what lies between `<!-- marker:begin -->` and `<!-- marker:end -->`."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: no {begin} ... {end} section to regenerate")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}\n{end}{tail}")


def write_docs(info: dict, quiet: list[dict], loaded: list[dict], configs: list[str],
               new_compile: dict, rounds: int, spinners: int) -> None:
    root = os.path.dirname(HERE)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    where = (f"Measured {when} on {info['cpu']} ({info['cores']} cores"
             f"{', ' + info['isa'] if 'isa' in info else ''}), {info.get('threads', 2)} threads "
             f"per implementation, float32, Python {info['python']}; {info.get('versions', '')}; "
             f"{rounds} alternating rounds, each implementation in its own process, medians; "
             f"`load` is the 1-minute load average after each run (median).")
    doc = "\n\n".join([
        where, "**Without a competing load of our own** (anything else running on the "
        "machine shows in the load column):",
        markdown_table(quiet, info, new_compile),
        f"**Beside a competing load**: {spinners} processes spinning `{SPIN}`:",
        markdown_table(loaded, info, {})])
    replace_section(os.path.join(root, "docs", "performance.md"), "compare.py", doc)
    replace_section(os.path.join(root, "README.md"), "compare.py", "\n\n".join([
        f"{when}, {info['cpu']}, {info.get('threads', 2)} threads; "
        f"{info.get('versions', '')}; median µs per step; 'loaded': beside {spinners} "
        f"spinning processes (`python benchmarks/compare.py --markdown`).",
        readme_table(quiet, loaded, configs)]))


def main(argv: list[str] | None = None) -> int:
    global WORKER_THREADS, PRECISION, PEER
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("mlp", "gpt"), default="mlp",
                    help="mlp: the MLP and conv-net configs; gpt: the GPT steps (_gpt.py)")
    ap.add_argument("--configs", default=None, help="default: every config of the model")
    ap.add_argument("--impls", default=None,
                    help=f"default: {','.join(IMPLS)}; with --precision bf16 "
                         f"{','.join(BF16_IMPLS)}; with --model gpt {','.join(GPT.IMPLS)}")
    ap.add_argument("--precision", choices=("f32", "bf16"), default=PRECISION,
                    help="bf16: jitgrad precision='bf16' against PyTorch bf16 autocast")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markdown", action="store_true",
                    help="measure quiet and loaded; rewrite docs/performance.md and the README")
    ap.add_argument("--loaded", action="store_true",
                    help="run beside a competing load (--threads spinning processes)")
    ap.add_argument("--threads", type=int, default=C.THREADS,
                    help="threads for every implementation (default 2)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("--profile", metavar="CONFIG", help="per-kernel profile of jitgrad's step")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CONFIG"), help=argparse.SUPPRESS)
    ap.add_argument("--with-profile", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    PRECISION = a.precision

    if a.worker:
        impl, cfg = a.worker
        if cfg in GPT.CONFIGS:
            res = worker_gpt(impl, cfg, profile=a.with_profile)
        else:
            fn = {"jitgrad": worker_jitgrad, "numpy": worker_numpy, "torch": worker_torch,
                  "torch_compile": worker_torch_compile, "jax": worker_jax,
                  "jitgrad-f32": lambda c: worker_jitgrad(c, precision="f32")}[impl]
            res = fn(cfg, profile=True) if impl == "jitgrad" and a.with_profile else fn(cfg)
        res["load1"] = os.getloadavg()[0]  # the machine is shared: record how busy it was
        print(json.dumps(res))
        return 0

    if a.profile:
        res = run_worker("jitgrad", a.profile, ["--with-profile"])
        if "error" in res:
            print("profile failed:", res["error"])
            return 1
        print_profile(a.profile, res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0

    WORKER_THREADS = a.threads
    known = GPT.CONFIGS if a.model == "gpt" else CONFIGS
    configs = [c for c in (a.configs or ",".join(known)).split(",") if c]
    for c in configs:
        if c not in known:
            ap.error(f"unknown config {c!r}; choose from {', '.join(known)}")
    if a.model == "gpt":
        if a.markdown or a.loaded:
            ap.error("--model gpt compares steps on a quiet machine only (no --markdown, "
                     "--loaded)")
        return compare_gpt(a, configs)
    if PRECISION == "bf16":
        PEER = BF16_PEER
    a.impls = a.impls or ",".join(BF16_IMPLS if PRECISION == "bf16" else IMPLS)
    impls = [i for i in a.impls.split(",") if i]
    if PRECISION == "bf16" and a.markdown:
        ap.error("--markdown regenerates the float32 tables; run --precision bf16 without it")
    if PRECISION == "bf16" and any(i not in BF16_IMPLS for i in impls):
        ap.error(f"--precision bf16 compares {', '.join(BF16_IMPLS)} (numpy and JAX have no "
                 f"bfloat16 autocast)")
    skipped = [i for i in impls if not available(i)]
    impls = [i for i in impls if i not in skipped]
    if skipped:
        print(f"(not installed, skipped: {', '.join(skipped)})", file=sys.stderr)
    info = machine()
    info["versions"] = versions(impls)
    info["threads"] = a.threads

    new_compile = {}
    if "jitgrad" in impls:  # warm the cache; its first-result time is the new-program time
        for cfg in configs:
            r = run_worker("jitgrad", cfg)
            if "jitgrad-f32" in impls:
                run_worker("jitgrad-f32", cfg)
            if "first_s" in r:
                new_compile[cfg] = r["first_s"]
            print(f"warm-up jitgrad {cfg}: "
                  f"{r.get('first_s', r.get('error'))}", file=sys.stderr)
    spinners = a.threads
    if a.loaded and not a.markdown:
        results = with_competing_load(spinners, lambda: measure_rounds(configs, impls, a.rounds))
    else:
        results = measure_rounds(configs, impls, a.rounds)
    rows = summarize(results, configs, impls)
    print_table(rows, info, new_compile)
    dump = {"machine": info, "rows": rows, "new_compile_s": new_compile, "loaded": a.loaded,
            "raw": {f"{i}/{c}": v for (i, c), v in results.items()}}
    if a.markdown:
        loaded = with_competing_load(spinners, lambda: measure_rounds(configs, impls, a.rounds))
        loaded_rows = summarize(loaded, configs, impls)
        print(f"\nbeside {spinners} spinning processes:")
        print_table(loaded_rows, info, {})
        write_docs(info, rows, loaded_rows, configs, new_compile, a.rounds, spinners)
        dump["loaded_rows"] = loaded_rows
        dump["loaded_raw"] = {f"{i}/{c}": v for (i, c), v in loaded.items()}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dump, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
