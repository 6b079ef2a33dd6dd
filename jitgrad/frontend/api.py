"""The public transformations: jit, grad, value_and_grad."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..compiler import pipeline
from ..compiler import remat as remat_mod
from ..compiler.passes import dce
from ..compiler.pipeline import Compiled
from ..errors import JitgradError, NonFiniteError, UndefinedGradientError
from . import tree
from .autodiff import grad_program
from .core import Tracer, _trace_stack, eval_program, instr_tags, user_frame_loc
from .ir import dtype_short
from .trace import Signature, signature_of, trace_flat

DEFAULT_BACKEND = "numba"


@contextlib.contextmanager
def default_backend(name: str) -> Iterator[None]:
    """Within the block, jit without an explicit backend uses `name` (tests, comparisons)."""
    global DEFAULT_BACKEND
    old, DEFAULT_BACKEND = DEFAULT_BACKEND, name
    try:
        yield
    finally:
        DEFAULT_BACKEND = old


def check_finite_from_env() -> bool:
    """JITGRAD_CHECK_FINITE=1 turns check_finite on for every jit (e.g. while debugging)."""
    return os.environ.get("JITGRAD_CHECK_FINITE", "").strip().lower() not in ("", "0", "false")


def _signatures(leaves: Sequence[Any], in_tree: tree.TreeDef) -> list[Signature]:
    """Each argument leaf's signature; an unsupported one is named by its place and the call."""
    try:
        return [signature_of(x) for x in leaves]
    except JitgradError as e:
        bad = next(i for i, x in enumerate(leaves) if not _supported(x))
        where = "args" + tree.leaf_paths(in_tree)[bad]
        raise type(e)(f"{where}: {e} (at {user_frame_loc()})") from None


def _supported(x: Any) -> bool:
    try:
        signature_of(x)
    except JitgradError:
        return False
    return True


def check_finite_inputs(arrays: Sequence[np.ndarray], in_tree: tree.TreeDef,
                        arg_names: Sequence[str] = ()) -> None:
    """check_finite: a NaN or Inf passed in is the caller's, named by its place and line.

    Compiled code may drop a NaN before any result sees it (relu once did, an argmax or a
    comparison still may), so the inputs are checked, not only the results. arg_names
    names the leading arguments (train_step: "params", "state", ...); the others are
    args[0], args[1], ... Integer and boolean inputs are never non-finite.
    """
    bad = next((i for i, a in enumerate(arrays)
                if a.dtype.kind == "f" and not np.isfinite(a).all()), None)
    if bad is None:
        return
    paths = [p for k, td in enumerate(in_tree[1]) for p in tree.leaf_paths(
        td, arg_names[k] if k < len(arg_names) else f"args[{k - len(arg_names)}]")]
    a = arrays[bad]
    first = tuple(int(i) for i in np.unravel_index(np.flatnonzero(~np.isfinite(a))[0], a.shape))
    shape = ",".join(map(str, a.shape))
    raise NonFiniteError(f"input {paths[bad]} ({dtype_short(a.dtype)}[{shape}]) holds "
                         f"{a[first]} at index {first} (at {user_frame_loc()}); check_finite "
                         "rejects non-finite inputs")


def _as_input_array(x: Any, sig: Signature) -> np.ndarray:
    arr = np.asarray(x, dtype=sig[1])
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


