"""`jitgrad show`: the computational-graph pictures of Deep Learning ch. 6.5 as DOT text,
the memory timeline, `cf.show`, and the `jitgrad show` command.

The graph tests read the DOT text back into nodes (label, enclosing clusters) and
edges, and check the textbook's graphs: the forward graph G and the backward
subgraph B that back-propagation adds, for z = x·y, logistic regression, a ReLU
layer and the MLP with weight decay.
"""

from __future__ import annotations

import io
import re
import shutil
import textwrap

import numpy as np
import pytest

import jitgrad as jg
from jitgrad.compiler.backend import plan_program
from jitgrad.tools import cli, graph, timeline
from jitgrad.tools.show import inspect_function, parse_arg_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Dot:
    """A DOT text as written by jitgrad.tools.graph, read back: nodes and edges by label."""

    def __init__(self, text: str):
        self.text = text
        self.nodes: dict[str, tuple[str, tuple[str, ...]]] = {}  # id -> (label, clusters)
        self.edges: list[tuple[str, str, str]] = []  # (src id, dst id, edge label)
        stack: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if m := re.match(r"subgraph (cluster_\w+) \{", line):
                stack.append(m.group(1))
            elif line == "}" and stack:
                stack.pop()
            elif m := re.match(r'(\w+) -> (\w+)(?: \[(.*)\])?;', line):
                lab = re.search(r'label="([^"]*)"', m.group(3) or "")
                self.edges.append((m.group(1), m.group(2), lab.group(1).strip() if lab else ""))
            elif m := re.match(r'(\w+) \[label="((?:[^"\\]|\\.)*)"', line):
                self.nodes[m.group(1)] = (m.group(2).replace("\\n", "\n"), tuple(stack))

    def ids(self, head: str, cluster: str | None = None) -> list[str]:
        """Nodes whose label's first line is `head` (optionally inside `cluster`)."""
        return [i for i, (label, cl) in self.nodes.items() if label.split("\n")[0] == head
                and (cluster is None or cluster in cl)]

    def label(self, node: str) -> str:
        return self.nodes[node][0]

    def preds(self, node: str) -> list[str]:
        return [s for s, d, _ in self.edges if d == node]

    def result(self, name: str) -> str:
        """The node producing the result labelled `name`."""
        out = next(i for i, (label, _) in self.nodes.items() if label == name)
        return self.preds(out)[0]


def dot_of(fn, *args, which="grad", argnums=None, **kw) -> Dot:
    return Dot(inspect_function(fn, args, argnums=argnums).dot(which, **kw))


# ---------------------------------------------------------------- the textbook's graphs


def test_scalar_multiply_z_equals_x_times_y():
    def z(x, y):
        return x * y

    g = dot_of(z, np.float64(2.0), np.float64(3.0), argnums=(0, 1), edge_labels=True)
    (fwd,) = g.ids("mul", "cluster_forward")
    x, y = g.ids("x"), g.ids("y")
    assert g.label(x[0]) == "x\n%0: f64[]" and g.label(fwd) == "mul\n%2: f64[]"
    # G: x -> z <- y, each edge standing for one partial derivative
    assert (x[0], fwd, "∂%2/∂%0") in g.edges and (y[0], fwd, "∂%2/∂%1") in g.edges
    # B: dz/dx = 1 * y and dz/dy = 1 * x, the results of the gradient program
    back = g.ids("mul", "cluster_backward")
    assert len(back) == 2
    assert y[0] in g.preds(g.result("∂value/∂x")) and x[0] in g.preds(g.result("∂value/∂y"))
    assert g.result("value") == fwd
    # backward edges stand for no partial derivative of their own
    assert all(lab == "" for s, d, lab in g.edges if d in back)


