"""On-disk cache of generated modules, imported with Numba's own on-disk cache.

Numba cannot cache functions from exec'd source (numba issue 3501), so each
generated module is written to a file named by the hash of its source, the
versions involved and the kernel library, and executed from there. Generated
code and Numba's compiled machine code are *executed*, so the cache is a
code-injection surface and a place where crashes and concurrent writers leave
half-written files. The rules (see SECURITY.md):

- the directory is created user-only (0700); a directory or file that another
  user owns, or that group/others can write, is refused with CacheSecurityError;
- a module runs from the source jitgrad generated in memory (compiled with the
  file's name so that Numba can find its cache), never from whatever bytes are on
  disk; a file whose bytes differ is republished;
- every file is published atomically (private temp file + link/rename), never
  rewritten in place, so no reader sees half of one;
- Numba's index (.nbi) and data (.nbc) files for these modules carry a SHA-256
  checksum and the key they were compiled for; one that fails either check is a
  cache miss (recompiled and rewritten), never a crash. Numba itself has no file
  locking; its index is updated under an flock here.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import stat
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from typing import Any

import llvmlite
import numba
import numpy as np
from numba.core import caching

from .errors import CacheSecurityError

try:
    import fcntl
except ImportError:  # Windows: no flock; Numba's own atomic renames still apply
    fcntl = None  # type: ignore[assignment]

# "cache-2": sealed Numba files. Part of every key, so files of other jitgrad versions
# sharing the directory never collide with ours.
_VERSION_KEY = f"jitgrad-0.1|cache-2|numba-{numba.__version__}|" \
               f"llvmlite-{llvmlite.__version__}|numpy-{np.__version__}|py-{sys.version_info[:2]}"
_lock = threading.Lock()
_log = logging.getLogger("jitgrad.cache")
_dirs: set[str] = set()  # the cache directories this process has used


def cache_path() -> str:
    """Where the cache lives: JITGRAD_CACHE_DIR, or jitgrad/ under the user's cache home."""
    path = os.environ.get("JITGRAD_CACHE_DIR")
    if not path:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(home, "jitgrad")
    return os.path.abspath(path)


def cache_dir() -> str:
    """The cache directory, created private (0700) and checked to be private to this user."""
    path = cache_path()
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private(path, "cache directory")
    _dirs.add(path)
    return path


def permission_problem(path: str) -> str | None:
    """Why `path` cannot be trusted to hold code only this user wrote, or None if it can."""
    if not hasattr(os, "getuid"):  # no POSIX owners and modes (Windows): nothing to check
        return None
    st = os.stat(path)
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.filemode(st.st_mode)})"
    return None


def check_private(path: str, what: str) -> None:
    """Raise CacheSecurityError unless only this user can have written `path`."""
    problem = permission_problem(path)
    if problem:
        remove = "" if os.path.isdir(path) else ", remove it with `jitgrad cache clear`"
        raise CacheSecurityError(
            f"refusing to load generated code: the jitgrad {what} {path} {problem}. jitgrad "
            f"executes the code it caches, so another user could inject code through it. "
            f"Fix it with `chmod go-w {path}` (after checking its contents){remove}, or set "
            f"JITGRAD_CACHE_DIR to a private directory.")


def module_key(source: str, extra_key: str = "") -> str:
    return hashlib.sha256(f"{_VERSION_KEY}|{extra_key}|{source}".encode()).hexdigest()[:20]


def _corrupt(path: str, why: str) -> None:
    _log.warning("jitgrad: cache file %s is %s; ignoring it and rebuilding", path, why)


@contextlib.contextmanager
def _private_temp(directory: str, suffix: str) -> Iterator[tuple[Any, str]]:
    """A new 0600 temp file in `directory` (removed on exit unless renamed away)."""
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=suffix)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _publish(path: str, data: bytes, replace: bool) -> None:
    """Write `data` to `path` atomically: readers see the old file or the whole new one."""
    with _private_temp(os.path.dirname(path), ".tmp") as (f, tmp):
        f.write(data)
        f.close()
        if replace:
            os.replace(tmp, path)
        else:
            # link never replaces a file another process published meanwhile (same content:
            # the name is its hash), so the file's stamp, which Numba's index records, stays.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: same bytes, so replacing is safe
                os.replace(tmp, path)


