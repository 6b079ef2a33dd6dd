"""Code generation: a Program becomes kernel calls over one arena, as Python/Numba source.

Three steps: `prepare` rewrites the Program into the forms the kernels take
(int64 indices, reductions over contiguous axes); `lower` turns the fused
schedule into Steps, each one call of a library kernel or of a generated
fused-elementwise kernel; `render_glue` writes the C-ABI chunk functions that
make those calls in order through external symbols. Every rule about a
particular primitive is declared on it (core.Primitive); this module names none.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import NoLoweringError
from ..frontend.core import cast_p, emit_like, is_const
from ..frontend.ir import Instr, Program, Var, dtype_short, numpy_name
from . import kernels
from .fusion import Group, fuse
from .memory import Plan
from .passes import dce
from .threads import COLUMN_BLOCK

# ---------------------------------------------------------------- prepare

def prepare(prog: Program) -> Program:
    """Rewrite into kernel-friendly forms (each primitive's `def_prepare`; int64 indices
    where a primitive declares `index_inputs`); results are unchanged."""
    instrs: list[Instr] = []
    for ins in prog.instrs:
        inputs = list(ins.inputs)
        for k in ins.prim.index_inputs:
            if inputs[k].dtype != np.int64:
                inputs[k] = emit_like(instrs, cast_p, (inputs[k],), ins, dtype=np.dtype(np.int64))
        if inputs != list(ins.inputs):
            ins = dataclasses.replace(ins, inputs=tuple(inputs))
        if ins.prim.prepare is not None:
            ins.prim.prepare(ins, instrs)
        else:
            instrs.append(ins)
    # A rewrite may leave values unread (a rounding stored as bfloat16 instead): dropped.
    return dce(Program(prog.inputs, instrs, prog.outputs, prog.consts))


# ---------------------------------------------------------------- steps

@dataclass(eq=False)
class Step:
    """One native call: `sym(*args)`; Var arguments become pointers once memory is planned.

    A fused loop's step carries its group: the loop's symbol and source are made when
    first asked for (compiling needs them; the planner, which lowers many candidate
    programs, does not)."""

    kernel_sym: str | None  # a library kernel's symbol (None: a generated loop)
    args: list[Any]
    writes: list[Var]
    reads: list[Var]
    label: str
    in_place: list[tuple[Var, Var]] = field(default_factory=list)
    # The IR instructions this call executes, the one that names it first: `jitgrad show`
    # boxes fused kernels with them, and the memory timeline finds the backward pass.
    instrs: tuple[Instr, ...] = ()
    # The library kernel called (None: a generated elementwise loop).
    kernel: kernels.Kernel | None = None
    # Reads each input element only where it writes the same output element (a fused
    # loop): the result may take the memory of an input that dies here.
    elementwise: bool = False
    group: Group | None = None  # the fused loop's instructions
    # The leaf of a fused loop whose memory the planner gave its result (set once memory is
    # planned, before the loop's source is made).
    alias: int | None = None

    @functools.cached_property
    def loop(self) -> tuple[str, str]:
        """(symbol, module source) of the fused loop."""
        return fused_kernel(self.group, self.alias)[:2]

    @property
    def sym(self) -> str:
        return self.kernel_sym if self.group is None else self.loop[0]

    @property
    def role(self) -> str:
        """forward, backward or recompute: the role of the instruction the call stands for."""
        return self.instrs[0].role if self.instrs else "forward"

    @property
    def can_fail(self) -> bool:
        """The kernel checks its data (indices, labels) and may reject it."""
        return self.kernel is not None and self.kernel.can_fail


@dataclass(frozen=True)
class MetaAddress:
    """A kernel argument: the address of int64 values at this byte offset of the program's
    metadata block."""

    offset: int

    def __str__(self) -> str:
        return f"meta + {self.offset}"


class Lowering:
    """The kernel calls of a program, as lowering rules (`Primitive.def_lowering`) append
    them."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.meta: list[int] = []
        self.alias: dict[Var, Var] = {}  # reshape result -> the value whose memory it reuses

    def fused_sources(self) -> dict[str, str]:
        """symbol -> module source of every generated loop the steps call."""
        return dict(s.loop for s in self.steps if s.group is not None)

    def root(self, v: Var) -> Var:
        while v in self.alias:
            v = self.alias[v]
        return v

    def same_memory(self, v: Var, of: Var) -> None:
        """v is `of` viewed in another shape: no call, the same buffer."""
        self.alias[v] = of

    def meta_block(self, values: list[int]) -> tuple[MetaAddress, int]:
        """(address, length) arguments of int64 values a kernel reads at run time."""
        start = len(self.meta)
        self.meta += [int(v) for v in values]
        return MetaAddress(8 * start), len(values)

    def call(self, kernel: kernels.Kernel, dtype: np.dtype, args: list[Any], writes: list[Var],
             reads: list[Var], ins: Instr | tuple[Instr, ...]) -> None:
        """A call of the kernel's variant for dtype. Scratch values a kernel needs are in
        writes: the planner gives them arena memory and frees it at once."""
        if len(args) != len(kernel.args):
            raise NoLoweringError(f"the {kernel.name} kernel takes {len(kernel.args)} "
                                  f"arguments ({' '.join(kernel.args)}), not {len(args)}")
        instrs = ins if isinstance(ins, tuple) else (ins,)
        self.steps.append(Step(kernel.symbol(dtype), list(args), writes, reads,
                               f"{instrs[0].prim.name} at {instrs[0].loc}", instrs=instrs,
                               kernel=kernel))


