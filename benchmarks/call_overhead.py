"""Per-call Python overhead of `jg.train_step` on an MLP config, each source tree in its
own process, alternating over rounds.

    python benchmarks/call_overhead.py [--config deep] [--rounds 5] [--trees DIR[,DIR...]]

A child (PYTHONPATH = one jitgrad source tree) compiles the SGD step of the config, then
empties the executable's list of native chunks, so that `step(x, y)` does everything but
the native call: flattening the arguments, the cache key, input checks, collecting the
results (loss copied out, parameters donated), unflattening. (Measuring the whole call
minus the bare native call instead drowns microseconds in the milliseconds of the deep
step on a shared machine.) It times that call and `tree.flatten` of the step's arguments,
interleaved in blocks; the parent runs each tree once per round, in turn, and prints
medians over rounds and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402


def child(config: str, blocks: int, calls: int) -> dict:
    from jitgrad.frontend import tree
    C.pin_threads()
    step, params, x, y = C.make_jitgrad_step(config)
    step(x, y)  # compile or load
    step.compiled.latest.executable._chunks = ()  # the native call becomes a no-op
    args = (params, step.state, step.optimizer.hyper(1), x, y)
    overhead, flat = [], []
    for _ in range(blocks):  # interleaved, so that load changes hit both alike
        overhead.append(C.median_ns(lambda: step(x, y), calls))
        flat.append(C.median_ns(lambda: tree.flatten(args), calls))
    return {"overhead_us": statistics.median(overhead) / 1e3,
            "flatten_us": statistics.median(flat) / 1e3,
            "leaves": len(tree.flatten(args)[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deep")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--trees", default=os.path.dirname(HERE),
                    help="comma-separated jitgrad source trees to compare")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.blocks, a.calls)))
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child", a.config,
           "--blocks", str(a.blocks), "--calls", str(a.calls)]
    medians = C.alternate(a.rounds, {
        t: lambda t=t: C.json_child(cmd, dict(C.thread_env(), PYTHONPATH=t), t, cwd=t)
        for t in a.trees.split(",")})
    print(f"config {a.config}, {a.rounds} rounds x {a.blocks} blocks x {a.calls} calls, "
          "medians over rounds")
    print("| tree | leaves | overhead µs | flatten µs | load |")
    print("|---|---:|---:|---:|---:|")
    for t, m in medians.items():
        print(f"| {t} | {m['leaves']:.0f} | {m['overhead_us']:.1f} | {m['flatten_us']:.1f} | "
              f"{m['load1']:.1f} |")


if __name__ == "__main__":
    main()
