"""Contractions in numpy's spellings: einsum, tensordot, dot, inner, outer, kron.

All of them are built from primitives that exist already: matmul (a batched GEMM),
sum, diagonal, transpose, reshape and the broadcasting product, so their gradients
(to any order) come from those primitives' VJPs.

A contraction of two operands sorts its indices into batch (in both operands and
kept), contracted (in both, not kept) and free (in one operand), and views each
operand as a stack of matrices: batch dimensions leading, then the free and the
contracted dimensions grouped, in either order (GEMM's transpose flag says which).
Reshapes are free (the same memory); an operand whose dimensions fit neither order
is transposed, one copy. `np.einsum("bij,bjk->bik", a, b)` is one batched GEMM call,
`"bij,jk->bik"` one 2-d GEMM over all b·i rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ...errors import JitgradError
from ..core import Tracer
from . import diagonal as D
from . import elementwise as E
from . import linalg as L
from . import reduce as R
from . import shape as S

Label = Hashable  # einsum's letters; ints for the dimensions an ellipsis stands for


def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def _size(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# ---------------------------------------------------------------- einsum's subscripts

def _split_ellipsis(term: str, ndim: int, subscripts: str) -> tuple[str, str, int]:
    if term.count("...") > 1 or "." in term.replace("...", ""):
        raise JitgradError(f"einsum {subscripts!r}: an operand's subscripts may contain one "
                           f"ellipsis '...', got {term!r}")
    pre, _, post = term.partition("...")
    bad = [c for c in pre + post if not c.isalpha()]
    if bad:
        raise JitgradError(f"einsum {subscripts!r}: invalid subscript {bad[0]!r} (letters "
                           "and '...' only)")
    n_ell = ndim - len(pre) - len(post)
    if n_ell < 0 or ("..." not in term and n_ell):
        raise JitgradError(f"einsum {subscripts!r}: subscripts {term!r} do not match an "
                           f"operand of {ndim} dimensions")
    return pre, post, n_ell


def parse_subscripts(subscripts: str, ndims: Sequence[int]
                     ) -> tuple[list[list[Label]], list[Label]]:
    """Each operand's labels and the result's, numpy's rules: an ellipsis stands for the
    same trailing-aligned dimensions everywhere; without '->' the result is the
    ellipsis then the letters used once, in alphabetical order."""
    spec = subscripts.replace(" ", "")
    inputs, arrow, output = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(ndims):
        raise JitgradError(f"einsum {subscripts!r}: {len(terms)} operand subscripts for "
                           f"{len(ndims)} operands")
    parts = [_split_ellipsis(t, n, subscripts) for t, n in zip(terms, ndims, strict=True)]
    width = max([e for _, _, e in parts], default=0)
    labels = [list(pre) + list(range(width - e, width)) + list(post) for pre, post, e in parts]
    if not arrow:
        counts = {c: inputs.count(c) for c in set(inputs) if c.isalpha()}
        return labels, list(range(width)) + sorted(c for c, n in counts.items() if n == 1)
    if width and "..." not in output:
        raise JitgradError(f"einsum {subscripts!r}: the operands' ellipsis dimensions need an "
                           "ellipsis '...' in the output")
    pre, post, _ = _split_ellipsis(output, len(output.replace("...", "")) + width, subscripts)
    out = list(pre) + list(range(width)) + list(post)
    used = {lab for ls in labels for lab in ls}
    for c in pre + post:
        if output.count(c) > 1:
            raise JitgradError(f"einsum {subscripts!r}: output subscript {c!r} is repeated")
        if c not in used:
            raise JitgradError(f"einsum {subscripts!r}: output subscript {c!r} does not "
                               "appear in the operands")
    return labels, out


# ---------------------------------------------------------------- contracting labelled operands

def _label_sizes(xs: Sequence[Any], labels: Sequence[Sequence[Label]]) -> dict[Label, int]:
    sizes: dict[Label, int] = {}
    for x, ls in zip(xs, labels, strict=True):
        for lab, d in zip(ls, x.shape, strict=True):
            old = sizes.setdefault(lab, d)
            if old != d and 1 not in (old, d):
                raise JitgradError(f"einsum: dimension {lab!r} has size {old} in one operand "
                                   f"and {d} in another (shapes {[x.shape for x in xs]})")
            sizes[lab] = max(old, d)
    return sizes


def _squeeze_broadcast(x: Any, ls: list[Label], sizes: dict[Label, int]):
    """x without the size-1 dimensions that broadcast against a larger size elsewhere."""
    keep = [i for i, lab in enumerate(ls) if not (x.shape[i] == 1 and sizes[lab] > 1)]
    if len(keep) == len(ls):
        return x, ls
    return S.reshape(x, tuple(x.shape[i] for i in keep)), [ls[i] for i in keep]


def _take_diagonals(x: Any, ls: list[Label]):
    """x with each repeated label reduced to its diagonal (the label last)."""
    while len(set(ls)) < len(ls):
        lab = next(lab for lab in ls if ls.count(lab) > 1)
        i = ls.index(lab)
        j = ls.index(lab, i + 1)
        if x.shape[i] != x.shape[j]:
            raise JitgradError(f"einsum: repeated subscript {lab!r} on dimensions of sizes "
                               f"{x.shape[i]} and {x.shape[j]}")
        x = D.diagonal(x, 0, i, j)
        ls = [m for k, m in enumerate(ls) if k not in (i, j)] + [lab]
    return x, ls


def _sum_out(x: Any, ls: list[Label], keep: set[Label]):
    """x summed over the labels not in keep."""
    axes = tuple(i for i, lab in enumerate(ls) if lab not in keep)
    if not axes:
        return x, ls
    return R.sum(x, axis=axes), [lab for lab in ls if lab in keep]


def _permuted(x: Any, ls: list[Label], order: list[Label]) -> Any:
    return S.transpose(x, tuple(ls.index(lab) for lab in order)) if ls != order else x


def _as_matrices(x: Any, ls: list[Label], batch: list[Label], batch_shape: tuple[int, ...],
                 free: list[Label], contracted: list[Label], sizes: dict[Label, int]
                 ) -> tuple[Any, bool]:
    """x viewed as (batch_shape..., free, contracted), or transposed (flag True) as
    (batch_shape..., contracted, free) when that is the order its dimensions are in already;
    batch_shape holds x's batch labels, and 1s where it broadcasts against the other."""
    m, k = _size([sizes[lab] for lab in free]), _size([sizes[lab] for lab in contracted])
    if ls == batch + contracted + free and free and ls != batch + free + contracted:
        return S.reshape(x, batch_shape + (k, m)), True
    return S.reshape(_permuted(x, ls, batch + free + contracted), batch_shape + (m, k)), False


