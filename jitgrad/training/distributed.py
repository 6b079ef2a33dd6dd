"""Data-parallel training across processes on MPI (mpi4py).

Every rank holds the same parameters (broadcast from rank 0 at the start),
computes the gradient of the loss on its own shard of each global batch, and
one in-place ``Allreduce`` per step sums the gradients of all ranks; the
update then runs on every rank with the same averaged gradient, so the
parameters stay identical without ever being sent again.

MPI cannot be called from inside Numba code, so a step is two native calls
with the collective between them:

1. the *gradient program* ``(params, *batch) -> (loss, grads)``, whose results
   the memory planner pins back to back at the start of its arena, so that the
   loss and every gradient form one flat buffer (``Plan.pinned_bytes``);
2. ``comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)`` on that buffer;
3. the *update program* ``(params, state, hyper, grads, 1/N) -> (params, state)``,
   which reads the summed gradients straight out of the first program's arena
   (its inputs are views of the buffer: no copy), scales them by 1/N inside its
   fused update loops, and writes parameters and optimizer state in place.

The loss rides in the same buffer (one collective per step, not two), and so
does a failure count: a rank whose gradient program raises (a bad label in its
shard, a non-finite value with ``check_finite``) still joins the collective with
zeros and a count of one, so every rank learns of the failure in the same step,
raises the same error naming the failed rank, and no parameter changes anywhere.
A rank that fails anywhere else can leave the others waiting in a collective
forever; :func:`abort_on_error` turns that into ``comm.Abort`` (the job exits
non-zero with a message naming the rank).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from ..errors import JitgradError
from ..frontend import random, tree
from ..frontend.api import CompiledFunction, check_finite_from_env, value_and_grad
from .optim import Optimizer, check_params
from .train import check_key, step_inputs, step_key, with_key

MPI_MISSING = ("distributed training needs mpi4py and an MPI implementation: "
               "pip install 'jitgrad[mpi]' (mpi4py + the mpich wheel)")


def mpi() -> Any:
    """The ``mpi4py.MPI`` module, or a JitgradError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise JitgradError(f"{MPI_MISSING} ({e})") from None
    return MPI


def world() -> Any:
    """``MPI.COMM_WORLD``."""
    return mpi().COMM_WORLD


def ranks_on_this_node(comm: Any) -> int:
    """How many ranks of ``comm`` share this machine (they share its cores)."""
    node = comm.Split_type(mpi().COMM_TYPE_SHARED)
    try:
        return int(node.Get_size())
    finally:
        node.Free()


def set_default_threads(comm: Any) -> int:
    """Give this rank its share of the machine's cores (unless JITGRAD_NUM_THREADS says
    otherwise): N ranks each with all cores would oversubscribe it N-fold. Call before
    the first compile; returns the count in force."""
    from ..compiler import threads
    return threads.set_local_ranks(ranks_on_this_node(comm))


@contextlib.contextmanager
def abort_on_error(comm: Any, err: TextIO | None = None) -> Iterator[None]:
    """Within the block, an exception on any rank ends the whole job: the rank prints
    its traceback and a line naming itself, then calls ``comm.Abort(1)``.

    Without this, the other ranks would wait forever in their next collective
    for the rank that is gone. On a single rank the exception propagates as usual.
    """
    try:
        yield
    except Exception as e:
        if comm.Get_size() == 1:
            raise
        err = err or sys.stderr
        # One write, flushed: the abort can kill mpiexec's forwarding of this rank's
        # output between two writes (the naming line was lost after the traceback).
        err.write(f"{traceback.format_exc()}jitgrad: rank {comm.Get_rank()} of "
                  f"{comm.Get_size()} failed: {type(e).__name__}: {e}; aborting the job\n")
        err.flush()
        comm.Abort(1)