class CompiledFunction:
    """`jg.jit(fn)`: traces fn once per input signature, optimises and compiles the program.

    After the first call (or `.lower(*args)`), `.program`, `.plan` and `.source`
    describe the most recent specialisation.
    """

    def __init__(self, fn: Callable[..., Any], *, remat: Any = None, memory_budget: Any = None,
                 backend: str | None = None, check_finite: bool = False,
                 donate: dict[int, int] | None = None, pinned: Sequence[int] | None = None,
                 arg_names: Sequence[str] = ()):
        """donate maps result leaf -> argument leaf whose array receives it (train_step);
        pinned lists result leaves the Numba backend lays out contiguously at the start of
        its arena and returns as views of it (distributed training all-reduces them);
        arg_names name the leading arguments in errors (check_finite_inputs)."""
        self.fn = fn
        self.arg_names = tuple(arg_names)
        self._backend = backend
        self.options = {"check_finite": bool(check_finite) or check_finite_from_env()}
        remat_mod.check_policy(remat, memory_budget)
        self.remat, self.memory_budget = remat, memory_budget
        if donate:
            self.options["donate"] = dict(donate)
        if pinned:
            self.options["pinned"] = list(pinned)
        self._cache: dict[Any, Compiled] = {}
        self._lock = threading.Lock()
        self._last: Compiled | None = None
        # updated=(): copying fn.__dict__ would clobber our attributes when fn is itself
        # a CompiledFunction (or wraps one), e.g. jg.grad(jg.jit(f)).
        functools.update_wrapper(self, fn, updated=())

    def _specialise(self, args: Sequence[Any], flat: Any = None
                    ) -> tuple[Compiled, list[Any], list[Signature]]:
        leaves, in_tree = flat or tree.flatten(tuple(args))
        sigs = _signatures(leaves, in_tree)
        backend = self._backend or DEFAULT_BACKEND
        key = (backend, in_tree, tuple(sigs))
        entry = self._cache.get(key)
        if entry is None:
            with self._lock:
                entry = self._cache.get(key)
                if entry is None:
                    entry = pipeline.build(self.fn, in_tree, sigs, backend=backend,
                                           remat=self.remat, memory_budget=self.memory_budget,
                                           **self.options)
                    self._cache[key] = entry
        self._last = entry
        return entry, leaves, sigs

    def __call__(self, *args: Any) -> Any:
        if _trace_stack():
            # inside another trace (even with constant arguments, as fn may close over
            # traced values): inline, as jax.jit does
            return self.fn(*args)
        flat = tree.flatten(args)
        entry, leaves, sigs = self._specialise(args, flat)
        arrays = [_as_input_array(x, s) for x, s in zip(leaves, sigs, strict=True)]
        if self.options["check_finite"]:
            check_finite_inputs(arrays, flat[1], self.arg_names)
        return tree.unflatten(entry.out_tree, entry.executable.run(arrays))

    def lower(self, *args: Any) -> Compiled:
        """Trace and compile for these arguments without running."""
        return self._specialise(args)[0]

    def plan_only(self, *args: Any) -> Compiled:
        """Trace, optimise and lay out memory for these arguments as the Numba backend
        would, compiling nothing (whatever the backend)."""
        leaves, in_tree = tree.flatten(tuple(args))
        options = {k: v for k, v in self.options.items() if k != "check_finite"}
        return pipeline.build(self.fn, in_tree, _signatures(leaves, in_tree), backend=None,
                              remat=self.remat, memory_budget=self.memory_budget, **options)

    def _described(self) -> Compiled:
        if self._last is None:
            raise JitgradError("nothing compiled yet: call the function or .lower(*args) first")
        return self._last

    @property
    def latest(self) -> Compiled | None:
        """The specialisation of the most recent call or lower (None before any)."""
        return self._last

    # cf.show(*args, ...) is attached by jitgrad.tools.show (the tools layer builds on this one).

    program = property(lambda self: self._described().program)
    plan = property(lambda self: self._described().plan)
    source = property(lambda self: self._described().source)


def jit(fn: Callable[..., Any], *, remat: str | None = None, memory_budget: int | None = None,
        backend: str | None = None, check_finite: bool = False) -> CompiledFunction:
    """Compile fn: traced once per input signature, run natively (backend="numba").

    remat="sqrt" stores about sqrt(n) of the values the backward sweep needs and
    recomputes the rest; "full" stores none of them, as jax.checkpoint around fn:
    backward recomputes each from the arguments (on a chain all at once, so the peak
    stays where it was); memory_budget=BYTES stores what fits an arena of that many
    bytes with the least recomputation (see jitgrad.compiler.remat).
    """
    return CompiledFunction(fn, remat=remat, memory_budget=memory_budget, backend=backend,
                            check_finite=check_finite)


