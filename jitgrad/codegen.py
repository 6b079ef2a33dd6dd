"""Code generation: a Program becomes kernel calls over one arena, as Python/Numba source.

Three steps: `prepare` rewrites the Program into the forms the kernels take
(int64 indices, reductions over contiguous axes); `lower` turns the fused
schedule into Steps, each one call of a library kernel or of a generated
fused-elementwise kernel; `render_glue` writes the `@njit(cache=True)` entry
function that makes those calls in order through external symbols.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import kernels
from .errors import NoLoweringError
from .fusion import Group, fuse, is_const
from .ir import Instr, Program, Var, dtype_short
from .memory import Plan

# ---------------------------------------------------------------- prepare

_INDEX_ARG = {"gather": 1, "scatter_add": 1, "take_along_axis": 1, "scatter_along_axis": 1,
              "softmax_cross_entropy": 1, "softmax_cross_entropy_grad": 1}
_REDUCTIONS = ("sum", "max", "logsumexp")
# Reductions the kernel library also runs on 64-bit integers; bool and narrower integers
# are widened to int64 for them, and the values cast back to the instruction's dtype.
_INT_REDUCTIONS = ("sum", "max", "argmax", "max_argmax")
_WIDE_INTS = (np.dtype(np.int64), np.dtype(np.uint64))


def _emit(out: list[Instr], prim: Any, inputs: tuple[Var, ...], like: Instr,
          **params: Any) -> Var:
    """A helper instruction standing in for part of `like` (same line and tags)."""
    (shape, dtype), = prim.abstract_eval([(v.shape, v.dtype) for v in inputs], params)
    var = Var(shape, dtype)
    out.append(dataclasses.replace(like, prim=prim, inputs=inputs,
                                   params=tuple(sorted(params.items())), outputs=(var,)))
    return var


def _widen(ins: Instr, out: list[Instr]) -> None:
    """Append ins as it runs on the kernel library: an integer reduction of a narrow
    dtype reads its input widened to int64 (integer sums wrap around the same whatever
    the width, so casting back gives numpy's result)."""
    from .core import registry
    if (ins.prim.name not in _INT_REDUCTIONS or ins.inputs[0].dtype.kind not in "biu"
            or ins.inputs[0].dtype in _WIDE_INTS):
        out.append(ins)
        return
    x = ins.inputs[0]
    cast = registry["cast"]
    wide = _emit(out, cast, (x,), ins, dtype=np.dtype(np.int64))
    avals = ins.prim.abstract_eval([(wide.shape, wide.dtype)], ins.kw)
    outputs = [old if d == old.dtype else Var(s, d)
               for (s, d), old in zip(avals, ins.outputs, strict=True)]
    out.append(dataclasses.replace(ins, inputs=(wide,), outputs=tuple(outputs)))
    for new, old in zip(outputs, ins.outputs, strict=True):
        if new is not old:
            out.append(dataclasses.replace(ins, prim=cast, inputs=(new,),
                                           params=(("dtype", old.dtype),), outputs=(old,)))


def prepare(prog: Program) -> Program:
    """Rewrite into kernel-friendly forms; results are unchanged."""
    from .core import registry
    widened: list[Instr] = []
    for ins in prog.instrs:
        _widen(ins, widened)
    instrs: list[Instr] = []
    for ins in widened:
        name = ins.prim.name
        inputs = list(ins.inputs)
        if name in _INDEX_ARG:
            k = _INDEX_ARG[name]
            if inputs[k].dtype != np.int64:
                inputs[k] = _emit(instrs, registry["cast"], (inputs[k],), ins,
                                  dtype=np.dtype(np.int64))
        if name in _REDUCTIONS:
            axes = ins.kw["axes"]
            x = inputs[0]
            if axes and axes != tuple(range(axes[0], axes[-1] + 1)):
                rest = tuple(a for a in range(x.ndim) if a not in axes)
                moved = _emit(instrs, registry["transpose"], (x,), ins, perm=rest + axes)
                new_axes = tuple(range(len(rest), x.ndim))
                red = _emit(instrs, ins.prim, (moved,), ins, axes=new_axes, keepdims=False)
                instrs.append(dataclasses.replace(ins, prim=registry["reshape"], inputs=(red,),
                                                  params=(("shape", ins.outputs[0].shape),)))
                continue
        instrs.append(dataclasses.replace(ins, inputs=tuple(inputs))
                      if inputs != list(ins.inputs) else ins)
    return Program(prog.inputs, instrs, prog.outputs, prog.consts)


# ---------------------------------------------------------------- steps

@dataclass
class Step:
    """One native call: `sym(*args)`; Var arguments become pointers once memory is planned."""

    sym: str
    args: list[Any]
    writes: list[Var]
    reads: list[Var]
    label: str
    in_place: list[tuple[Var, Var]] = field(default_factory=list)
    # The IR instructions this call executes, the one that names it first: `jitgrad show`
    # boxes fused kernels with them, and the memory timeline finds the backward pass.
    instrs: tuple[Instr, ...] = ()

    @property
    def role(self) -> str:
        """forward, backward or recompute: the role of the instruction the call stands for."""
        return self.instrs[0].role if self.instrs else "forward"

    @property
    def elementwise(self) -> bool:
        """Reads each input element only where it writes the same output element."""
        return self.sym.startswith("jg_fused_")

    @property
    def can_fail(self) -> bool:
        return any(k in self.sym for k in ("_sce_", "gather", "scatter", "take_along"))


def _prod(xs: Any) -> int:
    return int(np.prod(xs, dtype=np.int64))


def _strides(shape: tuple[int, ...]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


class Lowering:
    def __init__(self, sources: bool = True) -> None:
        self.sources = sources  # False: steps only, for the planner (no kernel source)
        self.steps: list[Step] = []
        self.meta: list[int] = []
        self.fused: dict[str, str] = {}  # symbol -> module source
        self.alias: dict[Var, Var] = {}  # reshape result -> the value whose memory it reuses

    def root(self, v: Var) -> Var:
        while v in self.alias:
            v = self.alias[v]
        return v

    def meta_block(self, values: list[int]) -> tuple[str, int]:
        start = len(self.meta)
        self.meta += [int(v) for v in values]
        return f"meta + {8 * start}", len(values)

    def call(self, sym: str, args: list[Any], writes: list[Var], reads: list[Var],
             ins: Instr | None) -> None:
        label = f"{ins.prim.name} at {ins.loc}" if ins is not None else sym
        self.steps.append(Step(sym, args, writes, reads, label,
                               instrs=(ins,) if ins is not None else ()))

    def copy(self, src: Var, dst: Var, shape: tuple[int, ...], src_strides: list[int],
             dst_strides: list[int], src_off: int, dst_off: int, ins: Instr) -> None:
        nd = len(shape)
        pm, nm = self.meta_block([nd, *shape, *src_strides, *dst_strides, src_off, dst_off])
        self.call(kernels.symbol("copy", src.dtype), [src, dst, pm, nm], [dst], [src], ins)

    def zero(self, dst: Var, ins: Instr) -> None:
        self.call(kernels.symbol("zero", dst.dtype), [dst, dst.size], [dst], [], ins)


def _reduce_dims(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int]:
    if not axes:
        return _prod(shape), 1, 1
    return _prod(shape[:axes[0]]), _prod(shape[axes[0]:axes[-1] + 1]), _prod(shape[axes[-1] + 1:])


def lower(prog: Program, sources: bool = True) -> Lowering:
    """The schedule as kernel calls; sources=False leaves out the fused kernels' source,
    which only compilation needs (the planner lowers many candidate programs)."""
    low = Lowering(sources)
    schedule = fuse(prog)
    # softmax_cross_entropy and its gradient on the same inputs share one fused pass.
    sce_pairs: dict[int, list[Instr]] = {}  # id(instr) -> the instructions lowered with it
    by_inputs: dict[tuple[Var, ...], list[Instr]] = {}
    for item in schedule:
        if isinstance(item, Instr) and item.prim.name.startswith("softmax_cross_entropy"):
            by_inputs.setdefault(item.inputs, []).append(item)
    for same in by_inputs.values():
        # After recomputation a loss may appear twice: its gradient pairs with the last one.
        losses = [i for i in same if i.prim.name == "softmax_cross_entropy"]
        grads = [i for i in same if i.prim.name != "softmax_cross_entropy"]
        pair = losses[-1:] + grads[:1]
        for ins in same:
            sce_pairs[id(ins)] = pair if ins in pair else [ins]
    # a product added into a sum is lowered where the sum is
    done = {id(s.accumulates) for s in schedule if isinstance(s, Group) and s.accumulates}
    for item in schedule:
        try:
            if isinstance(item, Group) and item.accumulates is not None:
                _matmul_accumulate(low, item.accumulates, item)
            elif isinstance(item, Group):
                _lower_group(low, item)
            elif id(item) not in done:
                if item.prim.name.startswith("softmax_cross_entropy"):
                    pair = sce_pairs[id(item)]
                    done.update(id(i) for i in pair)
                    _lower_sce(low, pair)
                elif item.prim.name in _LOWER:
                    _LOWER[item.prim.name](low, item)
                else:
                    raise NoLoweringError("it has no Numba lowering")
        except NoLoweringError as e:  # name the instruction and the user's line
            ins = e.instr or (item.root if isinstance(item, Group) else item)
            raise NoLoweringError(f"{ins.prim.name} at {ins.loc} cannot run on the Numba "
                                  f"backend: {e}; backend='interpret' runs it") from None
    return low


def _lower_sce(low: Lowering, pair: list[Instr]) -> None:
    ins = pair[0]
    z, labels = ins.inputs
    loss = next((i.outputs[0] for i in pair if i.prim.name == "softmax_cross_entropy"), None)
    dz = next((i.outputs[0] for i in pair if i.prim.name != "softmax_cross_entropy"), None)
    writes = [v for v in (loss, dz) if v is not None]
    low.call(kernels.symbol("sce", z.dtype),
             [z, labels, loss if loss is not None else 0, dz if dz is not None else 0,
              z.shape[0], z.shape[1], int(loss is not None), int(dz is not None)],
             writes, [z, labels], ins)
    low.steps[-1].instrs = tuple(pair)  # forward loss and its gradient: one pass


def _matmul(low: Lowering, ins: Instr) -> None:
    a, b = ins.inputs
    c = ins.outputs[0]
    k = a.shape[0] if ins.kw["ta"] else a.shape[1]
    low.call(kernels.symbol("gemm", a.dtype),
             [a, b, c, c.shape[0], c.shape[1], k, int(ins.kw["ta"]), int(ins.kw["tb"])],
             [c], [a, b], ins)


def _matmul_accumulate(low: Lowering, mm: Instr, group: Group) -> None:
    a, b = mm.inputs
    out = group.out
    x = next(v for v in group.root.inputs if v is not mm.outputs[0])
    done: dict[Var, Instr] = {}
    if x in group.members:  # the other term is fused: its own loop first, then GEMM adds
        sub = _subgroup(group, x)
        _lower_group(low, sub)
        done = sub.members
    k = a.shape[0] if mm.kw["ta"] else a.shape[1]
    # The sum may take x's buffer when x dies here, unless GEMM also reads x as an operand.
    same = [] if low.root(x) in (low.root(a), low.root(b)) else [(out, x)]
    low.steps.append(Step(kernels.symbol("gemm_acc", a.dtype),
                          [a, b, out, x, out.shape[0], out.shape[1], k, int(mm.kw["ta"]),
                           int(mm.kw["tb"])], [out], [a, b, x],
                          f"matmul+add at {group.root.loc}", in_place=same,
                          instrs=(group.root, mm, *(i for v, i in group.members.items()
                                                    if v not in done and i is not group.root))))


def _subgroup(group: Group, v: Var) -> Group:
    """The part of a fused group that computes its interior value v."""
    members: dict[Var, Instr] = {}
    leaves: list[Var] = []

    def visit(u: Var) -> None:
        ins = group.members.get(u)
        if ins is None:
            if u not in leaves:
                leaves.append(u)
        elif u not in members:
            members[u] = ins
            for w in ins.inputs:
                visit(w)

    visit(v)
    return Group(group.members[v], members, [u for u in group.leaves if u in leaves])


def _reduction(kernel: str):
    def lower_it(low: Lowering, ins: Instr) -> None:
        x, y = ins.inputs[0], ins.outputs[0]
        outer, n, inner = _reduce_dims(x.shape, ins.kw["axes"])
        args: list[Any] = [x, y]
        scratch = []
        if kernel == "max":
            idx = Var(y.shape, np.dtype(np.int64))
            args.append(idx)
            scratch.append(idx)
        # a running float sum (float64; integers sum exactly without) or maximum per column
        if kernel == "logsumexp" or (kernel == "sum" and x.dtype.kind == "f"):
            acc = Var((max(inner, 1),), np.dtype(np.float64) if kernel == "sum" else x.dtype)
            args.append(acc)
            scratch.append(acc)
        # scratch (max's indices, running sums and maxima) is written like a result; the
        # planner frees it at once: it lives in the arena, so kernels allocate nothing
        low.call(kernels.symbol(kernel, x.dtype), args + [outer, n, inner], [y] + scratch, [x],
                 ins)
    return lower_it


def _argmax_like(low: Lowering, ins: Instr) -> None:
    x = ins.inputs[0]
    axis = ins.kw["axis"]
    if ins.prim.name == "max_argmax":
        y, idx = ins.outputs
    else:  # argmax alone: the maxima go to a scratch buffer the planner frees at once
        idx = ins.outputs[0]
        y = Var(idx.shape, x.dtype)
    outer, n, inner = _reduce_dims(x.shape, (axis,))
    low.call(kernels.symbol("max", x.dtype), [x, y, idx, outer, n, inner], [y, idx], [x], ins)


def _reshape(low: Lowering, ins: Instr) -> None:
    # Row-major data is unchanged by a reshape: the result is the same memory.
    low.alias[ins.outputs[0]] = ins.inputs[0]


def _transpose(low: Lowering, ins: Instr) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    xs = _strides(x.shape)
    low.copy(x, y, y.shape, [xs[p] for p in ins.kw["perm"]], _strides(y.shape), 0, 0, ins)


def _broadcast_to(low: Lowering, ins: Instr) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    lead = y.ndim - x.ndim
    xs = _strides(x.shape)
    src = [0] * lead + [0 if x.shape[i] == 1 else xs[i] for i in range(x.ndim)]
    low.copy(x, y, y.shape, src, _strides(y.shape), 0, 0, ins)


def _slice_geometry(shape: tuple[int, ...], index: tuple) -> tuple[list[int], int]:
    st = _strides(shape)
    return [s * step for s, (_, _, step) in zip(st, index)], sum(
        s * start for s, (start, _, _) in zip(st, index))


def _slice(low: Lowering, ins: Instr) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    strides, off = _slice_geometry(x.shape, ins.kw["index"])
    low.copy(x, y, y.shape, strides, _strides(y.shape), off, 0, ins)


def _pad_slice(low: Lowering, ins: Instr) -> None:
    g, y = ins.inputs[0], ins.outputs[0]
    low.zero(y, ins)
    strides, off = _slice_geometry(y.shape, ins.kw["index"])
    low.copy(g, y, g.shape, _strides(g.shape), strides, 0, off, ins)


def _concatenate(low: Lowering, ins: Instr) -> None:
    y = ins.outputs[0]
    axis = ins.kw["axis"]
    ys = _strides(y.shape)
    start = 0
    for x in ins.inputs:
        low.copy(x, y, x.shape, _strides(x.shape), ys, 0, start * ys[axis], ins)
        start += x.shape[axis]


def _gather(low: Lowering, ins: Instr) -> None:
    x, idx = ins.inputs
    y = ins.outputs[0]
    low.call(kernels.symbol("gather", x.dtype),
             [x, idx, y, idx.size, x.shape[0], _prod(x.shape[1:])], [y], [x, idx], ins)


def _scatter_add(low: Lowering, ins: Instr) -> None:
    g, idx = ins.inputs
    y = ins.outputs[0]
    low.call(kernels.symbol("scatter_add", g.dtype),
             [g, idx, y, idx.size, y.shape[0], _prod(y.shape[1:])], [y], [g, idx], ins)


def _along(kernel: str):
    def lower_it(low: Lowering, ins: Instr) -> None:
        a, idx = ins.inputs
        y = ins.outputs[0]
        axis = ins.kw["axis"]
        full = y if kernel == "scatter_along" else a
        outer, inner = _prod(full.shape[:axis]), _prod(full.shape[axis + 1:])
        low.call(kernels.symbol(kernel, a.dtype),
                 [a, idx, y, outer, full.shape[axis], idx.shape[axis], inner], [y], [a, idx], ins)
    return lower_it


_LOWER = {
    "matmul": _matmul, "sum": _reduction("sum"), "max": _reduction("max"),
    "logsumexp": _reduction("logsumexp"), "argmax": _argmax_like, "max_argmax": _argmax_like,
    "reshape": _reshape, "transpose": _transpose, "broadcast_to": _broadcast_to,
    "slice": _slice, "pad_slice": _pad_slice, "concatenate": _concatenate, "gather": _gather,
    "scatter_add": _scatter_add, "take_along_axis": _along("take_along"),
    "scatter_along_axis": _along("scatter_along"),
}


# ---------------------------------------------------------------- fused elementwise kernels

_NP = {"float32": "np.float32", "float64": "np.float64", "int64": "np.int64",
       "int32": "np.int32", "bool": "np.bool_", "uint8": "np.uint8", "int8": "np.int8",
       "int16": "np.int16", "uint16": "np.uint16", "uint32": "np.uint32",
       "uint64": "np.uint64", "float16": "np.float16"}


def _literal(value: Any, dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return repr(bool(value))
    if dtype.kind == "f":
        value = float(value)
        if not np.isfinite(value):
            value = {True: "np.inf", False: "-np.inf"}.get(value > 0, "np.nan") \
                if not np.isnan(value) else "np.nan"
            return f"{_NP[dtype.name]}({value})"
    return f"{_NP[dtype.name]}({value!r})"


def _scalar_expr(ins: Instr, a: list[str]) -> str:
    name = ins.prim.name
    dt = ins.outputs[0].dtype
    zero = _literal(0, dt)
    binary = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "lt": "<",
              "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
    if name in binary:
        return f"({a[0]} {binary[name]} {a[1]})"
    if name == "const":
        return _literal(ins.kw["value"], dt)
    if name == "cast":
        if dt == np.bool_:
            return f"({a[0]} != 0)"
        if ins.inputs[0].dtype == np.bool_:
            return f"({_literal(1, dt)} if {a[0]} else {zero})"
        return f"{_NP[dt.name]}({a[0]})"
    # Numba's np.sign(-0.0) is -0.0, numpy's 0.0: adding 0 gives numpy's (NaN stays NaN).
    unary = {"neg": "(-{0})", "exp": "np.exp({0})", "log": "np.log({0})",
             "tanh": "np.tanh({0})", "sqrt": "np.sqrt({0})", "abs": "abs({0})",
             "floor": "np.floor({0})", "ceil": "np.ceil({0})", "round": "np.rint({0})",
             "sign": "(np.sign({0}) + " + zero + ")", "stop_gradient": "{0}",
             "relu": "_relu({0}, " + zero + ")", "sigmoid": "_sigmoid({0})",
             "maximum": "_maximum({0}, {1})", "where": "_select({0}, {1}, {2})"}
    if name not in unary:  # a primitive defined without a scalar expression here
        raise NoLoweringError("it has no Numba lowering", ins)  # not the group's root
    return unary[name].format(*a)


_FUSED_PRELUDE = kernels.CFUNC_PRELUDE + '''

@intrinsic
def _select(typingctx, c, a, b):
    # A branch-free select: `a if c else b` compiles to a branch that a random mask
    # (relu's backward) mispredicts half the time, ~4x slower.
    def codegen(context, builder, signature, args):
        cond = context.cast(builder, args[0], signature.args[0], types.boolean)
        other = context.cast(builder, args[2], signature.args[2], signature.return_type)
        return builder.select(cond, args[1], other)
    return a(c, a, b), codegen


# relu and maximum are numpy's maximum: NaN propagates (`x if x > 0 else 0` made relu(NaN)
# 0, hiding a NaN from the loss and from check_finite) and on a tie the second operand wins.
# relu is `0 if x < 0 else x` (one maxss/maxps, NaN passing through) plus 0, which turns
# -0.0 into numpy's 0.0 (so 1/relu(-0.0) is +inf) and changes nothing else; LLVM keeps the
# addition (no fast-math). Measured as fast as the old form, vectorised or not.
@njit(inline="always")
def _relu(x, zero):
    return (zero if x < zero else x) + zero


@njit(inline="always")
def _maximum(a, b):
    return a if (a > b or a != a) else b


@njit(inline="always")
def _sigmoid(x):
    if x >= 0:
        return 1 / (1 + np.exp(-x))
    e = np.exp(x)
    return e / (1 + e)
'''


def _coalesce(out_shape: tuple[int, ...], leaves: list[Var]) -> tuple[list[int], list[list[bool]]]:
    """Output dims and per-leaf broadcast masks, with size-1 dims dropped and adjacent dims
    that every leaf treats alike merged (so most loops are 1-d or 2-d)."""
    r = len(out_shape)
    masks_full = []
    for v in leaves:
        padded = (1,) * (r - v.ndim) + v.shape
        masks_full.append([padded[d] == 1 and out_shape[d] != 1 for d in range(r)])
    dims: list[int] = []
    masks: list[list[bool]] = [[] for _ in leaves]
    for d in range(r):
        if out_shape[d] == 1:
            continue
        col = [m[d] for m in masks_full]
        if dims and all(masks[j][-1] == col[j] for j in range(len(leaves))):
            dims[-1] *= out_shape[d]
            continue
        dims.append(out_shape[d])
        for j in range(len(leaves)):
            masks[j].append(col[j])
    return dims, masks


def _group_expr(group: Group, leaf_names: dict[Var, str]) -> str:
    def expr(v: Var) -> str:
        if v in leaf_names:
            return leaf_names[v]
        ins = group.members[v]
        return _scalar_expr(ins, [expr(x) for x in ins.inputs])
    return expr(group.out)


def fused_kernel(group: Group) -> tuple[str, str, list[int]]:
    """(symbol, module source, runtime dims) of the loop computing a fused group."""
    out = group.out
    dims, masks = _coalesce(out.shape, group.leaves)
    k = len(dims)
    loop_vars = [f"i{d}" for d in range(k)]

    def index(mask: list[bool]) -> str:
        terms, stride = [], []
        for d in reversed(range(k)):
            if not mask[d]:
                terms.append("*".join([loop_vars[d]] + stride))
                stride = stride + [f"n{d}"]
        return " + ".join(reversed(terms)) or "0"

    def size(mask: list[bool]) -> str:
        return "*".join([f"n{d}" for d in range(k) if not mask[d]] or ["1"])

    names = {v: f"x{j}[{index(masks[j])}]" for j, v in enumerate(group.leaves)}
    body_expr = _group_expr(group, names)
    args = ["py"] + [f"p{j}" for j in range(len(group.leaves))] + [f"n{d}" for d in range(k)]
    lines = [f"y = carray(_vp(py), {size([False] * k)}, {_NP[out.dtype.name]})"]
    for j, v in enumerate(group.leaves):
        lines.append(f"x{j} = carray(_vp(p{j}), {size(masks[j])}, {_NP[v.dtype.name]})")
    indent = ""
    for d in range(k):
        lines.append(f"{indent}for i{d} in range(n{d}):")
        indent += "    "
    lines.append(f"{indent}y[{index([False] * k)}] = {body_expr}")
    lines.append("return 0")
    # The symbol names the kernel's meaning (expression, dtypes, broadcast pattern) only,
    # so every layer of a deep network shares one compiled loop.
    signature = "\n".join(lines)
    from .cache import module_key
    sym = f"jg_fused_{dtype_short(out.dtype)}_{module_key(signature)[:16]}"
    source = (_FUSED_PRELUDE + f"\n\n@cfunc(types.int64({', '.join(['I'] * len(args))}), "
              f"cache=True, error_model='numpy')\ndef {sym}({', '.join(args)}):\n"
              + "\n".join("    " + ln for ln in lines) + "\n")
    return sym, source, dims


def _lower_group(low: Lowering, group: Group) -> None:
    if low.sources:
        sym, source, dims = fused_kernel(group)
        low.fused[sym] = source
    else:
        sym, dims = "jg_fused_unnamed", []
    ops = ", ".join(m.prim.name for m in group.members.values() if not is_const(m)) or "const"
    out = group.out
    same = [(out, v) for v in group.leaves if v.shape == out.shape and v.dtype == out.dtype]
    low.steps.append(Step(sym, [out, *group.leaves, *dims], [out], list(group.leaves),
                          f"fused[{ops}] at {group.root.loc}", in_place=same,
                          instrs=(group.root, *(i for i in group.members.values()
                                                if i is not group.root))))


# ---------------------------------------------------------------- glue

CHUNK_STEPS = 48  # steps per compiled chunk: LLVM's cost grows faster than linearly per function

def render_glue(low: Lowering, plan: Plan, external: dict[Var, int], key: str) -> str:
    """The program as C-ABI chunk functions `jg_chunk_<key>_<i>(pp)`, run in order.

    pp is the address of [arena, meta, external arrays...]. Each chunk of steps is
    a function of its own, compiled separately, so compile time stays linear in
    the number of steps; a chunk returns 0, or 1 + the index of a step whose
    kernel rejected its data.
    """
    def arg(x: Any) -> str:
        if isinstance(x, Var):
            x = low.root(x)
            if x in external:
                return f"p{external[x]}"
            return f"arena + {plan.buffers[x].offset}" if plan.buffers[x].offset else "arena"
        return str(x)

    n_ptrs = 2 + len(external)
    lines = [kernels.CFUNC_PRELUDE]
    for sym in sorted({s.sym for s in low.steps}):
        n = len(next(s for s in low.steps if s.sym == sym).args)
        lines.append(f'{sym} = types.ExternalFunction("{sym}", types.int64('
                     f'{", ".join(["I"] * n)}))')
    chunks = [low.steps[i:i + CHUNK_STEPS] for i in range(0, len(low.steps), CHUNK_STEPS)]
    names = [f"jg_chunk_{key}_{c}" for c in range(len(chunks))]
    for c, (name, chunk) in enumerate(zip(names, chunks)):
        used = {low.root(a) for s in chunk for a in s.args if isinstance(a, Var)}
        used &= set(external)
        lines += ["", "", "@cfunc(types.int64(I), cache=True)", f"def {name}(pp):",
                  f"    ptrs = carray(_vp(pp), {n_ptrs}, np.int64)",
                  "    arena = ptrs[0]", "    meta = ptrs[1]"]
        lines += [f"    p{i} = ptrs[{i + 2}]" for i in sorted(external[v] for v in used)]
        for i, step in enumerate(chunk, start=c * CHUNK_STEPS):
            call = f"{step.sym}({', '.join(arg(a) for a in step.args)})"
            # Only kernels that check data (indices, labels) can fail; branches cost compile time.
            if step.can_fail:
                lines += [f"    if {call}:  # {step.label}", f"        return {i + 1}"]
            else:
                lines.append(f"    {call}  # {step.label}")
        lines.append("    return 0")
    return "\n".join(lines) + "\n"
