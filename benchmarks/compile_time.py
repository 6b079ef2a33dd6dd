"""Compile latency of jitgrad's Numba backend, each case in a fresh process.

    python benchmarks/compile_time.py [--rounds 3] [--skip-cold] [--markdown]

Every case is timed from before `import jitgrad` to the first result of a new
`jg.train_step` (float32 SGD step of an MLP: forward, softmax cross-entropy + L2,
backward, update) in a new process with a fresh `JITGRAD_CACHE_DIR`:

* new medium MLP (784-512-512-10, batch 128), new 32-layer MLP and new 128-layer MLP
  (256-(256×(N−1))-10, batch 64): the cache directory is a copy of a warmed one that holds
  only the kernel library, so the program's glue and fused loops compile;
* medium again: the same directory a second time (cache hit);
* cold: an empty `JITGRAD_CACHE_DIR` *and* an empty `NUMBA_CACHE_DIR` (so the library
  kernels the step calls, with their own @njit helpers, compile from scratch), once.

The child also reports where the time went: import jitgrad, library kernels compiled or
loaded on first use (`kernels.load_seconds`), the rest of trace + plan + codegen +
compile/load (`lower`), first call.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

T_START = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402

PROGRAMS = {
    "medium": ((784, 512, 512, 10), 128),
    "mlp32": ((256,) * 32 + (10,), 64),
    "mlp128": ((256,) * 128 + (10,), 64),
}


def child(program: str) -> dict:
    t0 = T_START
    import jitgrad as jg
    from jitgrad.compiler import kernels
    t_import = time.perf_counter()
    C.CONFIGS[program] = PROGRAMS[program]
    params = C.make_params(program)
    x, y = C.make_batch(program)
    step = jg.train_step(C.jitgrad_loss, params, jg.optim.SGD(lr=C.LR))
    step.lower(x, y)  # compiles (or loads) the library kernels it calls on the way
    t_lower = time.perf_counter()
    loss = step(x, y)
    t_first = time.perf_counter()
    t_kernels = kernels.load_seconds()
    return {"total_s": t_first - t0, "import_s": t_import - t0, "kernels_s": t_kernels,
            "lower_s": t_lower - t_import - t_kernels, "first_call_s": t_first - t_lower,
            "loss": float(loss)}


def run_child(program: str, cache_dir: str, numba_cache: str | None = None) -> dict:
    env = C.thread_env()
    env["JITGRAD_CACHE_DIR"] = cache_dir
    if numba_cache:
        env["NUMBA_CACHE_DIR"] = numba_cache
    else:
        env.pop("NUMBA_CACHE_DIR", None)
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", program],
                       capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        raise RuntimeError(f"child {program} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def warmed_library_dir(root: str) -> str:
    """A cache directory holding only the compiled kernel library (every declared kernel)."""
    base = os.path.join(root, "base")
    os.makedirs(base, mode=0o700)
    env = C.thread_env()
    env["JITGRAD_CACHE_DIR"] = base
    warm = "from jitgrad.compiler import kernels; kernels.ensure_loaded()"
    subprocess.run([sys.executable, "-c", warm], check=True, env=env)
    return base


def fresh_copy(base: str, root: str, name: str) -> str:
    dst = os.path.join(root, name)
    shutil.copytree(base, dst, copy_function=shutil.copy2)  # keeps mtimes: Numba's index
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child)))
        return 0

    root = tempfile.mkdtemp(prefix="jg_compile_")
    results: dict[str, list[dict]] = {k: [] for k in
                                      ("medium new", "mlp32 new", "mlp128 new", "medium hit")}
    try:
        base = warmed_library_dir(root)
        for r in range(a.rounds):
            d = fresh_copy(base, root, f"medium{r}")
            results["medium new"].append(run_child("medium", d))
            results["medium hit"].append(run_child("medium", d))
            results["mlp32 new"].append(run_child("mlp32", fresh_copy(base, root, f"m32_{r}")))
            results["mlp128 new"].append(run_child("mlp128", fresh_copy(base, root, f"m128_{r}")))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['total_s']:.2f}s"
                                                  for k, v in results.items()), file=sys.stderr)
        if not a.skip_cold:
            jd, nd = os.path.join(root, "cold"), os.path.join(root, "cold_numba")
            results["medium, cold cache (its kernels compile)"] = [
                run_child("medium", jd, numba_cache=nd)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    targets = {"medium new": "≤ 2.5", "mlp32 new": "≤ 5.5", "medium hit": "≤ 1.0"}
    t32 = statistics.median(x["total_s"] for x in results["mlp32 new"]) \
        if results["mlp32 new"] else None
    if t32:
        targets["mlp128 new"] = f"≤ {4 * t32:.1f} (4× mlp32)"
    cols = ("total_s", "import_s", "kernels_s", "lower_s", "first_call_s")
    head = ["case", "rounds", "total s (median)", "min–max", "import", "kernels",
            "trace+compile", "1st call", "target s"]
    rows = []
    for case, rs in results.items():
        if not rs:
            continue
        med = {c: statistics.median(x[c] for x in rs) for c in cols}
        tot = [x["total_s"] for x in rs]
        rows.append([case, str(len(rs)), f"{med['total_s']:.2f}",
                     f"{min(tot):.2f}–{max(tot):.2f}", f"{med['import_s']:.2f}",
                     f"{med['kernels_s']:.2f}", f"{med['lower_s']:.2f}",
                     f"{med['first_call_s']:.2f}", targets.get(case, "")])
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|---|" + "---:|" * (len(head) - 1))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
        for r in [head] + rows:
            print("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                            for i, (x, w) in enumerate(zip(r, widths, strict=False))))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