def _joint_sets(schedule: list[Instr | Group]) -> dict[int, dict[Any, Instr]]:
    """id(instruction) -> the instructions lowered with it in one call (Primitive.joint)."""
    by_inputs: dict[tuple[Any, tuple[Var, ...]], list[Instr]] = {}
    for item in schedule:
        if isinstance(item, Instr) and item.prim.joint is not None:
            by_inputs.setdefault((item.prim.joint, item.inputs), []).append(item)
    sets: dict[int, dict[Any, Instr]] = {}
    for (joint, _), same in by_inputs.items():
        # After recomputation the leader may appear twice: the others join its last copy.
        lead, *others = joint.prims
        chosen = {p: ([i for i in same if i.prim is p][-1:] if p is lead
                      else [i for i in same if i.prim is p][:1]) for p in joint.prims}
        members = {p: found[0] for p, found in chosen.items() if found}
        for ins in same:
            sets[id(ins)] = members if members.get(ins.prim) is ins else {ins.prim: ins}
    return sets


def lower(prog: Program) -> Lowering:
    """The schedule as kernel calls."""
    low = Lowering()
    schedule = fuse(prog)
    joint = _joint_sets(schedule)
    # a product added into a sum is lowered where the sum is
    done = {id(s.accumulates) for s in schedule if isinstance(s, Group) and s.accumulates}
    for item in schedule:
        try:
            if isinstance(item, Group) and item.accumulates is not None:
                _lower_accumulating(low, item.accumulates, item)
            elif isinstance(item, Group):
                _lower_group(low, item)
            elif id(item) not in done:
                if id(item) in joint:  # alone or with its partners: one call
                    members = joint[id(item)]
                    done.update(id(i) for i in members.values())
                    item.prim.joint.lower(low, members)
                    continue
                if item.prim.lowering is None:
                    raise NoLoweringError("it has no Numba lowering")
                item.prim.lowering(low, item)
        except NoLoweringError as e:  # name the instruction and the user's line
            ins = e.instr or (item.root if isinstance(item, Group) else item)
            raise NoLoweringError(f"{ins.prim.name} at {ins.loc} cannot run on the Numba "
                                  f"backend: {e}; backend='interpret' runs it") from None
    return low