def _copies(ls: list[Label], batch: list[Label], free: list[Label], contracted: list[Label]
            ) -> bool:
    return ls not in (batch + free + contracted, batch + contracted + free)


def _leading_free(ls: list[Label], other: list[Label]) -> list[list[Label]]:
    """The prefixes of ls's leading labels that other does not have (the empty one first)."""
    n = next((i for i, lab in enumerate(ls) if lab in other), len(ls))
    return [ls[:i] for i in range(n + 1)]


def _contract_pair(x: Any, lx: list[Label], y: Any, ly: list[Label], keep: set[Label],
                   sizes: dict[Label, int], target: list[Label] | None):
    """x·y summed over the labels they share that are not kept; the result's labels."""
    x, lx = _sum_out(x, lx, keep | set(ly))
    y, ly = _sum_out(y, ly, keep | set(lx))
    fx = [lab for lab in lx if lab not in ly]
    fy = [lab for lab in ly if lab not in lx]
    shared = [[lab for lab in ls if lab in lx and lab in ly] for ls in (lx, ly)]
    batched_dots = not fx and not fy and any(lab in keep for lab in shared[0])
    if not any(lab not in keep for lab in shared[0]) or batched_dots or x.dtype.kind != "f":
        # nothing contracted, or a batch of dot products (1x1 GEMMs): a product and a sum
        return _broadcast_product(x, lx, y, ly, keep, sizes)
    # Batch and contracted orders from either operand, and an operand's leading free labels
    # either free (rows of its matrix) or batch dimensions the other is broadcast along
    # (GEMM's batch stride 0): the choice copying the fewest elements, result included.
    out_size = _size([sizes[lab] for lab in fx + fy + shared[0] if lab in keep])
    best = None
    for bo, co, ex, ey in itertools.product(shared, shared, _leading_free(lx, ly),
                                            _leading_free(ly, lx)):
        batch = [lab for lab in bo if lab in keep]
        contracted = [lab for lab in co if lab not in keep]
        rx, ry = [lab for lab in fx if lab not in ex], [lab for lab in fy if lab not in ey]
        labels = ex + ey + batch + rx + ry
        swapped = ex + ey + batch + ry + rx
        cost = (_copies(lx, ex + batch, rx, contracted) * x.size
                + _copies(ly, ey + batch, ry, contracted) * y.size
                + (target is not None and target not in (labels, swapped)) * out_size)
        if best is None or cost < best[0]:
            best = (cost, batch, contracted, ex, ey, rx, ry)
    _, batch, contracted, ex, ey, rx, ry = best
    shared_shape = tuple(sizes[lab] for lab in batch)
    ex_shape, ey_shape = tuple(sizes[lab] for lab in ex), tuple(sizes[lab] for lab in ey)
    a, ta = _as_matrices(x, lx, ex + batch, ex_shape + (1,) * len(ey) + shared_shape, rx,
                         contracted, sizes)
    b, tb = _as_matrices(y, ly, ey + batch, ey_shape + shared_shape, ry, contracted, sizes)
    tb = not tb  # b is (batch, free, contracted) when not transposed: op(b) is its transpose
    lead = ex + ey + batch
    swap = target is not None and target == lead + ry + rx != lead + rx + ry
    # C^T = op(B)^T op(A)^T: the product in the order the result wants, without a copy
    out = (L.matmul_p.bind(b, a, ta=not tb, tb=not ta) if swap
           else L.matmul_p.bind(a, b, ta=ta, tb=tb))
    labels = lead + (ry + rx if swap else rx + ry)
    return S.reshape(out, tuple(sizes[lab] for lab in labels)), labels


