"""Primitives, traces and `bind`: the one place where an operation becomes an instruction.

`Primitive.bind` is the single entry point of every operation. With a traced
argument it appends an Instr to that argument's Trace and returns Tracers; with
only concrete arguments it runs the numpy reference implementation, so every
primitive also works eagerly on numpy arrays. Replaying a Program through
`bind` therefore either interprets it (numpy inputs) or copies it into the
current trace (traced inputs) — the grad transform and `grad`-inside-`jit` are
built on that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import JitgradError
from .ir import Instr, Program, Var, check_dtype, literal, numpy_name

Aval = tuple[tuple[int, ...], np.dtype]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jitgrad/
_NUMPY_DIR = os.path.dirname(os.path.abspath(np.__file__))


class Primitive:
    """An operation of the IR, with every rule about it declared beside its definition.

    Meaning: `def_impl` (numpy reference), `def_shape` (abstract evaluation), `def_vjp`.
    n_outputs: how many results an instruction has; None: as many as its shape rule
    gives (bind then always returns a tuple).
    grad: "rule" (has a VJP rule), "zero" (constant: no gradient flows, e.g.
    stop_gradient), or "undefined" (piecewise constant: a requested gradient
    through it raises UndefinedGradientError).

    Compilation (read by the pipeline, which never names a primitive):
    - `def_scalar`: the scalar expression of an elementwise primitive, which fusion
      inlines into one loop with its neighbours;
    - `def_lowering`: library-kernel calls (a `kernels.Kernel` declares its C signature);
    - `def_accumulate`: the call computing `x + this` in x's buffer (GEMM's beta = 1),
      used where a primitive that `absorbs_accumulation` (add) reads this one's result;
    - `sums_in_producer`: a sum over leading axes, which fusion computes inside the
      elementwise loop producing its input (compiler/fusion.py);
    - `joint`: primitives lowered as one call when they share inputs (a loss and its
      gradient);
    - `def_prepare`: a rewrite into the form the kernels take (reductions over
      contiguous axes); `index_inputs`: inputs the kernels read as int64;
    - `gemm_operands`: inputs a mixed-precision policy rounds (a GEMM's operands,
      compiler/precision.py);
    - `def_simplify`: an algebraic simplification (`passes.simplify`);
    - `def_cost`: the work of one instruction, for recomputation (default: elements);
    - `def_label`: how `jitgrad show`'s graph prints its parameters.
    """

    def __init__(self, name: str, family: str, *, n_outputs: int | None = 1, grad: str = "rule",
                 index_inputs: tuple[int, ...] = (), absorbs_accumulation: bool = False,
                 gemm_operands: tuple[int, ...] = ()):
        self.name = name
        self.family = family
        self.n_outputs = n_outputs
        self.grad = grad
        self.index_inputs = index_inputs
        self.gemm_operands = gemm_operands
        self.absorbs_accumulation = absorbs_accumulation
        self.sums_in_producer = False
        self.impl: Callable[..., Any] | None = None
        self.shape_rule: Callable[..., Any] | None = None
        self.vjp: Callable[..., Any] | None = None
        self.scalar: ScalarRule | None = None
        self.lowering: Callable[..., None] | None = None
        self.accumulate: Callable[..., Any] | None = None
        self.joint: Joint | None = None
        self.prepare: Callable[[Instr, list[Instr]], None] | None = None
        self.simplify: Callable[[Instr, dict[Var, Instr]], Var | Instr | None] | None = None
        self.cost: Callable[[Instr], int] | None = None
        self.label: Callable[[Instr], str] | None = None

    def __repr__(self) -> str:
        return self.name

    @property
    def elementwise(self) -> bool:
        """Each output element depends on the same element of each (broadcast) input."""
        return self.family == "elementwise"

    def def_impl(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.impl = fn
        return fn

    def def_shape(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.shape_rule = fn
        return fn

    def def_vjp(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        self.vjp = fn
        return fn

    def def_scalar(self, expr: str | Callable[[Instr, list[str]], str],
                   helpers: str = "") -> Any:
        """expr: a format string over the arguments' expressions ({0}, {1}, ...; {zero} and
        {one} are literals of the result's dtype, {dt} its numpy type), or a function
        (instruction, argument expressions) -> expression. helpers: source of the
        @njit(inline="always") functions expr calls, added to every loop that uses it."""
        if not self.elementwise:
            raise JitgradError(f"{self.name}: only elementwise primitives have a scalar "
                               f"expression")
        self.scalar = ScalarRule(expr, helpers)
        return expr

    def def_lowering(self, fn: Callable[..., None]) -> Callable[..., None]:
        """fn(low: codegen.Lowering, ins) appends the kernel calls computing ins."""
        self.lowering = fn
        return fn

    def def_accumulate(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(low, ins, out, x) -> (kernel, dtype, args): one call computing out = x + ins's
        result (x possibly out's own memory); `low.meta_block` holds any run-time table."""
        self.accumulate = fn
        return fn

    def def_prepare(self, fn: Callable[[Instr, list[Instr]], None]) -> Callable[..., None]:
        """fn(ins, out) appends to out the instructions standing for ins on the kernels."""
        self.prepare = fn
        return fn

    def def_simplify(self, fn: Callable[[Instr, dict[Var, Instr]], Var | Instr | None]
                     ) -> Callable[..., Any]:
        """fn(ins, producers) -> a Var equal to ins's result (a tuple of them, one per
        result), a simpler Instr, or None."""
        self.simplify = fn
        return fn

    def def_cost(self, fn: Callable[[Instr], int]) -> Callable[[Instr], int]:
        self.cost = fn
        return fn

    def def_label(self, fn: Callable[[Instr], str]) -> Callable[[Instr], str]:
        self.label = fn
        return fn

    def abstract_eval(self, in_avals: Sequence[Aval], params: dict[str, Any]) -> list[Aval]:
        out = self.shape_rule(*in_avals, **params)
        outs = list(out) if self.n_outputs != 1 else [out]
        return [(tuple(int(d) for d in s), np.dtype(d)) for s, d in outs]

    def bind(self, *args: Any, **params: Any) -> Any:
        trace = _innermost_trace(args)
        if trace is None:
            outs = self._eval_eager(args, params)
        else:
            outs = trace.emit(self, args, params)
        return outs[0] if self.n_outputs == 1 else tuple(outs)

    def _eval_eager(self, args: Sequence[Any], params: dict[str, Any]) -> list[np.ndarray]:
        arrays = [np.asarray(a) for a in args]
        avals = self.checked_abstract_eval([(a.shape, a.dtype) for a in arrays], params)
        try:
            outs = self.impl(*arrays, **params)
        except JitgradError as e:  # data errors (labels, indices): name the line
            raise type(e)(f"{self.name}: {e} (at {current_loc()})") from None
        outs = list(outs) if self.n_outputs != 1 else [outs]
        return [np.asarray(o, dtype=d).reshape(s) for o, (s, d) in zip(outs, avals, strict=True)]

    def checked_abstract_eval(self, in_avals: Sequence[Aval], params: dict[str, Any]) -> list[Aval]:
        """abstract_eval whose errors name the primitive and the user's source line."""
        try:
            return self.abstract_eval(in_avals, params)
        except JitgradError as e:
            raise type(e)(f"{self.name}: {e} (at {current_loc()})") from None


