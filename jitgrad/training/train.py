"""`jg.train_step`: forward, backward and the optimizer update compiled as one program."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import JitgradError
from ..frontend import tree
from ..frontend.api import CompiledFunction, check_finite_from_env, value_and_grad
from .optim import Optimizer, check_params

if TYPE_CHECKING:
    from .distributed import DistributedTrainStep


class TrainStep:
    """Call with a batch; returns the loss and updates params and optimizer state in place.

    The new parameters and state are donated to the caller's arrays: the fused
    update kernels write them in place (a momentum buffer as soon as its weight
    gradient is computed, so the layer's activations can be freed), but only
    after every kernel that can fail (label and index checks) has run; a result
    ready before that is copied in after the call. So a failed step leaves every
    parameter untouched. With check_finite the results are instead copied in only
    once the loss was found finite.
    """

    def __init__(self, loss_fn: Any, params: Any, optimizer: Optimizer, **jit_options: Any):
        self.params = params
        self.optimizer = optimizer
        self.state = optimizer.init(params)
        self.t = 0
        self.check_finite = bool(jit_options.get("check_finite")) or check_finite_from_env()
        # Steps from several threads take turns: each reads the parameters the previous
        # one wrote, and the step count and the copy-in below stay consistent.
        self._lock = threading.Lock()
        leaves = check_params(params)

        def step(params: Any, state: Any, hyper: Any, *batch: Any) -> Any:
            loss, grads = value_and_grad(loss_fn)(params, *batch)
            new_params, new_state = optimizer.update(params, grads, state, hyper)
            return loss, new_params, new_state

        n_state = len(leaves) + len(tree.flatten(self.state)[0])
        # Result leaves are (loss, params..., state...); argument leaves start (params, state).
        donate = None if self.check_finite else {1 + i: i for i in range(n_state)}
        # check_finite names a bad leaf as the caller sees it: params['W0'], args[0] (the batch)
        self.compiled = CompiledFunction(step, donate=donate,
                                         arg_names=("params", "state", "hyper"), **jit_options)

    def __call__(self, *batch: Any) -> np.ndarray:
        with self._lock:
            return self._step(batch)

    def _step(self, batch: tuple[Any, ...]) -> np.ndarray:
        hyper = self.optimizer.hyper(self.t + 1)
        loss, new_params, new_state = self.compiled(self.params, self.state, hyper, *batch)
        if self.check_finite and not np.isfinite(loss):
            raise JitgradError(f"non-finite loss {float(loss)} at step {self.t + 1}; "
                               "parameters were not updated")
        if self.check_finite:
            for dst, src in zip(tree.flatten((self.params, self.state))[0],
                                tree.flatten((new_params, new_state))[0], strict=True):
                np.copyto(dst, src)
        self.t += 1
        return loss

    def lower(self, *batch: Any) -> Any:
        return self.compiled.lower(self.params, self.state, self.optimizer.hyper(1), *batch)

    def plan_only(self, *batch: Any) -> Any:
        """The step's program and memory plan for this batch, compiling nothing."""
        return self.compiled.plan_only(self.params, self.state, self.optimizer.hyper(1), *batch)


def train_step(loss_fn: Any, params: Any, optimizer: Optimizer, *, comm: Any = None,
               **jit_options: Any) -> TrainStep | DistributedTrainStep:
    """Compile `loss_fn(params, *batch)` + backward + optimizer update into one program.

    With an MPI communicator (``comm=MPI.COMM_WORLD``) the step is data-parallel:
    each rank passes its own shard of the batch, one allreduce per step averages
    the gradients, and every rank applies the same update (see jitgrad.distributed).
    """
    if comm is not None:
        from .distributed import DistributedTrainStep
        return DistributedTrainStep(loss_fn, params, optimizer, comm, **jit_options)
    return TrainStep(loss_fn, params, optimizer, **jit_options)
