"""numpy's indexing on traced values, and the functional update that stands for `a[i] = v`.

Basic indexing (ints, slices, None, ...) is the slice primitive (shape.getitem).
Advanced indexing — integer arrays, concrete boolean masks, mixed with ints and
slices — becomes the flat positions of the selected rows of x, computed at trace
time when the indices are concrete and with integer arithmetic when they are traced,
and one gather; numpy's rules for where the indexed dimensions go are applied to the
positions, so the gather's result already has numpy's shape. Trailing dimensions the
index leaves whole are rows that move together.

`x.at[key].set(v)` / `.add(v)` (`jg.at(x)[key]` for any array, as JAX's `x.at`) are a
scatter-add into those positions: `add` is x plus it, `set` selects it where an
element is hit. Where a position is repeated, `add` accumulates and `set` keeps the
last value, as numpy's `a[i] = v` does; gradients reach both x and v.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import JitgradError, TracingError
from ..core import Tracer
from . import elementwise as E
from . import reduce as R
from . import shape as S


def _as_array(x: Any) -> Any:
    return x if isinstance(x, Tracer) else np.asarray(x)


def _is_array_index(k: Any) -> bool:
    return isinstance(k, (Tracer, np.ndarray, list))


def _expand_key(shape: tuple[int, ...], key: Any) -> tuple[tuple[int, ...], list[Any]]:
    """(shape with a 1 where each None is, one entry per dimension of it): concrete boolean
    masks become their nonzero integer arrays, Ellipsis and missing entries full slices."""
    key = key if isinstance(key, tuple) else (key,)
    entries: list[Any] = []
    for k in key:
        if isinstance(k, list):
            k = np.asarray(k)
            if k.dtype == object:
                raise JitgradError("ragged lists cannot be used as indices")
        if isinstance(k, (bool, np.bool_)) or (_is_array_index(k) and k.dtype == bool):
            if isinstance(k, Tracer):
                raise JitgradError("a traced boolean mask has a data-dependent shape; "
                                   "use jg.where(mask, x, 0) instead")
            dim = sum(1 for e in entries if e is not None)
            covered = shape[dim:dim + np.ndim(k)]
            if not any(e is Ellipsis for e in key) and np.shape(k) != covered:
                raise JitgradError(f"a boolean index of shape {np.shape(k)} does not match "
                                   f"the dimensions {covered} of {shape} it indexes")
            entries.extend(np.nonzero(k))
        elif _is_array_index(k) and k.dtype.kind not in "iu":
            raise JitgradError(f"array indices must be integers or booleans, got {k.dtype}")
        else:
            entries.append(k)
    real = sum(1 for k in entries if k is not None and k is not Ellipsis)
    if real > len(shape):
        raise JitgradError(f"too many indices ({real}) for an array of shape {shape}")
    ellipses = [i for i, k in enumerate(entries) if k is Ellipsis]
    if len(ellipses) > 1:
        raise JitgradError("an index can only have a single ellipsis ('...')")
    if ellipses:
        entries[ellipses[0]:ellipses[0] + 1] = [slice(None)] * (len(shape) - real)
    entries += [slice(None)] * (len(shape) - sum(1 for k in entries if k is not None))
    new_shape, dims, dim = [], [], 0
    for k in entries:
        if k is None:
            new_shape.append(1)
            dims.append(slice(None))
        else:
            new_shape.append(shape[dim])
            dims.append(k)
            dim += 1
    return tuple(new_shape), dims


@dataclass
class Selection:
    """Rows of x (its leading dimensions flattened) picked by an index."""

    lead: tuple[int, ...]        # x's dimensions the index selects over
    rows: tuple[int, ...]        # x's trailing dimensions taken whole
    positions: Any               # int positions into prod(lead) rows: numpy, or traced

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of x[key]."""
        return tuple(self.positions.shape) + self.rows


