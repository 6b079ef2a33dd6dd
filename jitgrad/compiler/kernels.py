"""Library kernels: declared beside the primitives that call them, compiled on first use.

A kernel is an @njit helper (in the module of the primitives it serves) plus a
`Kernel` declaration beside it: its C argument list, once, and the body of the
C-ABI wrapper that views those addresses as arrays and calls the helper. Each
(kernel, dtype) is a `numba.cfunc` of its own module, compiled (or loaded from
the sealed cache) only when a program first calls it, and registered with LLVM
by name (`llvmlite.binding.add_symbol`); generated glue declares it as an
external function. LLVM therefore cannot inline kernels into the glue, which
keeps the glue's compile time linear in program length (NUMBA_NOTES.md: an
inlined glue of 200 calls compiled in 21 s, an external-call glue in 0.8 s), and
the glue stays cacheable because it binds symbols by name, not by address.

A kernel module's key includes the hash of the file declaring the kernel, so a
changed kernel is never served stale; the helpers' own Numba files live in the
sealed cache directory too (`cache.njit`).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import NoLoweringError
from ..frontend.ir import dtype_short, numpy_name

# Variant tables: symbol suffix (ir.dtype_short) -> the numpy type the wrapper views memory as.
FLOATS = {dtype_short(d): numpy_name(d) for d in map(np.dtype, (np.float32, np.float64))}
WIDE_INTS = {dtype_short(d): numpy_name(d) for d in map(np.dtype, (np.int64, np.uint64))}
# Data movement only needs the item size: b1 .. b8, viewed as unsigned integers.
ITEM_SIZES = {f"b{d.itemsize}": numpy_name(d)
              for d in map(np.dtype, (np.uint8, np.uint16, np.uint32, np.uint64))}

# The start of every generated module of C-ABI functions: `_vp` turns an address
# (int64) into a pointer that numba.carray can view as an array.
CFUNC_PRELUDE = '''\
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def _vp(typingctx, addr):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(addr), codegen


@intrinsic
def _address_of(typingctx, name):
    # a C function's address, bound by name when the code is linked (so still cacheable)
    if not isinstance(name, types.StringLiteral):
        return None
    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
            ir.IntType(64), ()), name.literal_value)
        return builder.ptrtoint(fn, ir.IntType(64))
    return types.int64(name), codegen


I = types.int64
'''

_by_symbol: dict[str, tuple[Kernel, str]] = {}
_by_name: dict[str, list[Kernel]] = {}


class Kernel:
    """A library kernel's C-ABI entry point, declared once beside its helper.

    args: the C argument names (all int64: addresses, sizes, flags). body: the wrapper's
    body, `{dt}` standing for the variant's numpy type and `K` for the declaring module.
    variants: FLOATS, WIDE_INTS or ITEM_SIZES. can_fail: the kernel checks its data
    (indices, labels) and returns nonzero when it rejects it. uses_blas: it calls BLAS
    (whose threads threads.limit_blas sets once BLAS is loaded). library: for a kernel
    calling an optional native library by name, a function that loads it and registers
    its symbols, returning False when the library is missing (the kernel then cannot
    load, and `ensure_loaded` leaves it out). outs: suffix -> the numpy type `{out}` stands
    for (a mixed-precision product's result; `{dt}`'s when not given). calls: kernels whose
    variant of the same suffix the body calls by address (`_address_of("jg_<name>_{suffix}")`):
    loaded first.
    """

    def __init__(self, name: str, args: str, body: str, variants: dict[str, str], *,
                 can_fail: bool = False, uses_blas: bool = False, module: str | None = None,
                 library: Callable[[], bool] | None = None, outs: dict[str, str] | None = None,
                 calls: tuple[Kernel, ...] = ()):
        self.name = name
        self.args = args.split()
        self.body = body
        self.variants = variants
        self.can_fail = can_fail
        self.uses_blas = uses_blas
        self.library = library
        self.outs = outs or variants
        self.calls = calls
        self.module = module or sys._getframe(1).f_globals["__name__"]
        for suffix in variants:
            sym = f"jg_{name}_{suffix}"
            if sym in _by_symbol:
                raise NoLoweringError(f"kernel {sym} declared twice")
            _by_symbol[sym] = (self, suffix)
        _by_name.setdefault(name, []).append(self)

    def __repr__(self) -> str:
        return f"Kernel({self.name})"

    @property
    def by_item_size(self) -> bool:
        return self.variants is ITEM_SIZES

    def variant_dtypes(self) -> list[np.dtype]:
        return [np.dtype(t.removeprefix("np.")) for t in self.variants.values()]

    def suffix(self, dtype: np.dtype) -> str | None:
        dtype = np.dtype(dtype)
        suffix = f"b{dtype.itemsize}" if self.by_item_size else dtype_short(dtype)
        return suffix if suffix in self.variants else None

    def symbol(self, dtype: np.dtype) -> str:
        """The C symbol of the variant for dtype; NoLoweringError if there is none."""
        suffix = self.suffix(dtype)
        if suffix is None:
            raise NoLoweringError(_no_variant(self.name, [self], dtype))
        return f"jg_{self.name}_{suffix}"

    def source(self, suffix: str) -> str:
        """The module defining the C-ABI wrapper of one variant."""
        lines = self.body.format(dt=self.variants[suffix], out=self.outs[suffix],
                                 suffix=suffix).split("\n")
        return (CFUNC_PRELUDE + f"import {self.module} as K\n\n\n"
                f"@cfunc(types.int64({', '.join(['I'] * len(self.args))}), cache=True)\n"
                f"def jg_{self.name}_{suffix}({', '.join(self.args)}):\n"
                + "\n".join("    " + ln for ln in lines) + "\n")


def _no_variant(name: str, kernels: list[Kernel], dtype: Any) -> str:
    if all(k.by_item_size for k in kernels):
        sizes = ", ".join(s[1:] for k in kernels for s in k.variants)
        return f"its {name} kernel moves items of {sizes} bytes, not {np.dtype(dtype)}"
    names = ", ".join(d.name for k in kernels for d in k.variant_dtypes())
    return f"its {name} kernel takes {names}, not {np.dtype(dtype)}"


def symbol(name: str, dtype: Any) -> str:
    """The C symbol of the library kernel called `name` for dtype (float and integer
    variants may be declared as two kernels of one name)."""
    kernels = _by_name.get(name)
    if not kernels:
        raise NoLoweringError(f"no library kernel is called {name!r}")
    for k in kernels:
        if k.suffix(dtype) is not None:
            return k.symbol(dtype)
    raise NoLoweringError(_no_variant(name, kernels, dtype))


@functools.cache  # a loaded module's file, as Numba's own cache assumes, does not change
def _file_hash(module: str) -> str:
    with open(sys.modules[module].__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def library_hash() -> str:
    """Identifies the kernel library (this file and every file declaring kernels): any
    change to it changes every generated key."""
    modules = sorted({__name__} | {k.module for k, _ in _by_symbol.values()})
    return hashlib.sha256("".join(_file_hash(m) for m in modules).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading

_registered: set[str] = set()
_functions: dict[str, Any] = {}  # symbol -> its numba cfunc (callable through .ctypes)
_lock = threading.RLock()
_load_seconds = 0.0  # spent compiling or loading library kernels, for the compile benchmark


def register_symbols(module: Any, names: Iterable[str]) -> None:
    """Make a loaded module's C-ABI functions callable by name from generated code."""
    import llvmlite.binding as llb
    with _lock:
        for name in names:
            if name not in _registered:
                fn = getattr(module, name)
                llb.add_symbol(name, fn.address)
                _functions[name] = fn
                _registered.add(name)