def shard_range(n: int, comm: Any) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items (sizes differ by at most one)."""
    r, size = comm.Get_rank(), comm.Get_size()
    return n * r // size, n * (r + 1) // size


def allreduce_sum(comm: Any, values: Any) -> np.ndarray:
    """Sum a small float vector over all ranks (metrics for reporting)."""
    buf = np.array(values, dtype=np.float64)
    comm.Allreduce(mpi().IN_PLACE, buf, op=mpi().SUM)
    return buf


# Element of the flat buffer, inside the loss's 64-byte slot, that counts failed ranks.
_FLAG = 1


class DistributedTrainStep:
    """`jg.train_step(loss_fn, params, opt, comm=...)`: the data-parallel training step.

    Call with this rank's part of the batch; returns the loss averaged over all
    ranks (a 0-d array) after updating ``params`` and the optimizer state in
    place, identically on every rank. ``timings`` holds the seconds spent in the
    gradient program, the allreduce and the update, summed over every step after
    the first (which compiles).
    """

    def __init__(self, loss_fn: Any, params: Any, optimizer: Optimizer, comm: Any, *,
                 key: Any = None, **jit_options: Any):
        leaves = check_params(params)
        self.key = check_key(key)
        dtypes = {p.dtype for p in leaves}
        if len(dtypes) != 1:
            raise JitgradError(f"distributed training all-reduces one gradient buffer of one "
                               f"dtype; the parameters mix {sorted(map(str, dtypes))}")
        self.dtype = leaves[0].dtype
        self.params = params
        self.optimizer = optimizer
        self.state = optimizer.init(params)
        self.t = 0
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._mpi = mpi()
        self.check_finite = bool(jit_options.get("check_finite")) or check_finite_from_env()
        self.timings = {"grad": 0.0, "allreduce": 0.0, "update": 0.0, "steps": 0}
        self._n = len(leaves)
        self._grad_tree = tree.flatten(params)[1]
        self._flat: np.ndarray | None = None  # the buffer of the last step (reused on failure)
        self.broadcast()
        dtype = self.dtype

        def grads_of(objective: Any, params: Any, batch: Any) -> Any:
            loss, grads = value_and_grad(objective)(params, *batch)
            # The loss shares the gradients' buffer and dtype: one collective moves both.
            return loss.astype(dtype), grads

        if self.key is None:
            def grads_fn(params: Any, *batch: Any) -> Any:
                return grads_of(loss_fn, params, batch)
        else:
            def grads_fn(params: Any, key: Any, t: Any, *batch: Any) -> Any:
                # each rank's shard gets masks of its own
                k = random.fold_in(step_key(key, t), self.rank)
                return grads_of(with_key(loss_fn, k), params, batch)

        # Result leaves are (loss, grads...): all pinned, in this order, as the flat buffer.
        names = ("params",) + (() if self.key is None else ("key", "t"))
        self.compiled = CompiledFunction(grads_fn, pinned=list(range(1 + self._n)),
                                         arg_names=names, **jit_options)

        def update_fn(params: Any, state: Any, hyper: Any, grads: Any, scale: Any) -> Any:
            grads = tree.unflatten(self._grad_tree, [g * scale for g in tree.flatten(grads)[0]])
            return optimizer.update(params, grads, state, hyper)

        n_state = self._n + len(tree.flatten(self.state)[0])
        # Result leaves are (params..., state...), as are the first argument leaves. The
        # loss was checked before the update runs, so it can always write in place.
        update_options = {k: v for k, v in jit_options.items() if k != "check_finite"}
        self.update_compiled = CompiledFunction(update_fn, donate={i: i for i in range(n_state)},
                                                **update_options)

    def broadcast(self, root: int = 0) -> None:
        """Copy rank root's parameters and optimizer state to every rank (in place)."""
        for a in tree.flatten((self.params, self.state))[0]:
            self.comm.Bcast(a, root=root)

    def _buffers(self, loss: np.ndarray, grads: Any) -> tuple[np.ndarray, np.ndarray, Any]:
        """(flat buffer, loss view, gradients as views of it) of the gradient program's
        results."""
        region = self.compiled.latest.executable.pinned_region()
        if region.size:
            # Numba: the results already are views of the pinned region, back to back.
            # The loss comes first in a slot of memory.ALIGN (64) bytes, so element _FLAG
            # is padding no kernel writes: the failure count lives there.
            return region.view(self.dtype), loss, grads
        # Other backends return fresh arrays: pack them ([loss, failures, grads...]).
        leaves = tree.flatten(grads)[0]
        flat = np.concatenate([np.ravel(loss).astype(self.dtype), np.zeros(1, self.dtype),
                               *(g.ravel() for g in leaves)])
        views, pos = [], 2
        for g in leaves:
            views.append(flat[pos:pos + g.size].reshape(g.shape))
            pos += g.size
        return flat, flat[0:1].reshape(()), tree.unflatten(self._grad_tree, views)

    def __call__(self, *batch: Any) -> np.ndarray:
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            loss, grads = self.compiled(self.params, *step_inputs(self.key, self.t), *batch)
            flat, loss_view, grads = self._buffers(loss, grads)
            flat[_FLAG] = 0
        except Exception as e:
            if self._flat is None:
                raise  # no buffer of the agreed size yet: abort_on_error ends the job
            error, flat = e, self._flat
            flat[:] = 0
            flat[_FLAG] = 1
        self._flat = flat
        t1 = time.perf_counter()
        self.comm.Allreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM)
        t2 = time.perf_counter()
        failed = int(round(float(flat[_FLAG])))
        if failed:
            # Every rank takes this branch in the same step: gather who failed and why.
            reports = self.comm.allgather(None if error is None else
                                          f"{type(error).__name__}: {error}")
            who = "; ".join(f"rank {r}: {m}" for r, m in enumerate(reports) if m is not None)
            raise JitgradError(f"training step {self.t + 1} failed on {failed} of {self.size} "
                               f"ranks ({who}); parameters were not updated") from error
        loss = np.array(loss_view / self.size)
        if self.check_finite and not np.isfinite(loss):
            raise JitgradError(f"non-finite loss {float(loss)} at step {self.t + 1}; "
                               "parameters were not updated")
        hyper = self.optimizer.hyper(self.t + 1)
        self.update_compiled(self.params, self.state, hyper, grads, 1.0 / self.size)
        t3 = time.perf_counter()
        self.t += 1
        if self.t > 1:  # the first step compiles both programs
            tm = self.timings
            tm["grad"] += t1 - t0
            tm["allreduce"] += t2 - t1
            tm["update"] += t3 - t2
            tm["steps"] += 1
        return loss

    @property
    def allreduce_share(self) -> float | None:
        """Fraction of step time spent in the allreduce (steps after the first)."""
        tm = self.timings
        total = tm["grad"] + tm["allreduce"] + tm["update"]
        return tm["allreduce"] / total if total > 0 else None

    def lower(self, *batch: Any) -> Any:
        return self.compiled.lower(self.params, *step_inputs(self.key, self.t), *batch)
