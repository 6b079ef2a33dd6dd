"""Generated-glue prototype: straight-line calls into the kernel library.

Two glue flavours from the same random program of N kernel calls:
  extern : calls cfuncs by symbol name via numba.types.ExternalFunction,
           arguments = int64 base address + byte offsets, int64 dims
  njit   : calls the @njit(cache=True) helpers directly on arena views
           (LLVM links/inlines them into the glue)
Glue source is written atomically to <cache_dir>/<prefix>_<hash>.py and
imported with importlib; the function is @njit(cache=True).
"""
import hashlib
import importlib.util
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

S = 256            # slot size (floats): every tensor is 16x16 float32
D = 16
ISZ = 4            # bytes per float32

# kind -> (kernel symbol, C signature as source text)
SIGS = {
    "mm_nn": "V(P, P, P, I, I, I)", "mm_tn": "V(P, P, P, I, I, I)",
    "mm_nt": "V(P, P, P, I, I, I)", "add": "V(P, P, P, I)",
    "mul": "V(P, P, P, I)", "scale": "V(P, F, P, I)", "relu": "V(P, P, I)",
    "relu_bwd": "V(P, P, P, I)", "tanh": "V(P, P, I)",
    "tanh_bwd": "V(P, P, P, I)", "bias_add": "V(P, P, P, I, I)",
    "bias_grad": "V(P, P, I, I)", "sgd": "V(P, P, F, I)",
}
KINDS = ["mm_nn", "mm_tn", "mm_nt", "add", "mul", "scale", "relu",
         "relu_bwd", "tanh_bwd", "bias_add", "bias_grad", "sgd"]


def make_program(n, seed=0):
    """List of (kind, in-slots, out-slot, extra).  Exactly n calls."""
    rng = np.random.default_rng(seed)
    prog, nslots = [], 4            # slots 0..3 are inputs
    while len(prog) < n:
        k = KINDS[rng.integers(len(KINDS))]
        if k.startswith("mm") and len(prog) > n - 2:
            k = "add"
        a, b = (int(v) for v in rng.integers(0, nslots, 2))
        if k == "sgd":              # in place on an existing slot
            prog.append((k, (a, b), a, 0.1))
            continue
        out = nslots
        nslots += 1
        prog.append((k, (a, b), out, 0.5))
        if k.startswith("mm"):      # squash so values stay bounded
            prog.append(("tanh", (out,), nslots, None))
            nslots += 1
    return prog, nslots


def numpy_ref(prog, arena):
    v = lambda s: arena[s * S:(s + 1) * S]
    m = lambda s: v(s).reshape(D, D)
    for k, ins, out, x in prog:
        a = ins[0]
        b = ins[1] if len(ins) > 1 else None
        if k == "mm_nn": m(out)[:] = m(a) @ m(b)
        elif k == "mm_tn": m(out)[:] = m(a).T @ m(b)
        elif k == "mm_nt": m(out)[:] = m(a) @ m(b).T
        elif k == "add": v(out)[:] = v(a) + v(b)
        elif k == "mul": v(out)[:] = v(a) * v(b)
        elif k == "scale": v(out)[:] = v(a) * np.float32(x)
        elif k == "relu": v(out)[:] = np.maximum(v(a), 0)
        elif k == "relu_bwd": v(out)[:] = np.where(v(b) > 0, v(a), 0)
        elif k == "tanh": v(out)[:] = np.tanh(v(a))
        elif k == "tanh_bwd": v(out)[:] = v(a) * (1 - v(b) * v(b))
        elif k == "bias_add": m(out)[:] = m(a) + v(b)[:D]
        elif k == "bias_grad": v(out)[:D] = m(a).sum(0)
        elif k == "sgd": v(a)[:] -= np.float32(x) * v(b)
    return arena


def _call_args(k, ins, out, x, ptr, arr):
    """Argument list text; ptr(s) / arr(s, shape) render one operand."""
    a = ins[0]
    b = ins[1] if len(ins) > 1 else None
    if k in ("mm_nn", "mm_tn", "mm_nt"):
        return [ptr(a, 2), ptr(b, 2), ptr(out, 2)], [D, D, D]
    if k in ("add", "mul", "relu_bwd", "tanh_bwd"):
        return [ptr(a, 1), ptr(b, 1), ptr(out, 1)], [S]
    if k == "scale":
        return [ptr(a, 1), repr(x), ptr(out, 1)], [S]
    if k in ("relu", "tanh"):
        return [ptr(a, 1), ptr(out, 1)], [S]
    if k == "bias_add":
        return [ptr(a, 2), ptr(b, "b"), ptr(out, 2)], [D, D]
    if k == "bias_grad":
        return [ptr(a, 2), ptr(out, "b")], [D, D]
    if k == "sgd":
        return [ptr(a, 1), ptr(b, 1), repr(x)], [S]
    raise KeyError(k)


def gen_extern(prog):
    used = sorted({k for k, *_ in prog})
    lines = ["import numpy as np",
             "from numba import njit, types",
             "P = types.intp; I = types.int64; F = types.float64; V = types.void"]
    for k in used:
        lines.append(f'jg_{k}_f32 = types.ExternalFunction("jg_{k}_f32", {SIGS[k]})')
    lines += ["", "", "@njit(cache=True)", "def glue(b):"]
    ptr = lambda s, _r: f"b + {s * S * ISZ}" if s else "b"
    for k, ins, out, x in prog:
        p, dims = _call_args(k, ins, out, x, ptr, None)
        lines.append(f"    jg_{k}_f32({', '.join(p + [str(d) for d in dims])})")
    return "\n".join(lines) + "\n"


NJ = {"mm_nn": "_mm_nn", "mm_tn": "_mm_tn", "mm_nt": "_mm_nt", "add": "_add",
      "mul": "_mul", "scale": "_scale", "relu": "_relu", "relu_bwd": "_relu_bwd",
      "tanh": "_tanh", "tanh_bwd": "_tanh_bwd", "bias_add": "_bias_add",
      "bias_grad": "_bias_grad", "sgd": "_sgd"}


def gen_njit(prog):
    used = sorted({NJ[k] for k, *_ in prog})
    lines = ["import numpy as np", "from numba import njit",
             f"from kernels import {', '.join(used)}", "", "",
             "@njit(cache=True)", "def glue(x):"]

    def ptr(s, r):
        o = s * S
        if r == 1: return f"x[{o}:{o + S}]"
        if r == 2: return f"x[{o}:{o + S}].reshape(({D}, {D}))"
        return f"x[{o}:{o + D}]"
    for k, ins, out, xx in prog:
        p, _dims = _call_args(k, ins, out, xx, ptr, None)
        if k == "scale": p = [p[0], p[1], p[2]]
        if k == "sgd": p = [p[0], p[1], p[2]]
        lines.append(f"    {NJ[k]}({', '.join(p)})")
    return "\n".join(lines) + "\n"


def load_glue(src, cache_dir, prefix="glue", extra_key=""):
    """Content-addressed module file, written atomically, then imported."""
    import numba, llvmlite
    key = hashlib.sha256((src + numba.__version__ + llvmlite.__version__ +
                          np.__version__ + extra_key).encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{prefix}_{key}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(src)
        try:
            os.link(tmp, path)        # never overwrite an existing file
        except FileExistsError:
            pass
        os.unlink(tmp)
    name = f"{prefix}_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    # must be in sys.modules: a cache hit rebuilds the function's Environment
    # by importing its module name (else ModuleNotFoundError: '<dynamic>')
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
