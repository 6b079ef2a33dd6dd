"""Each compilation stage on small hand-written Programs: Program in, Program (or schedule,
or kernel calls) out — and an AST check that the pipeline names no primitive."""

import ast
import pathlib

import numpy as np
import pytest

import jitgrad
from jitgrad.compiler import blas, codegen, fusion, passes
from jitgrad.compiler.interp import run as interpret
from jitgrad.frontend.core import cast_p, const_p, registry
from jitgrad.frontend.ir import Instr, Program, Var, validate
from jitgrad.frontend.ops import elementwise as E
from jitgrad.frontend.ops import linalg as L
from jitgrad.frontend.ops import nn as N
from jitgrad.frontend.ops import reduce as R
from jitgrad.frontend.ops import shape as S

F32, F64, I32, I64 = (np.dtype(d) for d in (np.float32, np.float64, np.int32, np.int64))


class Builder:
    """A Program written instruction by instruction."""

    def __init__(self):
        self.inputs, self.instrs = [], []

    def input(self, shape, dtype=F64):
        v = Var(tuple(shape), np.dtype(dtype))
        self.inputs.append(v)
        return v

    def __call__(self, prim, *inputs, **params):
        avals = prim.abstract_eval([(v.shape, v.dtype) for v in inputs], params)
        outs = tuple(Var(s, d) for s, d in avals)
        self.instrs.append(Instr(prim, tuple(inputs), tuple(sorted(params.items())), outs,
                                 "test:1"))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=F64):
        return self(const_p, value=value, dtype=np.dtype(dtype))

    def program(self, *outputs):
        prog = Program(list(self.inputs), list(self.instrs), list(outputs))
        validate(prog)
        return prog


def same_results(a, b):
    """Both programs compute the same on random inputs (interpreted)."""
    rng = np.random.default_rng(0)
    args = [rng.normal(size=v.shape).astype(v.dtype) if v.dtype.kind == "f"
            else rng.integers(0, 3, size=v.shape).astype(v.dtype) for v in a.inputs]
    for x, y in zip(interpret(a, args), interpret(b, args), strict=True):
        np.testing.assert_array_equal(x, y)


def prims(prog):
    return [ins.prim for ins in prog.instrs]


# ---------------------------------------------------------------- passes

def test_simplify_drops_stop_gradient_and_times_one_and_folds_transposes():
    b = Builder()
    x, w = b.input((3, 4)), b.input((5, 4))
    s = b(E.stop_gradient_p, x)
    one = b.const(1.0)
    y = b(E.mul_p, s, b(S.broadcast_to_p, one, shape=(3, 4)))
    t = b(S.transpose_p, w, perm=(1, 0))
    out = b(E.mul_p, b(L.matmul_p, y, t, ta=False, tb=False), one)
    prog = b.program(out)
    simple = passes.dce(passes.simplify(prog))
    validate(simple)
    assert E.stop_gradient_p not in prims(simple) and S.transpose_p not in prims(simple)
    mm = next(i for i in simple.instrs if i.prim is L.matmul_p)
    assert mm.inputs == (simple.instrs[prims(simple).index(E.mul_p)].outputs[0], w)
    assert mm.kw == {"ta": False, "tb": True}
    assert simple.outputs == [mm.outputs[0]]  # `* 1` of a same-shaped value is gone
    same_results(prog, simple)


def test_cse_and_dce():
    b = Builder()
    x = b.input((4,))
    a1, a2 = b(E.exp_p, x), b(E.exp_p, x)
    b(E.tanh_p, x)  # dead
    prog = b.program(b(E.add_p, a1, a2))
    out = passes.dce(passes.cse(prog))
    validate(out)
    assert prims(out) == [E.exp_p, E.add_p]
    assert out.instrs[1].inputs == (out.instrs[0].outputs[0],) * 2
    same_results(prog, out)


def test_cse_keeps_minus_zero_apart():
    b = Builder()
    x = b.input((2,))
    prog = b.program(b(E.div_p, x, b(S.broadcast_to_p, b.const(0.0), shape=(2,))),
                     b(E.div_p, x, b(S.broadcast_to_p, b.const(-0.0), shape=(2,))))
    assert prims(passes.cse(prog)).count(const_p) == 2