def _merged(lx: list[Label], ly: list[Label]) -> list[Label]:
    """A label order in which both operands' labels keep their own order, so that each is
    aligned by a reshape (no copy); if their shared labels come in different orders, x's
    order followed by y's other labels."""
    order: list[Label] = []
    i = j = 0
    while i < len(lx) or j < len(ly):
        if i < len(lx) and lx[i] not in ly:
            order.append(lx[i])
            i += 1
        elif j < len(ly) and ly[j] not in lx:
            order.append(ly[j])
            j += 1
        elif lx[i] == ly[j]:
            order.append(lx[i])
            i, j = i + 1, j + 1
        else:
            return lx + [lab for lab in ly if lab not in lx]
    return order


def _broadcast_product(x: Any, lx: list[Label], y: Any, ly: list[Label], keep: set[Label],
                       sizes: dict[Label, int]):
    """x·y as a broadcasting product, summed over the shared labels not kept."""
    order = _merged(lx, ly)

    def aligned(v: Any, ls: list[Label]) -> Any:
        v = _permuted(v, ls, [lab for lab in order if lab in ls])
        return S.reshape(v, tuple(sizes[lab] if lab in ls else 1 for lab in order))

    out, labels = E.mul(aligned(x, lx), aligned(y, ly)), order
    return _sum_out(out, labels, keep)


def _pick_pair(labels: list[list[Label]], out: list[Label], sizes: dict[Label, int]
               ) -> tuple[int, int]:
    """The pair of operands whose contraction is smallest (greedy, as np.einsum_path)."""
    def result_size(i: int, j: int) -> int:
        others = {lab for k, ls in enumerate(labels) if k not in (i, j) for lab in ls}
        kept = (set(labels[i]) | set(labels[j])) & (others | set(out))
        return _size([sizes[lab] for lab in kept])
    return min(itertools.combinations(range(len(labels)), 2), key=lambda p: result_size(*p))


def contract(xs: Sequence[Any], labels: Sequence[Sequence[Label]], out: Sequence[Label]) -> Any:
    """The einsum of labelled operands: diagonals of repeated labels, sums of labels used
    once, and pairwise products (GEMM where something is contracted)."""
    xs = E.promote(*xs)
    out = list(out)
    sizes = _label_sizes(xs, labels)
    ops = []
    for x, ls in zip(xs, labels, strict=True):
        x, ls = _squeeze_broadcast(x, list(ls), sizes)
        ops.append(_take_diagonals(x, ls))
    while len(ops) > 1:
        i, j = _pick_pair([ls for _, ls in ops], out, sizes)
        (x, lx), (y, ly) = ops[i], ops[j]
        rest = [op for k, op in enumerate(ops) if k not in (i, j)]
        keep = set(out) | {lab for _, ls in rest for lab in ls}
        ops = rest + [_contract_pair(x, lx, y, ly, keep, sizes, None if rest else out)]
    # every result label is still there: a label is squeezed only where another operand
    # has it with a larger size, and contractions keep the result's labels
    x, ls = _sum_out(*ops[0], set(out))
    return _permuted(x, ls, out)


# ---------------------------------------------------------------- numpy's functions

