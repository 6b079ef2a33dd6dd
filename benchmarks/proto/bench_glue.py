"""Compile / cache-load timing of generated glue.

  python bench_glue.py one MODE N CACHE_DIR   # one process, prints a JSON line
  python bench_glue.py sweep OUT.jsonl [N ...]  # drives fresh processes
MODE: extern (cfunc via ExternalFunction) | njit (inlined @njit helpers)
"""
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(mode, n, cache_dir):
    t0 = time.perf_counter()
    import numpy as np
    import numba
    t1 = time.perf_counter()
    sys.path.insert(0, HERE)
    import kernels                      # loads 32 cached cfuncs + add_symbol
    t2 = time.perf_counter()
    import glue as G
    prog, nslots = G.make_program(n)
    src = G.gen_extern(prog) if mode == "extern" else G.gen_njit(prog)
    mod = G.load_glue(src, cache_dir, prefix=f"{mode}{n}")
    f = mod.glue
    rng = np.random.default_rng(1)
    arena = np.zeros(nslots * G.S, np.float32)
    arena[:4 * G.S] = rng.standard_normal(4 * G.S).astype(np.float32)
    ref = G.numpy_ref(prog, arena.copy())
    arg = arena.ctypes.data if mode == "extern" else arena
    t3 = time.perf_counter()
    f(arg)                              # compile or load from cache
    t4 = time.perf_counter()
    err = float(np.max(np.abs(arena - ref)) / (np.max(np.abs(ref)) + 1e-30))
    # steady-state call time
    ts = []
    for _ in range(5):
        a = time.perf_counter(); f(arg); ts.append(time.perf_counter() - a)
    st = f.stats
    return dict(mode=mode, n=n, numba_import=t1 - t0, kernels_load=t2 - t1,
                first_call=t4 - t3, call_us=1e6 * min(ts), relerr=err,
                cache_hits=sum(st.cache_hits.values()),
                cache_misses=sum(st.cache_misses.values()),
                layer=numba.threading_layer() if mode == "x" else None)


def sweep(out, ns, rounds=3, modes=("extern", "njit"), njit_max=200):
    base = "/tmp/jg_proto_glue"
    with open(out, "a") as fo:
        for n in ns:
            for r in range(rounds):
                for mode in modes:
                    if mode == "njit" and n > njit_max:
                        continue
                    cd = os.path.join(base, f"{mode}_{n}_{r}")
                    shutil.rmtree(cd, ignore_errors=True)
                    for phase in ("cold", "warm", "warm"):
                        p = subprocess.run([sys.executable, __file__, "one", mode,
                                            str(n), cd], capture_output=True, text=True)
                        if p.returncode:
                            print(p.stderr[-2000:]); raise SystemExit(1)
                        d = json.loads(p.stdout.strip().splitlines()[-1])
                        d.update(phase=phase, round=r)
                        print(json.dumps(d), flush=True)
                        fo.write(json.dumps(d) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "one":
        print(json.dumps(one(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
    else:
        ns = [int(x) for x in sys.argv[3:]] or [10, 50, 200, 800]
        sweep(sys.argv[2], ns)
