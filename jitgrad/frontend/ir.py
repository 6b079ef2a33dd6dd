"""The intermediate representation: SSA values, instructions, programs.

A Program is a flat list of instructions in an order where every input is
defined before use (Deep Learning, Algorithm 6.1). Every stage of jitgrad
(tracing, differentiation, passes, planning, code generation) reads or writes
this one structure.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import JitgradError

_var_ids = itertools.count()


@dataclass(frozen=True, eq=False)
class Var:
    """An SSA value with a static shape and dtype; identity is the object."""

    shape: tuple[int, ...]
    dtype: np.dtype
    id: int = field(default_factory=lambda: next(_var_ids))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def type_str(self) -> str:
        return f"{dtype_short(self.dtype)}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"%{self.id}:{self.type_str()}"


# The dtypes a value of a program may have, on every backend. Numba has no float16
# arithmetic and no long double, so neither is accepted (by the interpreter either: a
# program runs the same wherever it runs); complex numbers are not differentiated here.
SUPPORTED_DTYPES = tuple(np.dtype(d) for d in (
    np.bool_, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.float32, np.float64))


def check_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
    """dtype (in native byte order) as a np.dtype if programs may hold it, else a
    JitgradError naming it and the supported ones (``what`` says where it was met)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise JitgradError(f"unsupported {what} {dtype!r}: {supported_dtypes_text()}"
                           ) from None
    native = dt if dt.isnative else dt.newbyteorder("=")
    if native not in SUPPORTED_DTYPES:
        raise JitgradError(f"unsupported {what} {dt}: {supported_dtypes_text()}")
    return native


def supported_dtypes_text() -> str:
    return "jitgrad handles " + ", ".join(d.name for d in SUPPORTED_DTYPES)


def dtype_short(dtype: np.dtype) -> str:
    """The dtype as the IR prints it, kernel symbols end and `jitgrad show --arg` reads it:
    kind and bits (f32, i64, u8), and bool."""
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return "bool"
    return f"{dt.kind}{8 * dt.itemsize}" if dt.kind in "iuf" else dt.name


def dtype_named(name: str) -> np.dtype | None:
    """The supported dtype called `name`, short (f32) or as numpy calls it (float32)."""
    return next((d for d in SUPPORTED_DTYPES if name in (dtype_short(d), d.name)), None)


def numpy_name(dtype: np.dtype) -> str:
    """The dtype as generated code spells it (`np.float32`, `np.bool_`)."""
    name = np.dtype(dtype).name
    return "np.bool_" if name == "bool" else f"np.{name}"


