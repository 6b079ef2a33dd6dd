"""Random primitives: the Threefry-2x32 counter-based generator (20 rounds), as JAX's.

A key is a uint32[2] array. Every random value is a pure function of the key and the
value's position: element n of `random_bits(key, shape)` hashes the 64-bit counter n,
split into words (n >> 32, n & 0xffffffff), with the key, and combines the two output
words (xor for 32 bits or fewer, hi·2^32 + lo for 64). That is JAX's "partitionable"
layout (`jax_threefry_partitionable`, its default since jax 0.5), so results match
`jax.random` bit for bit, every element can be computed on its own (the kernels run in
parallel past PARALLEL_MIN elements), the compiled kernels agree bitwise with the numpy
references, and a new key -- an ordinary input -- never recompiles anything.

Derived keys follow JAX too: `split(key, n)[i]` is both output words for counter i,
`fold_in(key, d)` those for counter (0, d). `erf_inv` (for normal samples) and
`randint_offset` (for randint) are elementwise primitives that fusion inlines.
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import intrinsic, overload

from ...compiler.cache import njit
from ...compiler.kernels import Kernel
from ...errors import JitgradError
from ..core import primitive
from . import elementwise as E

KEY_SHAPE = (2,)
_KEY_DTYPE = np.dtype(np.uint32)
UNSIGNED = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64))
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# Below this many elements (~1.5 ms of hashing on one core) a kernel runs on one thread:
# a parallel region costs ~2 µs on an idle machine but, measured here on a loaded one,
# made a draw of 10^5 values 60x slower than the serial loop.
PARALLEL_MIN = 1 << 20

# ---------------------------------------------------------------- Threefry-2x32, numpy

_PARITY = 0x1BD11BDA
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Random123's Threefry-2x32-20 of the counters (x0, x1) (uint32 arrays of one shape)
    under key: JAX's `threefry2x32_p`."""
    u32 = np.uint32
    # 1-d arrays throughout: numpy warns on scalar overflow, and wrapping is the point here
    k = [key[0:1].astype(u32), key[1:2].astype(u32)]
    k.append(k[0] ^ k[1] ^ u32(_PARITY))
    shape = np.shape(x0)
    x0 = np.ravel(x0).astype(u32) + k[0]
    x1 = np.ravel(x1).astype(u32) + k[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << u32(r)) | (x1 >> u32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + k[(i + 1) % 3]
        x1 = x1 + k[(i + 2) % 3] + u32(i + 1)
    return x0.reshape(shape), x1.reshape(shape)


def _hash_positions(key: np.ndarray, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Both output words for the 64-bit counters start, start + 1, ..., start + n - 1."""
    c = np.arange(start, start + n, dtype=np.uint64)
    return threefry2x32(key, (c >> np.uint64(32)).astype(np.uint32),
                        (c & np.uint64(0xFFFFFFFF)).astype(np.uint32))


def _bits_ref(key: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    hi, lo = _hash_positions(key, 0, n)
    if dtype.itemsize == 8:
        bits = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    else:
        bits = (hi ^ lo).astype(dtype)  # narrower widths keep the low bits, as JAX's
    return bits.reshape(shape)


def _unit_ref(key: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Floats in [0, 1): random mantissa bits under the exponent of 1.0, minus 1 (JAX)."""
    uint = np.dtype(f"u{dtype.itemsize}")
    bits = _bits_ref(key, shape, uint)
    mantissa = np.finfo(dtype).nmant
    one = np.array(1.0, dtype).view(uint)
    floats = ((bits >> uint.type(8 * dtype.itemsize - mantissa)) | one).view(dtype)
    return floats - dtype.type(1)


def _pairs_ref(key: np.ndarray, start: int, n: int) -> np.ndarray:
    hi, lo = _hash_positions(key, start, n)
    return np.stack([hi, lo], axis=1)


# ---------------------------------------------------------------- primitives

def _check_key(key) -> None:
    if key != (KEY_SHAPE, _KEY_DTYPE):
        raise JitgradError(f"the key must be a uint32 array of shape (2,), as jg.random.key(seed) "
                           f"makes, got {np.dtype(key[1]).name}{list(key[0])}")


random_bits_p = primitive("random_bits", "random", grad="zero")
random_bits_p.def_impl(lambda key, *, shape, dtype: _bits_ref(key, shape, dtype))


@random_bits_p.def_shape
def _bits_shape(key, *, shape, dtype):
    _check_key(key)
    if dtype not in UNSIGNED:
        raise JitgradError(f"random bits are unsigned integers (uint8 to uint64), not {dtype}")
    return shape, dtype


random_uniform_p = primitive("random_uniform", "random", grad="zero")
random_uniform_p.def_impl(lambda key, *, shape, dtype: _unit_ref(key, shape, dtype))


@random_uniform_p.def_shape
def _uniform_shape(key, *, shape, dtype):
    _check_key(key)
    if dtype.kind != "f":
        raise JitgradError(f"uniform samples are floats, not {dtype}")
    return shape, dtype


random_split_p = primitive("random_split", "random", grad="zero")
random_split_p.def_impl(lambda key, *, num: _pairs_ref(key, 0, num))


@random_split_p.def_shape
def _split_shape(key, *, num):
    _check_key(key)
    return (num, 2), _KEY_DTYPE


# The data is read as int64 by the kernel, which hashes it as a counter.
random_fold_in_p = primitive("random_fold_in", "random", grad="zero", index_inputs=(1,))
random_fold_in_p.def_impl(lambda key, data: _pairs_ref(key, int(data), 1)[0])


@random_fold_in_p.def_shape
def _fold_in_shape(key, data):
    _check_key(key)
    if data != ((), _KEY_DTYPE):
        raise JitgradError(f"fold_in data must be a uint32 scalar, got "
                           f"{np.dtype(data[1]).name}{list(data[0])}")
    return KEY_SHAPE, _KEY_DTYPE


# ---------------------------------------------------------------- erf_inv

# Giles, "Approximating the erfinv function" (GPU Computing Gems, 2010), in the form XLA
# uses for jax.lax.erf_inv: w = -log1p(-x²), then per branch (w below `bound`) a
# polynomial in w - shift (or sqrt(w) - shift), times x.
_GILES = {
    np.dtype(np.float32): (
        (5.0, 2.5, False, (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                           0.00021858087, -0.00125372503, -0.00417768164, 0.246640727,
                           1.50140941)),
        (np.inf, 3.0, True, (-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844,
                             0.00573950773, -0.0076224613, 0.00943887047, 1.00167406,
                             2.83297682))),
    np.dtype(np.float64): (
        (6.25, 3.125, False, (
            -3.6444120640178196996e-21, -1.685059138182016589e-19, 1.2858480715256400167e-18,
            1.115787767802518096e-17, -1.333171662854620906e-16, 2.0972767875968561637e-17,
            6.6376381343583238325e-15, -4.0545662729752068639e-14, -8.1519341976054721522e-14,
            2.6335093153082322977e-12, -1.2975133253453532498e-11, -5.4154120542946279317e-11,
            1.051212273321532285e-09, -4.1126339803469836976e-09, -2.9070369957882005086e-08,
            4.2347877827932403518e-07, -1.3654692000834678645e-06, -1.3882523362786468719e-05,
            0.0001867342080340571352, -0.00074070253416626697512, -0.0060336708714301490533,
            0.24015818242558961693, 1.6536545626831027356)),
        (16.0, 3.25, True, (
            2.2137376921775787049e-09, 9.0756561938885390979e-08, -2.7517406297064545428e-07,
            1.8239629214389227755e-08, 1.5027403968909827627e-06, -4.013867526981545969e-06,
            2.9234449089955446044e-06, 1.2475304481671778723e-05, -4.7318229009055733981e-05,
            6.8284851459573175448e-05, 2.4031110387097893999e-05, -0.0003550375203628474796,
            0.00095328937973738049703, -0.0016882755560235047313, 0.0024914420961078508066,
            -0.0037512085075692412107, 0.005370914553590063617, 1.0052589676941592334,
            3.0838856104922207635)),
        (np.inf, 5.0, True, (
            -2.7109920616438573243e-11, -2.5556418169965252055e-10, 1.5076572693500548083e-09,
            -3.7894654401267369937e-09, 7.6157012080783393804e-09, -1.4960026627149240478e-08,
            2.9147953450901080826e-08, -6.7711997758452339498e-08, 2.2900482228026654717e-07,
            -9.9298272942317002539e-07, 4.5260625972231537039e-06, -1.9681778105531670567e-05,
            7.5995277030017761139e-05, -0.00021503011930044477347, -0.00013871931833623122026,
            1.0103004648645343977, 4.8499064014085844221))),
}


def _erf_inv_ref(x: np.ndarray) -> np.ndarray:
    t = x.dtype.type
    with np.errstate(invalid="ignore", divide="ignore"):
        w = -np.log1p(-x * x)
        out = np.full_like(x, np.nan)
        todo = np.ones(x.shape, bool)
        for bound, shift, root, coefs in _GILES[x.dtype]:
            here = todo & (w < t(bound))
            v = (np.sqrt(w) if root else w) - t(shift)
            p = np.full_like(x, coefs[0])
            for c in coefs[1:]:
                p = t(c) + p * v
            out[here] = (p * x)[here]
            todo &= ~here
        return np.where(np.abs(x) == t(1), x * t(np.inf), out)  # erf_inv(±1) = ±inf


def _erf_inv_helper(dtype: np.dtype) -> str:
    """The scalar function computing _erf_inv_ref's steps, in the same dtype and order."""
    t = f"np.{dtype.name}"
    lines = ["@njit(inline=\"always\")", f"def _jg_erf_inv{8 * dtype.itemsize}(x):",
             "    w = -np.log1p(-x * x)"]
    for k, (bound, shift, root, coefs) in enumerate(_GILES[dtype]):
        test = "else:" if bound == np.inf else f"{'if' if k == 0 else 'elif'} w < {t}({bound!r}):"
        lines += [f"    {test}", f"        v = {'np.sqrt(w)' if root else 'w'} - {t}({shift!r})",
                  f"        p = {t}({coefs[0]!r})"]
        lines += [f"        p = {t}({c!r}) + p * v" for c in coefs[1:]]
    lines += [f"    if abs(x) == {t}(1.0):", f"        return x * {t}(np.inf)", "    return p * x"]
    return "\n".join(lines) + "\n"


erf_inv_p = primitive("erf_inv", "elementwise")
erf_inv_p.def_impl(_erf_inv_ref)


@erf_inv_p.def_shape
def _erf_inv_shape(x):
    if x[1] not in _GILES:
        raise JitgradError(f"expects a float input, got {x[1]}")
    return x


@erf_inv_p.def_vjp
def _erf_inv_vjp(cts, outs, ins):
    y = outs[0]  # d/dx erf_inv(x) = sqrt(pi)/2 * exp(erf_inv(x)^2)
    return [cts[0] * (0.5 * np.sqrt(np.pi)) * E.exp(y * y)]


erf_inv_p.def_scalar(lambda ins, args: f"_jg_erf_inv{8 * ins.outputs[0].dtype.itemsize}({args[0]})",
                     "\n\n".join(_erf_inv_helper(d) for d in _GILES))


def erf_inv(x):
    """The inverse error function (Giles' approximation, as jax.lax.erf_inv)."""
    return erf_inv_p.bind(E.asdtype(x, E._float_dtype(x)))


# ---------------------------------------------------------------- randint's offsets

def _offset_ref(hi: np.ndarray, lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """JAX's randint: (hi·2^bits + lo) mod span from two draws, in wrapping unsigned
    arithmetic, with XLA's x % 0 == x (a span that wrapped to 0 stands for the full range)."""
    hi, lo, span = np.broadcast_arrays(hi, lo, span)
    t = hi.dtype.type
    zero = span == 0
    divisor = np.where(zero, t(1), span)

    def rem(x):
        return np.where(zero, x, x % divisor)

    m = rem(np.full(span.shape, 1 << (4 * hi.dtype.itemsize), hi.dtype))
    m = rem(m * m)
    return rem(rem(hi) * m + rem(lo))


def _offset_helper(dtype: np.dtype) -> str:
    t = f"np.{dtype.name}"
    return f'''@njit(inline="always")
def _jg_rand_offset_{dtype.name}(hi, lo, span):
    if span == 0:
        return {t}(lo)
    m = {t}({t}({1 << (4 * dtype.itemsize)}) % span)
    m = {t}({t}(m * m) % span)
    return {t}({t}({t}(hi % span) * m) + {t}(lo % span)) % span
'''


randint_offset_p = primitive("randint_offset", "elementwise", grad="zero")
randint_offset_p.def_impl(_offset_ref)


@randint_offset_p.def_shape
def _offset_shape(hi, lo, span):
    if not hi[1] == lo[1] == span[1] or hi[1] not in UNSIGNED:
        raise JitgradError(f"expects three arrays of one unsigned dtype, got {hi[1]}, {lo[1]} "
                           f"and {span[1]}")
    return E.broadcast_shapes(hi[0], lo[0], span[0]), hi[1]


randint_offset_p.def_scalar(
    lambda ins, args: f"_jg_rand_offset_{ins.outputs[0].dtype.name}({', '.join(args)})",
    "\n\n".join(_offset_helper(d) for d in UNSIGNED))

# ---------------------------------------------------------------- compiling

# The kernels hash in uint32: Numba widens each operation to 64 bits, and truncating
# right after it lets LLVM keep 32-bit lanes (and AVX-512's rotate), ~1.6x faster than
# masked int64 arithmetic.
_U32T = np.uint32


@njit()
def _rotl(x, r):
    return _U32T((x << r) | (x >> (32 - r)))


@njit()
def _four_rounds(x0, x1, r0, r1, r2, r3):
    x0 = _U32T(x0 + x1)
    x1 = _rotl(x1, r0) ^ x0
    x0 = _U32T(x0 + x1)
    x1 = _rotl(x1, r1) ^ x0
    x0 = _U32T(x0 + x1)
    x1 = _rotl(x1, r2) ^ x0
    x0 = _U32T(x0 + x1)
    x1 = _rotl(x1, r3) ^ x0
    return x0, x1


@njit()
def _threefry(k0, k1, c):
    """Both output words of Threefry-2x32-20 for the 64-bit counter c (as threefry2x32)."""
    k2 = _U32T(k0 ^ k1 ^ _U32T(_PARITY))
    x0 = _U32T(_U32T(c >> 32) + k0)
    x1 = _U32T(_U32T(c & 0xFFFFFFFF) + k1)
    x0, x1 = _four_rounds(x0, x1, 13, 15, 26, 6)
    x0, x1 = _U32T(x0 + k1), _U32T(x1 + k2 + 1)
    x0, x1 = _four_rounds(x0, x1, 17, 29, 16, 24)
    x0, x1 = _U32T(x0 + k2), _U32T(x1 + k0 + 2)
    x0, x1 = _four_rounds(x0, x1, 13, 15, 26, 6)
    x0, x1 = _U32T(x0 + k0), _U32T(x1 + k1 + 3)
    x0, x1 = _four_rounds(x0, x1, 17, 29, 16, 24)
    x0, x1 = _U32T(x0 + k1), _U32T(x1 + k2 + 4)
    x0, x1 = _four_rounds(x0, x1, 13, 15, 26, 6)
    return _U32T(x0 + k2), _U32T(x1 + k0 + 5)


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float with bits' bit pattern (uint32 -> float32, uint64 -> float64)."""
    ftype = types.float32 if bits.bitwidth == 32 else types.float64

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(ftype))
    return ftype(bits), codegen


@njit()
def _narrow_bits(k0, k1, i):
    hi, lo = _threefry(k0, k1, i)
    return hi ^ lo


@njit()
def _wide_bits(k0, k1, i):
    hi, lo = _threefry(k0, k1, i)
    return (np.uint64(hi) << np.uint64(32)) | np.uint64(lo)


def _sample(k0, k1, i, out):
    """Element i of the draw out holds: random bits for unsigned integers, [0, 1) for floats."""


@overload(_sample)
def _sample_for(k0, k1, i, out):
    dt = out.dtype
    if dt == types.float32:
        def unit32(k0, k1, i, out):
            bits = _U32T((_narrow_bits(k0, k1, i) >> 9) | 0x3F800000)
            return _float_from_bits(bits) - np.float32(1.0)
        return unit32
    if dt == types.float64:
        def unit64(k0, k1, i, out):
            bits = (_wide_bits(k0, k1, i) >> np.uint64(12)) | np.uint64(0x3FF0000000000000)
            return _float_from_bits(bits) - 1.0
        return unit64
    if dt.bitwidth == 64:
        return lambda k0, k1, i, out: _wide_bits(k0, k1, i)
    return lambda k0, k1, i, out: _narrow_bits(k0, k1, i)  # stored, it keeps the low bits


@njit(cache=True, parallel=True)
def random_fill(key, out):
    """out[i] = _sample(key, i) for every i: on all threads when the draw is large."""
    k0, k1 = key[0], key[1]
    n = out.size
    if n < PARALLEL_MIN:
        for i in range(n):
            out[i] = _sample(k0, k1, i, out)
    else:
        for i in prange(n):
            out[i] = _sample(k0, k1, i, out)
    return 0


@njit(cache=True)
def key_pairs(key, start, out):
    """out[i] = both words for counter start + i: split's keys (start 0), fold_in's key."""
    k0, k1 = key[0], key[1]
    for i in range(out.shape[0]):
        out[i, 0], out[i, 1] = _threefry(k0, k1, start + i)
    return 0


FILL = Kernel("random_fill", "pkey pout n", (
    "return K.random_fill(carray(_vp(pkey), 2, np.uint32), carray(_vp(pout), n, {dt}))"),
    {f"{d.kind}{8 * d.itemsize}": f"np.{d.name}" for d in (*UNSIGNED, *_FLOATS)})
PAIRS = Kernel("random_pairs", "pkey pstart pout n", (
    "return K.key_pairs(carray(_vp(pkey), 2, np.uint32), carray(_vp(pstart), 1, np.int64)[0], "
    "carray(_vp(pout), (n, 2), {dt}))"), {"u32": "np.uint32"})


def _lower_fill(low, ins) -> None:
    key, out = ins.inputs[0], ins.outputs[0]
    low.call(FILL, out.dtype, [key, out, out.size], [out], [key], ins)


random_bits_p.def_lowering(_lower_fill)
random_uniform_p.def_lowering(_lower_fill)


@random_split_p.def_lowering
def _lower_split(low, ins) -> None:
    key, out = ins.inputs[0], ins.outputs[0]
    start, _ = low.meta_block([0])
    low.call(PAIRS, _KEY_DTYPE, [key, start, out, out.shape[0]], [out], [key], ins)


@random_fold_in_p.def_lowering
def _lower_fold_in(low, ins) -> None:
    (key, data), out = ins.inputs, ins.outputs[0]
    low.call(PAIRS, _KEY_DTYPE, [key, data, out, 1], [out], [key, data], ins)
