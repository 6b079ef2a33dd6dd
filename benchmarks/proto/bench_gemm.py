"""GEMM provider benchmark: each provider in its own process, alternating rounds.

  python bench_gemm.py one PROV        # prints JSON lines {prov,dtype,shape,layout,gflops,us}
  python bench_gemm.py mix PROV        # thread-pool interplay with numba prange
  python bench_gemm.py sweep OUT.jsonl ROUNDS PROV...
PROV: f77 | npdot | mkl (JG_MKL_THREADING=gnu|intel) | pmm | smm
The timed loop is an @njit driver calling the cfunc by symbol name (like glue).
Run under: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(32, 64, 32), (64, 784, 128), (128, 784, 512), (128, 512, 512),
          (256, 2048, 2048)]                      # (batch M, in K, out N)
TINY_ONLY = {"pmm": 2, "smm": 2}                  # loops: first 2 shapes only


def drivers():
    from numba import njit, types
    import gemm_providers as g
    out = {}
    for (p, d), cf in g.GEMMS.items():
        if p == "mkl" and not g.HAVE_MKL:
            continue
        ext = types.ExternalFunction(f"jgk_gemm_{p}_{d}", g.GEMM_SIG)
        import llvmlite.binding as llb
        llb.add_symbol(f"jgk_gemm_{p}_{d}", cf.address)

        def make(ext=ext):
            @njit
            def drive(reps, ta, tb, pa, pb, pc, M, N, K):
                for _ in range(reps):
                    ext(ta, tb, pa, pb, pc, M, N, K)
            return drive
        out[(p, d)] = make()
    return out


def layouts(M, K, N):
    """(name, ta, tb, out rows, out cols, inner): forward and the 2 backward."""
    return [("X@W", 0, 0, M, N, K),        # Y = X W
            ("X.T@G", 1, 0, K, N, M),      # dW = X^T G
            ("G@W.T", 0, 1, M, K, N)]      # dX = G W^T


def one(prov):
    import numpy as np
    sys.path.insert(0, HERE)
    drv = drivers()
    rng = np.random.default_rng(0)
    for d, dt in (("f32", np.float32), ("f64", np.float64)):
        f = drv[(prov, d)]
        for si, (M, K, N) in enumerate(SHAPES):
            if si >= TINY_ONLY.get(prov, 99):
                continue
            for name, ta, tb, m, n, k in layouts(M, K, N):
                A = rng.standard_normal((k, m) if ta else (m, k)).astype(dt)
                B = rng.standard_normal((n, k) if tb else (k, n)).astype(dt)
                C = np.empty((m, n), dt)
                args = (ta, tb, A.ctypes.data, B.ctypes.data, C.ctypes.data, m, n, k)
                f(1, *args)
                R = (A.T if ta else A) @ (B.T if tb else B)
                err = float(np.abs(C - R).max() / np.abs(R).max())
                t0 = time.perf_counter(); f(3, *args); t1 = time.perf_counter()
                reps = max(3, int(0.08 / max((t1 - t0) / 3, 1e-7)))
                ts = []
                for _ in range(5):
                    t0 = time.perf_counter(); f(reps, *args)
                    ts.append((time.perf_counter() - t0) / reps)
                t = sorted(ts)[2]
                print(json.dumps(dict(prov=prov, dtype=d, shape=f"{M}x{K}x{N}",
                                      layout=name, us=t * 1e6,
                                      gflops=2 * m * n * k / t / 1e9, relerr=err)),
                      flush=True)


def mix(prov):
    """Alternate a GEMM (128x784x512 f32) with a numba prange kernel."""
    import numpy as np
    from numba import njit, types
    sys.path.insert(0, HERE)
    drv = drivers()
    import kernels
    f = drv[(prov, "f32")]
    relu = types.ExternalFunction("jg_relu_par_f32", kernels.KERNELS["jg_relu_par_f32"][1])

    @njit
    def both(reps, do_g, do_r, pa, pb, pc, px, py, n):
        for _ in range(reps):
            if do_g:
                f(1, 0, 0, pa, pb, pc, 128, 512, 784)
            if do_r:
                relu(px, py, n)
    M, K, N = 128, 784, 512
    A = np.random.rand(K, M).astype(np.float32)
    B = np.random.rand(K, N).astype(np.float32)
    C = np.empty((M, N), np.float32)
    x = np.random.randn(1 << 20).astype(np.float32)
    y = np.empty_like(x)
    res = {}
    for lab, g, r in (("gemm", 1, 0), ("prange", 0, 1), ("both", 1, 1)):
        args = (g, r, A.ctypes.data, B.ctypes.data, C.ctypes.data,
                x.ctypes.data, y.ctypes.data, x.size)
        both(2, *args)
        ts = []
        for _ in range(5):
            t0 = time.perf_counter(); both(200, *args)
            ts.append((time.perf_counter() - t0) / 200 * 1e6)
        res[lab] = sorted(ts)[2]
    import numba
    res.update(prov=prov, mkl_threading=os.environ.get("JG_MKL_THREADING", "gnu"),
               layer=numba.threading_layer(),
               slowdown=res["both"] / (res["gemm"] + res["prange"]))
    print(json.dumps(res), flush=True)


def sweep(out, rounds, provs):
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None); env.pop("OPENBLAS_L2_SIZE", None)
    with open(out, "a") as fo:
        for r in range(rounds):
            for prov in provs:
                e = dict(env)
                p = prov
                if prov.startswith("mkl_"):            # mkl_gnu / mkl_intel
                    p, e["JG_MKL_THREADING"] = "mkl", prov[4:]
                cp = subprocess.run([sys.executable, __file__, "one", p], env=e,
                                    capture_output=True, text=True)
                if cp.returncode:
                    print(cp.stderr[-3000:]); continue
                for line in cp.stdout.splitlines():
                    d = json.loads(line); d.update(round=r, prov=prov)
                    fo.write(json.dumps(d) + "\n")
                print(f"round {r} {prov} done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "one":
        one(sys.argv[2])
    elif sys.argv[1] == "mix":
        mix(sys.argv[2])
    else:
        sweep(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
