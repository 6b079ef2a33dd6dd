"""On-disk cache of generated modules, imported with Numba's own on-disk cache.

Numba cannot cache functions from exec'd source (numba issue 3501), so each
generated module is written to a file named by the hash of its source, the
versions involved and the kernel library, then imported from there. Files are
published atomically (temp file + link) and never rewritten in place.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from types import ModuleType

import llvmlite
import numba
import numpy as np

from .errors import JitgradError

_VERSION_KEY = f"jitgrad-0.1|numba-{numba.__version__}|llvmlite-{llvmlite.__version__}|" \
               f"numpy-{np.__version__}|py-{sys.version_info[:2]}"
_lock = threading.Lock()


def cache_dir() -> str:
    """JITGRAD_CACHE_DIR, or jitgrad/ under the user's cache home; created private (0700)."""
    path = os.environ.get("JITGRAD_CACHE_DIR")
    if not path:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(home, "jitgrad")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def module_key(source: str, extra_key: str = "") -> str:
    return hashlib.sha256(f"{_VERSION_KEY}|{extra_key}|{source}".encode()).hexdigest()[:20]


def _publish(path: str, source: str) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        try:
            os.link(tmp, path)  # atomic, and never replaces a file another process published
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


def load_module(prefix: str, source: str, extra_key: str = "") -> ModuleType:
    """Import `source` as a module from the cache directory (writing it first if new)."""
    name = f"jg_{prefix}_{module_key(source, extra_key)}"
    with _lock:
        if name in sys.modules:
            return sys.modules[name]
        path = os.path.join(cache_dir(), name + ".py")
        if not os.path.exists(path):
            _publish(path, source)
        else:
            with open(path) as f:
                if f.read() != source:  # truncated or tampered: publish a fresh copy
                    os.replace(path, path + ".bad")
                    _publish(path, source)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise JitgradError(f"cannot import generated module {path}")
        module = importlib.util.module_from_spec(spec)
        # Numba's cache rebuilds a function's environment by importing its module by name.
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
