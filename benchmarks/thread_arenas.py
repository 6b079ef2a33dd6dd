"""Per-thread arenas vs one arena behind a lock, for one compiled function called from threads.

    python benchmarks/thread_arenas.py [--rounds 9]

Measured on the 2-core machine (busy), 9 rounds, medians, µs per call:

    JITGRAD_NUM_THREADS=1     1 thread         4 threads
    tiny    lock              10.1             26.6
    tiny    per-thread        10.3             17.9
    medium  lock              3182             3400
    medium  per-thread        3221             1791

One thread pays the same either way (the difference is below the noise); threads
calling at once go up to 1.9x faster with per-thread arenas, as the native code
runs without the GIL. jitgrad uses per-thread arenas.

Each variant runs in its own process (NUMBA_NOTES.md: measure apart), the
processes alternate over rounds, and medians are reported:

- single: µs per call from one thread (the cost every caller pays);
- threads: µs per call, 4 threads each making calls at once (throughput).

Two programs: "tiny" (call overhead dominates) and "medium" (a 256x512x512 matmul
and a tanh, where the native code dominates). "lock" is the executable's `run`
as it was before per-thread arenas: one arena, a lock held until the results
are copied out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np


def lock_variant() -> None:
    """Patch NumbaExecutable.run back to one shared arena behind a lock."""
    from jitgrad.compiler import backend

    def run(self, args):
        with self._lock_variant:
            arena = self._shared
            ptrs, last = arena.ptrs, arena.last_args
            for i, a in enumerate(args):
                if a is not last[i]:
                    ptrs[2 + i] = backend._address(a)
                    last[i] = a
            for chunk in self._chunks:
                if chunk(arena.ptrs_addr):
                    raise RuntimeError("kernel failure")
            return [self._collect(arena.buf, args, s, False) for s in self._outputs]

    init = backend.NumbaExecutable.__init__

    def init_shared(self, *a, **kw):
        init(self, *a, **kw)
        self._lock_variant = threading.Lock()
        self._shared = self._new_arena()

    backend.NumbaExecutable.__init__ = init_shared
    backend.NumbaExecutable.run = run


def child(variant: str, size: str) -> dict[str, float]:
    import jitgrad as jg
    if variant == "lock":
        lock_variant()
    rng = np.random.default_rng(0)
    if size == "tiny":
        shapes, calls = ((8, 16), (16, 4)), 4000
    else:
        shapes, calls = ((256, 512), (512, 512)), 40
    a, b = (rng.normal(size=s).astype(np.float32) for s in shapes)
    f = jg.jit(lambda a, b: (jg.tanh(a @ b), jg.sum(a, axis=0)))
    f(a, b)
    t0 = time.perf_counter()
    for _ in range(calls):
        f(a, b)
    single = (time.perf_counter() - t0) / calls

    n_threads = 4
    start = threading.Barrier(n_threads + 1)

    def work():
        start.wait()
        for _ in range(calls // n_threads):
            f(a, b)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    multi = (time.perf_counter() - t0) / (calls // n_threads * n_threads)
    return {"single_us": single * 1e6, "threads_us": multi * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "SIZE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for size in ("tiny", "medium"):
            for variant in ("lock", "arena"):
                out = subprocess.run([sys.executable, __file__, "--child", variant, size],
                                     capture_output=True, text=True, check=True, env=os.environ)
                results.setdefault((size, variant), []).append(
                    json.loads(out.stdout.strip().splitlines()[-1]))
    for (size, variant), rows in sorted(results.items()):
        single = statistics.median(r["single_us"] for r in rows)
        multi = statistics.median(r["threads_us"] for r in rows)
        print(f"{size:7s} {variant:6s} 1 thread: {single:9.1f} us/call   "
              f"4 threads: {multi:9.1f} us/call")


if __name__ == "__main__":
    # this checkout's jitgrad, not whichever one is installed (only when run as a script:
    # asv imports this module while discovering benchmarks)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
