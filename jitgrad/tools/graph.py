"""A Program as a computational-graph picture: Graphviz DOT text, rendered by `dot` if present.

The drawing follows Deep Learning, ch. 6.5: the forward graph G (the user's
function) and the subgraph B that back-propagation adds to it are separate
clusters in different colours; instructions repeated by rematerialisation are
a third (green, dashed). Each node shows its primitive and the shape of what
it computes; fused kernels (several instructions executed as one native call)
are boxed inside their cluster. With `edge_labels`, every forward edge u -> v
carries the partial derivative ∂v/∂u it stands for, the factor the backward
pass multiplies by. Large graphs stay readable: repeated layers (runs of
identical instructions from the same source lines) are collapsed to one node,
and past `max_nodes` the middle of the program is elided with a note.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import JitgradError
from ..frontend.core import is_const
from ..frontend.ir import Instr, Program, Var, var_names

INSTALL_HINT = ("install Graphviz: `apt-get install graphviz` (Debian/Ubuntu), "
                "`brew install graphviz` (macOS) or `conda install graphviz`")

# role -> (fill, border, cluster title)
ROLES = {
    "forward": ("#dbe9f6", "#3b6ea5", "G: forward (the function)"),
    "backward": ("#fde3cf", "#c0504d", "B: backward (added by back-propagation)"),
    "recompute": ("#e2f0d9", "#4f8a3a", "recomputed for the backward pass"),
}
KERNEL_COLOUR = "#7b4fa0"
MAX_PERIOD = 48    # longest repeated block (instructions per layer) looked for
MIN_REPEATS = 3    # a block repeated this often is a stack of layers: draw first and last


class GraphvizMissing(JitgradError):
    """`dot` is not installed; the DOT text was still written (see `.dot_path`)."""

    def __init__(self, message: str, dot_path: str | None = None):
        super().__init__(message)
        self.dot_path = dot_path


@dataclass
class Elision:
    """Instructions drawn as one node: a collapsed stack of layers or a cut for max_nodes."""

    indices: list[int]
    label: str
    role: str


def _q(text: str) -> str:
    """A DOT double-quoted string; newlines become centred line breaks."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _short_params(ins: Instr) -> str:
    if ins.prim.label is not None:  # the primitive's own (a constant's value, matmul's flags)
        return ins.prim.label(ins)
    shown = [f"{k}={v}" for k, v in ins.params if k in ("axes", "axis", "perm")]
    return f" [{' '.join(shown)}]" if shown else ""


