"""`jitgrad show` and `cf.show(...)`: every stage of one function, as text and as pictures.

What is shown. If the function returns a float scalar (a loss), the program
shown is that of `jg.value_and_grad(fn, argnums)` (argnums by default 0, as in
`jg.grad`, or the first all-float argument if argument 0 is not one): the
forward graph G plus the backward subgraph B, as training runs it
(`grad=False` shows the function alone). A
`TrainStep` is shown as the one program it compiles (forward, backward and
optimizer update). Stages:

- ``ir``: the function as traced (before any pass);
- ``grad``: the gradient program as `value_and_grad` traces it (before passes);
- ``optimized``: after the passes (and recomputation, with `remat`), plus its
  kernel calls (fused kernels visible: which instructions each call runs);
- ``plan``: the memory plan table; ``source``: the generated Numba source.

Nothing is compiled: the program is lowered and planned in pure Python, as the
Numba backend would (so it is quick and needs no compiler).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import runpy
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from ..compiler import pipeline
from ..compiler.backend import Planned, glue_source
from ..errors import JitgradError
from ..frontend import tree
from ..frontend.api import CompiledFunction, _leaf_ranges, value_and_grad
from ..frontend.core import is_const
from ..frontend.ir import SUPPORTED_DTYPES, Program, dtype_named, dtype_short
from ..frontend.trace import signature_of, trace_flat
from . import graph
from .options import policy_options

EXAMPLE_ATTR = "__jitgrad_example__"
_SPEC = re.compile(r"\s*([a-z0-9]+)\s*(?:\[\s*([0-9,\s]*)\])?\s*")


# ---------------------------------------------------------------- example inputs


def parse_arg_spec(text: str) -> np.ndarray:
    """'f32[64,784]' -> a float32 array of that shape; 'i64[64]', 'f32[]' or 'f32' likewise.

    Only shapes and dtypes matter (nothing is run), so the array is zeros as a
    read-only broadcast view: f32[100000,100000] takes no memory.
    """
    m = _SPEC.fullmatch(text)
    dtype = dtype_named(m.group(1)) if m else None
    if dtype is None:
        names = " ".join(dtype_short(d) for d in SUPPORTED_DTYPES)
        raise JitgradError(f"bad argument spec {text!r}: expected DTYPE[d0,d1,...] such as "
                           f"f32[64,784], i64[64] or f32[] (dtypes: {names})")
    dims = [d.strip() for d in (m.group(2) or "").split(",") if d.strip()]
    shape = tuple(int(d) for d in dims)
    try:
        return np.broadcast_to(np.zeros((), dtype), shape)
    except ValueError as e:  # more elements than an array can index
        raise JitgradError(f"bad argument spec {text!r}: {e}") from None


@contextlib.contextmanager
def blame_script(script: str, what: str) -> Iterator[None]:
    """Report an exception raised by the user's script (a SyntaxError in it, or one whose
    traceback runs through it and does not end inside jitgrad) as one JitgradError naming
    ``what`` and the script's line. jitgrad's own errors, exceptions the script has no
    part in, and bugs inside jitgrad pass through unchanged."""
    try:
        yield
    except (JitgradError, OSError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as e:
        frames = traceback.extract_tb(e.__traceback__)
        script_path = os.path.abspath(script)
        mine = [f for f in frames if os.path.abspath(f.filename) == script_path]
        package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # jitgrad/
        in_jitgrad = bool(frames) and os.path.abspath(frames[-1].filename).startswith(package)
        if in_jitgrad or not (mine or isinstance(e, SyntaxError)):
            raise  # not the script's doing (a bug in jitgrad: its traceback is needed)
        where = f" (at {script}:{mine[-1].lineno})" if mine else ""
        detail = f"exit({e.code!r})" if isinstance(e, SystemExit) else \
            f"{type(e).__name__}: {e}"
        raise JitgradError(f"{what} failed: {detail}{where}") from None


def check_arguments(fn: Callable[..., Any], args: Sequence[Any], name: str) -> None:
    """The example arguments must fit fn's parameters (else a TypeError from deep inside
    tracing)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin or the like: tracing will say
    try:
        sig.bind(*args)
    except TypeError as e:
        raise JitgradError(f"{name} cannot be called with the {len(args)} example "
                           f"argument(s): {e}") from None


