"""2-d convolution (NCHW activations, OIHW weights, as torch.nn.functional.conv2d) and its
two gradients, each a primitive with its own VJP, so second derivatives are convolutions too.

- `conv2d(x, w[, b])`: y = x ⋆ w (+ b per output channel; relu optionally applied in the
  same pass, see `_absorb_relu`);
- `conv2d_input_grad(g, w)`: the adjoint in x (a transposed convolution);
- `conv2d_weight_grad(x, g)`: the adjoint in w.

The three are linear in each argument, and each is the others' adjoint:
<conv(x, w), g> = <x, input_grad(g, w)> = <w, weight_grad(x, g)>, which gives every VJP.

Compiled, a convolution is GEMM over im2col: a chunk of images is unrolled into a
channel-major (C·KH·KW, images·OH·OW) matrix in arena scratch (the planner sizes it and
frees it after the call), the weight of each group multiplies it through BLAS, and the
(O, images·OH·OW) product is copied into NCHW by an epilogue that adds the bias and applies
relu while it is in cache. The gradients use the same unrolling: the input gradient is
GEMM then col2im (a scatter-add per (image, channel) plane, so threads never share an
output), the weight gradient GEMM accumulating over the chunks (beta = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from numba import prange

from ...compiler import blas
from ...compiler.cache import njit
from ...compiler.kernels import FLOATS, Kernel
from ...errors import JitgradError
from ..core import Tracer, primitive, with_user_loc
from ..ir import Var
from . import elementwise as E
from . import reduce as R
from . import shape as S

# ---------------------------------------------------------------- geometry


def pair(value: Any, what: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair (torch's `_pair`)."""
    vals = (value, value) if isinstance(value, (int, np.integer)) else tuple(value) \
        if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise JitgradError(f"{what} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise JitgradError(f"{what} must be >= {minimum}, got {value!r}")
    return int(vals[0]), int(vals[1])


def out_size(size: int, pad_lo: int, pad_hi: int, kernel: int, stride: int,
             dilation: int) -> int:
    """Output length along one axis; < 1 when the (dilated) kernel exceeds the padded input."""
    return (size + pad_lo + pad_hi - dilation * (kernel - 1) - 1) // stride + 1


def _check_float(name: str, aval) -> None:
    if aval[1] not in (np.float32, np.float64):
        raise JitgradError(f"{name} must be float32 or float64, got {aval[1]}")


def _check_4d(name: str, shape: tuple[int, ...], layout: str) -> None:
    if len(shape) != 4:
        raise JitgradError(f"{name} must be 4-d ({layout}), got shape {shape}")


def _geometry(xshape, wshape, stride, padding, dilation, groups) -> tuple[int, int]:
    """(OH, OW) of a convolution, after checking channels, groups and sizes."""
    n, c, h, w = xshape
    o, cg, kh, kw = wshape
    if c % groups or cg * groups != c:
        raise JitgradError(f"input has {c} channels but the weight {wshape} with groups="
                           f"{groups} expects {cg * groups} (weight.shape[1] * groups)")
    if o % groups:
        raise JitgradError(f"the weight's {o} output channels are not divisible by groups="
                           f"{groups}")
    if min(kh, kw) < 1:
        raise JitgradError(f"the weight {wshape} has an empty kernel")
    pt, pb, pl, pr = padding
    oh = out_size(h, pt, pb, kh, stride[0], dilation[0])
    ow = out_size(w, pl, pr, kw, stride[1], dilation[1])
    if oh < 1 or ow < 1:
        eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
        raise JitgradError(f"the kernel {eff[0]}x{eff[1]} (dilated) is larger than the padded "
                           f"input {h + pt + pb}x{w + pl + pr}")
    return oh, ow


# ---------------------------------------------------------------- numpy references

def _padded(x: np.ndarray, padding) -> np.ndarray:
    pt, pb, pl, pr = padding
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def _windows(xp: np.ndarray, k, stride, dilation, out) -> np.ndarray:
    """View (N, C, KH, KW, OH, OW) of a padded input: the input of every output at every
    kernel tap."""
    sn, sc, sh, sw = xp.strides
    shape = xp.shape[:2] + tuple(k) + tuple(out)
    strides = (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1])
    return np.lib.stride_tricks.as_strided(xp, shape, strides, writeable=False)


def _by_group(a: np.ndarray, groups: int) -> np.ndarray:
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, *a.shape[2:])


def _conv_ref(x, w, stride, padding, dilation, groups):
    out = _geometry(x.shape, w.shape, stride, padding, dilation, groups)
    win = _by_group(_windows(_padded(x, padding), w.shape[2:], stride, dilation, out), groups)
    wg = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])
    y = np.einsum("ngcklij,gockl->ngoij", win, wg, optimize=True)
    return y.reshape(x.shape[0], w.shape[0], *out)