def _find_runs(sigs: Sequence[tuple]) -> list[tuple[int, int, int]]:
    """(start, period, repeats) of blocks repeated at least MIN_REPEATS times in a row."""
    runs: list[tuple[int, int, int]] = []
    i, n = 0, len(sigs)
    while i < n:
        best = (0, 0)  # (covered, period)
        for p in range(1, min(MAX_PERIOD, (n - i) // MIN_REPEATS) + 1):
            r = 1
            while i + (r + 1) * p <= n and sigs[i + r * p:i + (r + 1) * p] == sigs[i:i + p]:
                r += 1
            if r >= MIN_REPEATS and r * p > best[0]:
                best = (r * p, p)
        if best[0]:
            p = best[1]
            runs.append((i, p, best[0] // p))
            i += best[0]
        else:
            i += 1
    return runs


def _elisions(prog: Program, max_nodes: int, collapse: bool) -> list[Elision]:
    instrs = prog.instrs
    out: list[Elision] = []
    hidden: set[int] = set()
    if collapse:
        sigs = [(ins.prim.name, ins.role, ins.loc, tuple(o.shape for o in ins.outputs))
                for ins in instrs]
        for start, p, r in _find_runs(sigs):
            # keep the first and the last repetition; the ones between become one node
            idx = list(range(start + p, start + (r - 1) * p))
            if len(idx) < 2:
                continue
            block = instrs[start:start + p]
            ops = " → ".join(i.prim.name for i in block if not is_const(i))
            locs = sorted({i.loc for i in block if i.loc})
            out.append(Elision(idx, f"⋮ {r - 2} more × [{ops}]\n({len(idx)} instructions"
                                    f"{', ' + ', '.join(locs[:2]) if locs else ''})",
                               block[0].role))
            hidden.update(idx)
    visible = [i for i in range(len(instrs)) if i not in hidden]
    keep = max(max_nodes // 2, 1)
    cut = visible[keep:len(visible) - keep]
    # collapsed runs count towards max_nodes, so the instructions alone may all fit
    if len(visible) + len(out) > max_nodes and cut:
        roles = [instrs[i].role for i in cut]
        out = [e for e in out if not set(e.indices) <= set(range(cut[0], cut[-1] + 1))]
        for e in out:  # a collapsed run that straddles the cut loses its inner part
            e.indices = [i for i in e.indices if not cut[0] <= i <= cut[-1]]
        out = [e for e in out if e.indices]
        out.append(Elision([i for i in range(cut[0], cut[-1] + 1)],
                           f"… {cut[-1] - cut[0] + 1} instructions not drawn\n"
                           f"(raise max_nodes / --max-nodes to see them)",
                           max(set(roles), key=roles.count)))
    return out


def to_dot(prog: Program, *, kernels: Sequence[Sequence[Instr]] = (),
           input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, edge_labels: bool = False,
           max_nodes: int = 150, collapse: bool = True, title: str | None = None,
           names: Mapping[Var, str] | None = None) -> str:
    """The program's graph as DOT text.

    kernels: groups of instructions executed as one native call (a lowering's
    `Step.instrs`); groups of two or more visible instructions are boxed.
    input_names / output_names label the program's inputs and results.
    names: how values are called (default: numbered as `print(prog)` does); a value
    missing from it is called by its id.
    """
    if names is None:
        names = var_names(prog)
    else:
        every = {v for ins in prog.instrs for v in (*ins.inputs, *ins.outputs)}
        names = {**{v: f"%{v.id}" for v in (*prog.inputs, *prog.consts, *every)}, **names}
    producer: dict[Var, int] = {o: i for i, ins in enumerate(prog.instrs) for o in ins.outputs}
    elisions = _elisions(prog, max(int(max_nodes), 2), collapse)
    node_of: dict[int, str] = {i: f"i{i}" for i in range(len(prog.instrs))}
    for k, e in enumerate(elisions):
        for i in e.indices:
            node_of[i] = f"e{k}"

    def src(v: Var) -> str:
        return node_of[producer[v]] if v in producer else f"v{v.id}"

    lines = ["digraph jitgrad {",
             '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, nodesep=0.25, '
             'ranksep=0.35' + (f", label={_q(title)}, labelloc=t" if title else "") + "];",
             '  node [fontname="Helvetica", fontsize=10, shape=box, style="rounded,filled", '
             'penwidth=1.2];',
             '  edge [fontname="Helvetica", fontsize=9, color="#555555", arrowsize=0.7];']
    outputs = {v: k for k, v in enumerate(prog.outputs)}
    # An input read only inside collapsed layers (their weights), and a result computed
    # there (their gradients), are counted on the collapsed node rather than drawn.
    consumers: dict[Var, set[str]] = {}
    for i, ins in enumerate(prog.instrs):
        for v in ins.inputs:
            consumers.setdefault(v, set()).add(node_of[i])
    folded = {v for v in [*prog.inputs, *prog.consts] if v not in outputs and consumers.get(v)
              and all(n.startswith("e") for n in consumers[v])}
    inside: dict[str, list[int]] = {}  # elision node -> [inputs, results] it stands for
    for v in folded:
        inside.setdefault(min(consumers[v]), [0, 0])[0] += 1
    for v in outputs:
        if src(v).startswith("e"):
            inside.setdefault(src(v), [0, 0])[1] += 1

    # inputs and captured constants: leaves of the graph, outside every cluster
    for j, v in enumerate(prog.inputs):
        if v in folded:
            continue
        name = input_names[j] if input_names and j < len(input_names) else names[v]
        label = f"{name}\n{names[v]}: {v.type_str()}" if name != names[v] else \
            f"{names[v]}: {v.type_str()}"
        lines.append(f"  v{v.id} [label={_q(label)}, shape=ellipse, style=filled, "
                     f'fillcolor=white, color="#333333"];')
    for c in prog.consts:
        if c in folded:
            continue
        lines.append(f"  v{c.id} [label={_q(f'constant {names[c]}: {c.type_str()}')}, "
                     f'shape=note, style=filled, fillcolor="#eeeeee", color="#888888"];')


    def node_line(i: int, ins: Instr) -> str:
        fill, border, _ = ROLES.get(ins.role, ROLES["forward"])
        if is_const(ins):
            return (f"  i{i} [label={_q(f'{ins.prim.name}{_short_params(ins)}')}, shape=plaintext, "
                    f'style="", fontcolor="{border}"];')
        head = ("↻ " if ins.role == "recompute" else "") + ins.prim.name + _short_params(ins)
        body = "\n".join(f"{names[o]}: {o.type_str()}" for o in ins.outputs)
        extra = []
        if ins.checkpoint is not None:
            extra.append(f"checkpoint {ins.checkpoint}")
        style = "rounded,filled,dashed" if ins.role == "recompute" else "rounded,filled"
        if ins.checkpoint is not None:
            style += ",bold"
        label = "\n".join([head, body, *extra])
        periph = ", peripheries=2" if any(o in outputs for o in ins.outputs) else ""
        return (f'  i{i} [label={_q(label)}, fillcolor="{fill}", color="{border}", '
                f'style="{style}"{periph}];')

    # clusters: one per role, fused kernels boxed inside the role of the kernel's first instr
    index = {id(ins): i for i, ins in enumerate(prog.instrs)}
    kernel_of: dict[int, int] = {}
    boxes: list[tuple[str, list[int]]] = []
    for group in kernels:
        members = [index[id(ins)] for ins in group
                   if id(ins) in index and not is_const(prog.instrs[index[id(ins)]])]
        members = sorted(i for i in members if node_of[i] == f"i{i}" and i not in kernel_of)
        if len(members) >= 2:
            for i in members:
                kernel_of[i] = len(boxes)
            boxes.append((prog.instrs[members[0]].role, members))
    # Scalar constants are drawn next to each use: one shared node would send long edges
    # across the whole picture (the 0 of every relu-backward).
    inline = {i for i, ins in enumerate(prog.instrs)
              if is_const(ins) and ins.outputs[0] not in outputs}
    for role, (_, border, title_text) in ROLES.items():
        nodes = [i for i, ins in enumerate(prog.instrs) if ins.role == role
                 and node_of[i] == f"i{i}" and i not in kernel_of and i not in inline]
        mine = [(k, m) for k, (r, m) in enumerate(boxes) if r == role]
        elided = [(k, e) for k, e in enumerate(elisions) if e.role == role]
        if not nodes and not mine and not elided:
            continue
        lines.append(f"  subgraph cluster_{role} {{")
        lines.append(f'    label={_q(title_text)}; color="{border}"; style="rounded"; '
                     f'fontcolor="{border}";')
        for i in nodes:
            lines.append("  " + node_line(i, prog.instrs[i]))
        for k, members in mine:
            ops = ", ".join(prog.instrs[i].prim.name for i in members)
            lines.append(f"    subgraph cluster_kernel{k} {{")
            lines.append(f'      label={_q(f"fused kernel {k}: {ops}")}; style="dashed,rounded"; '
                         f'color="{KERNEL_COLOUR}"; fontcolor="{KERNEL_COLOUR}"; fontsize=9;')
            for i in members:
                lines.append("    " + node_line(i, prog.instrs[i]))
            lines.append("    }")
        for k, e in elided:
            fill = ROLES.get(e.role, ROLES["forward"])[0]
            n_in, n_out = inside.get(f"e{k}", (0, 0))
            extra = ", ".join(f"{n} {what}" for n, what in ((n_in, "inputs"), (n_out, "results"))
                              if n)
            label = e.label + (f"\nand their {extra}" if extra else "")
            lines.append(f'    e{k} [label={_q(label)}, shape=note, style="filled,dashed", '
                         f'fillcolor="{fill}"];')
        lines.append("  }")

    # data edges; collapsed nodes merge their edges (drawn once)
    seen: set[tuple[str, str]] = set()
    for i, ins in enumerate(prog.instrs):
        dst = node_of[i]
        for v in ins.inputs:
            s = src(v)
            if s == dst or v in folded:
                continue
            if v in producer and producer[v] in inline and s == f"i{producer[v]}":
                if dst.startswith("e"):
                    continue  # a constant of the collapsed layers
                c = prog.instrs[producer[v]]
                colour = ROLES.get(c.role, ROLES["forward"])[1]
                s = f"k{i}_{ins.inputs.index(v)}"
                lines.append(f"  {s} [label={_q(_short_params(c).strip())}, shape=plaintext, "
                             f'style="", fontsize=9, fontcolor="{colour}"];')
            attrs = []
            if edge_labels and dst == f"i{i}" and s.startswith(("i", "v")) \
                    and ins.role != "backward" and ins.prim.grad == "rule" \
                    and v.dtype.kind == "f" and ins.outputs[0].dtype.kind == "f":
                attrs.append(f"label={_q(f' ∂{names[ins.outputs[0]]}/∂{names[v]}')}")
            key = (s, dst) if not attrs else (s, dst + attrs[0])
            if key in seen:
                continue
            seen.add(key)
            if v in producer and prog.instrs[producer[v]].role != ins.role:
                attrs.append("style=dashed")  # a value crossing from G into B (or recomputed)
            lines.append(f"  {s} -> {dst}" + (f" [{', '.join(attrs)}]" if attrs else "") + ";")
    # results
    for k, v in enumerate(prog.outputs):
        if src(v).startswith("e"):
            continue
        name = output_names[k] if output_names and k < len(output_names) else f"result {k}"
        lines.append(f"  out{k} [label={_q(name)}, shape=plaintext, style=\"\", "
                     f"fontcolor=\"#333333\"];")
        lines.append(f"  {src(v)} -> out{k} [style=bold, arrowhead=none];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def have_dot() -> bool:
    return shutil.which("dot") is not None


def render(dot_text: str, path: str | os.PathLike[str]) -> str:
    """Render DOT text to path (.png, .svg or .pdf, by its suffix) with Graphviz's `dot`.

    Without `dot` the DOT text is written next to path (suffix .dot) and
    GraphvizMissing says how to install Graphviz.
    """
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise JitgradError(f"cannot render {path!r}: use a .png, .svg or .pdf file name "
                           "(or write the DOT text itself to a .dot file)")
    exe = shutil.which("dot")
    if exe is None:
        dot_path = os.path.splitext(path)[0] + ".dot"
        with open(dot_path, "w", encoding="utf-8") as f:
            f.write(dot_text)
        raise GraphvizMissing(f"Graphviz's `dot` is not installed, so {path} was not drawn; "
                              f"{INSTALL_HINT}. The DOT text is in {dot_path} "
                              f"(`dot -T{fmt} {dot_path} -o {path}` renders it).", dot_path)
    proc = subprocess.run([exe, f"-T{fmt}", "-o", path], input=dot_text.encode("utf-8"),
                          capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise JitgradError(f"dot failed on {path}: {proc.stderr.decode(errors='replace')[:500]}")
    return path
