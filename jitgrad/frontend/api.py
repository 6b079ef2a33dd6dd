"""The public transformations: jit, grad, value_and_grad, checkpoint."""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compiler import pipeline
from ..compiler import remat as remat_mod
from ..compiler.passes import dce
from ..compiler.pipeline import Compiled
from ..compiler.precision import check_precision
from ..errors import JitgradError, NonFiniteError, UndefinedGradientError
from . import tree
from .autodiff import grad_program
from .core import _trace_stack, eval_program, instr_tags, user_frame_loc
from .ir import Program, dtype_short
from .static_args import StaticArgs
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


def _roots(n: int, arg_names: Sequence[str] = ()) -> list[str]:
    """What to call each of n arguments in errors: arg_names for the leading ones (train_step:
    "params", "state", ...), then args[0], args[1], ..."""
    return [arg_names[k] if k < len(arg_names) else f"args[{k - len(arg_names)}]"
            for k in range(n)]


def _leaf_names(in_tree: tree.TreeDef, roots: Sequence[str]) -> list[str]:
    return [p for root, td in zip(roots, tree.children_of(in_tree), strict=True)
            for p in tree.leaf_paths(td, root)]


def _signatures(leaves: Sequence[Any], in_tree: tree.TreeDef,
                roots: Sequence[str] | None = None) -> list[Signature]:
    """Each argument leaf's signature; an unsupported one is named by its place and the call."""
    try:
        return [signature_of(x) for x in leaves]
    except JitgradError as e:
        bad = next(i for i, x in enumerate(leaves) if not _supported(x))
        names = _leaf_names(in_tree, roots or _roots(len(tree.children_of(in_tree))))
        raise type(e)(f"{names[bad]}: {e} (at {user_frame_loc()})") from None


def _supported(x: Any) -> bool:
    try:
        signature_of(x)
    except JitgradError:
        return False
    return True


def check_finite_inputs(arrays: Sequence[np.ndarray], in_tree: tree.TreeDef,
                        roots: Sequence[str]) -> None:
    """check_finite: a NaN or Inf passed in is the caller's, named by its place and line.

    Compiled code may drop a NaN before any result sees it (relu once did, an argmax or a
    comparison still may), so the inputs are checked, not only the results. roots name
    the arguments (see _roots). Integer and boolean inputs are never non-finite.
    """
    bad = next((i for i, a in enumerate(arrays)
                if a.dtype.kind == "f" and not np.isfinite(a).all()), None)
    if bad is None:
        return
    a = arrays[bad]
    first = tuple(int(i) for i in np.unravel_index(np.flatnonzero(~np.isfinite(a))[0], a.shape))
    shape = ",".join(map(str, a.shape))
    raise NonFiniteError(f"input {_leaf_names(in_tree, roots)[bad]} ({dtype_short(a.dtype)}"
                         f"[{shape}]) holds {a[first]} at index {first} (at "
                         f"{user_frame_loc()}); check_finite rejects non-finite inputs")


def _as_input_array(x: Any, sig: Signature) -> np.ndarray:
    arr = np.asarray(x, dtype=sig[1])
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)


