"""Direct numpy references for convolution and pooling, written from the definitions (one
output position at a time) and independent of jitgrad's own references: the tests' oracle
next to torch's stored results."""

from __future__ import annotations

import numpy as np


def _pair(v):
    return (v, v) if np.isscalar(v) else tuple(v)


def np_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """y[n, o, i, j] = b[o] + Σ_{c in o's group, kh, kw} x_pad[n, c, i·s + kh·d, j·s + kw·d]
    · w[o, c, kh, kw]; padding an int, a pair or (top, bottom, left, right)."""
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    pad = _pair(padding)
    pt, pb, pl, pr = (pad[0], pad[0], pad[1], pad[1]) if len(pad) == 2 else pad
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    og = o // groups
    y = np.zeros((n, o, oh, ow), np.result_type(x, w))
    for g in range(groups):
        wg = w[g * og:(g + 1) * og]
        xg = xp[:, g * cg:(g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                patch = xg[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                           j * sw:j * sw + dw * (kw - 1) + 1:dw]
                y[:, g * og:(g + 1) * og, i, j] = np.tensordot(patch, wg, ([1, 2, 3], [1, 2, 3]))
    if b is not None:
        y = y + b[None, :, None, None]
    return y


def _pool(x, kernel, stride, padding, fill, reduce):
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    y = np.zeros((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            y[:, :, i, j] = reduce(xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw])
    return y


def np_max_pool2d(x, kernel, stride=None, padding=0):
    return _pool(x, kernel, stride, padding, -np.inf, lambda p: p.max(axis=(2, 3)))


def np_avg_pool2d(x, kernel, stride=None, padding=0):
    """count_include_pad=True: the zero padding counts in every window's mean."""
    kh, kw = _pair(kernel)
    return _pool(x, kernel, stride, padding, 0.0, lambda p: p.sum(axis=(2, 3)) / (kh * kw))


def _conv_taps(g_shape, w, xshape, stride, padding, dilation, groups):
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    o, cg, kh, kw = w.shape
    og = o // groups
    for gr in range(groups):
        for i in range(g_shape[2]):
            for j in range(g_shape[3]):
                rows = slice(i * sh, i * sh + dh * (kh - 1) + 1, dh)
                cols = slice(j * sw, j * sw + dw * (kw - 1) + 1, dw)
                yield gr, og, cg, i, j, rows, cols


def np_conv2d_input_grad(g, w, xshape, stride=1, padding=0, dilation=1, groups=1):
    """Σ over outputs of g[n, o, i, j] · w[o]: each output's gradient sent back to its taps."""
    ph, pw = _pair(padding)
    n, c, h, wd = xshape
    gp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw), g.dtype)
    for gr, og, cg, i, j, rows, cols in _conv_taps(g.shape, w, xshape, stride, padding,
                                                   dilation, groups):
        gp[:, gr * cg:(gr + 1) * cg, rows, cols] += np.tensordot(
            g[:, gr * og:(gr + 1) * og, i, j], w[gr * og:(gr + 1) * og], ([1], [0]))
    return gp[:, :, ph:ph + h, pw:pw + wd]


def np_conv2d_weight_grad(x, g, k, stride=1, padding=0, dilation=1, groups=1):
    """Σ over outputs and images of g[n, o, i, j] · (the input patch output (i, j) reads)."""
    ph, pw = _pair(padding)
    o = g.shape[1]
    cg = x.shape[1] // groups
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gw = np.zeros((o, cg, *k), g.dtype)
    w_like = np.empty((o, cg, *k))
    for gr, og, cg, i, j, rows, cols in _conv_taps(g.shape, w_like, x.shape, stride, padding,
                                                   dilation, groups):
        gw[gr * og:(gr + 1) * og] += np.tensordot(
            g[:, gr * og:(gr + 1) * og, i, j], xp[:, gr * cg:(gr + 1) * cg, rows, cols],
            ([0], [0]))
    return gw


def np_avg_pool2d_grad(g, xshape, kernel, stride=None, padding=0):
    kh, kw = _pair(kernel)
    sh, sw = _pair(kernel if stride is None else stride)
    ph, pw = _pair(padding)
    n, c, h, w = xshape
    gp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), g.dtype)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            gp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw] += g[:, :, i, j, None, None] / (
                kh * kw)
    return gp[:, :, ph:ph + h, pw:pw + w]


def np_max_pool2d_grad(g, positions, hw):
    """g added at the flat positions (into each H·W plane) max pooling chose."""
    n, c = g.shape[:2]
    out = np.zeros((n * c, hw[0] * hw[1]), g.dtype)
    for p in range(n * c):
        np.add.at(out[p], positions.reshape(n * c, -1)[p], g.reshape(n * c, -1)[p])
    return out.reshape(n, c, *hw)
