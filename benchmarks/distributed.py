"""Data-parallel throughput: the same global batch on 1 process or N MPI ranks.

    python benchmarks/distributed.py medium                  # 1 process, ordinary train_step
    mpiexec -n 2 python benchmarks/distributed.py medium     # 2 ranks, global batch unchanged

Each rank trains the MLP of benchmarks/compare.py's config (SGD, float32) on its
1/N of the config's batch, with cores/N threads unless JITGRAD_NUM_THREADS is set.
Prints one JSON line (rank 0): examples/s over the timed steps, the step time,
the share of the step spent in the allreduce as the step sees it (this includes
waiting for the slowest rank), and the cost of the bare allreduce of the same
buffer after a barrier (the transport alone).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", choices=list(C.CONFIGS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--plain", action="store_true",
                    help="1 process: the ordinary one-program train_step (no MPI)")
    args = ap.parse_args()

    import numpy as np

    import jitgrad as jg
    from jitgrad.compiler import threads
    comm = None
    rank, size = 0, 1
    if not args.plain:
        from jitgrad.training import distributed
        comm = distributed.world()
        rank, size = comm.Get_rank(), comm.Get_size()
        distributed.set_default_threads(comm)
    widths, batch = C.CONFIGS[args.config]
    if batch % size:
        raise SystemExit(f"global batch {batch} does not split over {size} ranks")
    x, y = C.make_batch(args.config)
    lo, hi = rank * batch // size, (rank + 1) * batch // size
    xb, yb = np.ascontiguousarray(x[lo:hi]), np.ascontiguousarray(y[lo:hi])
    params = C.make_params(args.config)
    step = jg.train_step(C.jitgrad_loss, params, jg.optim.SGD(lr=C.LR), comm=comm)
    for _ in range(args.warmup):
        step(xb, yb)
    if comm is not None:
        comm.Barrier()
        step.timings = dict.fromkeys(step.timings, 0)  # time the measured steps only
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(xb, yb)
    if comm is not None:
        comm.Barrier()
    wall = time.perf_counter() - t0
    result = {"config": args.config, "ranks": size, "plain": args.plain,
              "threads_per_rank": threads.num_threads(), "global_batch": batch,
              "step_ms": 1e3 * wall / args.steps, "examples_per_s": batch * args.steps / wall}
    if comm is not None:
        from jitgrad.training.distributed import mpi
        shares = comm.gather(step.allreduce_share, root=0)
        flat = step._flat
        reps = 50
        comm.Barrier()
        t1 = time.perf_counter()
        for _ in range(reps):
            comm.Allreduce(mpi().IN_PLACE, flat, op=mpi().SUM)
        bare = (time.perf_counter() - t1) / reps
        result |= {"grad_bytes": int(flat.nbytes),
                   "allreduce_share_in_step": None if rank else float(np.mean(shares)),
                   "bare_allreduce_ms": 1e3 * bare,
                   "bare_allreduce_share": 1e3 * bare / result["step_ms"]}
    if rank == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
