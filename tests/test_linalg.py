"""The numpy surface for linear algebra and indexing (issue 16, part B).

A table of rows, one or more per function — matmul/@ (batched, broadcast), dot,
einsum, tensordot, inner, outer, kron, trace, diag, diagonal, triu, tril, advanced
indexing and `x.at[...]` — each checked against numpy (eagerly and jitted) and
gradchecked in float64 at orders 1 and 2 against central differences of the numpy
reference. Every row runs on the interpreter; on Numba the first row of each
function runs by default and the rest with JITGRAD_TEST_FULL=1 (conftest.py).

Then the lowering: a batched einsum is one GEMM step, copies only where GEMM's
flags and batch strides cannot express the contraction; and the errors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from gradcheck import check_grads

import jitgrad as jg
from jitgrad.compiler import blas


@dataclass(frozen=True)
class Row:
    function: str                       # the numpy function or operator the row is about
    variant: str
    fn: Callable[..., Any]              # jitgrad's spelling (numpy functions dispatch)
    ref: Callable[..., Any]             # numpy's
    shapes: tuple[tuple[int, ...], ...]  # float arguments, drawn normal
    extra: tuple[Any, ...] = ()         # further (integer) arguments, not differentiated

    @property
    def id(self) -> str:
        return f"{self.function}-{self.variant}"


ROWS: list[Row] = []


def row(function: str, variant: str, fn, ref, *shapes: tuple[int, ...], extra=()) -> None:
    ROWS.append(Row(function, variant, fn, ref, shapes, tuple(extra)))


def same(f: Callable[..., Any]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """fn and ref are one numpy call: on traced values it dispatches to jitgrad."""
    return f, f


# matmul and @: numpy's full semantics
row("matmul", "batched", *same(lambda a, b: a @ b), (3, 4, 5), (3, 5, 2))
row("matmul", "broadcast-batch", *same(lambda a, b: np.matmul(a, b)), (2, 1, 3, 4), (5, 4, 2))
row("matmul", "3d-by-2d", *same(lambda h, w: h @ w), (2, 3, 4), (4, 5))
row("matmul", "2d-by-3d", *same(lambda w, h: w @ h), (3, 4), (2, 4, 5))
row("matmul", "1d-by-3d", *same(lambda v, h: v @ h), (4,), (2, 4, 3))
row("matmul", "3d-by-1d", *same(lambda h, v: h @ v), (2, 3, 4), (4,))
row("matmul", "batched-transposed", lambda a, b: jg.transpose(a, (0, 2, 1)) @ b,
    lambda a, b: np.transpose(a, (0, 2, 1)) @ b, (3, 5, 4), (3, 5, 2))
# dot
row("dot", "2d-1d", *same(np.dot), (3, 4), (4,))
row("dot", "scalar", *same(np.dot), (), (3, 2))
row("dot", "nd-nd", *same(np.dot), (2, 3, 4), (3, 4, 2))
row("dot", "nd-1d", *same(np.dot), (2, 3, 4), (4,))
row("dot", "method", lambda a, b: a.dot(b), lambda a, b: a.dot(b), (3, 4), (4, 2))
row("dot", "jg.dot", jg.dot, np.dot, (4,), (4,))
# einsum
for _sub, _shapes in [
        ("bij,bjk->bik", ((3, 4, 5), (3, 5, 2))), ("ij,jk", ((3, 4), (4, 5))),
        ("ii", ((4, 4),)), ("ii->i", ((4, 4),)), ("iij->j", ((3, 3, 2),)),
        ("ij->ji", ((2, 3),)), ("ij->", ((2, 3),)), ("i,i", ((4,), (4,))),
        ("i,j->ij", ((3,), (4,))), ("...ij,...jk->...ik", ((2, 3, 4), (4, 5))),
        ("bij,jk->bik", ((2, 3, 4), (4, 5))), ("ibj,bjk->bik", ((3, 2, 4), (2, 4, 5))),
        ("bji,bjk->bki", ((2, 4, 3), (2, 4, 5))), ("ij,jk,kl->il", ((2, 3), (3, 4), (4, 5))),
        ("bij,bij->b", ((2, 3, 4), (2, 3, 4))), ("ijk,jil->kl", ((2, 3, 4), (3, 2, 5))),
        ("ij,ij->ij", ((3, 1), (3, 4))), ("i...,i...->...", ((3, 2, 2), (3, 2, 2))),
        ("ji,kj->ik", ((4, 3), (5, 4))), ("Ba,ab", ((2, 3), (3, 2))),
        ("ij,bjk->bik", ((3, 4), (2, 4, 5))), ("bji,jk->bik", ((2, 4, 3), (4, 5))),
        ("aij,bjk->abik", ((2, 3, 4), (3, 4, 2)))]:
    row("einsum", _sub, lambda *xs, s=_sub: np.einsum(s, *xs),
        lambda *xs, s=_sub: np.einsum(s, *xs), *_shapes)
row("einsum", "jg.einsum-optimize", lambda a, b: jg.einsum("ij,jk->ki", a, b, optimize=True),
    lambda a, b: np.einsum("ij,jk->ki", a, b, optimize=True), (3, 4), (4, 2))
# tensordot, inner, outer, kron
row("tensordot", "axes2", *same(lambda a, b: np.tensordot(a, b)), (2, 3, 4), (3, 4, 2))
row("tensordot", "axes1", *same(lambda a, b: np.tensordot(a, b, 1)), (2, 3), (3, 4))
row("tensordot", "axes0", *same(lambda a, b: np.tensordot(a, b, 0)), (2,), (3,))
row("tensordot", "pairs", *same(lambda a, b: np.tensordot(a, b, ([1, 0], [0, 2]))),
    (3, 2, 4), (2, 5, 3))
row("tensordot", "negative-axis", *same(lambda a, b: np.tensordot(a, b, (-1, 0))),
    (2, 3), (3, 2))
row("inner", "1d", *same(np.inner), (4,), (4,))
row("inner", "nd", *same(np.inner), (2, 3), (4, 3))
row("inner", "scalar", *same(np.inner), (), (2, 3))
row("outer", "1d", *same(np.outer), (3,), (4,))
row("outer", "flattens", *same(np.outer), (2, 2), (3,))
row("kron", "2d", *same(np.kron), (2, 3), (3, 2))
row("kron", "1d-2d", *same(np.kron), (2,), (2, 3))
# diagonals and triangles
row("trace", "2d", *same(np.trace), (4, 4))
row("trace", "offset-rect", *same(lambda a: np.trace(a, 1)), (3, 5))
row("trace", "axes", *same(lambda a: np.trace(a, -1, 0, 2)), (3, 2, 4))
row("diag", "1d-offset", *same(lambda v: np.diag(v, 1)), (3,))
row("diag", "2d-negative", *same(lambda a: np.diag(a, -1)), (4, 3))
row("diagonal", "3d-axes", *same(lambda a: np.diagonal(a, 1, 2, 1)), (2, 4, 3))
row("diagonal", "default", *same(np.diagonal), (3, 4))
row("triu", "k1", *same(lambda a: np.triu(a, 1)), (3, 4))
row("triu", "batched", *same(np.triu), (2, 3, 3))
row("tril", "k-1", *same(lambda a: np.tril(a, -1)), (4, 3))
row("tril", "1d", *same(np.tril), (3,))
# advanced indexing
_I, _J = np.array([0, 2, -1]), np.array([[1], [3]])
_MASK = np.array([[True, False, True, True], [False, False, True, False], [True] * 4])
row("getitem", "array-slice-int", *same(lambda x: x[[0, 1], :, 2]), (3, 4, 5))
row("getitem", "two-arrays", *same(lambda x: x[_I, _J]), (3, 4))
row("getitem", "two-arrays-traced", lambda x, i, j: x[i, j], lambda x, i, j: x[i, j], (3, 4),
    extra=(_I, _J))
row("getitem", "adjacent-arrays-after-slice", *same(lambda x: x[:, [0, 1], [2, 0]]), (2, 3, 4))
row("getitem", "bool-mask", *same(lambda x: x[_MASK]), (3, 4))
row("getitem", "bool-mask-rows", *same(lambda x: x[_MASK[:, 0]]), (3, 4, 2))
row("getitem", "traced-array-and-slice", lambda x, i: x[1:, i], lambda x, i: x[1:, i], (3, 4),
    extra=(_I,))
row("getitem", "newaxis-ellipsis", *same(lambda x: x[None, ..., [1, 1]]), (2, 3))
# functional updates: gradients reach x and v
_DUP = np.array([0, 2, 0])  # a repeated row: add accumulates, set keeps the last
row("at", "set-rows", lambda x, v: jg.at(x)[_DUP].set(v), lambda x, v: _np_set(x, _DUP, v),
    (4, 3), (3, 3))
row("at", "add-rows", lambda x, v: jg.at(x)[_DUP].add(v), lambda x, v: _np_add(x, _DUP, v),
    (4, 3), (3, 3))
row("at", "set-mixed", lambda x, v: jg.at(x)[1:3, [2, 0]].set(v),
    lambda x, v: _np_set(x, np.s_[1:3, [2, 0]], v), (4, 3), (2,))
row("at", "add-scalar-key", lambda x, v: jg.at(x)[1].add(v), lambda x, v: _np_add(x, 1, v),
    (4, 3), ())
row("at", "set-mask", lambda x, v: jg.at(x)[_MASK].set(v), lambda x, v: _np_set(x, _MASK, v),
    (3, 4), ())
row("at", "set-traced-index", lambda x, v, i: jg.at(x)[i].set(v),
    lambda x, v, i: _np_set(x, i, v), (4, 3), (3, 3), extra=(_DUP,))


def _np_set(x, key, v):
    y = x.copy()
    y[key] = v
    return y


def _np_add(x, key, v):
    y = x.copy()
    np.add.at(y, key, v)
    return y


def _params(rows: list[Row]) -> list[Any]:
    first: dict[str, str] = {}
    for r in rows:
        first.setdefault(r.function, r.id)
    return [pytest.param(r, id=r.id, marks=() if first[r.function] == r.id
                         else pytest.mark.numba_full) for r in rows]


def _args(r: Row) -> tuple:
    rng = np.random.default_rng(sum(map(ord, r.id)))
    return tuple(rng.normal(size=s) for s in r.shapes) + r.extra


def _weighted(f: Callable[..., Any], w: np.ndarray) -> Callable[..., Any]:
    return lambda *a: (f(*a) * w).sum()


def test_every_function_has_a_row():
    assert {r.function for r in ROWS} == {
        "matmul", "dot", "einsum", "tensordot", "inner", "outer", "kron", "trace", "diag",
        "diagonal", "triu", "tril", "getitem", "at"}
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("r", _params(ROWS))
def test_row(r: Row, backend: str) -> None:
    args = _args(r)
    want = r.ref(*args)
    np.testing.assert_allclose(r.fn(*args), want, rtol=1e-12, atol=1e-12)  # eagerly
    got = jg.jit(r.fn)(*args)
    assert got.shape == np.shape(want) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    w = np.random.default_rng(7).normal(size=np.shape(want))
    floats = tuple(range(len(r.shapes)))
    check_grads(_weighted(r.fn, w), args, argnums=floats, order=2, ref=_weighted(r.ref, w))


# ---------------------------------------------------------------- lowering

# the batched kernels' variant for the provider of float64 products (MKL where installed)
_F64_GEMM = blas.choose(blas.GemmShape(8, 8, 8, False, False, np.dtype(np.float64),
                                       np.dtype(np.float64))).name
BATCHED, BATCHED_ACC = f"jg_gemm_batched_{_F64_GEMM}_f64", f"jg_gemm_batched_acc_{_F64_GEMM}_f64"


def _kernel_calls(cf, *args) -> list[str]:
    return [ln.split("(")[0].strip() for ln in cf.lower(*args).source.splitlines()
            if ln.startswith("    jg_") or ln.startswith("    if jg_")]


@pytest.fixture(scope="module")
def batch_operands():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 5, 2))


def test_batched_einsum_is_one_gemm_step(batch_operands):
    cf = jg.jit(lambda a, b: np.einsum("bij,bjk->bik", a, b))
    assert _kernel_calls(cf, *batch_operands) == [BATCHED]
    np.testing.assert_allclose(cf(*batch_operands), np.einsum("bij,bjk->bik", *batch_operands),
                               rtol=1e-12)


def test_batched_gradients_are_gemm_steps_without_copies(batch_operands):
    # d/da = G·bᵀ and d/db = aᵀ·G: transposes are GEMM's flags, batches its strides
    cf = jg.jit(jg.grad(lambda a, b: jg.sum(jg.tanh(a @ b)), argnums=(0, 1)))
    calls = _kernel_calls(cf, *batch_operands)
    assert calls.count(BATCHED) == 3, calls
    assert not [c for c in calls if c.startswith("jg_copy")], calls


def test_a_matrix_broadcast_along_a_batch_is_never_copied_nor_its_gradient_materialised():
    w, h = np.ones((3, 4)), np.ones((2, 4, 5))
    forward = jg.jit(lambda w, h: np.einsum("ij,bjk->bik", w, h))
    assert _kernel_calls(forward, w, h) == [BATCHED]
    cf = jg.jit(jg.grad(lambda w, h: jg.sum(jg.tanh(w @ h)), argnums=(0, 1)))
    calls = _kernel_calls(cf, w, h)
    assert calls.count(BATCHED) == 3 and not [
        c for c in calls if c.startswith(("jg_copy", "jg_sum"))], calls
    assert "matmul_sum" in {i.prim.name for i in cf.program.instrs}  # dW: Σ_b G_b h_bᵀ


def test_batch_of_rows_times_a_matrix_is_one_2d_gemm():
    a, w = np.ones((4, 3, 5)), np.ones((5, 2))
    one_gemm = [blas.choose(blas.GemmShape(12, 2, 5, False, False, a.dtype, a.dtype))
                .plain.symbol(a.dtype)]
    assert _kernel_calls(jg.jit(lambda a, w: np.einsum("bij,jk->bik", a, w)), a, w) == one_gemm
    assert _kernel_calls(jg.jit(lambda a, w: a @ w), a, w) == one_gemm


@pytest.mark.parametrize("k, copied", [(2, "result"), (20, "a")])
def test_a_layout_gemm_cannot_take_costs_one_copy_of_the_smaller(k, copied):
    # "ibj": b is not a's leading dimension. Either a is transposed, or i becomes a batch
    # dimension b broadcasts along and the (i, b, k) result is transposed: the smaller copy.
    a, b = np.ones((3, 4, 5)), np.ones((4, 5, k))
    calls = _kernel_calls(jg.jit(lambda a, b: np.einsum("ibj,bjk->bik", a, b)), a, b)
    assert calls == ([BATCHED, "jg_copy_b8"] if copied == "result"
                     else ["jg_copy_b8", BATCHED]), calls


def test_a_sum_into_a_batched_product_accumulates_in_gemm(batch_operands):
    a, b = batch_operands
    c = np.ones((4, 3, 2))
    cf = jg.jit(lambda a, b, c: c + a @ b)
    assert _kernel_calls(cf, a, b, c) == [BATCHED_ACC]
    np.testing.assert_allclose(cf(a, b, c), c + a @ b, rtol=1e-12)


def test_batched_matmul_float32_and_empty_batches():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(1, 4, 2)).astype(
        np.float32)
    got = jg.jit(lambda a, b: a @ b)(a, b)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, a @ b, rtol=1e-5)
    for sa, sb in [((0, 3, 4), (0, 4, 2)), ((2, 3, 0), (2, 0, 2))]:
        z = jg.jit(lambda a, b: a @ b)(np.ones(sa), np.ones(sb))
        np.testing.assert_array_equal(z, np.ones(sa) @ np.ones(sb))


def test_diagonal_is_a_strided_copy():
    x = np.arange(12.0).reshape(3, 4)
    assert _kernel_calls(jg.jit(np.diagonal), x) == ["jg_copy_b8"]


# ---------------------------------------------------------------- updates and errors

def test_the_at_method_of_traced_values_is_jg_at(backend):
    x, v = np.arange(12.0).reshape(4, 3), np.ones((2, 3))
    cf = jg.jit(lambda x, v: (x.at[[3, 1]].set(v), x.at[[3, 1]].add(v), x.at[0, 1:].get()))
    want = (_np_set(x, [3, 1], v), _np_add(x, [3, 1], v), x[0, 1:])
    for got, w in zip(cf(x, v), want, strict=True):
        np.testing.assert_array_equal(got, w)


def test_at_on_a_numpy_array_leaves_it_unchanged():
    x = np.zeros((3, 2))
    y = jg.at(x)[[2, 0]].add(np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(y, [[3.0, 4.0], [0.0, 0.0], [1.0, 2.0]])
    np.testing.assert_array_equal(x, 0.0)
    np.testing.assert_array_equal(jg.at(x)[1, 1].get(), 0.0)


def test_assignment_to_a_traced_value_names_the_functional_form():
    def f(x):
        x[0] = 1.0
        return x

    with pytest.raises(jg.TracingError, match=r"x\.at\[key\]\.set\(v\)") as info:
        jg.jit(f)(np.zeros(3))
    assert "test_linalg.py" in str(info.value)


@pytest.mark.parametrize("fn, args, match", [
    (lambda a: np.einsum("ij,jk", a), (np.ones((2, 2)),), "2 operand subscripts for 1"),
    (lambda a, b: np.einsum("ij,jk->ik", a, b), (np.ones((2, 3)), np.ones((2, 2))),
     "size 3 in one operand and 2"),
    (lambda a: np.einsum("ij->k", a), (np.ones((2, 2)),), "'k' does not appear"),
    (lambda a: np.einsum("i1", a), (np.ones((2, 2)),), "invalid subscript '1'"),
    (lambda a: np.einsum("...i->i", a), (np.ones((2, 2)),), "ellipsis '...' in the output"),
    (lambda a: np.einsum("iii->i", a), (np.ones((2, 2)),), "do not match an operand of 2"),
    (lambda a, b: np.tensordot(a, b, ([0], [0])), (np.ones((2, 3)), np.ones((3, 2))),
     "shape-mismatch"),
    (lambda a, b: a @ b, (np.ones((2, 3, 4)), np.ones((2, 5, 2))), "not aligned"),
    (lambda x: x[[0, 3]], (np.ones((3, 2)),), "index 3 is out of bounds for axis 0 with size 3"),
    (lambda x: x[:, [0, -4]], (np.ones((3, 2)),), "index -4 is out of bounds for axis 1"),
    (lambda x: x[x > 0], (np.ones((3, 2)),), "traced boolean mask"),
    (lambda x: x[np.ones(2, bool)], (np.ones((3, 2)),), "boolean index of shape"),
    (lambda x: np.trace(x), (np.ones(3),), "2 or more dimensions"),
])
def test_errors_name_the_problem_and_the_line(fn, args, match):
    with pytest.raises(jg.JitgradError, match=match) as info:
        jg.jit(fn, backend="interpret")(*args)
    assert "test_linalg.py" in str(info.value)


def test_traced_index_out_of_range_is_rejected_when_run(backend):
    cf = jg.jit(lambda x, i, j: x[i, j])
    with pytest.raises(jg.JitgradError, match="out of bounds"):
        cf(np.ones((3, 4)), np.array([0, 3]), np.array([1, 4]))
