"""Run by tests/test_distributed.py under `mpiexec -n N python tests/mpi_worker.py MODE OUT`.

MODE equiv: k data-parallel steps with per-rank batch B; each rank saves its parameters
and losses to OUT.rank<r>.npz for comparison with one process and batch N*B.
MODE label: one rank feeds an out-of-range label in step 2; every rank must get the same
error, keep its parameters, and go on training.
MODE raise: rank 1 raises outside the step; abort_on_error must end the job.
"""

import sys

import numpy as np

import jitgrad as jg
from jitgrad.training import distributed, nn
from jitgrad.training.data import minibatches

SIZES = [12, 16, 5]
PER_RANK_BATCH = 8
STEPS = 5


def problem() -> tuple[np.ndarray, np.ndarray]:
    """A small fixed classification problem, float64 so the comparison can be tight."""
    rng = np.random.default_rng(42)
    x = rng.standard_normal((96, SIZES[0]))
    y = rng.integers(0, SIZES[-1], 96)
    return x, y


def optimizer() -> jg.optim.Optimizer:
    return jg.optim.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    comm = distributed.world()
    rank, size = comm.Get_rank(), comm.Get_size()
    x, y = problem()
    # Every rank but 0 starts from different parameters: the broadcast must fix that.
    params = nn.mlp_init(SIZES, np.random.default_rng(0 if rank == 0 else 100 + rank),
                         np.float64)
    step = jg.train_step(nn.mlp_loss, params, optimizer(), comm=comm)
    with distributed.abort_on_error(comm):
        if mode == "equiv":
            losses = []
            batches = minibatches(x, y, PER_RANK_BATCH, 0, rank=rank, num_ranks=size)
            for _, (xb, yb) in zip(range(STEPS), batches):
                losses.append(float(step(xb, yb)))
            np.savez(f"{out}.rank{rank}.npz", losses=np.array(losses), **params)
        elif mode == "label":
            xb, yb = x[:PER_RANK_BATCH], y[:PER_RANK_BATCH].copy()
            step(xb, yb)
            before = {k: v.copy() for k, v in params.items()}
            bad = yb.copy()
            if rank == size - 1:
                bad[3] = SIZES[-1] + 4
            try:
                step(xb, bad)
            except jg.JitgradError as e:
                unchanged = all(np.array_equal(before[k], params[k]) for k in params)
                print(f"rank {rank} caught: {e} unchanged={unchanged}", flush=True)
            else:
                print(f"rank {rank}: no error", flush=True)
            step(xb, yb)
            print(f"rank {rank} continued at step {step.t}", flush=True)
        elif mode == "raise":
            step(x[:PER_RANK_BATCH], y[:PER_RANK_BATCH])
            if rank == 1:
                raise RuntimeError("injected fault")
            step(x[:PER_RANK_BATCH], y[:PER_RANK_BATCH])  # waits for rank 1 forever, unless
            step(x[:PER_RANK_BATCH], y[:PER_RANK_BATCH])  # the job is aborted
            print(f"rank {rank} finished: the fault went unnoticed", flush=True)
        else:
            raise ValueError(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