def test_logistic_regression():
    def y_hat(x, w, b):
        return jg.sigmoid(x @ w + b)

    x, w, b = np.ones(3), np.full(3, 0.5), np.float64(0.1)
    g = Dot(inspect_function(y_hat, (x, w, b), argnums=(1, 2)).dot("grad"))
    (mm,) = g.ids("matmul A·B", "cluster_forward")
    (add,) = g.ids("add", "cluster_forward")
    (sig,) = g.ids("sigmoid", "cluster_forward")
    assert g.ids("b")[0] in g.preds(add) and sig in [d for s, d, _ in g.edges if s == add]
    # B: σ' = σ(1 - σ), computed from the stored forward value σ (a dashed G -> B edge)
    (sub,) = g.ids("sub", "cluster_backward")
    assert sig in g.preds(sub)
    assert f"{sig} -> {sub} [style=dashed];" in g.text
    # ∂ŷ/∂w = x · δ: a transposed product in B; ∂ŷ/∂b is δ itself
    (mm_back,) = g.ids("matmul Aᵀ·B", "cluster_backward")
    # (x enters as a 1x3 matrix: a reshape of x)
    assert g.ids("x") in [g.preds(p) for p in g.preds(mm_back) if g.label(p).startswith("resh")]
    assert "mul" in g.label(g.result("∂value/∂b"))
    assert g.label(g.result("value")).startswith("sigmoid")


def test_relu_layer_forward_backward_and_fused_kernel():
    def layer(W, b, x):
        return jg.sum(jg.relu(x @ W + b))

    args = (np.ones((4, 3), np.float32), np.zeros(3, np.float32), np.ones((2, 4), np.float32))
    view = inspect_function(layer, args)
    g = Dot(view.dot("grad"))
    (relu,) = g.ids("relu", "cluster_forward")
    # relu's backward routes the gradient with a mask: gt and where in B
    (gt,) = g.ids("gt", "cluster_backward")
    (where,) = g.ids("where", "cluster_backward")
    assert relu in g.preds(gt) and gt in g.preds(where)
    assert g.label(relu) == "relu\n%5: f32[2,3]"  # b is broadcast in the add's loop
    # optimized: bias + relu and relu-backward are each one fused kernel, boxed
    opt = Dot(view.dot("optimized"))
    kernels = {c for _, cl in opt.nodes.values() for c in cl if c.startswith("cluster_kernel")}
    boxed = {c: {opt.label(i).split("\n")[0] for i, (_, cl) in opt.nodes.items() if c in cl}
             for c in kernels}
    assert {"add", "relu"} in boxed.values() and {"gt", "where"} in boxed.values()
    fwd_kernel = next(c for c, ops in boxed.items() if ops == {"add", "relu"})
    assert any(c == "cluster_forward" for i, (_, cl) in opt.nodes.items()
               if fwd_kernel in cl for c in cl)
    assert "fused kernel" in opt.text


def test_weight_decay_mlp():
    lam = 1e-2

    def loss(W1, W2, x, y):
        h = jg.relu(x @ W1)
        return jg.softmax_cross_entropy(h @ W2, y) + lam * (jg.sum(W1 ** 2) + jg.sum(W2 ** 2))

    args = (np.ones((4, 5)), np.ones((5, 3)), np.ones((2, 4)), np.zeros(2, np.int64))
    view = inspect_function(loss, args, argnums=(0, 1))
    g = Dot(view.dot("grad"))
    for head in ("matmul A·B", "relu", "softmax_cross_entropy", "pow", "sum [axes=(0, 1)]"):
        assert g.ids(head, "cluster_forward"), head
    assert len(g.ids("matmul A·B", "cluster_forward")) == 2
    # B: the cross-entropy gradient, then a product with a transposed weight
    (sce_grad,) = g.ids("softmax_cross_entropy_grad", "cluster_backward")
    assert g.ids("y")[0] in g.preds(sce_grad)
    # each weight is reached by two paths (the data term and the penalty): B sums them
    for w in ("W1", "W2"):
        total = g.result(f"∂value/∂{w}")
        assert g.label(total).startswith("add") and total in g.ids("add", "cluster_backward")
        heads = {g.label(p).split("\n")[0] for p in g.preds(total)}
        assert "matmul Aᵀ·B" in heads and "mul" in heads
    # the integer labels take no gradient: no result for y, and nothing flows back into it
    assert "∂value/∂y" not in g.text