def is_registered(sym: str) -> bool:
    return sym in _registered


def function(sym: str) -> Any:
    """The ctypes callable of a loaded kernel or generated loop (profiling calls it)."""
    return _functions[sym].ctypes


def require(symbols: Iterable[str]) -> None:
    """Compile (or load from the cache) and register the library kernels among symbols that
    are not loaded yet; other symbols (generated loops) are left to their caller."""
    global _load_seconds
    from . import cache, threads
    with _lock:
        missing = sorted(s for s in set(symbols) if s in _by_symbol and s not in _registered)
        if not missing:
            return
        start = time.perf_counter()
        threads.init()
        blas = False
        order: list[str] = []
        for sym in missing:  # what a kernel calls by address is loaded before it
            kernel, suffix = _by_symbol[sym]
            order += [f"jg_{c.name}_{suffix}" for c in kernel.calls] + [sym]
        for sym in dict.fromkeys(s for s in order if s not in _registered):
            kernel, suffix = _by_symbol[sym]
            if kernel.library is not None and not kernel.library():
                raise NoLoweringError(f"kernel {sym} calls a library that is not installed")
            module = cache.load_module("kernels", kernel.source(suffix),
                                       extra_key=_file_hash(kernel.module) + _file_hash(__name__))
            register_symbols(module, [sym])
            blas = blas or kernel.uses_blas
        if blas:
            threads.limit_blas()  # now that Numba has loaded scipy's BLAS, threadpoolctl sees it
        _load_seconds += time.perf_counter() - start


def load_seconds() -> float:
    """Seconds this process has spent compiling or loading library kernels."""
    return _load_seconds


def declared_symbols() -> list[str]:
    return sorted(_by_symbol)


def ensure_loaded() -> None:
    """Compile (or load) every declared kernel: for warming a cache ahead of use. (The
    modules declaring them are imported with the package.)"""
    require(s for s, (k, _) in _by_symbol.items() if k.library is None or k.library())


__all__ = ["CFUNC_PRELUDE", "FLOATS", "ITEM_SIZES", "Kernel", "WIDE_INTS", "ensure_loaded",
           "library_hash", "register_symbols", "require", "symbol"]