def _lower_accumulating(low: Lowering, product: Instr, group: Group) -> None:
    """`x + product` as one call computing the product into the sum's buffer."""
    out = group.out
    x = next(v for v in group.root.inputs if v is not product.outputs[0])
    done: dict[Var, Instr] = {}
    if x in group.members:  # the other term is fused: its own loop first, then GEMM adds
        sub = _subgroup(group, x)
        _lower_group(low, sub)
        done = sub.members
    kernel, dtype, args = product.prim.accumulate(low, product, out, x)
    # The sum may take x's buffer when x dies here, unless the call also reads x as an operand.
    same = [] if low.root(x) in {low.root(v) for v in product.inputs} else [(out, x)]
    low.steps.append(Step(kernel.symbol(dtype), args, [out], [*product.inputs, x],
                          f"{product.prim.name}+{group.root.prim.name} at {group.root.loc}",
                          in_place=same, kernel=kernel,
                          instrs=(group.root, product, *(i for v, i in group.members.items()
                                                         if v not in done
                                                         and i is not group.root))))


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


# ---------------------------------------------------------------- fused elementwise kernels

def _scalar_expr(ins: Instr, args: list[str]) -> str:
    if ins.prim.scalar is None:  # an elementwise primitive declared without one
        raise NoLoweringError("it has no Numba lowering", ins)  # not the group's root
    return ins.prim.scalar.render(ins, args)


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


def _helpers(group: Group) -> str:
    """The source of the scalar helpers the group's expressions call, each once."""
    seen: dict[str, None] = {}
    for ins in group.members.values():
        rule = ins.prim.scalar
        if rule is not None and rule.helpers:
            seen.setdefault(rule.helpers.strip())
    return "".join(f"\n\n{h}\n" for h in seen)


# Loops over at least this many elements run on all of jitgrad's threads (prange). A parallel
# loop costs ~0.3-0.5 s more to compile (Numba's parfor passes) and a parallel region's start
# a few us: worth it for the large MLP's 2048x2048 weights (16 MB streamed per pass), not for
# the medium one's 784x512 (whose new-program compile budget it would break).
PARALLEL_MIN_ELEMENTS = 1 << 20
# A fused sum over all elements adds fixed blocks of this many (each its own partial sum,
# partials combined in block order), and one over leading axes gives each thread fixed
# blocks of threads.COLUMN_BLOCK columns: the result depends on neither the thread count nor
# the schedule, and one block is exactly the plain sum kernel's order.
SUM_BLOCK = 8192


def _parallel(size: int) -> bool:
    return size >= PARALLEL_MIN_ELEMENTS


def _kernel(dtype: np.dtype, args: list[str], views: list[str], body: list[str],
            passed: list[str], helpers: str, parallel: bool,
            alias: int | None = None) -> tuple[str, str]:
    """(symbol, module source) of a generated loop: a C-ABI function making its views
    (`views`, assignments) and running `body`; a parallel one hands the views (the names
    in `passed`) to an @njit(parallel=True) function holding the body, as a cfunc's own
    prange does not run in parallel.

    alias: the leaf x<alias> the result y is computed in place of. y is then that very
    array, not a second view of its memory: LLVM vectorises a loop only after checking at
    run time that the arrays it writes do not overlap those it reads, and two views of
    one buffer fail that check (GPT's in-place gelu-backward: 8.9 ms scalar, 0.9 ms
    vectorised), while one array read and written at the same index passes it."""
    if alias is not None:
        views = [v for v in views if not v.startswith("y = ")]
        if parallel:
            body = [f"y = x{alias}"] + body
            passed = [n for n in passed if n != "y"]
        else:
            views = views + [f"y = x{alias}"]
    lines = views + body
    sym = _symbol(dtype, helpers + ("parallel\n" if parallel else "") + "\n".join(lines))
    head = f"@cfunc(types.int64({', '.join(['I'] * len(args))}), cache=True, " \
           f"error_model='numpy')\ndef {sym}({', '.join(args)}):\n"
    if not parallel:
        return sym, (kernels.CFUNC_PRELUDE + helpers + "\n\n" + head
                     + "\n".join("    " + ln for ln in lines + ["return 0"]) + "\n")
    call = f"_body({', '.join(passed)})"
    return sym, (kernels.CFUNC_PRELUDE + "from numba import prange\n" + helpers
                 + "\n\n@njit(parallel=True, cache=True, error_model='numpy')\n"
                 + f"def {call}:\n" + "\n".join("    " + ln for ln in body) + "\n\n\n"
                 + head + "\n".join("    " + ln for ln in views + [call, "return 0"]) + "\n")