def load_target(target: str) -> tuple[Any, Any]:
    """'path/script.py:NAME' -> (the object NAME, the script's example arguments or None).

    The script's `__jitgrad_example__` may be a tuple/list of arguments, a
    callable returning one, or a dict {NAME: either} for scripts with several
    functions.
    """
    script, sep, name = target.rpartition(":")
    if not sep or not script or not name.isidentifier():
        raise JitgradError(f"expected SCRIPT.py:FUNCTION, got {target!r}")
    if not os.path.isfile(script):
        raise FileNotFoundError(2, "no such script", script)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # its own imports
    try:
        with blame_script(script, f"running {script}"):
            namespace = runpy.run_path(script, run_name="__jitgrad_show__")
    finally:
        sys.path.pop(0)
    if name not in namespace:
        found = sorted(k for k, v in namespace.items()
                       if callable(v) and not k.startswith("_") and not inspect.isclass(v)
                       and getattr(v, "__module__", None) == "__jitgrad_show__")
        raise JitgradError(f"{script} defines no {name!r}"
                           + (f" (functions there: {', '.join(found)})" if found else ""))
    obj = namespace[name]
    if not callable(obj):
        raise JitgradError(f"{script}:{name} is a {type(obj).__name__}, not a function")
    example = namespace.get(EXAMPLE_ATTR)
    if isinstance(example, dict):
        example = example.get(name)
    if callable(example):
        with blame_script(script, f"{script}:{EXAMPLE_ATTR}()"):
            example = example()
    if example is not None and not isinstance(example, (tuple, list)):
        example = (example,)
    return obj, None if example is None else tuple(example)


