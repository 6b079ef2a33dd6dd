"""`jg.train_step`: forward, backward and the optimizer update compiled as one program."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import JitgradError
from ..frontend import random, tree
from ..frontend.api import CompiledFunction, check_finite_from_env, value_and_grad
from .optim import Optimizer, check_params

if TYPE_CHECKING:
    from .distributed import DistributedTrainStep


def check_key(key: Any) -> np.ndarray | None:
    """train_step's key: None, or a private copy of a uint32[2] key (jg.random.key)."""
    if key is None:
        return None
    arr = np.asarray(key)
    if arr.shape != (2,) or arr.dtype != np.uint32:
        raise JitgradError(f"train_step's key must be a uint32 array of shape (2,), as "
                           f"jg.random.key(seed) makes, got {arr.dtype}{list(arr.shape)}")
    return arr.copy()


def step_key(key: Any, t: Any) -> Any:
    """The key of step t (the steps taken before it): fold_in(key, t), computed inside the
    step's program from two inputs, so neither a new key nor a new step recompiles."""
    return random.fold_in(key, t)


def with_key(loss_fn: Any, key: Any) -> Any:
    """loss_fn with its key given: (params, *batch) -> loss_fn(params, *batch, key=key)."""
    return lambda params, *batch: loss_fn(params, *batch, key=key)


def step_inputs(key: np.ndarray | None, t: int) -> tuple[Any, ...]:
    """The (key, t) arguments of step t's program, or nothing without a key."""
    return () if key is None else (key, np.uint32(t))


class TrainStep:
    """Call with a batch; returns the loss and updates params and optimizer state in place.

    The new parameters and state are donated to the caller's arrays: the fused
    update kernels write them in place (a momentum buffer as soon as its weight
    gradient is computed, so the layer's activations can be freed), but only
    after every kernel that can fail (label and index checks) has run; a result
    ready before that is copied in after the call. So a failed step leaves every
    parameter untouched. With check_finite the results are instead copied in only
    once the loss was found finite.

    With a key, each step calls ``loss_fn(params, *batch, key=k)`` with
    ``k = jg.random.fold_in(key, t)``, t the number of steps taken before it: ``key`` and
    ``t`` are all a run's randomness (dropout masks), and a checkpoint that holds them
    (checkpoint_io.step_meta) resumes it exactly.
    """

    def __init__(self, loss_fn: Any, params: Any, optimizer: Optimizer, *, key: Any = None,
                 **jit_options: Any):
        self.params = params  # (and no fast path yet)
        self.optimizer = optimizer
        self.state = optimizer.init(params)
        self.t = 0
        self.key = check_key(key)
        self.check_finite = bool(jit_options.get("check_finite")) or check_finite_from_env()
        # Steps from several threads take turns: each reads the parameters the previous
        # one wrote, and the step count and the copy-in below stay consistent.
        self._lock = threading.Lock()
        leaves = check_params(params)

        def update(params: Any, state: Any, hyper: Any, objective: Any, batch: Any) -> Any:
            loss, grads = value_and_grad(objective)(params, *batch)
            new_params, new_state = optimizer.update(params, grads, state, hyper)
            return loss, new_params, new_state

        # The step's parameters name its inputs (jitgrad show): params, ..., batch[0], ...
        if self.key is None:
            def step(params: Any, state: Any, hyper: Any, *batch: Any) -> Any:
                return update(params, state, hyper, loss_fn, batch)
        else:
            def step(params: Any, state: Any, hyper: Any, key: Any, t: Any, *batch: Any) -> Any:
                return update(params, state, hyper, with_key(loss_fn, step_key(key, t)), batch)

        n_state = len(leaves) + len(tree.flatten(self.state)[0])
        # Result leaves are (loss, params..., state...); argument leaves start (params, state).
        donate = None if self.check_finite else {1 + i: i for i in range(n_state)}
        # check_finite names a bad leaf as the caller sees it: params['W0'], args[0] (the batch)
        names = ("params", "state", "hyper") + (() if self.key is None else ("key", "t"))
        self.compiled = CompiledFunction(step, donate=donate, arg_names=names, **jit_options)

    @property
    def params(self) -> Any:
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        # The fast path holds the parameter arrays it was made with: new ones need a new path.
        self._params = params
        self._fast = None

    def __call__(self, *batch: Any) -> np.ndarray:
        with self._lock:
            fast = self._fast
            if fast is not None and not fast.holds(self._params, self.state):
                # an array replaced inside params or state: the pointers it wrote are stale
                fast = self._fast = None
            if fast is not None:
                loss = fast(self.t, batch)
                if loss is not None:
                    self.t += 1
                    return loss
            loss = self._step(batch)
            if self._fast is None and not self.check_finite:
                self._fast = _FastPath(self, batch)
            return loss

    def _step(self, batch: tuple[Any, ...]) -> np.ndarray:
        # The arrays may have been replaced since __init__ checked them: a read-only one
        # must not be written, a non-contiguous one would be updated in a copy only.
        check_params(self._params)
        hyper = self.optimizer.hyper(self.t + 1)
        loss, new_params, new_state = self.compiled(self.params, self.state, hyper,
                                                    *step_inputs(self.key, self.t), *batch)
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
        return self.compiled.lower(self.params, self.state, self.optimizer.hyper(1),
                                   *step_inputs(self.key, self.t), *batch)

    def plan_only(self, *batch: Any) -> Any:
        """The step's program and memory plan for this batch, compiling nothing."""
        return self.compiled.plan_only(self.params, self.state, self.optimizer.hyper(1), *batch)