def _symbol(dtype: np.dtype, signature: str) -> str:
    # The symbol names the kernel's meaning (expression, helpers, dtypes, broadcast pattern,
    # parallel or not) only, so every layer of a deep network shares one compiled loop.
    from .cache import module_key
    return f"jg_fused_{dtype_short(dtype)}_{module_key(signature)[:16]}"


def fused_kernel(group: Group, alias: int | None = None) -> tuple[str, str, list[int]]:
    """(symbol, module source, runtime dims) of the loop computing a fused group; alias: the
    leaf whose memory the result takes (see _kernel)."""
    if group.reduction is not None:
        return _fused_reduction_kernel(group, alias)
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
        return _unsigned(" + ".join(reversed(terms))) if terms else "0"

    def size(mask: list[bool]) -> str:
        return "*".join([f"n{d}" for d in range(k) if not mask[d]] or ["1"])

    names = {v: f"x{j}[{index(masks[j])}]" for j, v in enumerate(group.leaves)}
    body_expr = _group_expr(group, names)
    args = ["py"] + [f"p{j}" for j in range(len(group.leaves))] + [f"n{d}" for d in range(k)]
    views = [f"y = carray(_vp(py), {size([False] * k)}, {numpy_name(out.dtype)})"]
    for j, v in enumerate(group.leaves):
        views.append(f"x{j} = carray(_vp(p{j}), {size(masks[j])}, {numpy_name(v.dtype)})")
    parallel = k > 0 and _parallel(out.size)
    body, indent = [], ""
    for d in range(k):
        body.append(f"{indent}for i{d} in {'prange' if parallel and d == 0 else 'range'}(n{d}):")
        indent += "    "
    body.append(f"{indent}y[{index([False] * k)}] = {body_expr}")
    passed = ["y"] + [f"x{j}" for j in range(len(group.leaves))] + [f"n{d}" for d in range(k)]
    sym, source = _kernel(out.dtype, args, views, body, passed, _helpers(group), parallel,
                          alias)
    return sym, source, dims


def _unsigned(index: str) -> str:
    """An index expression as unsigned: Numba then does not wrap negative indices around,
    which leaves LLVM an index it can analyse (a loop whose reads and writes meet at
    `base + c` vectorises only so)."""
    return f"np.uint64({index})"


def reduction_dims(group: Group) -> tuple[int, int]:
    """(rows, columns) of a fused sum: the summed leading axes, and the kept ones."""
    out = group.out
    rows = _prod(out.shape[:len(group.reduction.kw["axes"])])
    return rows, out.size // rows


