"""The numpy surface's elementwise families, compiled by jitgrad vs numpy, each
implementation in its own process, alternating over rounds (medians, ratios).

    python benchmarks/numpy_surface.py [--rounds 3] [--size 1000000] [--dtype float32]

Every case is a numpy expression run as it is by numpy and through `jg.jit`: a call as a
user makes it (arguments in, a fresh result array out: the result is copied out of the
arena), and the bare native call (the fused loop alone, its result left in the arena).
The "family" cases combine the functions of a family the way code uses them; the
single-function cases are each ufunc alone. Ratio = numpy time / jitgrad time (> 1:
jitgrad faster).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402
from compare import measure_calls  # noqa: E402


def family_cases() -> dict:
    return {
        "trig": lambda x, y: np.sin(x) * np.cos(y) + np.tan(0.5 * x),
        "inverse trig": lambda x, y: np.arcsin(0.9 * x) + np.arccos(0.9 * y) + np.arctan(x * y),
        "hyperbolic": lambda x, y: np.sinh(x) + np.cosh(y) + np.arcsinh(x)
        + np.arctanh(0.5 * y),
        "exp/log": lambda x, y: np.exp2(x) + np.expm1(y) + np.log1p(x * x)
        + np.log2(1.0 + y * y),
        "min/max": lambda x, y: np.minimum(x, y) + np.fmax(x, 0.5) + np.clip(y, -0.3, 0.3),
        "binary maths": lambda x, y: np.hypot(x, y) + np.arctan2(x, y) + np.logaddexp(x, y),
        "remainder": lambda x, y: x % 0.7 + np.floor_divide(y, 0.3) * 0.1,
        "softplus-like": lambda x, y: np.logaddexp(0.0, x) * np.square(y)
        + np.log1p(np.exp(-y * y)),
    }


def single_cases() -> dict:
    unary = ["sin", "cos", "tan", "arcsin", "arccos", "arctan", "sinh", "cosh", "arcsinh",
             "arctanh", "exp2", "expm1", "log2", "log10", "log1p", "square"]
    def one(f):  # inputs in [-1, 1): inside every domain but those of the logarithms
        return lambda x, y: f(x)

    def two(f):
        return lambda x, y: f(x, y)

    out = {f"np.{u}": one(getattr(np, u)) for u in unary}
    out["np.log2"] = lambda x, y: np.log2(1.5 + x)
    out["np.log10"] = lambda x, y: np.log10(1.5 + x)
    out["np.arccosh"] = lambda x, y: np.arccosh(2.0 + x)
    for b in ["minimum", "fmax", "hypot", "arctan2", "logaddexp", "remainder"]:
        out[f"np.{b}"] = two(getattr(np, b))
    return out


def inputs(size: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size).astype(dtype)
    y = rng.uniform(-1.0, 1.0, size).astype(dtype)
    y[np.abs(y) < 1e-3] = 0.5  # no division by ~0 in remainder/floor_divide
    return x, y


def measure(fn) -> float:
    """Median µs per call over samples of ~0.2 s each."""
    return float(np.median(measure_calls(fn, target_s=0.2)))


def worker(impl: str, size: int, dtype: str) -> dict:
    C.pin_threads()
    x, y = inputs(size, dtype)
    cases = {**family_cases(), **single_cases()}
    out = {}
    with np.errstate(all="ignore"):
        for name, fn in cases.items():
            if impl == "numpy":
                out[name] = measure(lambda f=fn: f(x, y))
                continue
            import jitgrad as jg
            cf = jg.jit(fn)
            np.testing.assert_allclose(cf(x, y), fn(x, y), rtol=1e-4 if dtype == "float32"
                                       else 1e-10, atol=1e-5)
            run, _keep = C.native_runner(cf, x, y)
            out[name] = measure(lambda c=cf: c(x, y))
            out[f"{name} (native)"] = measure(run)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--worker", choices=["numpy", "jitgrad"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.dtype)))
        return 0
    runs: dict[str, list[dict]] = {"numpy": [], "jitgrad": []}
    env = C.thread_env()
    for _ in range(args.rounds):
        for impl in runs:  # alternate the two processes
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl,
                   "--size", str(args.size), "--dtype", args.dtype]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return 1
            runs[impl].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = []
    for name in runs["numpy"][0]:
        row = {"case": name}
        row["numpy_us"] = float(np.median([r[name] for r in runs["numpy"]]))
        for key, case in (("jitgrad_us", name), ("native_us", f"{name} (native)")):
            row[key] = float(np.median([r[case] for r in runs["jitgrad"]]))
        row["ratio"] = row["numpy_us"] / row["jitgrad_us"]
        row["native_ratio"] = row["numpy_us"] / row["native_us"]
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{args.size:,} {args.dtype} elements, {args.rounds} alternating rounds, medians, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| case | numpy µs | jitgrad µs | numpy/jitgrad | native µs | numpy/native |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['numpy_us']:,.0f} | {r['jitgrad_us']:,.0f} | "
              f"{r['ratio']:.2f} | {r['native_us']:,.0f} | {r['native_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