def _input_grad_ref(g, w, hw, stride, padding, dilation, groups):
    n, o, oh, ow = g.shape
    pt, pb, pl, pr = padding
    c = w.shape[1] * groups
    gp = np.zeros((n, c, hw[0] + pt + pb, hw[1] + pl + pr), g.dtype)
    gg = _by_group(g, groups)
    wg = w.reshape(groups, o // groups, *w.shape[1:])
    for kh in range(w.shape[2]):
        for kw in range(w.shape[3]):
            part = np.einsum("ngoij,goc->ngcij", gg, wg[:, :, :, kh, kw]).reshape(n, c, oh, ow)
            h0, w0 = kh * dilation[0], kw * dilation[1]
            gp[:, :, h0:h0 + stride[0] * (oh - 1) + 1:stride[0],
               w0:w0 + stride[1] * (ow - 1) + 1:stride[1]] += part
    return gp[:, :, pt:pt + hw[0], pl:pl + hw[1]]


def _weight_grad_ref(x, g, k, stride, padding, dilation, groups):
    out = g.shape[2:]
    win = _by_group(_windows(_padded(x, padding), k, stride, dilation, out), groups)
    gw = np.einsum("ngcklij,ngoij->gockl", win, _by_group(g, groups), optimize=True)
    return gw.reshape(g.shape[1], x.shape[1] // groups, *k)


# ---------------------------------------------------------------- primitives

# gemm_operands: what precision="bf16" rounds (the two factors of each im2col GEMM)
conv2d_p = primitive("conv2d", "conv", gemm_operands=(0, 1))
conv2d_input_grad_p = primitive("conv2d_input_grad", "conv", gemm_operands=(0, 1))
conv2d_weight_grad_p = primitive("conv2d_weight_grad", "conv", gemm_operands=(0, 1))
CONVS = (conv2d_p, conv2d_input_grad_p, conv2d_weight_grad_p)


def _check_pair(a, b, names: str) -> None:
    for name, aval in zip(names.split(), (a, b), strict=True):
        _check_float(name, aval)
    if a[1] != b[1]:
        raise JitgradError(f"{names.split()[0]} is {a[1]} but {names.split()[1]} is {b[1]}")


@conv2d_p.def_shape
def _conv_shape(x, w, *bias, stride, padding, dilation, groups, relu):
    _check_4d("input", x[0], "N, C, H, W")
    _check_4d("weight", w[0], "out_channels, in_channels / groups, kH, kW")
    _check_pair(x, w, "input weight")
    out = _geometry(x[0], w[0], stride, padding, dilation, groups)
    if bias:
        (bshape, bdtype), = bias
        if bshape != w[0][:1]:
            raise JitgradError(f"bias must have shape ({w[0][0]},) (one per output channel), "
                               f"got {bshape}")
        if bdtype != x[1]:
            raise JitgradError(f"bias is {bdtype} but input is {x[1]}")
    return (x[0][0], w[0][0], *out), x[1]


@conv2d_input_grad_p.def_shape
def _input_grad_shape(g, w, *, hw, stride, padding, dilation, groups):
    _check_pair(g, w, "gradient weight")
    n, o, oh, ow = g[0]
    c = w[0][1] * groups
    if (oh, ow) != _geometry((n, c, *hw), w[0], stride, padding, dilation, groups) \
            or o != w[0][0]:
        raise JitgradError(f"gradient {g[0]} does not match a convolution of a {hw} input "
                           f"with weight {w[0]}")
    return (n, c, *hw), g[1]


@conv2d_weight_grad_p.def_shape
def _weight_grad_shape(x, g, *, k, stride, padding, dilation, groups):
    _check_pair(x, g, "input gradient")
    n, c = x[0][:2]
    o = g[0][1]
    wshape = (o, c // groups, *k)
    if g[0] != (n, o, *_geometry(x[0], wshape, stride, padding, dilation, groups)):
        raise JitgradError(f"gradient {g[0]} does not match a convolution of {x[0]} with a "
                           f"{wshape} weight")
    return wshape, x[1]


def _geom(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in ("stride", "padding", "dilation", "groups")}


@conv2d_p.def_impl
def _conv_impl(x, w, *bias, relu, **geom):
    y = _conv_ref(x, w, **geom)
    if bias:
        y = y + bias[0][None, :, None, None]
    return np.maximum(y, 0) if relu else y


conv2d_input_grad_p.def_impl(lambda g, w, *, hw, **geom: _input_grad_ref(g, w, hw, **geom))
conv2d_weight_grad_p.def_impl(lambda x, g, *, k, **geom: _weight_grad_ref(x, g, k, **geom))


def _input_grad(g, w, hw, geom):
    return conv2d_input_grad_p.bind(g, w, hw=tuple(hw), **geom)


def _weight_grad(x, g, k, geom):
    return conv2d_weight_grad_p.bind(x, g, k=tuple(k), **geom)


def _conv(x, w, geom):
    return conv2d_p.bind(x, w, relu=False, **geom)


@conv2d_p.def_vjp
def _conv_vjp(cts, outs, ins, *, relu, **geom):
    x, w = ins[:2]
    g = E.where(outs[0] > 0, cts[0], 0.0) if relu else cts[0]
    grads = [_input_grad(g, w, x.shape[2:], geom), _weight_grad(x, g, w.shape[2:], geom)]
    if len(ins) == 3:  # by planes, then images: a sum over axes (0, 2, 3) is a transpose copy
        grads.append(R.sum(R.sum(g, axis=(2, 3)), axis=0))
    return grads


@conv2d_input_grad_p.def_vjp
def _input_grad_vjp(cts, outs, ins, *, hw, **geom):
    g, w = ins
    return [_conv(cts[0], w, geom), _weight_grad(cts[0], g, w.shape[2:], geom)]


@conv2d_weight_grad_p.def_vjp
def _weight_grad_vjp(cts, outs, ins, *, k, **geom):
    x, g = ins
    return [_input_grad(g, cts[0], x.shape[2:], geom), _conv(x, cts[0], geom)]


# ---------------------------------------------------------------- the user's function

def conv2d(x: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Any:
    """torch.nn.functional.conv2d: x (N, C, H, W) or (C, H, W), weight (O, C / groups, kH,
    kW), bias (O,) or None; stride, padding, dilation an int or a pair; padding also
    "valid" (0) or "same" (output as large as the input; stride 1 only, as in torch)."""
    x = x if isinstance(x, Tracer) else np.asarray(x)
    weight = weight if isinstance(weight, Tracer) else np.asarray(weight)
    if x.ndim == 3:  # unbatched, as torch allows
        y = conv2d(S.reshape(x, (1, *x.shape)), weight, bias, stride, padding, dilation,
                   groups)
        return S.reshape(y, y.shape[1:])
    try:  # argument errors name the caller's line, as shape errors do
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise JitgradError(f"conv2d: groups must be a positive int, got {groups!r}")
        stride = pair(stride, "conv2d: stride", 1)
        dilation = pair(dilation, "conv2d: dilation", 1)
        if weight.ndim != 4:
            raise JitgradError(f"conv2d: weight must be 4-d (out_channels, in_channels / groups, "
                               f"kH, kW), got shape {weight.shape}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                if stride != (1, 1):
                    raise JitgradError("conv2d: padding='same' is not supported for strided "
                                       "convolutions (as in torch)")
                # torch puts the odd element of an even total at the end
                th, tw = (d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True))
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise JitgradError(f"conv2d: padding must be an int, a pair, 'valid' or 'same', "
                                   f"got {padding!r}")
        else:
            ph, pw = pair(padding, "conv2d: padding", 0)
            pads = (ph, ph, pw, pw)
    except JitgradError as e:
        raise with_user_loc(e) from None
    args = (x, weight) if bias is None else (x, weight, bias)
    return conv2d_p.bind(*args, stride=stride, padding=pads, dilation=dilation,
                         groups=int(groups), relu=False)


# ---------------------------------------------------------------- compiling

# Images per im2col chunk: the unrolled matrix stays about this many elements, so it is
# reused from cache by GEMM and the arena does not hold a whole batch's unrolling.
CHUNK_ELEMENTS = 1 << 19


def chunk_images(n: int, c: int, k: tuple[int, int], out: tuple[int, int]) -> int:
    per_image = out[0] * out[1] * c * k[0] * k[1]
    return max(1, min(n, CHUNK_ELEMENTS // max(per_image, 1)))


# The unrolled chunk is channel-major: col[(c, kh, kw), (i, oh, ow)] (K rows of nb·P
# columns), so each tap's row is a shifted copy of input rows, the forward product
# W·col is (O, nb·P) and lands in NCHW by contiguous copies, and the loops below run along
# output columns (contiguous) rather than along the few taps of a kernel.
# Below this many elements moved, a loop runs on one thread: interleaving Numba's parallel
# regions with BLAS's threads made a step 10-100x slower on this 2-core machine (the two
# pools' spinning threads take each other's cores; NUMBA_NOTES.md: threads need one owner),
# while these loops move memory the GEMMs then reuse.
PARALLEL_MIN = 1 << 22


@njit(inline="always")
def _valid(lo_pad, k_off, stride, size, n_out):
    """[first, last) outputs whose input index o·stride - lo_pad + k_off is in [0, size)."""
    start = lo_pad - k_off
    first = 0 if start <= 0 else (start + stride - 1) // stride
    last = (size - 1 + lo_pad - k_off) // stride + 1 if size - 1 + lo_pad - k_off >= 0 else 0
    return min(first, n_out), max(min(last, n_out), min(first, n_out))


@njit(inline="always")
def _im2col_tap(x, col, n0, t, nb, d):
    """Row (c, kh, kw) of col for image n0 + t % nb."""
    kh_, kw_, oh_, ow_ = d[5], d[6], d[7], d[8]
    sh, sw, pt, pl, dh, dw = d[9], d[10], d[11], d[13], d[15], d[16]
    h, w = x.shape[2], x.shape[3]
    k, i = t // nb, t % nb
    c, kh, kw = k // (kh_ * kw_), (k // kw_) % kh_, k % kw_
    row = col[k]
    base = i * oh_ * ow_
    lo, hi = _valid(pl, kw * dw, sw, w, ow_)
    for oh in range(oh_):
        ih = oh * sh - pt + kh * dh
        seg = base + oh * ow_
        if ih < 0 or ih >= h:
            for ow in range(ow_):
                row[seg + ow] = 0
            continue
        src = x[n0 + i, c, ih]
        for ow in range(lo):
            row[seg + ow] = 0
        off = kw * dw - pl
        for ow in range(lo, hi):
            row[seg + ow] = src[ow * sw + off]
        for ow in range(hi, ow_):
            row[seg + ow] = 0


@njit(cache=True, parallel=True)
def im2col(x, col, n0, nb, d):
    """col[(c, kh, kw), (i, oh, ow)] = padded x[n0 + i, c, oh·s + kh·dil, ow·s + kw·dil]."""
    n = col.shape[0] * nb
    if n * d[7] * d[8] < PARALLEL_MIN:
        for t in range(n):
            _im2col_tap(x, col, n0, t, nb, d)
    else:
        for t in prange(n):
            _im2col_tap(x, col, n0, t, nb, d)
    return 0


@njit(inline="always")
def _col2im_plane(gcol, gx, n0, t, d):
    """gx[n0 + i, c] from the rows (c, ·, ·) of gcol: each (image, channel) plane is one
    iteration's own."""
    _, c_in, h, w = gx.shape
    kh_, kw_, oh_, ow_ = d[5], d[6], d[7], d[8]
    sh, sw, pt, pl, dh, dw = d[9], d[10], d[11], d[13], d[15], d[16]
    i, c = t // c_in, t % c_in
    plane = gx[n0 + i, c]
    for ih in range(h):  # a loop, not plane[:] = 0: that would be a parallel region of its own
        for iw in range(w):
            plane[ih, iw] = 0
    base = i * oh_ * ow_
    for kh in range(kh_):
        for kw in range(kw_):
            row = gcol[(c * kh_ + kh) * kw_ + kw]
            lo, hi = _valid(pl, kw * dw, sw, w, ow_)
            off = kw * dw - pl
            for oh in range(oh_):
                ih = oh * sh - pt + kh * dh
                if ih < 0 or ih >= h:
                    continue
                dst = plane[ih]
                seg = base + oh * ow_
                for ow in range(lo, hi):
                    dst[ow * sw + off] += row[seg + ow]


@njit(cache=True, parallel=True)
def col2im(gcol, gx, n0, nb, d):
    """gx[n0 + i] = the sum of gcol's entries over the taps reading each input element
    (im2col's adjoint)."""
    n = nb * gx.shape[1]
    if gcol.size < PARALLEL_MIN:
        for t in range(n):
            _col2im_plane(gcol, gx, n0, t, d)
    else:
        for t in prange(n):
            _col2im_plane(gcol, gx, n0, t, d)
    return 0


@njit(inline="always")
def _epilogue_plane(yt, y, b, n0, t, nb, has_bias, relu, zero):
    o, i = t // nb, t % nb
    p_ = y.shape[2] * y.shape[3]
    plane = y[n0 + i, o].reshape(p_)
    src = yt[o]
    bias = b[o] if has_bias else zero
    base = i * p_
    for p in range(p_):
        v = src[base + p] + bias
        if relu and v < zero:  # NaN passes, as numpy's maximum lets it
            v = zero
        plane[p] = v


@njit(cache=True, parallel=True)
def product_to_nchw(yt, y, b, n0, nb, has_bias, relu, zero):
    """y[n0 + i, o] = yt[o, i·P:(i+1)·P] (+ b[o], relu): the GEMM's (O, nb·P) product laid
    out as NCHW, bias and activation applied while the product is in cache."""
    n = nb * y.shape[1]
    if n * y.shape[2] * y.shape[3] < PARALLEL_MIN:
        for t in range(n):
            _epilogue_plane(yt, y, b, n0, t, nb, has_bias, relu, zero)
    else:
        for t in prange(n):
            _epilogue_plane(yt, y, b, n0, t, nb, has_bias, relu, zero)
    return 0


@njit(inline="always")
def _gather_plane(g, gt, n0, t, nb):
    o, i = t // nb, t % nb
    p_ = g.shape[2] * g.shape[3]
    plane = g[n0 + i, o].reshape(p_)
    dst = gt[o]
    for p in range(p_):
        dst[i * p_ + p] = plane[p]


@njit(cache=True, parallel=True)
def nchw_to_product(g, gt, n0, nb):
    """gt[o, i·P:(i+1)·P] = g[n0 + i, o]: a gradient as GEMM's (O, nb·P) operand."""
    n = nb * g.shape[1]
    if n * g.shape[2] * g.shape[3] < PARALLEL_MIN:
        for t in range(n):
            _gather_plane(g, gt, n0, t, nb)
    else:
        for t in prange(n):
            _gather_plane(g, gt, n0, t, nb)
    return 0


@njit(cache=True)
def conv_forward(x, w, b, y, col, yt, d, has_bias, relu, zero, gemm):
    """y = conv(x, w) (+ b, relu) by chunks of images: im2col, one GEMM per group
    (W_g · col_g), epilogue. d: the geometry (see _meta); gemm: the address of the provider's
    strided GEMM (compiler/blas.py; a group's operand is a row block of a matrix)."""
    n_, c_ = x.shape[0], x.shape[1]
    o_, groups, chunk = w.shape[0], d[17], d[18]
    cg, og = c_ // groups, o_ // groups
    kk = d[5] * d[6]
    p_ = d[7] * d[8]
    ld = chunk * p_
    for n0 in range(0, n_, chunk):
        nb = min(chunk, n_ - n0)
        im2col(x, col, n0, nb, d)
        for g in range(groups):
            blas.call_strided(gemm, w.ctypes.data + g * og * cg * kk * w.itemsize, cg * kk,
                              col.ctypes.data + g * cg * kk * ld * col.itemsize, ld,
                              yt.ctypes.data + g * og * ld * yt.itemsize, ld, og, nb * p_,
                              cg * kk, 0, 0, 0)
        product_to_nchw(yt, y, b, n0, nb, has_bias, relu, zero)
    return 0


@njit(cache=True)
def conv_input_grad(g, w, gx, gt, gcol, d, gemm):
    """gx = col2im(W_gᵀ · g_g) by chunks: the gradient as (O, rows), one GEMM per group,
    col2im."""
    n_, c_ = gx.shape[0], gx.shape[1]
    o_, groups, chunk = w.shape[0], d[17], d[18]
    cg, og = c_ // groups, o_ // groups
    kk = d[5] * d[6]
    p_ = d[7] * d[8]
    ld = chunk * p_
    for n0 in range(0, n_, chunk):
        nb = min(chunk, n_ - n0)
        nchw_to_product(g, gt, n0, nb)
        for grp in range(groups):
            blas.call_strided(gemm, w.ctypes.data + grp * og * cg * kk * w.itemsize, cg * kk,
                              gt.ctypes.data + grp * og * ld * gt.itemsize, ld,
                              gcol.ctypes.data + grp * cg * kk * ld * gcol.itemsize, ld,
                              cg * kk, nb * p_, og, 1, 0, 0)
        col2im(gcol, gx, n0, nb, d)
    return 0


@njit(cache=True)
def conv_weight_grad(x, g, gw, col, gt, d, gemm):
    """gw = Σ over chunks of g_g · col_gᵀ, one GEMM per group accumulating (beta = 1) after
    the first chunk."""
    n_, c_ = x.shape[0], x.shape[1]
    o_, groups, chunk = gw.shape[0], d[17], d[18]
    cg, og = c_ // groups, o_ // groups
    kk = d[5] * d[6]
    p_ = d[7] * d[8]
    ld = chunk * p_
    if n_ == 0 or p_ == 0:
        for i in range(gw.shape[0]):
            gw[i] = 0
        return 0
    for n0 in range(0, n_, chunk):
        nb = min(chunk, n_ - n0)
        im2col(x, col, n0, nb, d)
        nchw_to_product(g, gt, n0, nb)
        for grp in range(groups):
            blas.call_strided(gemm, gt.ctypes.data + grp * og * ld * gt.itemsize, ld,
                              col.ctypes.data + grp * cg * kk * ld * col.itemsize, ld,
                              gw.ctypes.data + grp * og * cg * kk * gw.itemsize, cg * kk,
                              og, cg * kk, nb * p_, 0, 1, int(n0 > 0))
    return 0


# ---------------------------------------------------------------- direct kernels
# A convolution with few taps per output (C/groups·KH·KW) makes a poor GEMM: conv1 of
# LeNet-5 is 6 x 50176 x 25, and its im2col matrix is 25 copies of the input, written and
# read back through memory. At stride 1 the direct kernels below skip the unrolling: each
# image is copied once into a zero-padded (C, Hp, Wp) scratch, and every output plane is
# computed over the padded width (OH·Wp outputs, of which OW of each Wp are kept), so that
# each tap is one contiguous multiply-add over the whole plane: tap (c, kh, kw) of output j
# is xp[c·Hp·Wp + kh·dh·Wp + kw·dw + j]. The padded scratch ends with (KW-1)·dw zeros for
# the last plane's surplus columns.


@njit(inline="always")
def _pad_image(x, xp, n, d):
    """xp = x[n] zero-padded, one Hp·Wp plane per channel; False if it holds a non-finite
    value (the weight gradient's surplus columns then take the exact path)."""
    c_, h, w = x.shape[1], x.shape[2], x.shape[3]
    pt, pl = d[11], d[13]
    hp, wp = h + pt + d[12], w + pl + d[14]
    for i in range(xp.size):  # a loop, not xp[:] = 0: that would be a parallel region
        xp[i] = 0
    finite = True
    for c in range(c_):
        for ih in range(h):
            src = x[n, c, ih]
            base = (c * hp + pt + ih) * wp + pl
            for iw in range(w):
                v = src[iw]
                finite &= v - v == 0
                xp[base + iw] = v
    return finite


@njit(inline="always")
def _direct_geometry(x, o_, d):
    """(C/groups, O/groups, Wp, Hp·Wp, OH·Wp) of a direct kernel's padded planes."""
    groups = d[17]
    wp = x.shape[3] + d[13] + d[14]
    return x.shape[1] // groups, o_ // groups, wp, (x.shape[2] + d[11] + d[12]) * wp, d[7] * wp


@njit(inline="always")
def _direct_forward_images(x, w, b, y, xp, acc, n_lo, n_hi, d, has_bias, relu, zero):
    o_, kh_, kw_, oh_, ow_, dh, dw = w.shape[0], d[5], d[6], d[7], d[8], d[15], d[16]
    cg, og, wp, plane, run = _direct_geometry(x, o_, d)
    for n in range(n_lo, n_hi):
        _pad_image(x, xp, n, d)
        for o in range(o_):
            c0 = (o // og) * cg
            bias = b[o] if has_bias else zero
            for j in range(run):
                acc[j] = bias
            for c in range(cg):
                for kh in range(kh_):
                    for kw in range(kw_):
                        wv = w[o, c, kh, kw]
                        src = xp[(c0 + c) * plane + kh * dh * wp + kw * dw:]
                        for j in range(run):
                            acc[j] += wv * src[j]
            out = y[n, o]
            for oh in range(oh_):
                row, kept = out[oh], acc[oh * wp:oh * wp + ow_]
                if relu:
                    for ow in range(ow_):  # a select that vectorises; NaN passes, as in numpy
                        row[ow] = zero if kept[ow] < zero else kept[ow]
                else:
                    for ow in range(ow_):
                        row[ow] = kept[ow]


@njit(cache=True, parallel=True, fastmath={"contract"})
def conv_direct_forward(x, w, b, y, xp, acc, d, has_bias, relu, zero):
    """y = conv(x, w) (+ b, relu) at stride 1 without im2col: per image and output
    channel, acc (OH·Wp) += w[o, c, kh, kw] · a shifted run of the padded image. xp and
    acc hold one row per slot: with more than one, the slots' blocks of images run in
    parallel."""
    n_, slots = x.shape[0], xp.shape[0]
    if slots == 1:
        _direct_forward_images(x, w, b, y, xp[0], acc[0], 0, n_, d, has_bias, relu, zero)
    else:
        for s in prange(slots):
            _direct_forward_images(x, w, b, y, xp[s], acc[s], s * n_ // slots,
                                   (s + 1) * n_ // slots, d, has_bias, relu, zero)
    return 0


@njit(inline="always")
def _direct_weight_grad_images(x, g, gw, xp, acc, n_lo, n_hi, d, zero):
    """gw (O, C/groups·KH·KW) = Σ over images n_lo..n_hi-1 (see conv_direct_weight_grad)."""
    o_, kh_, kw_, oh_, ow_, dh, dw = gw.shape[0], d[5], d[6], d[7], d[8], d[15], d[16]
    cg, og, wp, plane, run = _direct_geometry(x, o_, d)
    for o in range(o_):
        for k in range(gw.shape[1]):
            gw[o, k] = 0
    for n in range(n_lo, n_hi):
        finite = _pad_image(x, xp, n, d)
        for o in range(o_):
            c0 = (o // og) * cg
            src = g[n, o]
            for j in range(run):
                acc[j] = 0
            for oh in range(oh_):
                for ow in range(ow_):
                    acc[oh * wp + ow] = src[oh, ow]
            for c in range(cg):
                for kh in range(kh_):
                    for kw in range(kw_):
                        tap = xp[(c0 + c) * plane + kh * dh * wp + kw * dw:]
                        s = zero
                        if finite:
                            for j in range(run):
                                s += acc[j] * tap[j]
                        else:
                            for oh in range(oh_):
                                for ow in range(oh * wp, oh * wp + ow_):
                                    s += acc[ow] * tap[ow]
                        gw[o, (c * kh_ + kh) * kw_ + kw] += s


@njit(cache=True, parallel=True, fastmath={"contract", "reassoc"})
def conv_direct_weight_grad(x, g, gw, xp, acc, parts, d, zero):
    """gw = Σ over images of g · shifted runs of the padded image (stride 1, no im2col):
    each weight is a dot product over the output plane laid out at the padded width, its
    surplus columns zero. (reassoc: those dot products vectorise; 0 · a surplus column is
    exact unless the image holds inf or NaN, and then the image's rows go one by one.)
    With more than one slot, each slot's block of images sums into its row of parts, and
    the rows are added after."""
    n_, slots = x.shape[0], xp.shape[0]
    flat = gw.reshape((gw.shape[0], -1))
    if slots == 1:
        _direct_weight_grad_images(x, g, flat, xp[0], acc[0], 0, n_, d, zero)
        return 0
    for s in prange(slots):
        _direct_weight_grad_images(x, g, parts[s], xp[s], acc[s], s * n_ // slots,
                                   (s + 1) * n_ // slots, d, zero)
    for o in range(flat.shape[0]):
        for k in range(flat.shape[1]):
            v = parts[0, o, k]
            for s in range(1, slots):
                v += parts[s, o, k]
            flat[o, k] = v
    return 0


@njit(cache=True)
def conv_direct_input_grad(g, w, gx, wt, gp, acc, d, zero):
    """gx = the transposed convolution of g at stride 1, as a direct convolution of g
    (padded by the kernel's extent less the padding, d's geometry) with w's taps flipped
    and its channel axes swapped: wt[c, o, kh, kw] = w[o, c, KH-1-kh, KW-1-kw] per group."""
    o_, cg, kh_, kw_ = w.shape
    groups = d[17]
    og = o_ // groups
    for grp in range(groups):
        for o in range(og):
            for c in range(cg):
                for kh in range(kh_):
                    for kw in range(kw_):
                        wt[grp * cg + c, o, kh, kw] = w[grp * og + o, c, kh_ - 1 - kh,
                                                        kw_ - 1 - kw]
    return conv_direct_forward(g, wt, wt[0, 0, 0, :0], gx, gp, acc, d, False, False, zero)


# A convolution (or gradient) whose im2col GEMM would have at most this many rows per group
# (m: O/groups for the convolution and its weight gradient, C/groups·KH·KW for the input
# gradient) takes the direct kernels at stride 1: their work grows with m, the unrolling's
# does not. Measured (jg.jit, 2 threads, MKL), direct / im2col time: 1 -> 6 channels 5x5
# (m 6) 0.23-0.35, 1 -> 32 3x3 (m 32) 0.22-0.77, 6 -> 16 5x5 (m 16) 0.8-0.93 but its
# input gradient (m 150) 1.37, 32 -> 64 3x3 (m 64) 1.25 on one thread.
DIRECT_MAX_M = 32
# ... and at least this many outputs per plane at the padded width (OH·Wp, the length of
# each multiply-add run): the digits conv net's 8x8 and 4x4 planes (runs of 80 and 24)
# trained 1.2-4x slower per step direct than on im2col.
DIRECT_MIN_RUN = 128


def _direct_rule(ins, m: int, xshape, out, padding) -> bool:
    """The direct kernels' rule for a convolution of an xshape input into `out` planes
    under `padding` whose im2col GEMM has m rows per group (not for bfloat16 operands:
    those go to a bfloat16 GEMM)."""
    run = out[0] * (xshape[3] + padding[2] + padding[3])
    return (ins.kw["stride"] == (1, 1) and m <= DIRECT_MAX_M and run >= DIRECT_MIN_RUN
            and ins.inputs[0].dtype == ins.outputs[0].dtype)


def direct_path(ins) -> bool:
    """Whether a convolution or its weight gradient takes the direct kernels."""
    xshape, wshape, out = _shapes(ins)
    return _direct_rule(ins, wshape[0] // ins.kw["groups"], xshape, out, ins.kw["padding"])


def transposed_padding(ins) -> tuple[int, ...] | None:
    """The padding of g that makes the input gradient a stride-1 convolution of g: the
    dilated kernel's extent less each side's padding (None if a side would be negative,
    or when the input gradient does not take the direct kernels)."""
    _, wshape, _ = _shapes(ins)
    (dh, dw), (pt, pb, pl, pr) = ins.kw["dilation"], ins.kw["padding"]
    eh, ew = dh * (wshape[2] - 1), dw * (wshape[3] - 1)
    pads = (eh - pt, eh - pb, ew - pl, ew - pr)
    m = wshape[1] * wshape[2] * wshape[3]
    if min(pads) < 0 or not _direct_rule(ins, m, ins.inputs[0].shape,
                                          ins.outputs[0].shape[2:], pads):
        return None
    return pads


# Kernels over independent images or planes (the direct convolutions, max pooling) take
# this many rows of scratch above PARALLEL_MIN operations: as many blocks run in parallel
# (more slots than threads even out blocks of unequal speed).
SLOTS = 4


def slots_for(work: int, items: int) -> int:
    """How many blocks of `items` a kernel doing `work` operations runs in parallel."""
    return SLOTS if work >= PARALLEL_MIN and items >= SLOTS else 1


def _direct_scratch(dtype, xshape, wshape, out, kw) -> tuple[Var, Var]:
    """The padded image (C·Hp·Wp plus the last plane's surplus) and one output plane at
    the padded width (OH·Wp), one row of each per slot."""
    pt, pb, pl, pr = kw["padding"]
    hp, wp = xshape[2] + pt + pb, xshape[3] + pl + pr
    slack = (wshape[3] - 1) * kw["dilation"][1]
    work = xshape[0] * wshape[0] * out[0] * out[1] * wshape[1] * wshape[2] * wshape[3]
    slots = slots_for(work, xshape[0])
    return (Var((slots, xshape[1] * hp * wp + slack), dtype),
            Var((slots, out[0] * wp), dtype))


_VIEWS = (
    "d = carray(_vp(pmeta), nmeta, np.int64)\n"
    "x4 = (d[0], d[1], d[2], d[3])\n"
    "w4 = (d[4], d[1] // d[17], d[5], d[6])\n"
    "y4 = (d[0], d[4], d[7], d[8])\n"
    "cols = d[18] * d[7] * d[8]\n"
    "kc = d[1] * d[5] * d[6]\n")
# {dt}: the GEMMs' operands (and their unrolled and gathered copies); {out}: their products
# (bfloat16 operands give float32 products).
CONV_FORWARD = blas.GemmKernel("conv2d", "px pw pb py pcol pyt pmeta nmeta has_bias relu",
                               _VIEWS + (
    "return K.conv_forward(carray(_vp(px), x4, {dt}), carray(_vp(pw), w4, {dt}), "
    "carray(_vp(pb), d[4] if has_bias else 0, {out}), carray(_vp(py), y4, {out}), "
    "carray(_vp(pcol), (kc, cols), {dt}), carray(_vp(pyt), (d[4], cols), {out}), d, "
    "has_bias, relu, {out}(0), {gemm})"))
CONV_INPUT_GRAD = blas.GemmKernel("conv2d_input_grad", "pg pw pgx pgt pgcol pmeta nmeta",
                                  _VIEWS + (
    "return K.conv_input_grad(carray(_vp(pg), y4, {dt}), carray(_vp(pw), w4, {dt}), "
    "carray(_vp(pgx), x4, {out}), carray(_vp(pgt), (d[4], cols), {dt}), "
    "carray(_vp(pgcol), (kc, cols), {out}), d, {gemm})"))
CONV_WEIGHT_GRAD = blas.GemmKernel("conv2d_weight_grad", "px pg pgw pcol pgt pmeta nmeta",
                                   _VIEWS + (
    "return K.conv_weight_grad(carray(_vp(px), x4, {dt}), carray(_vp(pg), y4, {dt}), "
    "carray(_vp(pgw), w4, {out}), carray(_vp(pcol), (kc, cols), {dt}), "
    "carray(_vp(pgt), (d[4], cols), {dt}), d, {gemm})"))


_DIRECT_VIEWS = _VIEWS + (
    "xp = carray(_vp(pxp), (slots, nxp // slots), {dt})\n"
    "acc = carray(_vp(pacc), (slots, nacc // slots), {dt})\n")
CONV_DIRECT = Kernel(
    "conv2d_direct", "px pw pb py pxp nxp pacc nacc slots pmeta nmeta has_bias relu",
    _DIRECT_VIEWS + (
        "return K.conv_direct_forward(carray(_vp(px), x4, {dt}), carray(_vp(pw), w4, {dt}), "
        "carray(_vp(pb), d[4] if has_bias else 0, {dt}), carray(_vp(py), y4, {dt}), xp, acc, "
        "d, has_bias, relu, {dt}(0))"), FLOATS)
CONV_DIRECT_WEIGHT_GRAD = Kernel(
    "conv2d_direct_weight_grad", "px pg pgw pxp nxp pacc nacc pparts slots pmeta nmeta",
    _DIRECT_VIEWS + (
        "return K.conv_direct_weight_grad(carray(_vp(px), x4, {dt}), carray(_vp(pg), y4, "
        "{dt}), carray(_vp(pgw), w4, {dt}), xp, acc, carray(_vp(pparts), (slots, d[4], kc // "
        "d[17]), {dt}), d, {dt}(0))"), FLOATS)

CONV_DIRECT_INPUT_GRAD = Kernel(
    "conv2d_direct_input_grad", "pg pw pgx pwt pxp nxp pacc nacc slots pmeta nmeta",
    "d = carray(_vp(pmeta), nmeta, np.int64)\n"
    "w4 = (d[1], d[4] // d[17], d[5], d[6])\n"
    "return K.conv_direct_input_grad(carray(_vp(pg), (d[0], d[1], d[2], d[3]), {dt}), "
    "carray(_vp(pw), w4, {dt}), carray(_vp(pgx), (d[0], d[4], d[7], d[8]), {dt}), "
    "carray(_vp(pwt), (d[4], d[1] // d[17], d[5], d[6]), {dt}), "
    "carray(_vp(pxp), (slots, nxp // slots), {dt}), "
    "carray(_vp(pacc), (slots, nacc // slots), {dt}), d, {dt}(0))", FLOATS)


def _meta(low, xshape, wshape, out, kw) -> tuple[Any, int, int]:
    """The geometry block every convolution kernel reads: N C H W O KH KW OH OW, stride,
    padding (top bottom left right), dilation, groups, images per chunk; and that chunk."""
    n, c = xshape[:2]
    chunk = chunk_images(n, c, wshape[2:], out)
    addr, length = low.meta_block([*xshape, wshape[0], *wshape[2:], *out, *kw["stride"],
                                   *kw["padding"], *kw["dilation"], kw["groups"], chunk])
    return addr, length, chunk


def _scratch(col_dtype, product_dtype, xshape, wshape, out, chunk) -> tuple[Var, Var]:
    """The unrolled chunk (C·KH·KW, chunk·OH·OW) and the product (O, chunk·OH·OW): arena
    scratch."""
    cols = chunk * out[0] * out[1]
    return (Var((xshape[1] * wshape[2] * wshape[3], cols), col_dtype),
            Var((wshape[0], cols), product_dtype))


def _shapes(ins) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
    """(input's, weight's, output's spatial) shapes of any of the three convolutions."""
    if ins.prim is conv2d_p:
        return ins.inputs[0].shape, ins.inputs[1].shape, ins.outputs[0].shape[2:]
    if ins.prim is conv2d_input_grad_p:
        return ins.outputs[0].shape, ins.inputs[1].shape, ins.inputs[0].shape[2:]
    return ins.inputs[0].shape, ins.outputs[0].shape, ins.inputs[1].shape[2:]


def gemm_shape(ins) -> blas.GemmShape:
    """The product one group of one chunk of images computes, as the GEMM providers see it
    (the kernel makes groups x chunks of them)."""
    xshape, wshape, out = _shapes(ins)
    groups = ins.kw["groups"]
    og, ck = wshape[0] // groups, wshape[1] * wshape[2] * wshape[3]
    cols = chunk_images(xshape[0], xshape[1], wshape[2:], out) * out[0] * out[1]
    m, n, k, ta, tb = {conv2d_p: (og, cols, ck, False, False),
                       conv2d_input_grad_p: (ck, cols, og, True, False),
                       conv2d_weight_grad_p: (og, ck, cols, False, True)}[ins.prim]
    return blas.GemmShape(m, n, k, ta, tb, ins.inputs[0].dtype, ins.outputs[0].dtype)


@conv2d_p.def_lowering
def _lower_conv(low, ins) -> None:
    x, w = ins.inputs[:2]
    b = ins.inputs[2] if len(ins.inputs) == 3 else None
    y = ins.outputs[0]
    meta, nmeta, chunk = _meta(low, x.shape, w.shape, y.shape[2:], ins.kw)
    if direct_path(ins):
        xp, acc = _direct_scratch(x.dtype, x.shape, w.shape, y.shape[2:], ins.kw)
        low.call(CONV_DIRECT, x.dtype, [x, w, 0 if b is None else b, y, xp, xp.size, acc,
                                        acc.size, xp.shape[0], meta, nmeta, int(b is not None),
                                        int(ins.kw["relu"])], [y, xp, acc], list(ins.inputs), ins)
        return
    col, yt = _scratch(x.dtype, y.dtype, x.shape, w.shape, y.shape[2:], chunk)
    low.call(CONV_FORWARD.kernel(gemm_shape(ins)), x.dtype,
             [x, w, 0 if b is None else b, y, col, yt, meta, nmeta, int(b is not None),
              int(ins.kw["relu"])], [y, col, yt], list(ins.inputs), ins)


@conv2d_input_grad_p.def_lowering
def _lower_input_grad(low, ins) -> None:
    g, w = ins.inputs
    gx = ins.outputs[0]
    pads = transposed_padding(ins)
    if pads is not None:  # a direct convolution of g, gx its output (see the kernel)
        geom = dict(ins.kw, padding=pads)
        wt = Var((gx.shape[1], w.shape[0] // ins.kw["groups"], *w.shape[2:]), w.dtype)
        meta, nmeta, _ = _meta(low, g.shape, wt.shape, gx.shape[2:], geom)
        gp, acc = _direct_scratch(g.dtype, g.shape, wt.shape, gx.shape[2:], geom)
        low.call(CONV_DIRECT_INPUT_GRAD, g.dtype, [g, w, gx, wt, gp, gp.size, acc, acc.size,
                                                   gp.shape[0], meta, nmeta], [gx, wt, gp, acc],
                 [g, w], ins)
        return
    meta, nmeta, chunk = _meta(low, gx.shape, w.shape, g.shape[2:], ins.kw)
    gcol, gt = _scratch(gx.dtype, g.dtype, gx.shape, w.shape, g.shape[2:], chunk)
    low.call(CONV_INPUT_GRAD.kernel(gemm_shape(ins)), g.dtype,
             [g, w, gx, gt, gcol, meta, nmeta], [gx, gt, gcol], [g, w], ins)


@conv2d_weight_grad_p.def_lowering
def _lower_weight_grad(low, ins) -> None:
    x, g = ins.inputs
    gw = ins.outputs[0]
    meta, nmeta, chunk = _meta(low, x.shape, gw.shape, g.shape[2:], ins.kw)
    if direct_path(ins):
        xp, acc = _direct_scratch(x.dtype, x.shape, gw.shape, g.shape[2:], ins.kw)
        parts = Var((xp.shape[0], gw.size), gw.dtype)  # per slot (unused with one slot)
        low.call(CONV_DIRECT_WEIGHT_GRAD, x.dtype, [x, g, gw, xp, xp.size, acc, acc.size, parts,
                                                    xp.shape[0], meta, nmeta],
                 [gw, xp, acc, parts], [x, g], ins)
        return
    col, gt = _scratch(x.dtype, g.dtype, x.shape, gw.shape, g.shape[2:], chunk)
    low.call(CONV_WEIGHT_GRAD.kernel(gemm_shape(ins)), x.dtype,
             [x, g, gw, col, gt, meta, nmeta], [gw, col, gt], [x, g], ins)


def _conv_flops(ins) -> int:
    """2·N·O·OH·OW·(C/groups)·KH·KW: the GEMM work, the same for the three."""
    kw = ins.kw
    if ins.prim is conv2d_p:
        (n, _, oh, ow), (o, cg, kh, kwid) = ins.outputs[0].shape, ins.inputs[1].shape
    elif ins.prim is conv2d_input_grad_p:
        (n, o, oh, ow), (_, cg, kh, kwid) = ins.inputs[0].shape, ins.inputs[1].shape
    else:
        (n, o, oh, ow), (kh, kwid) = ins.inputs[1].shape, kw["k"]
        cg = ins.inputs[0].shape[1] // kw["groups"]
    return 2 * n * o * oh * ow * cg * kh * kwid


def _conv_label(ins) -> str:
    kw = ins.kw
    parts = []
    if kw["stride"] != (1, 1):
        parts.append(f"stride {kw['stride'][0]},{kw['stride'][1]}")
    if any(kw["padding"]):
        parts.append("pad " + ",".join(map(str, kw["padding"])))
    if kw["dilation"] != (1, 1):
        parts.append(f"dilation {kw['dilation'][0]},{kw['dilation'][1]}")
    if kw["groups"] != 1:
        parts.append(f"groups {kw['groups']}")
    if kw.get("relu"):
        parts.append("+relu")
    if ins.prim is conv2d_p and len(ins.inputs) == 3:
        parts.append("+bias")
    return " " + " ".join(parts) if parts else ""


for _p in CONVS:
    _p.def_cost(_conv_flops)
    _p.def_label(_conv_label)


@E.relu_p.def_simplify
def _absorb_relu(ins, producer):
    """relu(conv2d(...)) is the convolution with relu in its epilogue: one pass over the
    output instead of two. (relu's VJP reads relu's result, which stays the same Var; the
    convolution without relu is left for DCE unless something else reads it.)"""
    src = producer.get(ins.inputs[0])
    if src is None or src.prim is not conv2d_p or src.kw["relu"]:
        return None
    params = tuple(sorted(dict(src.kw, relu=True).items()))
    return dataclasses.replace(ins, prim=conv2d_p, inputs=src.inputs, params=params)