def literal(value: Any, dtype: np.dtype) -> str:
    """A scalar constant of dtype as generated code spells it (NaN and infinities too)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return repr(bool(value))
    if dtype.kind == "f":
        value = float(value)
        if not np.isfinite(value):
            value = "np.nan" if np.isnan(value) else ("np.inf" if value > 0 else "-np.inf")
    return f"{numpy_name(dtype)}({value!r})" if not isinstance(value, str) \
        else f"{numpy_name(dtype)}({value})"


@dataclass(frozen=True, eq=False)
class Instr:
    """`outputs = prim[params](inputs)`; params is a sorted tuple of (name, value) pairs."""

    prim: Any  # ops.core.Primitive (kept untyped here so the IR knows nothing of ops)
    inputs: tuple[Var, ...]
    params: tuple[tuple[str, Any], ...]
    outputs: tuple[Var, ...]
    loc: str | None = None  # the user's file:line that produced this instruction
    # Where the instruction belongs: "forward" (the function itself), "backward" (emitted by a
    # VJP rule) or "recompute" (a forward instruction repeated by rematerialisation).
    role: str = "forward"
    # The jg.checkpoint region it was traced in (its interior is recomputed, not stored).
    checkpoint: int | None = None

    @property
    def kw(self) -> dict[str, Any]:
        return dict(self.params)

    def __repr__(self) -> str:
        return format_instr(self, {})


@dataclass
class Program:
    """A traced function: inputs, instructions, outputs, and captured array constants."""

    inputs: list[Var]
    instrs: list[Instr]
    outputs: list[Var]
    consts: dict[Var, np.ndarray] = field(default_factory=dict)

    def __str__(self) -> str:
        return format_program(self)

    def __repr__(self) -> str:
        return format_program(self)

    def producers(self) -> dict[Var, Instr]:
        return {o: ins for ins in self.instrs for o in ins.outputs}


def _format_param(v: Any) -> str:
    if isinstance(v, np.dtype):
        return dtype_short(v)
    if isinstance(v, float):
        return repr(v)
    return str(v).replace(" ", "")


def format_instr(ins: Instr, names: dict[Var, str], width: int = 0) -> str:
    def name(v: Var) -> str:
        return names.get(v, f"%{v.id}")

    outs = " ".join(f"{name(o)}:{o.type_str()}" for o in ins.outputs).ljust(width)
    params = " ".join(f"{k}={_format_param(v)}" for k, v in ins.params)
    args = " ".join(name(v) for v in ins.inputs)
    text = f"{outs} = {ins.prim.name}"
    if params:
        text += f"[{params}]"
    if args:
        text += " " + args
    return text


def var_names(prog: Program) -> dict[Var, str]:
    """Vars numbered in order of definition, as printed: stable and easy to follow (the
    memory plan uses the same names)."""
    names: dict[Var, str] = {}
    for v in prog.inputs:
        names[v] = f"%{len(names)}"
    for c in prog.consts:
        names[c] = f"c{len(names)}"
    for ins in prog.instrs:
        for o in ins.outputs:
            names[o] = f"%{len(names)}"
    return names


def format_program(prog: Program) -> str:
    names = var_names(prog)
    width = max((len(f"{names[o]}:{o.type_str()}") for i in prog.instrs for o in i.outputs),
                default=0)
    head = " ".join(f"{names[v]}:{v.type_str()}" for v in prog.inputs)
    lines = ["{ lambda " + head + " ."]
    for c, value in prog.consts.items():
        lines.append(f"  {names[c]}:{c.type_str()} = constant  # captured array, "
                     f"first {np.ravel(value)[:3].tolist()}")
    role = "forward"
    for ins in prog.instrs:
        if ins.role != role:  # the forward/backward boundary and recomputed stretches
            role = ins.role
            lines.append(f"  # ---- {role}")
        line = "  " + format_instr(ins, names, width)
        if ins.checkpoint is not None:
            line += f"  @checkpoint{ins.checkpoint}"
        if ins.loc:
            line = line.ljust(60) + f"  # {ins.loc}"
        lines.append(line)
    outs = " ".join(names.get(v, f"%{v.id}") for v in prog.outputs)
    lines.append(f"  return {outs} }}")
    return "\n".join(lines)


def validate(prog: Program) -> None:
    """Check defined-before-use, single definition, and every shape/dtype rule.

    Raises JitgradError naming the offending instruction. Tests call this after
    every transformation.
    """
    defined: set[Var] = set(prog.inputs) | set(prog.consts)
    if len(defined) != len(prog.inputs) + len(prog.consts):
        raise JitgradError("program inputs/constants are not distinct")
    for ins in prog.instrs:
        for v in ins.inputs:
            if v not in defined:
                raise JitgradError(f"{v!r} used before definition in: {ins!r}")
        avals = ins.prim.abstract_eval([(v.shape, v.dtype) for v in ins.inputs], ins.kw)
        if len(avals) != len(ins.outputs):
            raise JitgradError(f"wrong number of outputs in: {ins!r}")
        for o, (shape, dtype) in zip(ins.outputs, avals, strict=True):
            if o.shape != tuple(shape) or o.dtype != np.dtype(dtype):
                raise JitgradError(
                    f"output {o!r} disagrees with the rule's {shape} {dtype} in: {ins!r}")
            if o in defined:
                raise JitgradError(f"{o!r} defined twice")
            defined.add(o)
    for v in prog.outputs:
        if v not in defined:
            raise JitgradError(f"output {v!r} is never defined")