def _ensure_file(path: str, data: bytes) -> None:
    """Make `path` hold exactly `data` (publishing it if missing, truncated or tampered)."""
    try:
        check_private(path, "generated module")
        with open(path, "rb") as f:
            current = f.read()
    except FileNotFoundError:
        _publish(path, data, replace=False)
        return
    except OSError as e:  # e.g. unreadable: the directory is ours, so replace it
        _corrupt(path, f"unreadable ({e.strerror})")
        _publish(path, data, replace=True)
        return
    if current != data:
        _corrupt(path, "truncated or modified")
        _publish(path, data, replace=True)


def load_module(prefix: str, source: str, extra_key: str = "") -> types.ModuleType:
    """Run `source` as a module backed by a file in the cache directory (written first if new)."""
    name = f"jg_{prefix}_{module_key(source, extra_key)}"
    with _lock:
        module = sys.modules.get(name)
        if module is not None:
            return module
        path = os.path.join(cache_dir(), name + ".py")
        _ensure_file(path, source.encode())
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


# ---------------------------------------------------------------- Numba's files

_MAGIC = b"JGSEAL1\n"
_HEADER = len(_MAGIC) + 32  # magic, then the SHA-256 of the payload


def _read_sealed(path: str) -> bytes | None:
    """The payload of a sealed file; None if it is missing or fails its checksum."""
    try:
        check_private(path, "Numba cache file")
        with open(path, "rb") as f:
            blob = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:  # unreadable: a miss; saving the entry again replaces the file
        _corrupt(path, f"unreadable ({e.strerror})")
        return None
    if not blob.startswith(_MAGIC) or len(blob) < _HEADER:
        _corrupt(path, "truncated or not written by this jitgrad")
        return None
    payload = blob[_HEADER:]
    if hashlib.sha256(payload).digest() != blob[len(_MAGIC):_HEADER]:
        _corrupt(path, "corrupted (checksum mismatch)")
        return None
    return payload


@contextlib.contextmanager
def _flock(path: str) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class _SealedCacheFile(caching.IndexDataCacheFile):
    """Numba's index and data files for jitgrad's modules, checksummed and keyed.

    Numba numbers data files 1, 2, ... per function, so two processes compiling
    different signatures at once can write each other's code under one name; here
    each key gets its own data file (named by the key's hash) that also records
    the key, and the index is updated under a lock.
    """

    def save(self, key: Any, data: Any) -> None:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        name = f"{self._index_name[:-len('.nbi')]}.{digest}.nbc"
        self._save_data(name, (key, data))  # the data first: the index must never lead nowhere
        with _flock(os.path.join(self._cache_path, "jg_index.lock")):  # one per directory
            overloads = self._load_index()
            if overloads.get(key) != name:
                overloads[key] = name
                self._save_index(overloads)

    def load(self, key: Any) -> Any:
        name = self._load_index().get(key)
        if name is None:
            return None
        stored = self._load_data(name)
        if not (isinstance(stored, tuple) and len(stored) == 2 and stored[0] == key):
            return None
        return stored[1]

    def _load_index(self) -> dict[Any, str]:
        payload = _read_sealed(self._index_path)
        if payload is None:
            return {}
        try:
            version, stamp, overloads = pickle.loads(payload)
        except Exception:  # a checksummed file that still does not unpickle: a miss
            _corrupt(self._index_path, "unreadable")
            return {}
        caching._cache_log("[cache] index loaded from %r", self._index_path)
        if version != self._version or stamp != self._source_stamp:
            return {}
        return overloads

    def _save_index(self, overloads: dict[Any, str]) -> None:
        self._write_sealed(self._index_path,
                           self._dump((self._version, self._source_stamp, overloads)))
        caching._cache_log("[cache] index saved to %r", self._index_path)

    def _load_data(self, name: str) -> Any:
        path = self._data_path(name)
        payload = _read_sealed(path)
        if payload is None:
            return None
        try:
            data = pickle.loads(payload)
        except Exception:
            _corrupt(path, "unreadable")
            return None
        caching._cache_log("[cache] data loaded from %r", path)
        return data

    def _save_data(self, name: str, data: Any) -> None:
        path = self._data_path(name)
        self._write_sealed(path, self._dump(data))
        caching._cache_log("[cache] data saved to %r", path)

    def _write_sealed(self, path: str, payload: bytes) -> None:
        _publish(path, _MAGIC + hashlib.sha256(payload).digest() + payload, replace=True)


