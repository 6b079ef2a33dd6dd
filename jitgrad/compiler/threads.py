"""One owner for threads: Numba's threading layer and BLAS share JITGRAD_NUM_THREADS.

BLAS threads and Numba threads fight when they alternate on a busy machine
(NUMBA_NOTES.md), so both get the same count, set once here. The BLAS meant is the
one Numba's `np.dot` calls (scipy's); numpy's own BLAS is the user's and is left
as it is.
"""

from __future__ import annotations

import os
import warnings

import numba

from ..errors import JitgradError

NUM_THREADS_VAR = "JITGRAD_NUM_THREADS"

# Below this many elements a library kernel runs on one thread. A parallel region costs ~2 µs
# on an idle machine, but on a loaded one its spinning threads starve BLAS's: row kernels
# (layer norm, masked softmax) run in parallel at 10^5 elements made a GPT training step
# 10x slower here, every GEMM around them included.
PARALLEL_MIN = 1 << 20
# A parallel sum down the rows gives each thread fixed blocks of this many columns (a fused
# column sum, layer norm's weight gradient): each column still adds its rows in order.
COLUMN_BLOCK = 256

_initialised = False
_local_ranks: int | None = None  # set from the communicator by distributed training


# Set for every rank by MPI launchers: MPICH's and Intel MPI's Hydra, Open MPI.
_LOCAL_RANKS_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def ranks_on_this_machine() -> int:
    """How many processes of an MPI job share this machine (1 outside mpiexec)."""
    if _local_ranks is not None:
        return _local_ranks
    for var in _LOCAL_RANKS_VARS:
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return 1


def num_threads() -> int:
    """JITGRAD_NUM_THREADS, else the cores divided among the MPI ranks on this machine:
    N ranks each spinning all cores' worth of threads would oversubscribe it N-fold."""
    default = max(1, (os.cpu_count() or 1) // ranks_on_this_machine())
    env = os.environ.get(NUM_THREADS_VAR, "").strip()
    if not env:
        return default
    if not (env.isascii() and env.isdigit() and int(env) >= 1):
        raise JitgradError(f"{NUM_THREADS_VAR}={env!r}: expected a whole number of threads "
                           f">= 1, such as 2 (unset it for the default, {default} here)")
    return int(env)


def prefer_passive_waiting() -> None:
    """Idle pool threads sleep instead of spinning, unless the user chose otherwise.

    Set before GNU OpenMP (Numba's omp layer, MKL's GNU layer) and scipy's OpenBLAS start
    their pools, which read these once. On a busy machine a spinning pool fights the
    neighbours and itself: a small MLP step beside other work took 27 ms with MKL's
    threads spinning, 1.5 ms with them waiting passively (OpenBLAS: 62 ms)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # 2^4 cycles' spinning, then sleep


def init() -> None:
    global _initialised
    if _initialised:
        return
    prefer_passive_waiting()
    # omp costs ~2 us per parallel region here, workqueue ~33 us and aborts when nested.
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "omp"
    try:
        numba.get_num_threads()  # launches the layer: cached parallel code needs its symbols
    except (ValueError, ImportError) as e:
        warnings.warn(f"jitgrad: the OpenMP threading layer is unavailable ({e}); "
                      "falling back to Numba's default layer", stacklevel=2)
        numba.config.THREADING_LAYER = "default"
        numba.get_num_threads()
    _set_numba_threads()
    _initialised = True


def _set_numba_threads() -> None:
    from . import blas
    numba.set_num_threads(min(num_threads(), numba.config.NUMBA_NUM_THREADS))
    blas.set_threads(numba.get_num_threads())  # MKL (when loaded) runs on the same pool


def set_local_ranks(n: int) -> int:
    """Tell the thread count how many ranks share this machine (when the launcher's
    variables do not say, or to trust the communicator); applies it at once if threads
    are already running. Returns the threads per rank now in force."""
    global _local_ranks
    _local_ranks = max(1, int(n))
    if _initialised:
        _set_numba_threads()
        limit_blas()
    return num_threads()


def numba_blas_paths() -> list[str]:
    """The loaded BLAS libraries Numba's `np.dot` calls: the ones scipy ships (Numba binds
    scipy.linalg.cython_blas). numpy's wheel bundles a BLAS of its own, which this leaves
    out; where numpy and scipy share one system BLAS (conda, distribution packages) it
    is numpy's too, and is left out as well, so that the user's numpy never changes."""
    import scipy
    from threadpoolctl import threadpool_info
    root = os.path.dirname(os.path.realpath(scipy.__file__))  # .../site-packages/scipy
    # wheels: scipy.libs/ beside the package (Linux, Windows), scipy/.dylibs (macOS)
    homes = (root + os.sep, root + ".libs" + os.sep)
    return [lib["filepath"] for lib in threadpool_info() if lib["user_api"] == "blas"
            and os.path.realpath(lib["filepath"]).startswith(homes)]


def limit_blas() -> None:
    """Give the BLAS Numba calls (numba_blas_paths) the thread count Numba has."""
    from threadpoolctl import threadpool_limits
    n = num_threads()
    threadpool_limits({path: n for path in numba_blas_paths()})
