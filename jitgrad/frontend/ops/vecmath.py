"""libm calls that fused loops vectorise: glibc's libmvec through LLVM's vector-function ABI.

numpy evaluates sin, exp, arctan, ... with SIMD kernels (16 float32 lanes at a time under
AVX-512); a Numba loop calling the scalar libm function runs one element at a time, 10 to
50 times slower (benchmarks/numpy_surface.py). Numba's llvmlite has no SVML here, but glibc
ships libmvec, vector versions of those functions (`_ZGVdN8v_sinf`: AVX2, 8 lanes;
`_ZGVeN16v_sinf`: AVX-512, 16 lanes). Each function below is an intrinsic calling the scalar
libm function, declared with the `vector-function-abi-variant` attribute naming its libmvec
versions, so LLVM's loop vectoriser replaces a loop's calls by vector calls (the remainder
of the loop stays scalar). The vector declarations are kept in `llvm.compiler.used` until
the vectoriser has looked for them.

Only variants this CPU can run and this libmvec has are named; without libmvec (another C
library, glibc < 2.22) the loops call the scalar functions as before. libmvec's functions
are within 4 ulp of the correctly rounded result, as numpy's SIMD ones are.
"""

from __future__ import annotations

import hashlib

import llvmlite.binding as llb
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _load_libmvec() -> bool:
    try:
        llb.load_library_permanently("libmvec.so.1")
    except RuntimeError:
        return False
    return True


_HAVE_LIBMVEC = _load_libmvec()
_CPU = llb.get_host_cpu_features()
# (libmvec ISA letter, vector bits, CPU feature)
_ISAS = (("d", 256, "avx2"), ("e", 512, "avx512f"))


def _variants(name: str, n_args: int, bits: int) -> list[tuple[int, str]]:
    """(lanes, symbol) of each libmvec version of libm's `name` this machine can call."""
    if not _HAVE_LIBMVEC:
        return []
    out = []
    for isa, width, feature in _ISAS:
        lanes = width // bits
        symbol = f"_ZGV{isa}N{lanes}{'v' * n_args}_{name}"
        if _CPU.get(feature) and llb.address_of_symbol(symbol):
            out.append((lanes, symbol))
    return out


def _keep_alive(module: ir.Module, functions: list[ir.Function]) -> None:
    """Add functions to the module's llvm.compiler.used (optimisation must not drop them)."""
    ptr = ir.IntType(8).as_pointer()
    used = module.globals.get("llvm.compiler.used")
    members = list(used.initializer.constant) if used is not None else []
    members += [f.bitcast(ptr) for f in functions]
    if used is None:
        used = ir.GlobalVariable(module, ir.ArrayType(ptr, len(members)), "llvm.compiler.used")
        used.linkage = "appending"
        used.section = "llvm.metadata"
    used.value_type = ir.ArrayType(ptr, len(members))  # nothing else refers to it
    used.initializer = ir.Constant(used.value_type, members)


def _declare(module: ir.Module, name: str, fty: ir.Type, n_args: int) -> ir.Function:
    """libm's scalar `name`, declared with the libmvec versions LLVM may call instead."""
    fn = cgutils.get_or_insert_function(module, ir.FunctionType(fty, [fty] * n_args), name)
    if "nounwind" in fn.attributes:  # declared by an earlier call in this module
        return fn
    bits = 32 if isinstance(fty, ir.FloatType) else 64
    mapping, vector_fns = [], []
    for lanes, symbol in _variants(name, n_args, bits):
        vty = ir.VectorType(fty, lanes)
        vector_fns.append(cgutils.get_or_insert_function(
            module, ir.FunctionType(vty, [vty] * n_args), symbol))
        mapping.append(f"_ZGV_LLVM_N{lanes}{'v' * n_args}_{name}({symbol})")
    fn.attributes.add("nounwind")
    # AttributeSet accepts known names only; these two are written out verbatim
    set.add(fn.attributes, "memory(none)")  # as llvm.sin is: errno is not read
    if mapping:
        set.add(fn.attributes, f'"vector-function-abi-variant"="{",".join(mapping)}"')
        _keep_alive(module, vector_fns)
    return fn


def _codegen(name: str, ty: types.Float, n_args: int):
    def codegen(context, builder, signature, llargs):
        symbol = name + ("f" if ty == types.float32 else "")
        fn = _declare(builder.module, symbol, context.get_value_type(ty), n_args)
        return builder.call(fn, llargs)
    return codegen


def _libm(name: str, n_args: int):
    """An intrinsic calling libm's `name` (`namef` for float32) on float arguments of one
    type."""
    if n_args == 1:
        @intrinsic
        def call(typingctx, x):
            if isinstance(x, types.Float):
                return x(x), _codegen(name, x, 1)
            return None
    else:
        @intrinsic
        def call(typingctx, a, b):
            if isinstance(a, types.Float) and a == b:
                return a(a, b), _codegen(name, a, 2)
            return None
    call.__name__ = f"vm_{name}"
    return call


vm_sin, vm_cos, vm_tan = _libm("sin", 1), _libm("cos", 1), _libm("tan", 1)
vm_asin, vm_acos, vm_atan = _libm("asin", 1), _libm("acos", 1), _libm("atan", 1)
vm_sinh, vm_cosh = _libm("sinh", 1), _libm("cosh", 1)
vm_asinh, vm_acosh, vm_atanh = _libm("asinh", 1), _libm("acosh", 1), _libm("atanh", 1)
vm_exp, vm_exp2, vm_expm1 = _libm("exp", 1), _libm("exp2", 1), _libm("expm1", 1)
vm_log2, vm_log10, vm_log1p = _libm("log2", 1), _libm("log10", 1), _libm("log1p", 1)
vm_erf = _libm("erf", 1)
vm_atan2, vm_hypot = _libm("atan2", 2), _libm("hypot", 2)


def _stamp() -> str:
    """What the generated loops depend on here: this file, libmvec's presence, the ISAs."""
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    isas = "".join(isa for isa, _, feature in _ISAS if _CPU.get(feature))
    return f"{digest}-{'mvec' if _HAVE_LIBMVEC else 'nomvec'}-{isas}"


STAMP = _stamp()


def helper(*names: str) -> str:
    """Source importing the named intrinsics into a fused loop's module (the stamp makes the
    loop's symbol, hence its cache entry, change with what the call compiles to)."""
    return f"from jitgrad.frontend.ops.vecmath import {', '.join(names)}  # vecmath {STAMP}"
