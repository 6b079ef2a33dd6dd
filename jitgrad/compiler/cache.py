"""On-disk cache of generated modules, imported with Numba's own on-disk cache.

Numba cannot cache functions from exec'd source (numba issue 3501), so each
generated module is written to a file named by the hash of its source, the
versions involved and the kernel library, and executed from there. Generated
code and Numba's compiled machine code are *executed*, so the cache is a
code-injection surface and a place where crashes and concurrent writers leave
half-written files. The rules (see SECURITY.md):

- the cache directory is opened through trusted_dir: every component of its path
  checked on its open descriptor, every file opened relative to the checked
  directory and checked on its own descriptor; what another user could have
  written or replaced is refused with CacheSecurityError;
- a module runs from the source jitgrad generated in memory (compiled with the
  file's name so that Numba can find its cache), never from whatever bytes are on
  disk; a file whose bytes differ is republished;
- every file is published atomically (private temp file + link/rename), never
  rewritten in place, so no reader sees half of one;
- Numba's index (.nbi) and data (.nbc) files of all jitgrad's code -- generated
  modules, and jitgrad's own @njit helpers through `cache.njit` (never the
  installed package's __pycache__) -- carry a SHA-256 checksum and the key they
  were compiled for; one that fails either check is a cache miss (recompiled and
  rewritten), never a crash. Numba itself has no file locking; its index is
  updated under an flock.

This reaches into Numba's private caching classes, so it is only switched on for
the Numba versions it was tested with; with any other, nothing is cached on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import pickle
import re
import stat
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import llvmlite
import numba
import numpy as np
from numba.core import caching
from numba.core.serialize import dumps

from .trusted_dir import POSIX, Problem, TrustedDir, check, open_trusted

# "cache-2": sealed Numba files. Part of every key, so files of other jitgrad versions
# sharing the directory never collide with ours.
_VERSION_KEY = f"jitgrad-0.1|cache-2|numba-{numba.__version__}|" \
               f"llvmlite-{llvmlite.__version__}|numpy-{np.__version__}|py-{sys.version_info[:2]}"
# The Numba versions whose caching internals this module was tested against: from the
# first up to (not including) the second. Keep in step with pyproject.toml's bound.
TESTED_NUMBA = ((0, 60), (0, 69))
_lock = threading.Lock()
_log = logging.getLogger("jitgrad.compiler.cache")


def _numba_untested_reason() -> str | None:
    """Why the sealed cache cannot be hooked into this Numba, or None if it can."""
    m = re.match(r"(\d+)\.(\d+)", numba.__version__)
    lo, hi = TESTED_NUMBA
    if m is None or not lo <= (int(m[1]), int(m[2])) < hi:
        return (f"numba {numba.__version__} is not a version it was tested with "
                f"(>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]})")
    if getattr(numba.config, "CACHE_LOCATOR_CLASSES", ""):
        return "NUMBA_CACHE_LOCATOR_CLASSES is set, which bypasses its cache locator"
    return None


_UNTESTED = _numba_untested_reason()  # a reason: nothing is cached on disk


def cache_path() -> str:
    """Where the cache lives: JITGRAD_CACHE_DIR, or jitgrad/ under the user's cache home."""
    path = os.environ.get("JITGRAD_CACHE_DIR")
    if not path:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(home, "jitgrad")
    return os.path.abspath(path)


def module_key(source: str, extra_key: str = "") -> str:
    return hashlib.sha256(f"{_VERSION_KEY}|{extra_key}|{source}".encode()).hexdigest()[:20]


def cache_dir() -> str:
    """The cache directory, created private (0700) and checked, path and all."""
    with open_trusted(cache_path(), create=True) as d:
        return d.path


# ---------------------------------------------------------------- generated modules

def _corrupt(path: str, why: str) -> None:
    _log.warning("jitgrad: cache file %s is %s; ignoring it and rebuilding", path, why)


def _ensure_file(d: TrustedDir, name: str, data: bytes) -> None:
    """Make `name` in `d` hold exactly `data` (publishing it if missing, truncated or
    tampered with)."""
    try:
        current = d.read(name, "generated module")
    except OSError as e:  # e.g. a symlink or unreadable: the directory is ours, so replace it
        _corrupt(os.path.join(d.path, name), f"unreadable ({e.strerror})")
        d.publish(name, data, replace=True)
        return
    if current is None:
        d.publish(name, data, replace=False)
    elif current != data:
        _corrupt(os.path.join(d.path, name), "truncated or modified")
        d.publish(name, data, replace=True)