def einsum(subscripts: str, *operands: Any, optimize: Any = False, dtype: Any = None,
           out: Any = None, order: str = "K", casting: str = "safe") -> Any:
    """np.einsum with a subscripts string: explicit ('->') and implicit results, repeated
    subscripts (traces and diagonals), ellipses. `optimize` is accepted and ignored: the
    pairwise order is always chosen greedily."""
    if not isinstance(subscripts, str):
        raise JitgradError("einsum's interleaved (operand, sublist) form is not supported; "
                           "pass a subscripts string")
    if dtype is not None or out is not None or order != "K" or casting != "safe":
        raise JitgradError("einsum: dtype, out, order and casting are not supported on "
                           "traced values")
    if not operands:
        raise JitgradError("einsum needs at least one operand")
    xs = [_as_array(x) for x in operands]
    labels, result = parse_subscripts(subscripts, [x.ndim for x in xs])
    return contract(xs, labels, result)


def _axes_list(axes: Any, ndim: int, what: str) -> list[int]:
    axes = [axes] if isinstance(axes, (int, np.integer)) else list(axes)
    for a in axes:
        if not -ndim <= a < ndim:
            raise JitgradError(f"tensordot: axis {a} is out of range for {what} of "
                               f"{ndim} dimensions")
    return [int(a) % ndim for a in axes]


def tensordot(a: Any, b: Any, axes: Any = 2) -> Any:
    """np.tensordot: a's axes[0] contracted with b's axes[1] (an int n: a's last n with
    b's first n); the result has a's other dimensions, then b's."""
    a, b = _as_array(a), _as_array(b)
    if isinstance(axes, (int, np.integer)):
        if not 0 <= axes <= min(a.ndim, b.ndim):
            raise JitgradError(f"tensordot: axes={axes} for shapes {a.shape} and {b.shape}")
        ax_a, ax_b = list(range(a.ndim - axes, a.ndim)), list(range(axes))
    else:
        if len(axes) != 2:
            raise JitgradError(f"tensordot: axes must be an int or a pair, got {axes!r}")
        ax_a, ax_b = _axes_list(axes[0], a.ndim, "a"), _axes_list(axes[1], b.ndim, "b")
    if len(ax_a) != len(ax_b) or any(a.shape[i] != b.shape[j] for i, j in zip(ax_a, ax_b)):
        raise JitgradError(f"tensordot: shape-mismatch for sum: axes {ax_a} of {a.shape} "
                           f"and {ax_b} of {b.shape}")
    la: list[Label] = list(range(a.ndim))
    lb: list[Label] = [a.ndim + j for j in range(b.ndim)]
    for i, j in zip(ax_a, ax_b, strict=True):
        lb[j] = la[i]
    out = [lab for i, lab in enumerate(la) if i not in ax_a] + [
        lab for j, lab in enumerate(lb) if j not in ax_b]
    return contract([a, b], [la, lb], out)


def dot(a: Any, b: Any) -> Any:
    """np.dot: a product for 0-d operands, matmul for 1-d and 2-d ones, else the sum over
    a's last axis and b's second-to-last (its last, if b is 1-d)."""
    a, b = E.promote(_as_array(a), _as_array(b))
    if a.ndim == 0 or b.ndim == 0:
        return E.mul(a, b)
    if a.ndim <= 2 and b.ndim <= 2:
        return L.matmul(a, b)
    return tensordot(a, b, ([-1], [-2 if b.ndim >= 2 else -1]))


def inner(a: Any, b: Any) -> Any:
    """np.inner: the sum over the last axes of both (a product for 0-d operands)."""
    a, b = E.promote(_as_array(a), _as_array(b))
    if a.ndim == 0 or b.ndim == 0:
        return E.mul(a, b)
    return tensordot(a, b, ([-1], [-1]))


def outer(a: Any, b: Any) -> Any:
    """np.outer: every element of a (flattened) times every element of b."""
    a, b = _as_array(a), _as_array(b)
    return E.mul(S.reshape(a, (-1, 1)), S.reshape(b, (1, -1)))


def kron(a: Any, b: Any) -> Any:
    """np.kron: the blocks a[i, j, ...] * b, as one broadcasting product."""
    a, b = _as_array(a), _as_array(b)
    nd = max(a.ndim, b.ndim)
    sa, sb = (1,) * (nd - a.ndim) + a.shape, (1,) * (nd - b.ndim) + b.shape
    # a's dimensions interleaved with b's: (a0, 1, a1, 1, ...) * (1, b0, 1, b1, ...)
    pa = tuple(d for n in sa for d in (n, 1))
    pb = tuple(d for n in sb for d in (1, n))
    return S.reshape(E.mul(S.reshape(a, pa), S.reshape(b, pb)),
                     tuple(m * n for m, n in zip(sa, sb, strict=True)))