# ---------------------------------------------------------------- drawing options


def _deep(params, x):
    h = x
    for W in params:
        h = jg.relu(h @ W)
    return jg.sum(h)


def _deep_args(depth=8, width=6, batch=4):
    rng = np.random.default_rng(0)
    return ([rng.standard_normal((width, width)) for _ in range(depth)],
            rng.standard_normal((batch, width)))


def test_repeated_layers_collapse_and_max_nodes():
    view = inspect_function(_deep, _deep_args())
    full = Dot(view.dot("optimized", collapse=False, max_nodes=10_000))
    collapsed = Dot(view.dot("optimized"))
    assert "more ×" not in full.text and len(full.nodes) > len(collapsed.nodes)
    notes = [lab for lab, _ in collapsed.nodes.values() if "more ×" in lab]
    # forward layers (matmul, relu) and backward layers both collapse to one node each
    assert any("matmul → relu" in n for n in notes) and len(notes) >= 2
    # the collapsed layers' weights and gradients are counted there, not drawn one by one
    def counted(what):
        return sum(int(m) for n in notes for m in re.findall(rf"(\d+) {what}", n))

    weights = [i for i, (lab, _) in collapsed.nodes.items() if lab.startswith("params[")]
    grads = [i for i, (lab, _) in collapsed.nodes.items() if lab.startswith("∂value/∂params")]
    assert counted("inputs") > 0 and len(weights) + counted("inputs") == 8
    assert counted("results") > 0 and len(grads) + counted("results") == 8
    assert len([i for i, (lab, _) in full.nodes.items() if lab.startswith("params[")]) == 8
    small = Dot(view.dot("optimized", max_nodes=12))
    instr_nodes = [i for i in small.nodes if re.fullmatch(r"[ie]\d+", i)]
    assert len(instr_nodes) <= 14 and "instructions not drawn" in small.text
    # every edge still connects drawn nodes
    assert all(s in small.nodes and d in small.nodes for s, d, _ in small.edges)


def test_recomputed_nodes_are_marked():
    view = inspect_function(_deep, _deep_args(depth=9, width=16), remat="sqrt")
    recomputed = [ins for ins in view.program.instrs if ins.role == "recompute"]
    assert recomputed, "sqrt should recompute some activations of a 9-layer chain"
    g = Dot(view.dot("optimized", collapse=False, max_nodes=10_000))
    marked = [i for i, (lab, cl) in g.nodes.items() if lab.startswith("↻")]
    assert len(marked) == sum(ins.prim.name != "const" for ins in recomputed)
    assert all("cluster_recompute" in g.nodes[i][1] for i in marked)


def test_png_rendered_or_clear_install_message(tmp_path):
    text = inspect_function(lambda x, y: x * y, (np.float64(1), np.float64(2))).dot()
    path = tmp_path / "g.png"
    if graph.have_dot():
        graph.render(text, path)
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        svg = graph.render(text, tmp_path / "g.svg")
        assert "<svg" in open(svg).read()
    else:
        with pytest.raises(graph.GraphvizMissing, match="apt-get install graphviz"):
            graph.render(text, path)
        assert (tmp_path / "g.dot").read_text() == text