@dataclass(frozen=True)
class ScalarRule:
    """How an elementwise primitive computes one element (Primitive.def_scalar)."""

    expr: str | Callable[[Instr, list[str]], str]
    helpers: str = ""

    def render(self, ins: Instr, args: list[str]) -> str:
        if callable(self.expr):
            return self.expr(ins, args)
        dt = ins.outputs[0].dtype
        return self.expr.format(*args, zero=literal(0, dt), one=literal(1, dt),
                                dt=numpy_name(dt))


class Joint:
    """Primitives computed by one kernel call where they share their inputs (a loss and its
    gradient in one pass). `lower(low, {primitive: instruction})` makes that call; the first
    primitive listed leads: after recomputation it may appear twice, and the last copy
    joins the first of each other primitive."""

    def __init__(self, prims: Sequence[Primitive], lower: Callable[..., None]):
        self.prims = list(prims)
        self.lower = lower
        for p in self.prims:
            p.joint = self


registry: dict[str, Primitive] = {}


def primitive(name: str, family: str, **kw: Any) -> Primitive:
    if name in registry:
        raise JitgradError(f"primitive {name!r} defined twice")
    p = Primitive(name, family, **kw)
    registry[name] = p
    return p


def emit_like(out: list[Instr], prim: Primitive, inputs: tuple[Var, ...], like: Instr,
              **params: Any) -> Var:
    """Append an instruction standing in for part of `like` (same line and tags) to out;
    returns its result. Rewrites (`def_prepare`) build with it."""
    (shape, dtype), = prim.abstract_eval([(v.shape, v.dtype) for v in inputs], params)
    var = Var(shape, dtype)
    out.append(dataclasses.replace(like, prim=prim, inputs=inputs,
                                   params=tuple(sorted(params.items())), outputs=(var,)))
    return var


