"""One owner for threads: Numba's threading layer and BLAS share JITGRAD_NUM_THREADS.

BLAS threads and Numba threads fight when they alternate on a busy machine
(NUMBA_NOTES.md), so both get the same count, set once here.
"""

from __future__ import annotations

import os
import warnings

import numba

_initialised = False


def num_threads() -> int:
    env = os.environ.get("JITGRAD_NUM_THREADS")
    return max(1, int(env)) if env else (os.cpu_count() or 1)


def init() -> None:
    global _initialised
    if _initialised:
        return
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
    numba.set_num_threads(min(num_threads(), numba.config.NUMBA_NUM_THREADS))
    _initialised = True


def limit_blas() -> None:
    """Give every loaded BLAS (numpy's and scipy's OpenBLAS, MKL) the same thread count."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(num_threads(), user_api="blas")