def test_missing_graphviz_message(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(graph.GraphvizMissing) as e:
        graph.render("digraph {}\n", tmp_path / "g.svg")
    assert "conda install graphviz" in str(e.value) and e.value.dot_path.endswith("g.dot")
    assert (tmp_path / "g.dot").read_text() == "digraph {}\n"
    with pytest.raises(jg.JitgradError, match=r"\.png, \.svg or \.pdf"):
        graph.render("digraph {}\n", tmp_path / "g.jpg")


# ---------------------------------------------------------------- the memory timeline


def test_timeline_peak_is_the_lower_bound_and_arena_line_is_peak_bytes(tmp_path):
    args = _deep_args(depth=9, width=16, batch=128)  # activations outweigh the weights
    plans = {p: inspect_function(_deep, args, remat=p).plan for p in ("none", "sqrt")}
    path = tmp_path / "timeline.png"
    drawn = timeline.plot_timeline(plans, path, title="deep chain")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert [s.name for s in drawn] == ["none", "sqrt"]
    for s in drawn:
        plan = plans[s.name]
        assert s.live == plan.live_bytes() and len(s.live) == plan.n_steps
        assert s.peak == plan.peak_live_bytes == s.live[s.peak_step]
        assert s.arena == plan.arena_bytes >= s.peak
        # the backward pass starts at the first step running a backward instruction
        assert s.backward_start == plan.step_roles.index("backward") > 0
    assert drawn[1].recompute_steps and not drawn[0].recompute_steps
    assert drawn[1].peak < drawn[0].peak  # recomputation lowers the peak


def test_timeline_of_a_compiled_function(tmp_path):
    def f(x, W):
        return jg.sum(jg.tanh(x @ W))

    cf = jg.jit(jg.grad(f, argnums=1))
    cf(np.ones((8, 4), np.float32), np.ones((4, 3), np.float32))
    (s,) = timeline.plot_timeline(cf.plan, tmp_path / "t.png")
    assert s.arena == cf.plan.arena_bytes and s.peak == cf.plan.peak_live_bytes
    assert (tmp_path / "t.png").stat().st_size > 0
    # the planner's view (no compiler) agrees with the compiled function's plan
    assert plan_program(cf.program).plan.peak_live_bytes == cf.plan.peak_live_bytes


# ---------------------------------------------------------------- cf.show and TrainStep


def test_cf_show_prints_stages(tmp_path):
    def f(x, w):
        return jg.sum(jg.relu(x @ w))

    cf = jg.jit(f, backend="interpret")
    x, w = np.ones((3, 4), np.float32), np.ones((4, 2), np.float32)
    cf(x, w)
    out = io.StringIO()
    view = cf.show(ir=True, grad=True, optimized=True, plan=True, source=True,
                   dot=str(tmp_path / "g.dot"), file=out)  # args: the last call's shapes
    text = out.getvalue()
    for head in ("== traced IR", "== gradient program", "== optimized program", "== kernels",
                 "== memory plan", "== generated source", "# ---- backward", "fused[",
                 "arena (arena_bytes)", "@cfunc", "wrote "):
        assert head in text, head
    assert view.grad is not None and (tmp_path / "g.dot").read_text().startswith("digraph")
    # a function that does not return a scalar is shown as is
    out = io.StringIO()
    jg.jit(lambda x: x * 2.0, backend="interpret").show(x, grad=True, file=out)
    assert "does not return a float scalar" in out.getvalue()


def test_train_step_graph():
    params = {"W": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}

    def loss(p, x, y):
        return jg.softmax_cross_entropy(x @ p["W"] + p["b"], y)

    step = jg.train_step(loss, params, jg.optim.SGD(lr=0.1, momentum=0.9), backend="interpret")
    view = inspect_function(step, (np.ones((2, 4), np.float32), np.zeros(2, np.int64)))
    roles = {ins.role for ins in view.program.instrs}
    assert {"forward", "backward"} <= roles
    g = Dot(view.dot())
    assert g.ids("matmul Aᵀ·B", "cluster_backward")  # dL/dW = xᵀ δ
    labels = [lab.split("\n")[0] for lab, _ in g.nodes.values()]
    assert {"params.W", "state.momentum.W", "batch[0]", "batch[1]"} <= set(labels)
    assert view.donate  # parameters are updated in place, as the compiled step does
    # results: (loss, new params, new optimizer state)
    assert view.output_names == ["result[0]", "result[1].W", "result[1].b",
                                 "result[2].momentum.W", "result[2].momentum.b"]


# ---------------------------------------------------------------- the command


SCRIPT = textwrap.dedent("""
    import numpy as np
    import jitgrad as jg

    def loss(W, b, x, y):
        return jg.softmax_cross_entropy(jg.relu(x @ W + b), y)

    def predict(W, x):
        return x @ W

    __jitgrad_example__ = {
        "loss": lambda: (np.ones((6, 4), np.float32), np.zeros(4, np.float32),
                         np.ones((5, 6), np.float32), np.zeros(5, np.int64)),
    }
""")


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(SCRIPT)
    return path


def test_cli_show_with_example_from_the_script(script, tmp_path, capsys):
    rc = cli.main(["show", f"{script}:loss", "--all", "--edge-labels",
                   "--dot", str(tmp_path / "g.dot"), "--timeline", str(tmp_path / "t.png")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "value_and_grad(loss, argnums=(0,))" in out  # argument 0, as jg.grad
    assert "== memory plan" in out and "== kernels" in out and "# ---- backward" in out
    g = Dot((tmp_path / "g.dot").read_text())
    assert g.ids("W") and any(lab.startswith("∂") for _, _, lab in g.edges)
    assert (tmp_path / "t.png").read_bytes().startswith(PNG_MAGIC)


def test_cli_show_with_arg_specs(script, capsys):
    rc = cli.main(["show", f"{script}:predict", "--arg", "f32[6,4]", "--arg", "f32[5, 6]",
                   "--ir"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "%0:f32[6,4] %1:f32[5,6]" in out and "does not return a float scalar" in out
    rc = cli.main(["show", f"{script}:loss", "--arg", "f64[6,4]", "--arg", "f64[4]",
                   "--arg", "f64[5,6]", "--arg", "i64[5]", "--wrt", "0", "--grad"])
    out = capsys.readouterr().out
    assert rc == 0 and "argnums=(0,)" in out and "%0:f64[6,4]" in out


@pytest.mark.parametrize("argv, message", [
    (["{script}"], "expected SCRIPT.py:FUNCTION"),
    (["{dir}/missing.py:loss"], "no such script"),
    (["{script}:nope"], "defines no 'nope' (functions there: loss, predict)"),
    (["{script}:predict"], "no example inputs for"),
    (["{script}:predict", "--arg", "f33[2]"], "bad argument spec 'f33[2]'"),
    (["{script}:predict", "--arg", "f32[2,x]"], "bad argument spec"),
    (["{script}:loss", "--remat", "lots"], "bad recomputation policy 'lots'"),
])
def test_cli_show_errors(script, tmp_path, capsys, argv, message):
    argv = [a.format(script=script, dir=tmp_path) for a in argv]
    assert cli.main(["show", *argv]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("jitgrad show: error:") and message in err, err


def test_parse_arg_spec():
    a = parse_arg_spec("f32[64,784]")
    assert a.shape == (64, 784) and a.dtype == np.float32
    assert parse_arg_spec("i64[3]").dtype == np.int64
    assert parse_arg_spec("f64[]").shape == () == parse_arg_spec("f64").shape


def test_max_nodes_below_the_collapsed_runs_does_not_crash():
    # collapsed runs count towards max_nodes; the instructions left may have nothing to cut
    def f(x):
        for _ in range(4):
            x = jg.tanh(x) * 2.0
        return jg.sum(x)

    prog = jg.jit(f, backend="interpret").lower(np.ones(3)).program
    for max_nodes in (2, 4, 6):
        assert graph.to_dot(prog, max_nodes=max_nodes).startswith("digraph")