# ---------------------------------------------------------------- primitives the core needs

# Scalar constants: Trace.var_of makes one of every Python or 0-d numpy scalar it meets.
const_p = primitive("const", "elementwise", grad="zero")
const_p.def_impl(lambda *, value, dtype: np.asarray(value, dtype=dtype))
const_p.def_shape(lambda *, value, dtype: ((), dtype))
const_p.def_scalar(lambda ins, args: literal(ins.kw["value"], ins.outputs[0].dtype))
const_p.def_cost(lambda ins: 0)  # folded into the kernels that read it


@const_p.def_label
def _const_label(ins: Instr) -> str:
    v = ins.kw["value"]
    return f" {v:.4g}" if isinstance(v, float) else f" {v!r}"  # f32 reprs are long


def is_const(ins: Instr | None) -> bool:
    return ins is not None and ins.prim is const_p


# Casts: code generation also makes them, where a kernel reads int64 indices.
cast_p = primitive("cast", "elementwise")
cast_p.def_impl(lambda x, *, dtype: x.astype(dtype))
cast_p.def_shape(lambda x, *, dtype: (x[0], dtype))


@cast_p.def_vjp
def _cast_vjp(cts, outs, ins, *, dtype):
    return [cast(cts[0], ins[0].dtype)]


@cast_p.def_scalar
def _cast_scalar(ins: Instr, args: list[str]) -> str:
    dt = ins.outputs[0].dtype
    if dt == np.bool_:
        return f"({args[0]} != 0)"
    if ins.inputs[0].dtype == np.bool_:
        return f"({literal(1, dt)} if {args[0]} else {literal(0, dt)})"
    return f"{numpy_name(dt)}({args[0]})"


def cast(x: Any, dtype: Any) -> Any:
    return cast_p.bind(x, dtype=check_dtype(dtype))


# ---------------------------------------------------------------- source locations

_state = threading.local()


def _loc_override() -> str | None:
    return getattr(_state, "loc", None)


@contextlib.contextmanager
def source_loc(loc: str | None) -> Iterator[None]:
    """Attribute instructions emitted inside to `loc` (VJP rules, replayed programs)."""
    old = _loc_override()
    _state.loc = loc
    try:
        yield
    finally:
        _state.loc = old


def current_tags() -> tuple[str, int | None]:
    """(role, checkpoint region) recorded on instructions emitted now."""
    return getattr(_state, "tags", ("forward", None))


@contextlib.contextmanager
def instr_tags(role: str | None = None, checkpoint: int | None = None) -> Iterator[None]:
    """Tag instructions emitted inside: a role (VJP rules emit "backward") and/or a
    jg.checkpoint region; an argument left None keeps the enclosing value."""
    old = current_tags()
    _state.tags = (role or old[0], old[1] if checkpoint is None else checkpoint)
    try:
        yield
    finally:
        _state.tags = old


