"""Per-call cost of flattening a compiled call's arguments and unflattening its results:
jitgrad's own pytree registry against optree, each in its own process, alternating.

    python benchmarks/tree_flatten.py [--config deep] [--rounds 5] [--trees DIR[,DIR]]
                                      [--optree-python PYTHON]

The arguments are those of a `jg.train_step` call on the config: (params, optimizer
state, hyperparameters, x, y), 69 leaves on the deep MLP (66 parameters); the results
are (loss, params, state). A child times `flatten(args)` and `unflatten(structure,
leaves)` of the results with one implementation: `jitgrad.tree` from a source tree, or
optree (`optree.tree_flatten` / `tree_unflatten`, run by an interpreter that has it:
`--optree-python`, e.g. a venv's). Medians of blocks of calls, then of rounds.
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


def child(impl: str, config: str, blocks: int, calls: int) -> dict:
    import numpy as np
    params = C.make_params(config)
    x, y = C.make_batch(config)
    args = (params, {}, {"lr": C.LR}, x, y)
    results = (np.float32(0.0), params, {})
    if impl == "optree":
        import optree
        flatten, unflatten = optree.tree_flatten, optree.tree_unflatten
    else:
        from jitgrad.frontend import tree
        flatten, unflatten = tree.flatten, tree.unflatten
    out_leaves, out_tree = flatten(results)
    fl, unfl = [], []
    for _ in range(blocks):
        fl.append(C.median_ns(lambda: flatten(args), calls))
        unfl.append(C.median_ns(lambda: unflatten(out_tree, out_leaves), calls))
    return {"flatten_us": statistics.median(fl) / 1e3,
            "unflatten_us": statistics.median(unfl) / 1e3, "leaves": len(flatten(args)[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="deep")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--trees", default=os.path.dirname(HERE),
                    help="comma-separated jitgrad source trees (their jitgrad.tree)")
    ap.add_argument("--optree-python", help="an interpreter with optree installed")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.config, a.blocks, a.calls)))
        return
    trees = a.trees.split(",")
    impls = [(f"jitgrad.tree ({t})", "jitgrad", sys.executable, t) for t in trees]
    if a.optree_python:
        impls.append(("optree", "optree", a.optree_python, trees[0]))

    def runner(impl: str, python: str, src: str):
        cmd = [python, os.path.abspath(__file__), "--child", impl, "--config", a.config,
               "--blocks", str(a.blocks), "--calls", str(a.calls)]
        return lambda: C.json_child(cmd, dict(os.environ, PYTHONPATH=src), impl)

    medians = C.alternate(a.rounds, {name: runner(*rest) for name, *rest in impls})
    print(f"config {a.config}, {a.rounds} rounds x {a.blocks} blocks x {a.calls} calls, "
          "medians over rounds")
    print("| implementation | leaves | flatten µs | unflatten µs | load |")
    print("|---|---:|---:|---:|---:|")
    for name, m in medians.items():
        print(f"| {name} | {m['leaves']:.0f} | {m['flatten_us']:.2f} | "
              f"{m['unflatten_us']:.2f} | {m['load1']:.1f} |")


if __name__ == "__main__":
    main()
