"""2-d max and average pooling over NCHW inputs (torch.nn.functional.max_pool2d and
avg_pool2d, count_include_pad=True) and their gradients, each a primitive.

Max pooling is one pass with two results, the maxima and where they are (a flat index
into each H·W input plane, as torch's `return_indices`); its gradient scatters through
those positions, and the gradient of that scatter gathers at them. Average pooling's
gradient spreads each output's gradient over its window; the adjoint of that is average
pooling again. Compiled, every kernel is a parallel loop over the (image, channel) planes,
so no two threads write the same element.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import prange

from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...errors import JitgradError
from ..core import Tracer, primitive, with_user_loc
from ..ir import Var
from . import shape as S
from .conv import PARALLEL_MIN, out_size, pair, slots_for

# ---------------------------------------------------------------- geometry


def _pool_shape(x, kernel, stride, padding) -> tuple[int, ...]:
    if len(x[0]) != 4:
        raise JitgradError(f"input must be 4-d (N, C, H, W), got shape {x[0]}")
    if x[1] not in (np.float32, np.float64):
        raise JitgradError(f"input must be float32 or float64, got {x[1]}")
    n, c, h, w = x[0]
    oh = out_size(h, padding[0], padding[0], kernel[0], stride[0], 1)
    ow = out_size(w, padding[1], padding[1], kernel[1], stride[1], 1)
    if oh < 1 or ow < 1:
        raise JitgradError(f"the {kernel[0]}x{kernel[1]} window is larger than the padded "
                           f"input {h + 2 * padding[0]}x{w + 2 * padding[1]}")
    return n, c, oh, ow


def _windows(x: np.ndarray, kernel, stride, padding, fill: Any) -> np.ndarray:
    """(N, C, KH·KW, OH, OW): the padded input under every window."""
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    oh = out_size(x.shape[2], ph, ph, kernel[0], stride[0], 1)
    ow = out_size(x.shape[3], pw, pw, kernel[1], stride[1], 1)
    sn, sc, sh, sw = xp.strides
    win = np.lib.stride_tricks.as_strided(
        xp, x.shape[:2] + tuple(kernel) + (oh, ow),
        (sn, sc, sh, sw, sh * stride[0], sw * stride[1]), writeable=False)
    return win.reshape(x.shape[:2] + (kernel[0] * kernel[1], oh, ow))


# ---------------------------------------------------------------- primitives

max_pool2d_p = primitive("max_pool2d", "pool", n_outputs=2)
max_pool2d_grad_p = primitive("max_pool2d_grad", "pool", index_inputs=(1,))
avg_pool2d_p = primitive("avg_pool2d", "pool")
avg_pool2d_grad_p = primitive("avg_pool2d_grad", "pool")


@max_pool2d_p.def_shape
def _max_pool_shape(x, *, kernel, stride, padding):
    out = _pool_shape(x, kernel, stride, padding)
    return [(out, x[1]), (out, np.dtype(np.int64))]


@max_pool2d_p.def_impl
def _max_pool_impl(x, *, kernel, stride, padding):
    win = _windows(x, kernel, stride, padding, -np.inf)
    real = _windows(np.ones((1, 1) + x.shape[2:], bool), kernel, stride, padding, False)
    best = np.where(real, win, -np.inf).max(axis=2)
    # the first real position holding the maximum (or the first NaN): never the padding,
    # even where the maximum is -inf
    hit = real & ((win == best[:, :, None]) | (np.isnan(win) & np.isnan(best[:, :, None])))
    at = np.argmax(hit, axis=2)
    oh, ow = at.shape[2:]
    ih = (np.arange(oh) * stride[0] - padding[0])[:, None] + at // kernel[1]
    iw = (np.arange(ow) * stride[1] - padding[1])[None, :] + at % kernel[1]
    return best, (ih * x.shape[3] + iw).astype(np.int64)


@max_pool2d_p.def_vjp
def _max_pool_vjp(cts, outs, ins, *, kernel, stride, padding):
    return [max_pool2d_grad_p.bind(cts[0], outs[1], hw=ins[0].shape[2:])]


@max_pool2d_grad_p.def_shape
def _max_pool_grad_shape(g, idx, *, hw):
    if g[0] != idx[0] or len(g[0]) != 4 or idx[1].kind not in "iu":
        raise JitgradError(f"needs a 4-d gradient and integer positions of the same shape, "
                           f"got {g[0]} {g[1]} and {idx[0]} {idx[1]}")
    return g[0][:2] + tuple(hw), g[1]


@max_pool2d_grad_p.def_impl
def _max_pool_grad_impl(g, idx, *, hw):
    n, c = g.shape[:2]
    planes = hw[0] * hw[1]
    if idx.size and (idx.min() < 0 or idx.max() >= planes):
        raise JitgradError(f"max-pooling positions must lie in [0, {planes})")
    out = np.zeros((n * c, planes), g.dtype)
    rows = np.repeat(np.arange(n * c), idx[0, 0].size if idx.size else 0)
    np.add.at(out, (rows, idx.reshape(-1)), g.reshape(-1))
    return out.reshape(n, c, *hw)


@max_pool2d_grad_p.def_vjp
def _max_pool_grad_vjp(cts, outs, ins, *, hw):
    # the scatter's adjoint gathers at the same positions
    g, idx = ins
    n, c = g.shape[:2]
    flat = S.take_along_axis(S.reshape(cts[0], (n, c, hw[0] * hw[1])),
                             S.reshape(idx, (n, c, -1)), axis=2)
    return [S.reshape(flat, g.shape), None]


@avg_pool2d_p.def_shape
def _avg_pool_shape(x, *, kernel, stride, padding):
    return _pool_shape(x, kernel, stride, padding), x[1]


@avg_pool2d_p.def_impl
def _avg_pool_impl(x, *, kernel, stride, padding):
    return _windows(x, kernel, stride, padding, 0.0).sum(axis=2) / (kernel[0] * kernel[1])


@avg_pool2d_p.def_vjp
def _avg_pool_vjp(cts, outs, ins, *, kernel, stride, padding):
    return [avg_pool2d_grad_p.bind(cts[0], hw=ins[0].shape[2:], kernel=kernel, stride=stride,
                                   padding=padding)]


@avg_pool2d_grad_p.def_shape
def _avg_pool_grad_shape(g, *, hw, kernel, stride, padding):
    x = (g[0][:2] + tuple(hw), g[1])
    if _pool_shape(x, kernel, stride, padding) != g[0]:
        raise JitgradError(f"gradient {g[0]} does not match pooling a {hw} input")
    return x


@avg_pool2d_grad_p.def_impl
def _avg_pool_grad_impl(g, *, hw, kernel, stride, padding):
    n, c, oh, ow = g.shape
    ph, pw = padding
    gp = np.zeros((n, c, hw[0] + 2 * ph, hw[1] + 2 * pw), g.dtype)
    part = g / (kernel[0] * kernel[1])
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            gp[:, :, kh:kh + stride[0] * (oh - 1) + 1:stride[0],
               kw:kw + stride[1] * (ow - 1) + 1:stride[1]] += part
    return gp[:, :, ph:ph + hw[0], pw:pw + hw[1]]


@avg_pool2d_grad_p.def_vjp
def _avg_pool_grad_vjp(cts, outs, ins, *, hw, kernel, stride, padding):
    return [avg_pool2d_p.bind(cts[0], kernel=kernel, stride=stride, padding=padding)]


# ---------------------------------------------------------------- the user's functions

def _pool_args(name: str, x: Any, kernel_size: Any, stride: Any, padding: Any):
    x = x if isinstance(x, Tracer) else np.asarray(x)
    try:  # argument errors name the caller's line, as shape errors do
        kernel = pair(kernel_size, f"{name}: kernel_size", 1)
        stride = kernel if stride is None or stride == () else pair(stride, f"{name}: stride",
                                                                     1)
        padding = pair(padding, f"{name}: padding", 0)
        if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
            raise JitgradError(f"{name}: padding {padding} should be at most half of the "
                               f"kernel size {kernel} (as in torch)")
    except JitgradError as e:
        raise with_user_loc(e) from None
    return x, {"kernel": kernel, "stride": stride, "padding": padding}


def _unbatched(fn, x: Any, *args: Any) -> Any:
    y = fn(S.reshape(x, (1, *x.shape)), *args)
    return S.reshape(y, y.shape[1:])


def max_pool2d(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Any:
    """torch.nn.functional.max_pool2d: the maximum of each window of x (N, C, H, W) or
    (C, H, W); stride defaults to kernel_size; padding (at most half the kernel) is -inf."""
    x, kw = _pool_args("max_pool2d", x, kernel_size, stride, padding)
    if x.ndim == 3:
        return _unbatched(max_pool2d, x, kernel_size, stride, padding)
    return max_pool2d_p.bind(x, **kw)[0]


def avg_pool2d(x: Any, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Any:
    """torch.nn.functional.avg_pool2d with count_include_pad=True: the mean of each window
    of x (N, C, H, W) or (C, H, W), zero padding counted."""
    x, kw = _pool_args("avg_pool2d", x, kernel_size, stride, padding)
    if x.ndim == 3:
        return _unbatched(avg_pool2d, x, kernel_size, stride, padding)
    return avg_pool2d_p.bind(x, **kw)


# ---------------------------------------------------------------- compiling
# d = [N, C, H, W, OH, OW, KH, KW, stride h, stride w, pad h, pad w]. Each kernel is one
# function per (image, channel) plane, run over the planes serially for small inputs and
# in parallel above conv.PARALLEL_MIN elements.


@njit(inline="always")
def _max_plane(plane, vals, at, d):
    h, w, oh_, ow_, kh_, kw_, sh, sw, ph, pw = d[2], d[3], d[4], d[5], d[6], d[7], d[8], \
        d[9], d[10], d[11]
    for oh in range(oh_):
        for ow in range(ow_):
            best, pos = plane[0], -1
            for kh in range(kh_):
                ih = oh * sh - ph + kh
                if ih < 0 or ih >= h:
                    continue
                for kw in range(kw_):
                    iw = ow * sw - pw + kw
                    if iw < 0 or iw >= w:
                        continue
                    v = plane[ih * w + iw]
                    if pos < 0 or v > best or (v != v and best == best):  # the first NaN wins
                        best, pos = v, ih * w + iw
            vals[oh * ow_ + ow] = best
            at[oh * ow_ + ow] = pos


@njit(inline="always")
def _later_wins(a, b):
    """Whether b, met after a in window order, replaces it: larger, or the first NaN."""
    return (b > a) | ((b != b) & (a == a))


@njit(inline="always")
def _max_plane_2x2(plane, vals, at, d, best, down):
    """_max_plane for 2x2 windows at stride 2 without padding (nearly every CNN's pooling),
    in two passes that vectorise (2x faster on 28x28 planes, 1.35x on 10x10): the winner of
    each column of a row pair (best, and down: whether it is the lower row's), then of each
    pair of columns. Ties go to the first in window order ((kh, kw) row-major), as in
    _max_plane: the right column's winner comes later iff it is not above the left's."""
    w, oh_, ow_ = d[3], d[4], d[5]
    for oh in range(oh_):
        r0 = 2 * oh * w
        top, bottom = plane[r0:r0 + 2 * ow_], plane[r0 + w:r0 + w + 2 * ow_]
        for iw in range(2 * ow_):
            lower = _later_wins(top[iw], bottom[iw])
            best[iw] = bottom[iw] if lower else top[iw]
            down[iw] = lower
        out, pos = vals[oh * ow_:(oh + 1) * ow_], at[oh * ow_:(oh + 1) * ow_]
        for ow in range(ow_):
            a, b = best[2 * ow], best[2 * ow + 1]
            dl, dr = down[2 * ow], down[2 * ow + 1]
            right = _later_wins(a, b) if dr >= dl else not _later_wins(b, a)
            out[ow] = b if right else a
            pos[ow] = r0 + 2 * ow + right + w * (dr if right else dl)


@njit(inline="always")
def _max_pool_planes(x, y, idx, d, t_lo, t_hi, best, down):
    if d[6] == 2 and d[7] == 2 and d[8] == 2 and d[9] == 2 and d[10] == 0 and d[11] == 0:
        for t in range(t_lo, t_hi):
            _max_plane_2x2(x[t], y[t], idx[t], d, best, down)
    else:
        for t in range(t_lo, t_hi):
            _max_plane(x[t], y[t], idx[t], d)


@njit(cache=True, parallel=True)
def max_pool_forward(x, y, idx, d, best, down):
    """Max pooling of every (image, channel) plane; best and down: one row of scratch per
    slot (blocks of planes that run in parallel when there are several)."""
    planes, slots = x.shape[0], best.shape[0]
    if slots == 1:
        _max_pool_planes(x, y, idx, d, 0, planes, best[0], down[0])
    else:
        for s in prange(slots):
            _max_pool_planes(x, y, idx, d, s * planes // slots, (s + 1) * planes // slots,
                             best[s], down[s])
    return 0


@njit(inline="always")
def _scatter_plane(dst, src, at):
    for i in range(dst.size):  # a loop, not dst[:] = 0: that is a parallel region of its own
        dst[i] = 0
    for o in range(src.size):
        dst[at[o]] += src[o]


@njit(cache=True, parallel=True)
def _scatter_planes(g, idx, gx):
    if gx.size < PARALLEL_MIN:
        for t in range(g.shape[0]):
            _scatter_plane(gx[t], g[t], idx[t])
    else:
        for t in prange(g.shape[0]):
            _scatter_plane(gx[t], g[t], idx[t])


@njit(cache=True)
def max_pool_backward(g, idx, gx, d):
    """gx = 0 plus each g added at its position; positions outside the plane are rejected
    before anything is written."""
    planes = d[2] * d[3]
    for t in range(idx.shape[0]):
        for o in range(idx.shape[1]):
            if idx[t, o] < 0 or idx[t, o] >= planes:
                return t * idx.shape[1] + o + 1
    _scatter_planes(g, idx, gx)
    return 0


@njit(inline="always")
def _avg_plane(plane, vals, d, scale):
    h, w, oh_, ow_, kh_, kw_, sh, sw, ph, pw = d[2], d[3], d[4], d[5], d[6], d[7], d[8], \
        d[9], d[10], d[11]
    for oh in range(oh_):
        for ow in range(ow_):
            s = scale * 0
            for kh in range(kh_):
                ih = oh * sh - ph + kh
                if 0 <= ih < h:
                    for kw in range(kw_):
                        iw = ow * sw - pw + kw
                        if 0 <= iw < w:
                            s += plane[ih * w + iw]
            vals[oh * ow_ + ow] = s * scale


@njit(cache=True, parallel=True)
def avg_pool_forward(x, y, d, scale):
    if x.size * d[6] < PARALLEL_MIN:
        for t in range(x.shape[0]):
            _avg_plane(x[t], y[t], d, scale)
    else:
        for t in prange(x.shape[0]):
            _avg_plane(x[t], y[t], d, scale)
    return 0


@njit(inline="always")
def _avg_back_plane(dst, src, d, scale):
    h, w, oh_, ow_, kh_, kw_, sh, sw, ph, pw = d[2], d[3], d[4], d[5], d[6], d[7], d[8], \
        d[9], d[10], d[11]
    for i in range(dst.size):  # a loop, not dst[:] = 0: that is a parallel region of its own
        dst[i] = 0
    for oh in range(oh_):
        for ow in range(ow_):
            v = src[oh * ow_ + ow] * scale
            for kh in range(kh_):
                ih = oh * sh - ph + kh
                if 0 <= ih < h:
                    for kw in range(kw_):
                        iw = ow * sw - pw + kw
                        if 0 <= iw < w:
                            dst[ih * w + iw] += v


@njit(cache=True, parallel=True)
def avg_pool_backward(g, gx, d, scale):
    if gx.size * d[6] < PARALLEL_MIN:
        for t in range(g.shape[0]):
            _avg_back_plane(gx[t], g[t], d, scale)
    else:
        for t in prange(g.shape[0]):
            _avg_back_plane(gx[t], g[t], d, scale)
    return 0


_PLANES = ("d = carray(_vp(pmeta), nmeta, np.int64)\n"
           "nc, hw, ohw = d[0] * d[1], d[2] * d[3], d[4] * d[5]\n")
MAX_POOL = Kernel("max_pool2d", "px py pidx pbest pdown slots pmeta nmeta", _PLANES + (
    "return K.max_pool_forward(carray(_vp(px), (nc, hw), {dt}), carray(_vp(py), (nc, ohw), "
    "{dt}), carray(_vp(pidx), (nc, ohw), np.int64), d, carray(_vp(pbest), (slots, d[3]), "
    "{dt}), carray(_vp(pdown), (slots, d[3]), np.int64))"), FLOATS)
MAX_POOL_GRAD = Kernel("max_pool2d_grad", "pg pidx pgx pmeta nmeta", _PLANES + (
    "return K.max_pool_backward(carray(_vp(pg), (nc, ohw), {dt}), carray(_vp(pidx), "
    "(nc, ohw), np.int64), carray(_vp(pgx), (nc, hw), {dt}), d)"), FLOATS, can_fail=True)
AVG_POOL = Kernel("avg_pool2d", "px py pmeta nmeta", _PLANES + (
    "return K.avg_pool_forward(carray(_vp(px), (nc, hw), {dt}), carray(_vp(py), (nc, ohw), "
    "{dt}), d, {dt}(1.0 / (d[6] * d[7])))"), FLOATS)
AVG_POOL_GRAD = Kernel("avg_pool2d_grad", "pg pgx pmeta nmeta", _PLANES + (
    "return K.avg_pool_backward(carray(_vp(pg), (nc, ohw), {dt}), carray(_vp(pgx), (nc, hw), "
    "{dt}), d, {dt}(1.0 / (d[6] * d[7])))"), FLOATS)


def _meta(low, xshape, out, kw) -> tuple[Any, int]:
    return low.meta_block([*xshape, *out[2:], *kw["kernel"], *kw["stride"], *kw["padding"]])


@max_pool2d_p.def_lowering
def _lower_max_pool(low, ins) -> None:
    x, (y, idx) = ins.inputs[0], ins.outputs
    slots = slots_for(x.size * ins.kw["kernel"][0], x.shape[0] * x.shape[1])
    row = (slots, x.shape[3])
    best, down = Var(row, x.dtype), Var(row, np.dtype(np.int64))
    low.call(MAX_POOL, x.dtype, [x, y, idx, best, down, slots,
                                 *_meta(low, x.shape, y.shape, ins.kw)],
             [y, idx, best, down], [x], ins)


@max_pool2d_grad_p.def_lowering
def _lower_max_pool_grad(low, ins) -> None:
    (g, idx), gx = ins.inputs, ins.outputs[0]
    geometry = {"kernel": (1, 1), "stride": (1, 1), "padding": (0, 0)}  # unused: positions
    low.call(MAX_POOL_GRAD, g.dtype, [g, idx, gx, *_meta(low, gx.shape, g.shape, geometry)],
             [gx], [g, idx], ins)


@avg_pool2d_p.def_lowering
def _lower_avg_pool(low, ins) -> None:
    x, y = ins.inputs[0], ins.outputs[0]
    low.call(AVG_POOL, x.dtype, [x, y, *_meta(low, x.shape, y.shape, ins.kw)], [y], [x], ins)


@avg_pool2d_grad_p.def_lowering
def _lower_avg_pool_grad(low, ins) -> None:
    g, gx = ins.inputs[0], ins.outputs[0]
    low.call(AVG_POOL_GRAD, g.dtype, [g, gx, *_meta(low, gx.shape, g.shape, ins.kw)], [gx],
             [g], ins)


def _pool_label(ins) -> str:
    kw = ins.kw
    if "kernel" not in kw:
        return ""
    k, s, p = kw["kernel"], kw["stride"], kw["padding"]
    return (f" {k[0]}x{k[1]}" + (f" stride {s[0]},{s[1]}" if s != k else "")
            + (f" pad {p[0]},{p[1]}" if any(p) else ""))


def _window_cost(ins) -> int:
    kw = ins.kw
    k = kw.get("kernel", (1, 1))
    big = max(ins.outputs[0].size, ins.inputs[0].size)
    return big * k[0] * k[1]


for _p in (max_pool2d_p, max_pool2d_grad_p, avg_pool2d_p, avg_pool2d_grad_p):
    _p.def_label(_pool_label)
    _p.def_cost(_window_cost)