class CompiledFunction:
    """`jg.jit(fn)`: traces fn once per input signature, optimises and compiles the program.

    After the first call (or `.lower(*args)`), `.program`, `.plan` and `.source`
    describe the most recent specialisation.
    """

    def __init__(self, fn: Callable[..., Any], *, static_argnums: Any = None,
                 static_argnames: Any = None, remat: Any = None, memory_budget: Any = None,
                 backend: str | None = None, check_finite: bool = False,
                 donate: dict[int, int] | None = None, pinned: Sequence[int] | None = None,
                 arg_names: Sequence[str] = (), precision: str | None = None):
        """donate maps result leaf -> argument leaf whose array receives it (train_step);
        pinned lists result leaves the Numba backend lays out contiguously at the start of
        its arena and returns as views of it (distributed training all-reduces them);
        arg_names name the leading arguments in errors (check_finite_inputs)."""
        self.fn = fn
        self.static = StaticArgs(fn, static_argnums, static_argnames)
        self.arg_names = tuple(arg_names)
        self._backend = backend
        self.options = {"check_finite": bool(check_finite) or check_finite_from_env()}
        remat_mod.check_policy(remat, memory_budget)
        self.remat, self.memory_budget = remat, memory_budget
        self.precision = check_precision(precision)
        if self.precision is not None:
            self.options["precision"] = self.precision
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

    def _specialise(self, args: Sequence[Any], flat: Any = None, static_key: Any = None,
                    roots: Sequence[str] | None = None
                    ) -> tuple[Compiled, list[Any], list[Signature]]:
        """The compiled specialisation for these traced arguments (static_key: the static
        ones, from StaticArgs.split, which args then come from; roots: their names)."""
        leaves, in_tree = flat or tree.flatten(tuple(args))
        sigs = _signatures(leaves, in_tree, roots or _roots(len(args), self.arg_names))
        backend = self._backend or DEFAULT_BACKEND
        key = (backend, in_tree, tuple(sigs)) if static_key is None else (
            backend, in_tree, tuple(sigs), static_key)
        try:
            entry = self._cache.get(key)
        except TypeError:  # a registered class's aux data, a static dataclass field
            raise JitgradError(f"the arguments' structure is not hashable: "
                               f"{tree.first_unhashable(in_tree)}; it is part of the cache key "
                               f"(at {user_frame_loc()})") from None
        if entry is None:
            with self._lock:
                entry = self._cache.get(key)
                if entry is None:
                    fn = self.fn if static_key is None else self.static.bound(self.fn, static_key)
                    entry = pipeline.build(fn, in_tree, sigs, backend=backend,
                                           remat=self.remat, memory_budget=self.memory_budget,
                                           **self.options)
                    self._cache[key] = entry
        self._last = entry
        return entry, leaves, sigs

    def _split(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], Any, list[str]]:
        """(the traced arguments, the static ones' key, a name per traced argument)."""
        roots = _roots(len(args), self.arg_names)
        if not (kwargs or self.static):
            return args, None, roots
        traced, key, positions = self.static.split(args, kwargs)
        return traced, key, [roots[i] for i in positions] + ["kwargs"]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _trace_stack():
            # inside another trace (even with constant arguments, as fn may close over
            # traced values): inline, as jax.jit does
            if self.precision is not None:
                # The policy is a pass over one whole compiled program (forward and
                # backward GEMMs alike): inlined, it would silently be lost.
                raise JitgradError(f"a function jitted with precision={self.precision!r} "
                                   f"was called inside another traced function; give "
                                   f"precision= to the outermost jit (or train_step) "
                                   f"instead (at {user_frame_loc()})")
            return self.fn(*args, **kwargs)
        static_key = roots = None
        if kwargs or self.static:
            args, static_key, roots = self._split(args, kwargs)
        flat = tree.flatten(args)
        entry, leaves, sigs = self._specialise(args, flat, static_key, roots)
        arrays = [_as_input_array(x, s) for x, s in zip(leaves, sigs, strict=True)]
        if self.options["check_finite"]:
            check_finite_inputs(arrays, flat[1], roots or _roots(len(args), self.arg_names))
        return tree.unflatten(entry.out_tree, entry.executable.run(arrays))

    def lower(self, *args: Any, **kwargs: Any) -> Compiled:
        """Trace and compile for these arguments without running."""
        traced, static_key, roots = self._split(args, kwargs)
        return self._specialise(traced, static_key=static_key, roots=roots)[0]

    def plan_only(self, *args: Any, **kwargs: Any) -> Compiled:
        """Trace, optimise and lay out memory for these arguments as the Numba backend
        would, compiling nothing (whatever the backend)."""
        traced, static_key, roots = self._split(args, kwargs)
        leaves, in_tree = tree.flatten(tuple(traced))
        options = {k: v for k, v in self.options.items() if k != "check_finite"}
        fn = self.fn if static_key is None else self.static.bound(self.fn, static_key)
        return pipeline.build(fn, in_tree, _signatures(leaves, in_tree, roots), backend=None,
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


def jit(fn: Callable[..., Any], *, static_argnums: int | Sequence[int] | None = None,
        static_argnames: str | Sequence[str] | None = None, remat: str | None = None,
        memory_budget: int | None = None, backend: str | None = None,
        check_finite: bool = False, precision: str | None = None) -> CompiledFunction:
    """Compile fn: traced once per input signature, run natively (backend="numba").

    static_argnums / static_argnames: arguments passed to fn as the Python values they
    are (shapes, loop counts, flags), hashed into the cache key: a new value compiles
    again (see jitgrad.static_args). Keyword arguments are traced unless static.

    remat="sqrt" stores about sqrt(n) of the values the backward sweep needs and
    recomputes the rest; "full" stores none of them, as jax.checkpoint around fn:
    backward recomputes each from the arguments (on a chain all at once, so the peak
    stays where it was); memory_budget=BYTES stores what fits an arena of that many
    bytes with the least recomputation (see jitgrad.compiler.remat).

    precision="bf16" is mixed precision as torch.autocast(dtype=bfloat16) makes it: the
    float32 operands of every GEMM, forward and backward, are rounded to bfloat16 (an
    explicit `round_bf16` step of the program) and multiplied with float32 accumulation
    and results; everything else stays float32 (see jitgrad.compiler.precision).
    None or "f32" (the default): float32 throughout.
    """
    return CompiledFunction(fn, static_argnums=static_argnums, static_argnames=static_argnames,
                            remat=remat, memory_budget=memory_budget, backend=backend,
                            check_finite=check_finite, precision=precision)


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


def argnums_tuple(argnums: int | Sequence[int]) -> tuple[bool, tuple[int, ...]]:
    """(whether argnums is a sequence, its numbers)."""
    multi = not isinstance(argnums, int)
    return multi, (tuple(argnums) if multi else (argnums,))


@dataclass(frozen=True)
class TracedWrt:
    """fn traced as a function of its differentiated arguments alone (trace_wrt)."""

    program: Program       # inputs: the differentiated leaves, then captured values
    out_tree: tree.TreeDef
    wrt_leaves: list[Any]  # the differentiated arguments' leaves, as passed
    wrt_tree: tree.TreeDef  # their structure: a tuple with one child per argnum
    captured: list[Any]    # values of enclosing traces the program reads

    def inputs(self) -> list[Any]:
        return self.wrt_leaves + self.captured


def trace_wrt(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
              nums: Sequence[int], what: str) -> TracedWrt:
    """Trace fn with the arguments at positions nums as the program's inputs.

    As in JAX, only the differentiated arguments are abstracted: the others, and the
    keyword arguments, reach fn as they are (a Python int stays an int, usable as a
    shape; a value traced by an enclosing jit is captured)."""
    for n in nums:
        if not -len(args) <= n < len(args):
            raise JitgradError(f"{what}: argnums {n} is out of range for {len(args)} "
                               f"positional arguments (at {user_frame_loc()})")
    leaves, wrt_tree = tree.flatten(tuple(args[n] for n in nums))
    sigs = _signatures(leaves, wrt_tree, [f"args[{n}]" for n in nums])
    names = _leaf_names(wrt_tree, [f"argument {n}" for n in nums])
    for (shape, dtype, _), name in zip(sigs, names, strict=True):
        if dtype.kind != "f":
            raise UndefinedGradientError(
                f"cannot differentiate with respect to an integer/boolean input "
                f"({np.dtype(dtype)}{shape} in {name}): integer values carry no gradient")

    def of_wrt(*wrt_args: Any) -> Any:
        full = list(args)
        for n, a in zip(nums, wrt_args, strict=True):
            full[n] = a
        return fn(*full, **kwargs)

    prog, out_tree, captured = trace_flat(of_wrt, wrt_tree, sigs)
    return TracedWrt(prog, out_tree, list(leaves), wrt_tree, captured)


def per_argnum(traced: TracedWrt, leaves: Sequence[Any], multi: bool) -> Any:
    """Leaves laid out like the differentiated arguments (a tuple of them if multi)."""
    trees = tree.unflatten(traced.wrt_tree, leaves)
    return trees if multi else trees[0]


def aux_split(out_tree: tree.TreeDef, has_aux: bool
              ) -> tuple[tree.TreeDef, tree.TreeDef | None]:
    """(the structure of what is differentiated, of the aux data or None)."""
    if not has_aux:
        return out_tree, None
    children = tree.children_of(out_tree)
    if out_tree[0] != "tuple" or len(children) != 2:
        raise JitgradError(f"with has_aux=True the function must return a pair (output, aux), "
                           f"got {tree.describe(out_tree)} (at {user_frame_loc()})")
    return children[0], children[1]


def value_and_grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
                   has_aux: bool = False) -> Callable[..., Any]:
    """fn's value and its gradient with respect to argument(s) argnums (as jax.value_and_grad).

    Returns (value, grads), or ((value, aux), grads) with has_aux. grads mirrors
    the structure of the differentiated argument, or is a tuple of such for a
    tuple argnums. Keyword arguments are never differentiated. The value is a float
    scalar, or a float array of size 1 (as autograd allows).
    """
    multi, nums = argnums_tuple(argnums)

    @functools.wraps(fn)
    def value_and_grad_fn(*args: Any, **kwargs: Any) -> Any:
        if not _trace_stack():
            return compiled(*args, **kwargs)
        traced = trace_wrt(fn, args, kwargs, nums, "grad")
        value_tree, _ = aux_split(traced.out_tree, has_aux)
        if value_tree != tree.LEAF:
            raise JitgradError(f"grad needs a function returning a scalar, got a "
                               f"{tree.describe(value_tree)}" + ("" if has_aux else
                               "; use has_aux=True for extra outputs"))
        prog = dce(traced.program)
        gprog = grad_program(prog, range(len(traced.wrt_leaves)), out_index=0)
        outs = eval_program(gprog, traced.inputs())
        n_out = len(prog.outputs)
        value = tree.unflatten(traced.out_tree, outs[:n_out])
        return value, per_argnum(traced, outs[n_out:], multi)

    compiled = jit(value_and_grad_fn)
    return value_and_grad_fn


def grad(fn: Callable[..., Any], argnums: int | Sequence[int] = 0,
         has_aux: bool = False) -> Callable[..., Any]:
    """The gradient of a scalar function (as jax.grad); (grads, aux) with has_aux."""
    vg = value_and_grad(fn, argnums, has_aux)

    @functools.wraps(fn)
    def grad_fn(*args: Any, **kwargs: Any) -> Any:
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return grad_fn