def _is_user_file(fname: str) -> bool:
    return not (fname.startswith(_PKG_DIR) or fname.startswith(_NUMPY_DIR)
                or fname.startswith("<frozen"))


def user_frame_loc() -> str:
    """file:line of the innermost frame outside jitgrad and numpy (the user's code)."""
    f = sys._getframe(1)
    while f is not None:
        fname = f.f_code.co_filename
        if _is_user_file(fname):
            return f"{os.path.basename(fname)}:{f.f_lineno}"
        f = f.f_back
    return "<unknown>"


def current_loc() -> str:
    return _loc_override() or user_frame_loc()


_HAS_LOC = re.compile(r"\bat [^\s()]+:\d+")


def with_user_loc(e: JitgradError) -> JitgradError:
    """e, its message ending with the innermost user file:line of its traceback (or of the
    caller), if it names no line yet (errors of jitgrad's argument checks, before any bind)."""
    if _HAS_LOC.search(str(e)):
        return e
    loc, tb = None, e.__traceback__
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if _is_user_file(fname):
            loc = f"{os.path.basename(fname)}:{tb.tb_lineno}"
        tb = tb.tb_next
    if loc is None:  # raised by jitgrad about the whole function (e.g. grad of a vector):
        loc = user_frame_loc()  # name the line that called it
    try:
        new = type(e)(f"{e} (at {loc})")
    except TypeError:  # a subclass with another constructor: keep it as it is
        return e
    new.__cause__, new.__suppress_context__ = e.__cause__, e.__suppress_context__
    return new.with_traceback(e.__traceback__)


# ---------------------------------------------------------------- traces

def _trace_stack() -> list[Trace]:
    stack = getattr(_state, "traces", None)
    if stack is None:
        stack = _state.traces = []
    return stack


class Tracer:
    """A value inside a trace: a Var plus the trace it belongs to.

    `weak` marks Python scalars passed as arguments: like Python scalar
    constants they take the dtype of what they meet (a float32 program stays
    float32). Operators are attached in trace.py.
    """

    __slots__ = ("trace", "ir_var", "weak")
    __array_priority__ = 1000

    def __init__(self, trace: Trace, var: Var, weak: bool = False):
        self.trace = trace
        self.ir_var = var
        self.weak = weak

    shape = property(lambda self: self.ir_var.shape)
    dtype = property(lambda self: self.ir_var.dtype)
    ndim = property(lambda self: len(self.ir_var.shape))
    size = property(lambda self: self.ir_var.size)

    def __len__(self) -> int:
        if not self.ir_var.shape:
            raise TypeError("len() of a 0-d traced value")
        return self.ir_var.shape[0]

    def __repr__(self) -> str:
        return f"Tracer<{self.ir_var.type_str()}>"


def _uniform(arr: np.ndarray) -> bool:
    """Every element has the same bits (so -0.0 and 0.0, or two NaNs, are told apart)."""
    if arr.size < 2:
        return False
    bits = arr.reshape(-1).view(np.dtype(f"u{arr.dtype.itemsize}")) \
        if arr.dtype.itemsize in (1, 2, 4, 8) else None
    return bits is not None and bool(np.all(bits == bits[0]))