# ---------------------------------------------------------------- fusion

def test_a_chain_of_elementwise_ops_is_one_group_with_folded_constants():
    b = Builder()
    x, y = b.input((8, 3)), b.input((3,))
    z = b(E.tanh_p, b(E.add_p, b(E.mul_p, x, b(S.broadcast_to_p, b.const(2.0), shape=(8, 3))),
                      b(S.broadcast_to_p, y, shape=(8, 3))))
    prog = b.program(b(R.sum_p, z, axes=(0,), keepdims=False))
    schedule = fusion.fuse(prog)
    groups = [s for s in schedule if isinstance(s, fusion.Group)]
    # broadcast_to is not elementwise: the constant it reads is materialised on its own
    assert [g.root.prim for g in groups] == [const_p, E.tanh_p]
    chain = groups[1]
    assert {i.prim for i in chain.members.values()} == {E.tanh_p, E.add_p, E.mul_p}
    assert len(chain.leaves) == 3  # x and the two broadcast values; nothing interior
    assert isinstance(schedule[-1], Instr) and schedule[-1].prim is R.sum_p


def test_a_value_read_twice_is_materialised():
    b = Builder()
    x = b.input((4,))
    e = b(E.exp_p, x)
    prog = b.program(b(E.mul_p, b(E.neg_p, e), e))
    groups = fusion.fuse(prog)
    assert [g.root.prim for g in groups] == [E.exp_p, E.mul_p]
    assert groups[1].leaves == [e]


def test_a_wide_tree_is_split_at_a_leaf():
    b = Builder()
    xs = [b.input((4,)) for _ in range(fusion.MAX_LEAVES + 3)]
    acc = xs[0]
    for x in xs[1:]:
        acc = b(E.add_p, acc, x)
    groups = fusion.fuse(b.program(acc))
    assert len(groups) == 2 and all(len(g.leaves) <= fusion.MAX_LEAVES for g in groups)


def test_a_product_added_into_a_sum_accumulates_and_moves_up():
    b = Builder()
    a, w, x = b.input((4, 3)), b.input((3, 5)), b.input((4, 5))
    late = b(E.exp_p, x)  # computed before the sum, after the product's inputs exist
    mm = b(L.matmul_p, a, w, ta=False, tb=False)
    out = b(E.add_p, late, mm)
    schedule = fusion.fuse(b.program(out))
    group = next(s for s in schedule if isinstance(s, fusion.Group) and s.root.outputs[0] is out)
    assert group.accumulates is not None and group.accumulates.prim is L.matmul_p


# ---------------------------------------------------------------- prepare

def test_prepare_makes_reduction_axes_contiguous():
    b = Builder()
    x = b.input((2, 3, 4))
    prog = b.program(b(R.sum_p, x, axes=(0, 2), keepdims=False))
    out = codegen.prepare(prog)
    validate(out)
    assert prims(out) == [S.transpose_p, R.sum_p, S.reshape_p]
    assert out.instrs[0].kw["perm"] == (1, 0, 2) and out.instrs[1].kw["axes"] == (1, 2)
    same_results(prog, out)


def test_prepare_widens_narrow_integer_reductions():
    b = Builder()
    x = b.input((5, 3), np.int8)
    prog = b.program(b(R.sum_p, x, axes=(1,), keepdims=False),
                     b(R.argmax_p, x, axis=0))
    out = codegen.prepare(prog)
    validate(out)
    assert prims(out) == [cast_p, R.sum_p, cast_p, cast_p, R.argmax_p]
    assert out.instrs[1].inputs[0].dtype == I64
    same_results(prog, out)


def test_prepare_casts_index_inputs_to_int64():
    b = Builder()
    x, idx = b.input((6, 2)), b.input((4,), I32)
    prog = b.program(b(S.gather_p, x, idx))
    out = codegen.prepare(prog)
    validate(out)
    assert prims(out) == [cast_p, S.gather_p]
    assert out.instrs[1].inputs[1].dtype == I64
    same_results(prog, out)


# ---------------------------------------------------------------- lowering