_checkpoint_regions = itertools.count()


def checkpoint(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn's interior is recomputed in the backward sweep instead of stored (as jax.checkpoint).

    Only the region's inputs stay live from the forward pass; every value computed
    inside is recomputed, once, when the backward sweep first needs it.
    """
    @functools.wraps(fn)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        with instr_tags(checkpoint=next(_checkpoint_regions)):
            return fn(*args, **kwargs)

    return checkpointed


def _leaf_ranges(args: Sequence[Any]) -> list[tuple[int, int, tree.TreeDef]]:
    ranges, start = [], 0
    for a in args:
        leaves, td = tree.flatten(a)
        ranges.append((start, start + len(leaves), td))
        start += len(leaves)
    return ranges


def value_and_grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable[..., Any]:
    """fn's value and its gradient with respect to argument(s) argnums (as jax.value_and_grad).

    Returns (value, grads), or ((value, aux), grads) with has_aux. grads mirrors
    the structure of the differentiated argument, or is a tuple of such for a
    tuple argnums.
    """
    multi = not isinstance(argnums, int)
    nums = tuple(argnums) if multi else (argnums,)

    @functools.wraps(fn)
    def value_and_grad_fn(*args: Any) -> Any:
        leaves, in_tree = tree.flatten(tuple(args))
        if not _trace_stack() and not any(isinstance(x, Tracer) for x in leaves):
            return compiled(*args)
        for n in nums:
            if not -len(args) <= n < len(args):
                raise JitgradError(f"argnums {n} is out of range for {len(args)} arguments")
        ranges = _leaf_ranges(args)
        sigs = _signatures(leaves, in_tree)
        wrt = [i for n in nums for i in range(ranges[n][0], ranges[n][1])]
        for i in wrt:
            if sigs[i][1].kind != "f":
                raise UndefinedGradientError(
                    f"cannot differentiate with respect to an integer/boolean input "
                    f"({np.dtype(sigs[i][1])}{sigs[i][0]} in argument "
                    f"{next(n for n in nums if ranges[n][0] <= i < ranges[n][1])}): integer "
                    "values carry no gradient")
        prog, out_tree, captured = trace_flat(fn, in_tree, sigs)
        if has_aux:
            if out_tree[0] != "tuple" or len(out_tree[1]) != 2 or out_tree[1][0] != tree.LEAF:
                raise JitgradError("with has_aux=True the function must return (scalar, aux)")
        elif out_tree != tree.LEAF:
            raise JitgradError(f"grad needs a function returning a scalar, got a "
                               f"{tree.describe(out_tree)}; use has_aux=True for extra outputs")
        gprog = grad_program(dce(prog), wrt, out_index=0)
        outs = eval_program(gprog, list(leaves) + captured)
        n_out = len(prog.outputs)
        value = tree.unflatten(out_tree, outs[:n_out])
        grads, pos = [], n_out
        for n in nums:
            start, stop, td = ranges[n]
            grads.append(tree.unflatten(td, outs[pos:pos + stop - start]))
            pos += stop - start
        return value, (tuple(grads) if multi else grads[0])

    compiled = jit(value_and_grad_fn)
    return value_and_grad_fn


def grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
         has_aux: bool = False) -> Callable[..., Any]:
    """The gradient of a scalar function (as jax.grad); (grads, aux) with has_aux."""
    vg = value_and_grad(fn, argnums, has_aux)

    @functools.wraps(fn)
    def grad_fn(*args: Any) -> Any:
        value, grads = vg(*args)
        return (grads, value[1]) if has_aux else grads

    return grad_fn