class Trace:
    """Records instructions while a function runs on Tracers."""

    def __init__(self) -> None:
        self.instrs: list[Instr] = []
        self.consts: dict[Var, np.ndarray] = {}
        self.inputs: list[Var] = []
        self.captured: dict[int, tuple[Tracer, Var]] = {}  # id(outer tracer) -> (it, our var)
        self.level = -1

    def __enter__(self) -> Trace:
        stack = _trace_stack()
        self.level = len(stack)
        stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _trace_stack().pop()

    def new_input(self, shape: tuple[int, ...], dtype: Any, weak: bool = False) -> Tracer:
        var = Var(tuple(shape), np.dtype(dtype))
        self.inputs.append(var)
        return Tracer(self, var, weak)

    def var_of(self, x: Any) -> Var:
        """The Var standing for x here: our tracer, a lifted outer tracer, or a constant."""
        if isinstance(x, Tracer):
            if x.trace is self:
                return x.ir_var
            # A value of an enclosing trace used inside this one: a constant input here.
            hit = self.captured.get(id(x))
            if hit is None:
                hit = (x, Var(x.ir_var.shape, x.ir_var.dtype))
                self.captured[id(x)] = hit
            return hit[1]
        arr = np.asarray(x)
        try:
            dtype = check_dtype(arr.dtype)
        except JitgradError as e:
            raise JitgradError(f"cannot use a {type(x).__name__} ({arr.dtype}) as an array "
                               f"value: {e} (at {current_loc()})") from None
        arr = arr.astype(dtype, copy=False)  # native byte order
        if arr.ndim == 0:
            return self.emit(const_p, (), {"value": arr.item(), "dtype": arr.dtype})[0].ir_var
        if _uniform(arr):
            # One value everywhere (a constant cotangent broadcast by a VJP, as sum's is): a
            # scalar broadcast, which elementwise consumers read as a literal, rather than
            # an array the program stores and every kernel reading it streams from memory.
            from .ops.shape import broadcast_to_p
            scalar = self.emit(const_p, (), {"value": arr.flat[0].item(), "dtype": arr.dtype})
            return self.emit(broadcast_to_p, scalar, {"shape": arr.shape})[0].ir_var
        var = Var(arr.shape, arr.dtype)
        self.consts[var] = arr
        return var

    def emit(self, prim: Primitive, args: Sequence[Any], params: dict[str, Any]) -> list[Tracer]:
        in_vars = tuple(self.var_of(a) for a in args)
        avals = prim.checked_abstract_eval([(v.shape, v.dtype) for v in in_vars], params)
        outs = tuple(Var(s, d) for s, d in avals)
        role, region = current_tags()
        self.instrs.append(Instr(prim, in_vars, tuple(sorted(params.items())), outs,
                                 current_loc(), role, region))
        return [Tracer(self, o) for o in outs]

    def to_program(self, outputs: Sequence[Any]) -> Program:
        out_vars = [self.var_of(o) for o in outputs]
        inputs = self.inputs + [v for _, v in self.captured.values()]
        return Program(inputs, self.instrs, out_vars, self.consts)


def _innermost_trace(args: Sequence[Any]) -> Trace | None:
    best = None
    for a in args:
        if isinstance(a, Tracer) and (best is None or a.trace.level > best.level):
            best = a.trace
    return best


def replay(prog: Program, args: Sequence[Any],
           on_result: Callable[[Instr, Var, Any], None] | None = None) -> dict[Var, Any]:
    """Run prog on args through bind; returns the value of every Var.

    numpy args interpret the program; Tracers copy it into their trace, each
    instruction keeping its source line. on_result sees every value produced.
    """
    if len(args) != len(prog.inputs):
        raise JitgradError(f"program takes {len(prog.inputs)} inputs, got {len(args)}")
    env: dict[Var, Any] = dict(zip(prog.inputs, args, strict=True))
    env.update(prog.consts)
    for ins in prog.instrs:
        # A replayed instruction keeps its line and tags: "recompute" is a schedule
        # decision of one program, not a property carried into another.
        role = "forward" if ins.role == "recompute" else ins.role
        with source_loc(ins.loc), instr_tags(role, ins.checkpoint):
            outs = ins.prim.bind(*(env[v] for v in ins.inputs), **ins.kw)
        if ins.prim.n_outputs == 1:
            outs = (outs,)
        env.update(zip(ins.outputs, outs, strict=True))
        if on_result is not None:
            for var, val in zip(ins.outputs, outs, strict=True):
                on_result(ins, var, val)
    return env


def eval_program(prog: Program, args: Sequence[Any]) -> list[Any]:
    env = replay(prog, args)
    return [env[v] for v in prog.outputs]