class _Locator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba's files for a module in a jitgrad cache directory go to its private __pycache__,
    whatever NUMBA_CACHE_DIR says: one directory, one set of permission checks."""

    def __init__(self, py_func: Any, py_file: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = os.path.join(os.path.dirname(py_file), "__pycache__")

    def get_cache_path(self) -> str:
        return self._cache_path

    def ensure_cache_path(self) -> None:
        os.makedirs(self._cache_path, mode=0o700, exist_ok=True)
        check_private(self._cache_path, "Numba cache directory")

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> _Locator | None:
        if os.path.dirname(os.path.abspath(py_file)) not in _dirs:
            return None
        self = cls(py_func, py_file)
        self.ensure_cache_path()  # a refusal propagates: never fall back to another place
        return self


def _install() -> None:
    """Route Numba's caching of jitgrad's modules through _Locator and _SealedCacheFile.

    Only functions defined in a jitgrad cache directory are affected; every other
    Numba cache in the process keeps Numba's own behaviour and file format.
    """
    if getattr(caching.Cache, "_jitgrad_installed", False):
        return
    caching.CacheImpl._locator_classes.insert(0, _Locator)
    numba_init = caching.Cache.__init__

    def init(self: Any, py_func: Any) -> None:
        numba_init(self, py_func)
        if isinstance(self._impl.locator, _Locator):
            self._cache_file.__class__ = _SealedCacheFile

    caching.Cache.__init__ = init
    caching.Cache._jitgrad_installed = True


_install()


# ---------------------------------------------------------------- `jitgrad cache`

def _is_ours(name: str) -> bool:
    return name.startswith("jg_") or name.endswith(".tmp") or ".tmp." in name


def _cache_files(path: str) -> list[str]:
    """jitgrad's files in a cache directory (modules, Numba's files, leftover temp files)."""
    found = []
    for directory in (path, os.path.join(path, "__pycache__")):
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            with os.scandir(directory) as it:
                found += [e.path for e in it
                          if _is_ours(e.name) and (e.is_file(follow_symlinks=False)
                                                   or e.is_symlink())]
    return found


def info() -> dict[str, Any]:
    """What `jitgrad cache info` prints: where the cache is, its size, and whether it is safe."""
    path = cache_path()
    files = _cache_files(path)
    problems = []
    for p in [path, os.path.join(path, "__pycache__")] + files:
        with contextlib.suppress(FileNotFoundError):
            problem = permission_problem(p)
            if problem:
                problems.append(f"{p} {problem}")
    return {
        "path": path,
        "exists": os.path.isdir(path),
        "modules": sum(f.endswith(".py") and "__pycache__" not in f for f in files),
        "numba_files": sum(f.endswith((".nbi", ".nbc")) for f in files),
        "files": len(files),
        "bytes": sum(os.lstat(f).st_size for f in files if os.path.lexists(f)),
        "problems": problems,
    }


def clear() -> tuple[int, int]:
    """Remove jitgrad's files from the cache directory; returns (files, bytes) removed.

    Only files jitgrad writes are removed (JITGRAD_CACHE_DIR may point at a
    directory holding other things), symlinks are removed, never followed, and the
    directory itself stays.
    """
    path = cache_path()
    n = size = 0
    with _lock:
        for f in _cache_files(path):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(f)
                os.unlink(f)
                n, size = n + 1, size + st.st_size
        with contextlib.suppress(OSError):  # not empty, or already gone
            os.rmdir(os.path.join(path, "__pycache__"))
    return n, size


__all__ = ["cache_dir", "cache_path", "check_private", "clear", "info", "load_module",
           "module_key"]