def _wrapped(idx: Any, n: int, axis: int) -> tuple[Any, Any]:
    """(idx with negative entries counted from the end, a traced "all in range" or None)."""
    if not isinstance(idx, Tracer):
        idx = np.asarray(idx, dtype=np.int64)
        bad = (idx < -n) | (idx >= n)
        if bad.any():
            raise JitgradError(f"index {idx[bad].flat[0]} is out of bounds for axis {axis} "
                               f"with size {n}")
        return np.where(idx < 0, idx + n, idx), None
    idx = E.cast(idx, np.int64)
    ok = R.sum(E.cast(E.where(idx < -n, True, idx >= n), np.int64)) == 0
    return E.where(idx < 0, idx + n, idx), ok


def _is_whole(k: Any) -> bool:
    return isinstance(k, slice) and k == slice(None)


def select(shape: tuple[int, ...], dims: list[Any]) -> Selection:
    """The selection an expanded key makes (numpy's rules: ints beside an integer array
    are advanced indices; the indexed dimensions replace the first indexed one when all
    are adjacent, else they lead)."""
    adv = [d for d, k in enumerate(dims) if not isinstance(k, slice)]
    last = max(adv, default=-1)
    n_lead = len(dims)
    while n_lead > last + 1 and _is_whole(dims[n_lead - 1]):
        n_lead -= 1  # a trailing whole dimension: part of every row
    lead, rows = shape[:n_lead], shape[n_lead:]
    strides = S.strides(lead)
    bshape = E.broadcast_shapes(*(np.shape(dims[d]) if not isinstance(dims[d], Tracer)
                                  else dims[d].shape for d in adv))
    adjacent = adv == list(range(adv[0], adv[-1] + 1)) if adv else True
    # output axes: one per sliced lead dimension, the broadcast index shape as one group
    before = [d for d in range(n_lead) if d not in adv and (adjacent and adv and d < adv[0])]
    after = [d for d in range(n_lead) if d not in adv and d not in before]
    n_out = len(before) + len(bshape) + len(after)
    group_at = len(before)

    def on_axis(values: np.ndarray, axis: int) -> np.ndarray:
        return values.reshape([len(values) if a == axis else 1 for a in range(n_out)])

    const = np.zeros((1,) * n_out, np.int64)
    for axis, d in enumerate(before + after):
        axis += len(bshape) if d in after else 0
        start, stop, step = dims[d].indices(lead[d])
        const = const + on_axis(np.arange(start, stop, step, dtype=np.int64) * strides[d], axis)
    traced, ok_all = None, None
    for d in adv:
        idx, ok = _wrapped(dims[d], lead[d], d)
        # its place in the output: the index group's axes, right-aligned within the group
        placed = ((1,) * (group_at + len(bshape) - idx.ndim) + tuple(idx.shape)
                  + (1,) * len(after))
        term = S.reshape(idx, placed) * strides[d]
        if isinstance(term, Tracer):
            traced = term if traced is None else traced + term
            ok_all = ok if ok_all is None else E.where(ok_all, ok, False)
        else:
            const = const + term
    out_shape = tuple(np.broadcast_shapes(const.shape, (1,) * n_out if traced is None
                                          else traced.shape))
    if traced is None:
        return Selection(lead, rows, np.broadcast_to(const, out_shape).copy())
    positions = traced + const if const.any() else traced  # broadcast below in any case
    # an index out of range: a position past the end, which the gather kernel rejects
    positions = E.where(ok_all, positions, int(np.prod(lead, dtype=np.int64)))
    return Selection(lead, rows, S.broadcast_to(positions, out_shape))


def _rows_of(x: Any, sel: Selection) -> Any:
    return S.reshape(x, (int(np.prod(sel.lead, dtype=np.int64)),) + sel.rows)


def getitem(x: Any, key: Any) -> Any:
    """x[key] with numpy's semantics, basic and advanced."""
    x = _as_array(x)
    parts = key if isinstance(key, tuple) else (key,)
    if not any(_is_array_index(k) or isinstance(k, (bool, np.bool_)) for k in parts):
        return S.getitem(x, key)
    if (_is_array_index(key) and not isinstance(key, list) and key.dtype.kind in "iu"
            and x.ndim >= 1):
        return S.gather_p.bind(x, key) if isinstance(key, Tracer) else _gather_concrete(x, key)
    shape, dims = _expand_key(x.shape, key)
    sel = select(shape, dims)
    return S.gather_p.bind(_rows_of(S.reshape(x, shape), sel), sel.positions)