def _prod(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _fused_reduction_kernel(group: Group, alias: int | None) -> tuple[str, str, list[int]]:
    """The loop computing a group's values and their sum over its leading axes in one pass:
    rows x columns values, each added to its column's float64 running sum (the plain sum
    kernel's accumulation); a sum over everything (one column) adds fixed blocks."""
    out = group.out
    rows, cols = reduction_dims(group)
    dt = numpy_name(out.dtype)
    keep = group.keeps_out
    parallel = _parallel(out.size)
    loop = "prange" if parallel else "range"

    def value(i: str) -> str:
        names = {v: f"x{j}[{i if v.shape == out.shape else '0'}]"
                 for j, v in enumerate(group.leaves)}
        return f"{dt}({_group_expr(group, names)})"

    args = (["py"] if keep else []) + ["ps", "pacc"] + \
        [f"p{j}" for j in range(len(group.leaves))] + ["rows", "cols"]
    views = ["n = rows * cols"]
    if keep:
        views.append(f"y = carray(_vp(py), n, {dt})")
    views.append(f"s = carray(_vp(ps), cols, {dt})")
    for j, v in enumerate(group.leaves):
        views.append(f"x{j} = carray(_vp(p{j}), {'n' if v.shape == out.shape else 1}, "
                     f"{numpy_name(v.dtype)})")
    if cols == 1:
        views.append(f"acc = carray(_vp(pacc), (n + {SUM_BLOCK - 1}) // {SUM_BLOCK}, "
                     "np.float64)")
    else:
        views.append("acc = carray(_vp(pacc), cols, np.float64)")

    def add(i: str, acc: str) -> list[str]:
        return [f"v = {value(i)}"] + ([f"y[{i}] = v"] if keep else []) + [f"{acc} += v"]

    if cols == 1:  # everything: fixed blocks, eight running sums each, then the blocks in order
        body = [f"for b in {loop}(acc.size):",
                f"    lo = b * {SUM_BLOCK}",
                f"    hi = min(lo + {SUM_BLOCK}, n)",
                "    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0",
                "    i = lo",
                "    while i + 8 <= hi:"]
        for u in range(8):
            body += ["        " + ln for ln in add(f"i + {u}" if u else "i", f"a{u}")]
        body += ["        i += 8", "    t = 0.0", "    while i < hi:"]
        body += ["        " + ln for ln in add("i", "t")]
        body += ["        i += 1",
                 "    acc[b] = t + (((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)))",
                 "total = 0.0",
                 "for b in range(acc.size):",
                 "    total += acc[b]",
                 "s[0] = total"]
    else:  # columns: blocks of columns, each summed down the rows in order
        # The inner loops count from 0 and offset every index: LLVM does not vectorise a
        # `range(lo, hi)` loop adding into acc[c] (GPT's gelu-backward + bias sum, 768 x 512:
        # 9.7 ms that way, 1.1 ms this way).
        body = [f"for b in {loop}((cols + {COLUMN_BLOCK - 1}) // {COLUMN_BLOCK}):",
                f"    lo = b * {COLUMN_BLOCK}",
                f"    w = min({COLUMN_BLOCK}, cols - lo)",
                "    for c in range(w):",
                "        acc[lo + c] = 0.0",
                "    for r in range(rows):",
                "        base = r * cols + lo",
                "        for c in range(w):"]
        body += ["            " + ln for ln in add(_unsigned("base + c"),
                                                    f"acc[{_unsigned('lo + c')}]")]
        body += ["    for c in range(w):",
                 "        s[lo + c] = acc[lo + c]"]
    passed = (["y"] if keep else []) + ["s", "acc"] + \
        [f"x{j}" for j in range(len(group.leaves))] + ["rows", "cols", "n"]
    sym, source = _kernel(out.dtype, args, views, body, passed, _helpers(group), parallel,
                          alias if keep else None)
    return sym, source, [rows, cols]


def reduction_scratch(group: Group) -> Var:
    """The float64 partial sums a fused sum needs (arena scratch, freed at once)."""
    rows, cols = reduction_dims(group)
    n = -(-rows // SUM_BLOCK) if cols == 1 else cols
    return Var((n,), np.dtype(np.float64))


def _lower_group(low: Lowering, group: Group) -> None:
    for ins in group.members.values():  # named now, though the loop is written later
        if ins.prim.scalar is None:
            raise NoLoweringError("it has no Numba lowering", ins)
    ops = ", ".join(m.prim.name for m in group.members.values() if not is_const(m)) or \
        group.root.prim.name
    out = group.out
    same = [(out, v) for v in group.leaves if v.shape == out.shape and v.dtype == out.dtype]
    instrs = (group.root, *(i for i in group.members.values() if i is not group.root))
    if group.reduction is not None:
        total = group.reduction.outputs[0]
        scratch = reduction_scratch(group)
        written = ([out] if group.keeps_out else []) + [total]
        low.steps.append(Step(None, [*written, scratch, *group.leaves, *reduction_dims(group)],
                              [*written, scratch], list(group.leaves),
                              f"fused[{ops}; sum] at {group.root.loc}",
                              in_place=same if group.keeps_out else [], elementwise=True,
                              group=group, instrs=(*instrs, group.reduction)))
        return
    dims, _ = _coalesce(group.out.shape, group.leaves)
    low.steps.append(Step(None, [out, *group.leaves, *dims], [out], list(group.leaves),
                          f"fused[{ops}] at {group.root.loc}", in_place=same,
                          elementwise=True, group=group, instrs=instrs))


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
