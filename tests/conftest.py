"""Shared test fixtures.

Tests that take the `backend` fixture run once per backend. On CI the Numba
side runs a representative subset (JITGRAD_TEST_BACKENDS unset); set
JITGRAD_TEST_BACKENDS=interpret,numba to run everything on both.
"""

import os

import numpy as np
import pytest

import jitgrad as jg

ALL_BACKENDS = ("interpret", "numba")


def _backends() -> tuple[str, ...]:
    env = os.environ.get("JITGRAD_TEST_BACKENDS")
    return tuple(env.split(",")) if env else ALL_BACKENDS


@pytest.fixture(params=_backends())
def backend(request):
    """Runs the test with jit's default backend set to each backend in turn."""
    old = jg.api.DEFAULT_BACKEND
    jg.api.DEFAULT_BACKEND = request.param
    yield request.param
    jg.api.DEFAULT_BACKEND = old


@pytest.fixture
def rng():
    return np.random.default_rng(0)
