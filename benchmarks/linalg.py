"""Batched matmul and einsum: jitgrad's compiled call vs numpy's, each in its own process.

    python benchmarks/linalg.py [--rounds 5] [--cases all|name,name] [--markdown]

A case is an expression over float32 operands; for jitgrad it is `jg.jit` of the same
expression (the user's call: arguments in, a fresh result array out), for numpy
`np.matmul` or `np.einsum(..., optimize=True)`. Each (implementation, case) runs in a
fresh process (`--worker IMPL CASE`, one JSON line), the implementations alternate over
the rounds, and every process runs with 2 threads (--threads) and without OPENBLAS_CORETYPE /
OPENBLAS_L2_SIZE (NUMBA_NOTES.md: two BLAS thread pools in one process distort each
other). Reported: the median µs over rounds, of the call (a fresh result) and of the
call into memory allocated once (numpy's `out=`; jitgrad's bare native call, the result
left in its arena), and numpy's time / jitgrad's (above 1: jitgrad is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402
from compare import measure_calls  # noqa: E402

# name -> (einsum subscripts, operand shapes); "matmul" cases are np.matmul / @
CASES: dict[str, tuple[str, tuple[tuple[int, ...], ...]]] = {
    "matmul-64x64x64x64": ("matmul", ((64, 64, 64), (64, 64, 64))),
    "matmul-256x32x32x32": ("matmul", ((256, 32, 32), (256, 32, 32))),
    "matmul-16x128x128x128": ("matmul", ((16, 128, 128), (16, 128, 128))),
    "matmul-4x512x512x512": ("matmul", ((4, 512, 512), (4, 512, 512))),
    "matmul-broadcast-8x256x256-256x256": ("matmul", ((8, 256, 256), (256, 256))),
    # a 2-d product for reference: the gap of the BLAS jitgrad calls (scipy's) to numpy's
    "matmul-2d-512x512x512": ("matmul", ((512, 512), (512, 512))),
    "einsum-batched-16x128": ("bij,bjk->bik", ((16, 128, 128), (16, 128, 128))),
    "einsum-attention-scores": ("bhqd,bhkd->bhqk", ((2, 8, 128, 64), (2, 8, 128, 64))),
    "einsum-attention-values": ("bhqk,bhkd->bhqd", ((2, 8, 128, 128), (2, 8, 128, 64))),
    "einsum-chain-3x256": ("ij,jk,kl->il", ((256, 256), (256, 256), (256, 256))),
    "einsum-rows-by-matrix": ("bij,jk->bik", ((32, 64, 256), (256, 256))),
    "einsum-batch-not-leading": ("ibj,bjk->bik", ((128, 16, 128), (16, 128, 128))),
}
IMPLS = ("jitgrad", "numpy")


def _operands(case: str):
    import numpy as np
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in CASES[case][1]]


def worker(impl: str, case: str) -> dict:
    """µs per call ("us") and per call into memory allocated once ("into_us"): numpy's
    `out=`, jitgrad's bare native call (its result stays in the arena)."""
    import numpy as np
    spec = CASES[case][0]
    xs = _operands(case)
    if impl == "numpy":
        def fn():
            return np.matmul(*xs) if spec == "matmul" else np.einsum(spec, *xs, optimize=True)
        out = fn()

        def into():
            if spec == "matmul":
                np.matmul(*xs, out=out)
            else:
                np.einsum(spec, *xs, out=out, optimize=True)
    else:
        import jitgrad as jg
        cf = jg.jit(lambda *a: a[0] @ a[1] if spec == "matmul" else np.einsum(spec, *a))

        def fn():
            return cf(*xs)
        out = fn()
        into, _keep = C.native_runner(cf, *xs)
    C.pin_threads()
    return {"us": measure_calls(fn), "into_us": measure_calls(into),
            "check": float(np.abs(out).sum())}


def run_worker(impl: str, case: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, case]
    p = subprocess.run(cmd, capture_output=True, text=True, env=C.thread_env(threads=threads),
                       timeout=900)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="all")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--threads", type=int, default=C.THREADS,
                    help="threads of every pool (1 is steadier on a loaded machine)")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    results: dict[tuple[str, str, str], list[float]] = {}
    for r in range(args.rounds):
        for case in cases:
            for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
                out = run_worker(impl, case, args.threads)
                if "error" in out:
                    print(f"{impl} {case}: {out['error']}", file=sys.stderr)
                    continue
                for kind in ("us", "into_us"):
                    results.setdefault((impl, case, kind), []).append(
                        statistics.median(out[kind]))
    cols = ["case", "jitgrad µs", "numpy µs", "numpy/jitgrad", "jitgrad native µs",
            "numpy out= µs", "numpy/jitgrad"]
    print("| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1) if args.markdown
          else "".join(f"{c:>18s}" if i else f"{c:40s}" for i, c in enumerate(cols)))
    for case in cases:
        try:
            med = {(i, k): statistics.median(results[(i, case, k)]) for i in IMPLS
                   for k in ("us", "into_us")}
        except KeyError:
            continue
        cells = []
        for k in ("us", "into_us"):
            cells += [f"{med[('jitgrad', k)]:.1f}", f"{med[('numpy', k)]:.1f}",
                      f"{med[('numpy', k)] / med[('jitgrad', k)]:.2f}"]
        print("| " + " | ".join([case] + cells) + " |" if args.markdown
              else f"{case:40s}" + "".join(f"{c:>18s}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