def _leaf_names(fn: Callable[..., Any], args: Sequence[Any]) -> list[str]:
    """'x', 'params.W1', 'xs[0]', ...: a name for each input leaf, from fn's parameters."""
    try:
        sig = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        sig = []
    params = [p.name for p in sig if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    star = next((p.name for p in sig if p.kind == p.VAR_POSITIONAL), None)
    # *batch: batch[0], batch[1], ...
    params += [f"{star}[{k}]" for k in range(len(args) - len(params))] if star else []
    names: list[str] = []
    for i, a in enumerate(args):
        names += tree.leaf_paths(tree.flatten(a)[1], params[i] if i < len(params) else f"arg{i}",
                                 ".{}".format)
    return names


# ---------------------------------------------------------------- inspection


@dataclass
class Inspection:
    """One function at every stage (see the module docstring)."""

    name: str
    traced: Program                    # the function as traced
    grad: Program | None               # value_and_grad's program, when the function has one
    grad_note: str                     # what `grad` is, or why there is none
    program: Program                   # as compiled: after passes and recomputation
    planned: Planned
    input_names: list[str]
    output_names: list[str]
    policy: str = "none"
    remat: Any = None                  # remat.RematReport
    donate: dict[int, int] | None = None  # train_step's in-place parameter updates
    _source: str | None = field(default=None, repr=False)

    @property
    def plan(self) -> Any:
        return self.planned.plan

    def kernels_text(self) -> str:
        """The kernel calls in order; a fused kernel lists the instructions it runs."""
        names = self.plan.names
        rows = [f"{len(self.planned.low.steps)} kernel calls "
                f"({sum(len(s.instrs) > 1 for s in self.planned.low.steps)} fused):"]
        for i, s in enumerate(self.planned.low.steps):
            runs = ", ".join(f"{ins.prim.name}->{names.get(ins.outputs[0], '?')}"
                             for ins in s.instrs if not is_const(ins))
            rows.append(f"  {i:>4} {s.role:<9} {s.label}" + (f"   [{runs}]" if
                                                              len(s.instrs) > 1 else ""))
        return "\n".join(rows)

    def source(self) -> str:
        """The generated glue, then every fused kernel the Numba backend would compile."""
        if self._source is None:
            from ..compiler.kernels import CFUNC_PRELUDE
            parts = [glue_source(self.planned)]
            for sym, src in sorted(self.planned.low.fused_sources().items()):
                loop = src.removeprefix(CFUNC_PRELUDE).strip()
                parts.append(f"# ---- fused kernel {sym}\n{loop}")
            self._source = "\n\n".join(parts) + "\n"
        return self._source

    def dot(self, which: str = "optimized", *, edge_labels: bool = False,
            max_nodes: int = 150, collapse: bool = True) -> str:
        """DOT text of the traced, gradient or optimized program (fused kernels boxed)."""
        names = None
        if which == "optimized":  # named as the plan and the program printout name them
            prog, kernels = self.planned.prepared, [s.instrs for s in self.planned.low.steps]
            names = self.plan.names
        elif which == "grad" and self.grad is not None:
            prog, kernels = self.grad, []
        elif which in ("traced", "ir") or which == "grad":
            prog, kernels = self.traced, []
        else:
            raise JitgradError(f"unknown graph {which!r}: use traced, grad or optimized")
        outs = self.output_names if len(prog.outputs) == len(self.output_names) else None
        title = f"{self.name}: {which}" + (f", remat {self.policy}" if self.policy != "none"
                                          else "")
        return graph.to_dot(prog, kernels=kernels, input_names=self.input_names,
                            output_names=outs, edge_labels=edge_labels, max_nodes=max_nodes,
                            collapse=collapse, title=title, names=names)

    def summary(self) -> str:
        roles: dict[str, int] = {}
        for ins in self.program.instrs:
            roles[ins.role] = roles.get(ins.role, 0) + 1
        counts = ", ".join(f"{n} {r}" for r, n in roles.items())
        steps = self.planned.low.steps
        return (f"{self.name}: {len(self.program.instrs)} instructions ({counts}); "
                f"{len(steps)} kernel calls, {sum(len(s.instrs) > 1 for s in steps)} fused; "
                f"arena {self.plan.arena_bytes} bytes, at most {self.plan.peak_live_bytes} live "
                f"(remat {self.policy})\n  {self.grad_note}")


def _is_float_scalar(prog: Program) -> bool:
    return (len(prog.outputs) == 1 and prog.outputs[0].shape == ()
            and prog.outputs[0].dtype.kind == "f")


def _default_argnums(args: Sequence[Any]) -> tuple[int, ...]:
    """(0,) as jg.grad's default (loss(params, x, y)), or else the first all-float argument."""
    for i, a in enumerate(args):
        leaves = tree.flatten(a)[0]
        if leaves and all(signature_of(x)[1].kind == "f" for x in leaves):
            return (i,)
    return ()


def inspect_function(fn: Any, args: Sequence[Any], *, grad: bool | None = None,
                     argnums: Sequence[int] | None = None, remat: str | None = None,
                     name: str | None = None) -> Inspection:
    """Trace, differentiate, optimise and plan fn on example args (see the module docstring).

    fn may be a function, a CompiledFunction (its remat options apply unless
    `remat` is given) or a TrainStep (args are then the batch). grad=None
    differentiates a function that returns a float scalar; argnums defaults to
    (0,), as in jg.grad (the first all-float argument if argument 0 is not one).
    """
    from ..training.train import TrainStep
    donate = None
    jit_kw = policy_options(remat)
    policy = remat or "none"
    if isinstance(fn, TrainStep):
        cf = fn.compiled
        args = (fn.params, fn.state, fn.optimizer.hyper(1), *args)
        grad = False  # the step program has its backward pass and update already
        name = name or f"train_step({getattr(fn, 'loss_fn', cf.fn).__name__})"
        fn = cf
    if isinstance(fn, CompiledFunction):
        donate = fn.options.get("donate")
        if remat is None:
            jit_kw = {k: v for k, v in (("remat", fn.remat),
                                        ("memory_budget", fn.memory_budget)) if v is not None}
            policy = str(fn.remat or fn.memory_budget or "none")
        if fn.static:  # the static arguments in place, the others traced
            args, key, _ = fn.static.split(tuple(args), {})
            fn = fn.static.bound(fn.fn, key)
        else:
            fn = fn.fn
    name = name or getattr(fn, "__name__", "function")
    leaves, in_tree = tree.flatten(tuple(args))
    sigs = [signature_of(x) for x in leaves]
    traced, out_tree, captured = trace_flat(fn, in_tree, sigs)
    built_tree = out_tree
    if captured:
        raise JitgradError("the function captured a value being traced elsewhere")
    input_names = _leaf_names(fn, args)
    output_names = tree.leaf_paths(out_tree, "result", ".{}".format)
    gprog = None
    target = fn
    if grad is None:
        grad = _is_float_scalar(traced)
        note = ("" if grad else f"{name} does not return a float scalar: no gradient program "
                "(the function is shown as is)")
    else:
        note = ""
    if grad:
        if not _is_float_scalar(traced):
            raise JitgradError(f"grad: {name} must return a float scalar to be differentiated")
        nums = tuple(argnums) if argnums is not None else _default_argnums(args)
        if not nums:
            raise JitgradError(f"grad: no argument of {name} is a float array to "
                               "differentiate with respect to")
        target = value_and_grad(fn, argnums=nums)
        gprog, built_tree, _ = trace_flat(target, in_tree, sigs)
        ranges = [range(start, stop) for start, stop, _ in _leaf_ranges(args)]
        output_names = ["value"] + [f"∂value/∂{input_names[i]}" for n in nums
                                    for i in ranges[n]]
        note = (f"gradient program: value_and_grad({name}, argnums={nums}): forward G, then "
                f"backward B")
    elif not note:
        note = f"{name} as is (grad=False)"
    entry = pipeline.build_program(gprog or traced, in_tree, sigs, built_tree, backend=None,
                                   donate=donate, **jit_kw)
    planned = entry.planned if jit_kw else entry.planned.with_remat(None)
    result = Inspection(name, traced, gprog, note, entry.program, planned, input_names,
                        output_names, policy, entry.remat, donate)
    return result


# ---------------------------------------------------------------- printing and drawing


def show(fn: Any, args: Sequence[Any], *, ir: bool = False, grad: bool = False,
         optimized: bool = False, plan: bool = False, source: bool = False,
         dot: str | None = None, png: str | None = None, svg: str | None = None,
         timeline: str | None = None, draw: str = "optimized", edge_labels: bool = False,
         max_nodes: int = 150, collapse: bool = True, differentiate: bool | None = None,
         argnums: Sequence[int] | None = None, remat: Sequence[str] | str | None = None,
         name: str | None = None, file: TextIO | None = None) -> Inspection:
    """Print the requested stages of fn on args and write the requested pictures.

    remat: one policy ('none', 'sqrt', '4MiB') or several; the first drives the
    text and the graph, and the timeline overlays them all. Returns the
    Inspection of the first policy.
    """
    out = file if file is not None else sys.stdout
    policies = [remat] if remat is None or isinstance(remat, str) else list(remat) or [None]
    views = [inspect_function(fn, args, grad=differentiate, argnums=argnums, remat=p,
                              name=name) for p in policies]
    first = views[0]

    def section(title: str, body: str) -> None:
        print(f"== {title}", file=out)
        print(body.rstrip("\n"), file=out)
        print(file=out)

    print(first.summary(), file=out)
    print(file=out)
    if ir:
        section(f"traced IR: {first.name}", str(first.traced))
    if grad:
        section("gradient program", str(first.grad) if first.grad is not None
                else first.grad_note)
    if optimized:
        section("optimized program (simplify, cse, dce"
                + (f", remat {first.policy})" if first.policy != "none" else ")"),
                str(first.program))
        section("kernels", first.kernels_text())
    if plan:
        section("memory plan", str(first.plan))
    if source:
        section("generated source", first.source())
    wrote: list[str] = []
    if dot or png or svg:
        text = first.dot(draw, edge_labels=edge_labels, max_nodes=max_nodes, collapse=collapse)
        if dot:
            with open(dot, "w", encoding="utf-8") as f:
                f.write(text)
            wrote.append(dot)
        for path in (png, svg):
            if path:
                graph.render(text, path)
                wrote.append(path)
    if timeline:
        from .timeline import plot_timeline
        plot_timeline({v.policy: v.plan for v in views}, timeline,
                      title=f"memory timeline: {first.name}")
        wrote.append(timeline)
    for path in wrote:
        print(f"wrote {path}", file=out)
    return first


def show_compiled(cf: CompiledFunction, *args: Any, **options: Any) -> Inspection:
    """cf.show(*args, ...): print stages and draw pictures of cf (see show()); args default
    to zeros shaped like cf's last specialisation."""
    if not args:
        args = _last_args(cf)
    return show(cf, args, **options)


CompiledFunction.show = show_compiled  # the method lives with the tool it runs


def _last_args(cf: CompiledFunction) -> tuple[Any, ...]:
    last = cf.latest
    if cf.static:
        raise JitgradError("cf.show() of a function with static arguments needs its "
                           "arguments: cf.show(*args)")
    if last is not None:
        leaves = [(float if np.dtype(d).kind == "f" else int)(0) if weak
                  else np.zeros(shape, d) for shape, d, weak in last.sigs]
        return tuple(tree.unflatten(last.in_tree, leaves))
    raise JitgradError("cf.show() needs example arguments: cf.show(*args), or call cf first")
