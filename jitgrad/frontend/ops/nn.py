"""Neural-network primitives: fused softmax cross-entropy and its gradient; softmax."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...errors import JitgradError
from ..core import Joint, Tracer, primitive
from . import elementwise as E
from . import reduce as R


def check_labels(y: np.ndarray, n_classes: int | None = None, *, what: str = "label",
                 out_of_range: str | None = None) -> None:
    """Raise ``JitgradError`` (a ``ValueError``) unless every label is an integer in
    ``[0, n_classes)`` (``n_classes`` None: a non-negative integer).

    The one label check of jitgrad: the loss's reference, datasets, label files, the
    training recipe. The message names the first offending value and its index, because an
    out-of-range label otherwise surfaces much later as an opaque indexing error inside
    a compiled loss kernel: "{what} 7 at index 2 is {out_of_range}", ``out_of_range``
    by default "outside [0, n_classes)", and "negative" without ``n_classes``.
    """
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise JitgradError(f"labels must have an integer dtype, got {y.dtype}")
    bad = np.flatnonzero(y < 0 if n_classes is None else (y < 0) | (y >= n_classes))
    if bad.size:
        i = int(bad[0])
        why = ("negative" if n_classes is None
               else out_of_range or f"outside [0, {n_classes})")
        raise JitgradError(f"{what} {y.flat[i]} at index {i} is {why} "
                           f"({bad.size} out-of-range label(s) in total)")


def _check_labels(labels: np.ndarray, n_classes: int) -> None:
    check_labels(labels, n_classes, out_of_range=f"out of range for {n_classes} classes")


def _softmax_ref(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sce_shape(logits, labels):
    if len(logits[0]) != 2 or logits[1].kind != "f":
        raise JitgradError(f"logits must be a 2-d float array, got {logits[0]} {logits[1]}")
    if labels[1].kind not in "iu":
        raise JitgradError(f"labels must be integers, got {labels[1]}")
    if labels[0] != logits[0][:1]:
        raise JitgradError(f"labels of shape {labels[0]} do not match logits of shape "
                           f"{logits[0]} (one label per row)")


softmax_cross_entropy_p = primitive("softmax_cross_entropy", "nn", index_inputs=(1,))


@softmax_cross_entropy_p.def_impl
def _sce_impl(logits, labels):
    _check_labels(labels, logits.shape[1])
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    picked = logits[np.arange(len(labels)), labels]
    return np.mean(lse - picked) if len(labels) else np.zeros((), logits.dtype)


@softmax_cross_entropy_p.def_shape
def _sce_fwd_shape(logits, labels):
    _sce_shape(logits, labels)
    return (), logits[1]


@softmax_cross_entropy_p.def_vjp
def _sce_vjp(cts, outs, ins):
    return [softmax_cross_entropy_grad_p.bind(ins[0], ins[1]) * cts[0], None]


softmax_cross_entropy_grad_p = primitive("softmax_cross_entropy_grad", "nn",
                                         index_inputs=(1,))


@softmax_cross_entropy_grad_p.def_impl
def _sce_grad_impl(logits, labels):
    _check_labels(labels, logits.shape[1])
    p = _softmax_ref(logits)
    p[np.arange(len(labels)), labels] -= 1
    return p / max(len(labels), 1)


@softmax_cross_entropy_grad_p.def_shape
def _sce_grad_shape(logits, labels):
    _sce_shape(logits, labels)
    return logits


@softmax_cross_entropy_grad_p.def_vjp
def _sce_grad_vjp(cts, outs, ins):
    # d/dlogits of (softmax - onehot)/B applied to H: p * (H - sum(H * p)) / B.
    logits, h = ins[0], cts[0]
    p = softmax(logits, axis=-1)
    inner = R.sum(h * p, axis=-1, keepdims=True)
    return [p * (h - inner) * (1.0 / max(logits.shape[0], 1)), None]


def softmax_cross_entropy(logits: Any, labels: Any) -> Any:
    """Mean over the batch of -log softmax(logits)[label]; labels are integer class ids."""
    if not isinstance(logits, Tracer):
        logits = np.asarray(logits)
    if not isinstance(labels, Tracer):
        labels = np.asarray(labels)
    return softmax_cross_entropy_p.bind(logits, labels)


def softmax(x: Any, axis: int = -1) -> Any:
    x = E.asdtype(x, E._float_dtype(x))
    return E.exp(x - R.logsumexp(x, axis=axis, keepdims=True))


# ---------------------------------------------------------------- compiling

@njit(cache=True)
def softmax_xent(z, labels, loss, dz, want_loss, want_grad):
    """Loss (mean over rows) and/or its gradient (softmax - onehot) / rows, fused."""
    rows, cols = z.shape
    for r in range(rows):
        if labels[r] < 0 or labels[r] >= cols:
            return r + 1
    total = 0.0
    inv_rows = 1.0 / max(rows, 1)
    for r in range(rows):
        m = z[r, 0]
        for j in range(1, cols):
            if z[r, j] > m:
                m = z[r, j]
        s = 0.0
        for j in range(cols):
            e = np.exp(z[r, j] - m)
            if want_grad:
                dz[r, j] = e
            s += e
        if want_grad:
            scale = inv_rows / s
            for j in range(cols):
                dz[r, j] *= scale
            dz[r, labels[r]] -= inv_rows
        total += np.log(s) + m - z[r, labels[r]]
    if want_loss:
        loss[0] = total * inv_rows
    return 0


SCE = Kernel("sce", "pz pl ploss pdz rows cols want_loss want_grad", (
    "return K.softmax_xent(carray(_vp(pz), (rows, cols), {dt}), "
    "carray(_vp(pl), rows, np.int64), carray(_vp(ploss), 1, {dt}), "
    "carray(_vp(pdz), (rows, cols), {dt}), want_loss, want_grad)"), FLOATS, can_fail=True)


def _lower_sce(low, instrs) -> None:
    """The loss and/or its gradient on the same logits and labels: one pass."""
    loss_ins = instrs.get(softmax_cross_entropy_p)
    grad_ins = instrs.get(softmax_cross_entropy_grad_p)
    z, labels = (loss_ins or grad_ins).inputs
    loss = loss_ins.outputs[0] if loss_ins else None
    dz = grad_ins.outputs[0] if grad_ins else None
    low.call(SCE, z.dtype, [z, labels, loss if loss is not None else 0,
                            dz if dz is not None else 0, z.shape[0], z.shape[1],
                            int(loss is not None), int(dz is not None)],
             [v for v in (loss, dz) if v is not None], [z, labels], tuple(instrs.values()))


Joint([softmax_cross_entropy_p, softmax_cross_entropy_grad_p], _lower_sce)