@dataclass(frozen=True)
class _Origin:
    """A Python file whose functions' Numba cache jitgrad keeps in its sealed cache."""

    stamp: bytes          # Numba's source stamp: the hash of the source that was compiled
    directory: str | None  # a generated module's cache directory; None: cache_path() at use
    prefix: str = ""       # before Numba's file names (a generated module's already say jg_)


_origins: dict[str, _Origin] = {}  # Python file -> how its Numba files are kept


# The kind of a generated module ("step", "fused", "kernels"): part of its name, which
# `jitgrad cache clear` must recognise (_JITGRAD_NAME).
_KIND = r"[a-z][a-z0-9_]*"


def load_module(prefix: str, source: str, extra_key: str = "") -> types.ModuleType:
    """Run `source` as a module backed by a file in the cache directory (written first if new);
    `prefix` names its kind (lower-case letters, digits, underscores)."""
    if not re.fullmatch(_KIND, prefix):
        raise ValueError(f"cache.load_module: prefix {prefix!r} is not {_KIND}")
    name = f"jg_{prefix}_{module_key(source, extra_key)}"
    with _lock:
        module = sys.modules.get(name)
        if module is not None:
            return module
        data = source.encode()
        if _UNTESTED:  # no file, and Numba caches nothing (it would, unsealed, beside one)
            path = f"<jitgrad {name}>"
            source = re.sub(r"\bcache=True\b", "cache=False", source)
        else:
            with open_trusted(cache_path(), create=True) as d:
                _ensure_file(d, name + ".py", data)
                path = os.path.join(d.path, name + ".py")
            _origins[path] = _Origin(hashlib.sha256(data).digest(), d.path)
        # Compile the source we generated, not the file's bytes: what runs is exactly what
        # jitgrad wrote, even if the file changes after the check. The file name is what
        # Numba's cache is keyed on.
        code = compile(source, path, "exec")
        module = types.ModuleType(name)
        module.__file__ = path
        # Numba's cache rebuilds a function's environment by importing its module by name.
        sys.modules[name] = module
        try:
            exec(code, module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
        return module


def njit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """numba.njit for jitgrad's own modules: with cache=True, the function's Numba files are
    kept in the sealed cache directory (checked, checksummed, seen by `jitgrad cache`),
    never in the installed package's __pycache__; with an untested Numba, nowhere."""
    def decorate(fn: Callable[..., Any]) -> Any:
        opts = dict(options)
        if opts.get("cache"):
            opts["cache"] = not _UNTESTED and _seal_package_file(inspect.getfile(fn))
        return numba.njit(**opts)(fn)
    return decorate


def _seal_package_file(py_file: str) -> bool:
    """Register an installed module's file: its Numba files go to the sealed cache."""
    if py_file not in _origins:
        try:
            with open(py_file, "rb") as f:
                source = f.read()
        except OSError:  # not a plain file (e.g. inside a zip): compile, do not cache
            return False
        key = module_key(source.decode(errors="replace"), f"package|{os.path.basename(py_file)}")
        _origins[py_file] = _Origin(hashlib.sha256(source).digest(), None, f"jg_pkg_{key}.")
    return True


# ---------------------------------------------------------------- Numba's files

_MAGIC = b"JGSEAL1\n"
_HEADER = len(_MAGIC) + 32  # magic, then the SHA-256 of the payload
_INDEX_LOCK = "jg_index.lock"  # one per __pycache__


def _read_sealed(d: TrustedDir, name: str) -> bytes | None:
    """The payload of a sealed file; None if it is missing or fails its checksum."""
    path = os.path.join(d.path, name)
    try:
        blob = d.read(name, "Numba cache file")
    except OSError as e:  # a symlink, unreadable: a miss; saving the entry replaces it
        _corrupt(path, f"unreadable ({e.strerror})")
        return None
    if blob is None:
        return None
    if not blob.startswith(_MAGIC) or len(blob) < _HEADER:
        _corrupt(path, "truncated or not written by this jitgrad")
        return None
    payload = blob[_HEADER:]
    if hashlib.sha256(payload).digest() != blob[len(_MAGIC):_HEADER]:
        _corrupt(path, "corrupted (checksum mismatch)")
        return None
    return payload


def _write_sealed(d: TrustedDir, name: str, payload: bytes, kind: str) -> None:
    d.publish(name, _MAGIC + hashlib.sha256(payload).digest() + payload, replace=True)
    caching._cache_log("[cache] %s saved to %r", kind, os.path.join(d.path, name))


def _load_pickled(d: TrustedDir, name: str, kind: str) -> Any:
    payload = _read_sealed(d, name)
    if payload is None:
        return None
    try:
        data = pickle.loads(payload)
    except Exception:  # a checksummed file that still does not unpickle: a miss
        _corrupt(os.path.join(d.path, name), "unreadable")
        return None
    caching._cache_log("[cache] %s loaded from %r", kind, os.path.join(d.path, name))
    return data


class _SealedCacheFile:
    """Numba's index and data files of one function, checksummed and keyed (in place of
    Numba's IndexDataCacheFile: the same load/save/flush).

    Numba numbers data files 1, 2, ... per function, so two processes compiling
    different signatures at once can write each other's code under one name; here
    each key gets its own data file (named by the key's hash) that also records
    the key, and the index is updated under a lock.
    """

    def __init__(self, locator: _Locator, filename_base: str):
        self._locator = locator
        self._base = locator.origin.prefix + filename_base
        self._index = self._base + ".nbi"
        self._version = (numba.__version__, locator.get_source_stamp())

    def flush(self) -> None:
        with self._locator.open_dir(create=True) as d:
            self._save_index(d, {})

    def save(self, key: Any, data: Any) -> None:
        name = f"{self._base}.{hashlib.sha256(repr(key).encode()).hexdigest()[:16]}.nbc"
        with self._locator.open_dir(create=True) as d:
            # the data first: the index must never lead nowhere
            _write_sealed(d, name, dumps((key, data)), "data")
            with d.lock(_INDEX_LOCK):
                overloads = self._load_index(d)
                if overloads.get(key) != name:
                    overloads[key] = name
                    self._save_index(d, overloads)

    def load(self, key: Any) -> Any:
        try:
            d = self._locator.open_dir(create=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with d:
            name = self._load_index(d).get(key)
            if name is None:
                return None
            stored = _load_pickled(d, name, "data")
        if not (isinstance(stored, tuple) and len(stored) == 2 and stored[0] == key):
            return None
        return stored[1]

    def _load_index(self, d: TrustedDir) -> dict[Any, str]:
        stored = _load_pickled(d, self._index, "index")
        if not (isinstance(stored, tuple) and len(stored) == 3):
            return {}
        version, stamp, overloads = stored
        return overloads if (version, stamp) == self._version else {}

    def _save_index(self, d: TrustedDir, overloads: dict[Any, str]) -> None:
        _write_sealed(d, self._index, dumps((*self._version, overloads)), "index")


class _Locator(caching._CacheLocator):
    """Numba's files for a function of a registered file (`_origins`) go to the __pycache__
    of the sealed cache directory, whatever NUMBA_CACHE_DIR says: one directory, one set
    of checks. Nothing touches the disk until Numba loads or saves."""

    def __init__(self, py_func: Any, py_file: str, origin: _Origin):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self.origin = origin

    def _directory(self) -> str:
        return self.origin.directory or cache_path()

    def get_cache_path(self) -> str:
        return os.path.join(self._directory(), "__pycache__")

    def get_source_stamp(self) -> bytes:
        return self.origin.stamp  # of the source jitgrad compiled, not re-read from disk

    def get_disambiguator(self) -> str:
        return str(self._lineno)

    def ensure_cache_path(self) -> None:
        with self.open_dir(create=True):
            pass

    def open_dir(self, create: bool) -> TrustedDir:
        """The __pycache__, opened and checked (a refusal propagates: never another place)."""
        with open_trusted(self._directory(), create) as top:
            return top.subdir("__pycache__", create)

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> _Locator | None:
        origin = _origins.get(py_file)
        return None if origin is None else cls(py_func, py_file, origin)


def _install() -> None:
    """Route Numba's caching of registered files through _Locator and _SealedCacheFile.

    Only functions of files in `_origins` are affected; every other Numba cache in
    the process keeps Numba's own behaviour and file format. With a Numba this was
    not tested with, nothing is patched and jitgrad caches nothing on disk.
    """
    if _UNTESTED:
        warnings.warn(f"jitgrad: {_UNTESTED}; its on-disk cache hooks into Numba's private "
                      "caching classes, so it is switched off: compiled code is not cached on "
                      "disk and every process compiles again.", RuntimeWarning, stacklevel=2)
        return
    if getattr(caching.Cache, "_jitgrad_installed", False):
        return
    caching.CacheImpl._locator_classes.insert(0, _Locator)
    numba_init = caching.Cache.__init__

    def init(self: Any, py_func: Any) -> None:
        numba_init(self, py_func)
        if isinstance(self._impl.locator, _Locator):
            self._cache_file = _SealedCacheFile(self._impl.locator, self._impl.filename_base)

    caching.Cache.__init__ = init
    caching.Cache._jitgrad_installed = True


_install()


# ---------------------------------------------------------------- `jitgrad cache`

# Exactly the names jitgrad makes (JITGRAD_CACHE_DIR may be a directory holding other
# things): modules jg_<kind>_<key>.py; Numba's files of a module (or of a package file,
# jg_pkg_<key>.<module>...) <module>.<function>-<line>.py<version>.nbi and
# ....<key hash>.nbc; the index lock; temp files being published.
_MODULE = rf"jg_{_KIND}_[0-9a-f]{{20}}"
_JITGRAD_NAME = re.compile(rf"{_MODULE}\.py"
                           rf"|{_MODULE}\.[\w.]+-\d+\.py\d+\w*(\.nbi|\.[0-9a-f]{{16}}\.nbc)"
                           rf"|{re.escape(_INDEX_LOCK)}|jg_tmp_[0-9a-f]{{16}}\.tmp")


def _jitgrad_files(top: TrustedDir, report: list[Problem] | None
                   ) -> Iterator[tuple[TrustedDir, str, os.stat_result]]:
    """jitgrad's files in the cache directory `top` and its __pycache__."""
    for name, st in top.files(_JITGRAD_NAME):
        yield top, name, st
    try:
        sub = top.subdir("__pycache__", create=False, report=report)
    except (FileNotFoundError, NotADirectoryError):
        return
    with sub:
        for name, st in sub.files(_JITGRAD_NAME):
            yield sub, name, st


def info() -> dict[str, Any]:
    """What `jitgrad cache info` prints: where the cache is, its size, and every component
    of it (the directories above it included) that jitgrad would refuse."""
    path = cache_path()
    problems: list[Problem] = []
    files: list[tuple[str, os.stat_result]] = []
    try:
        top = open_trusted(path, create=False, report=problems)
    except (FileNotFoundError, NotADirectoryError):
        top = None
    if top is not None:
        with top:
            for d, name, st in _jitgrad_files(top, problems):
                files.append((os.path.join(d.path, name), st))
                if POSIX and not stat.S_ISLNK(st.st_mode):
                    what = "generated module" if name.endswith(".py") else "cache file"
                    check(st, files[-1][0], what, True, problems)
    return {
        "path": path,
        "exists": top is not None,
        "modules": sum(f.endswith(".py") for f, _ in files),
        "numba_files": sum(f.endswith((".nbi", ".nbc")) for f, _ in files),
        "files": len(files),
        "bytes": sum(st.st_size for _, st in files),
        "problems": problems,
        "disk_cache_off": _UNTESTED,  # why nothing is cached on disk, or None
    }


def clear() -> tuple[int, int]:
    """Remove jitgrad's files from the cache directory; returns (files, bytes) removed.

    Only names jitgrad makes are removed (JITGRAD_CACHE_DIR may point at a
    directory holding other things), symlinks are removed, never followed, and the
    directory itself stays.
    """
    n = size = 0
    with _lock:
        try:
            top = open_trusted(cache_path(), create=False, report=[])
        except (FileNotFoundError, NotADirectoryError):
            return 0, 0
        with top:
            for d, name, st in _jitgrad_files(top, []):  # each directory listed before
                with contextlib.suppress(FileNotFoundError):
                    d.unlink(name)
                    n, size = n + 1, size + st.st_size
            with contextlib.suppress(OSError):  # not empty, or already gone
                top.rmdir("__pycache__")
    return n, size


__all__ = ["TESTED_NUMBA", "cache_dir", "cache_path", "clear", "info",
           "load_module", "module_key", "njit"]