def _gather_concrete(x: Any, idx: np.ndarray) -> Any:
    _wrapped(idx, x.shape[0], 0)  # checks the bounds at trace time
    return S.gather_p.bind(x, idx)


# ---------------------------------------------------------------- functional updates

def _last_occurrences(positions: Any, n_rows: int) -> tuple[Any, Any]:
    """(which entries of the flat positions are the last to name their row, which rows are
    named): `a[i] = v` keeps the last of repeated positions."""
    n = positions.shape[0]
    if not isinstance(positions, Tracer):
        keep = np.zeros(n, bool)
        _, first_from_end = np.unique(positions[::-1], return_index=True)
        keep[n - 1 - first_from_end] = True
        hit = np.zeros(n_rows, bool)
        hit[positions] = True
        return keep, hit
    later = np.triu(np.ones((n, n), bool), 1)  # [p, q]: q comes after p
    same = E.eq(S.reshape(positions, (n, 1)), S.reshape(positions, (1, n)))
    keep = R.sum(E.cast(E.where(later, same, False), np.int64), axis=1) == 0
    return keep, None


class IndexUpdate:
    """`x.at[key]`: the functional forms of `x[key] = v` and `x[key] += v`."""

    def __init__(self, x: Any, key: Any):
        self.x, self.key = _as_array(x), key

    def get(self) -> Any:
        return getitem(self.x, self.key)

    def _scatter(self, v: Any) -> tuple[Selection, Any, Any, Any]:
        x = self.x
        shape, dims = _expand_key(x.shape, self.key)
        sel = select(shape, dims)
        n = int(np.prod(sel.lead, dtype=np.int64))
        flat = S.reshape(sel.positions, (-1,)) if isinstance(sel.positions, Tracer) else \
            sel.positions.reshape(-1)
        updates = S.broadcast_to(E.asdtype(_as_array(v), x.dtype), sel.shape)
        return sel, n, flat, S.reshape(updates, (flat.shape[0],) + sel.rows)

    def add(self, v: Any) -> Any:
        """x with v added at key; repeated positions accumulate (np.add.at)."""
        sel, n, flat, updates = self._scatter(v)
        added = S.scatter_add_p.bind(updates, flat, n=n)
        return S.reshape(E.add(_rows_of(self.x, sel), added), self.x.shape)

    def set(self, v: Any) -> Any:
        """x with v written at key; of repeated positions the last one wins."""
        sel, n, flat, updates = self._scatter(v)
        keep, hit = _last_occurrences(flat, n)
        row_ones = (1,) * len(sel.rows)
        if isinstance(keep, Tracer) or not keep.all():
            updates = E.where(S.reshape(keep, keep.shape + row_ones), updates, 0)
        if hit is None:  # traced positions: the rows some kept entry writes
            hit = S.scatter_add_p.bind(E.cast(keep, self.x.dtype if self.x.dtype.kind == "f"
                                              else np.float64), flat, n=n) > 0
        written = S.scatter_add_p.bind(updates, flat, n=n)
        out = E.where(S.reshape(hit, (n,) + row_ones), written, _rows_of(self.x, sel))
        return S.reshape(out, self.x.shape)


class IndexUpdates:
    """`x.at`: indexing it (`x.at[key]`) gives the update of those elements."""

    def __init__(self, x: Any):
        self.x = x

    def __getitem__(self, key: Any) -> IndexUpdate:
        return IndexUpdate(self.x, key)


def at(x: Any) -> IndexUpdates:
    """`jg.at(x)[key].set(v)` / `.add(v)`: a functional `x[key] = v` on any array (JAX's
    `x.at`); a new array, x is unchanged."""
    return IndexUpdates(x)


def setitem(x: Tracer, key: Any, value: Any) -> None:
    raise TracingError(
        f"a traced {x.ir_var.type_str()} cannot be assigned to in place (x[...] = v): jitgrad "
        "traces a functional program. Write x = x.at[key].set(v) (or .add(v) for +=); "
        "jg.at(a)[key].set(v) does the same for any array.")