def test_lowering_calls_declared_kernels():
    b = Builder()
    x, w, labels = b.input((4, 3), F32), b.input((3, 5), F32), b.input((4,), I64)
    z = b(L.matmul_p, x, w, ta=False, tb=False)
    flat = b(S.reshape_p, z, shape=(20,))
    loss = b(N.softmax_cross_entropy_p, z, labels)
    dz = b(N.softmax_cross_entropy_grad_p, z, labels)
    prog = b.program(loss, dz, b(R.sum_p, flat, axes=(0,), keepdims=False))
    low = codegen.lower(codegen.prepare(prog))
    # a product this small is OpenBLAS's, whether or not MKL is installed (compiler/blas.py)
    assert [s.sym for s in low.steps] == ["jg_gemm_f32", "jg_sce_f32", "jg_sum_f32"]
    gemm, sce, total = low.steps
    assert gemm.kernel is blas.OPENBLAS and gemm.args[3:] == [4, 5, 3, 0, 0]
    assert len(sce.instrs) == 2 and sce.can_fail and not gemm.can_fail  # loss + gradient
    assert low.root(flat) is z  # a reshape is the same memory: no call
    assert all(len(s.args) == len(s.kernel.args) for s in low.steps)


def test_fused_loops_are_elementwise_steps_and_library_calls_are_not():
    b = Builder()
    x = b.input((4, 5))
    y = b(E.relu_p, b(E.mul_p, x, x))
    prog = b.program(b(S.transpose_p, y, perm=(1, 0)))
    low = codegen.lower(prog)
    assert [s.elementwise for s in low.steps] == [True, False]
    assert low.steps[0].sym.startswith("jg_fused_f64_") and low.steps[0].kernel is None
    assert low.steps[1].kernel is S.COPY and low.steps[1].sym == "jg_copy_b8"
    sym, source, dims = codegen.fused_kernel(fusion.fuse(prog)[0])
    assert "_relu(" in source and "def _relu" in source and dims == [20]


def test_a_call_with_the_wrong_number_of_arguments_is_refused():
    low = codegen.Lowering()
    x = Var((2,), F64)
    ins = Instr(E.exp_p, (x,), (), (Var((2,), F64),))
    with pytest.raises(jitgrad.errors.NoLoweringError, match="zero kernel takes 2 arguments"):
        low.call(S.ZERO, F64, [x], [x], [], ins)


# ---------------------------------------------------------------- no module names a primitive

# Literals outside ops/ that equal a primitive's name but mean something else.
_NOT_PRIMITIVES = {
    ("cli.py", "sqrt"), ("memsweep.py", "sqrt"), ("options.py", "sqrt"),  # remat="sqrt"
    ("remat.py", "sqrt"),
    ("nn.py", "relu"),  # activation="relu", the default of the MLP helpers
    # Tracer methods, named as numpy's (x.sum(), x.max(), x.T, ...)
    ("trace.py", "sum"), ("trace.py", "max"), ("trace.py", "argmax"),
    ("trace.py", "transpose"), ("trace.py", "reshape"),
    # numpy's function and method names (np.prod, x.min(), x.cumsum(), x.round())
    ("numpy_surface.py", "min"), ("numpy_surface.py", "prod"),
    ("numpy_surface.py", "cumsum"), ("numpy_surface.py", "round"),
}


def test_no_module_outside_ops_names_a_primitive():
    package = pathlib.Path(jitgrad.__file__).parent
    names = set(registry)
    found = []
    for path in sorted(package.rglob("*.py")):
        if "ops" in path.relative_to(package).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        allowed = set()
        for node in ast.walk(tree):
            # a definition (core defines const and cast), and the public names in __all__
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "primitive":
                allowed.update(id(a) for a in node.args[:1])
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                    for t in node.targets):
                allowed.update(id(n) for n in ast.walk(node.value))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value in names and id(node) not in allowed
                    and (path.name, node.value) not in _NOT_PRIMITIVES):
                found.append(f"{path.relative_to(package)}:{node.lineno}: {node.value!r}")
    assert not found, "modules outside ops/ name primitives:\n" + "\n".join(found)
