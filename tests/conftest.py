"""Shared test fixtures.

Tests that take the `backend` fixture run once per backend. By default (and in
CI) the Numba side runs a representative subset: cases marked `numba_full`
(e.g. every gradcheck row after the first of its primitive) run on the
interpreter only. `JITGRAD_TEST_FULL=1 python -m pytest` runs everything on both;
JITGRAD_TEST_BACKENDS=interpret (or numba) restricts the backends.

The bfloat16 GEMM provider is loaded wherever MKL is (JITGRAD_BF16_GEMM=1: MKL emulates
bfloat16 on CPUs without the instructions), so its kernels are tested on every x86-64
CPU, not only where it is fast; JITGRAD_BF16_GEMM=0 (or any other value) set by hand wins.
"""

import os

os.environ.setdefault("JITGRAD_BF16_GEMM", "1")  # before jitgrad loads any provider

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jitgrad as jg  # noqa: E402

ALL_BACKENDS = ("interpret", "numba")


def _backends() -> tuple[str, ...]:
    env = os.environ.get("JITGRAD_TEST_BACKENDS")
    return tuple(env.split(",")) if env else ALL_BACKENDS


def pytest_configure(config):
    config.addinivalue_line("markers", "numba_full: on the Numba backend only with "
                            "JITGRAD_TEST_FULL=1 (CI runs a representative subset there)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JITGRAD_TEST_FULL"):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        on_numba = params is not None and params.params.get("backend") == "numba"
        (drop if on_numba and item.get_closest_marker("numba_full") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=_backends())
def backend(request):
    """Runs the test with jit's default backend set to each backend in turn."""
    with jg.frontend.api.default_backend(request.param):
        yield request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)