class _FastPath:
    """A step's call after the first, with little Python work.

    The parameters and optimizer state are the same arrays every step (they are updated
    in place), so their pointers are written once (`Executable.fast_call`) and a call only
    checks, by identity, that they still are there (`holds`: the user may have put a new
    array into the params dict, or set a new state). A call fills the hyperparameters into
    arrays of its own and checks what can differ: the batch's arrays (type, dtype, shape,
    contiguity) and the hyperparameters' structure.
    Anything else -- a batch of another shape, a list instead of an array -- returns None:
    the full path then converts, checks, compiles or explains, as on the first call."""

    def __init__(self, step: TrainStep, batch: tuple[Any, ...]):
        self.optimizer = step.optimizer
        fixed = tree.flatten((step.params, step.state))[0]
        hyper_leaves, self.hyper_tree = tree.flatten(self.optimizer.hyper(step.t))
        keyed = step.key is not None
        entry = step.compiled.lower(step.params, step.state, self.optimizer.hyper(step.t),
                                    *step_inputs(step.key, step.t), *batch)
        sigs = entry.sigs
        n_fixed, n_hyper = len(fixed), len(hyper_leaves)
        self.hyper = [np.zeros((), sig[1]) for sig in sigs[n_fixed:n_fixed + n_hyper]]
        fixed_args = dict(enumerate(fixed))
        if keyed:
            fixed_args[n_fixed + n_hyper] = step.key
            self.t_arg = np.zeros((), np.uint32)
        self.keyed = keyed
        self.batch = [(sig[0], np.dtype(sig[1])) for sig in sigs[n_fixed + n_hyper + 2 * keyed:]]
        self.call = entry.executable.fast_call(fixed_args)
        self._same = tree.same_leaves((step.params, step.state))

    def holds(self, params: Any, state: Any) -> bool:
        """Whether params and state still hold the arrays whose pointers this path wrote."""
        return self._same((params, state))

    def __call__(self, t: int, batch: tuple[Any, ...]) -> np.ndarray | None:
        if len(batch) != len(self.batch):
            return None
        for a, (shape, dtype) in zip(batch, self.batch, strict=True):
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype \
                    or not a.flags.c_contiguous:
                return None
        leaves, structure = tree.flatten(self.optimizer.hyper(t + 1))
        if structure != self.hyper_tree:
            return None
        for arr, v in zip(self.hyper, leaves, strict=True):
            arr[()] = v
        if self.keyed:
            self.t_arg[()] = t
            return self.call([*self.hyper, self.t_arg, *batch])
        return self.call([*self.hyper, *batch])


def train_step(loss_fn: Any, params: Any, optimizer: Optimizer, *, comm: Any = None,
               key: Any = None, **jit_options: Any) -> TrainStep | DistributedTrainStep:
    """Compile `loss_fn(params, *batch)` + backward + optimizer update into one program.

    With a key (``key=jg.random.key(seed)``) step t calls ``loss_fn(params, *batch,
    key=jg.random.fold_in(key, t))``: a fresh key per step for dropout and the like.

    With an MPI communicator (``comm=MPI.COMM_WORLD``) the step is data-parallel:
    each rank passes its own shard of the batch, one allreduce per step averages
    the gradients, and every rank applies the same update (see jitgrad.distributed);
    with a key, each rank folds in its rank too.
    """
    if comm is not None:
        from .distributed import DistributedTrainStep
        return DistributedTrainStep(loss_fn, params, optimizer, comm, key=key, **jit_options)
    return TrainStep(loss_fn, params, optimizer, key=key, **jit_options)
