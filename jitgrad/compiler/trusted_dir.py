"""Opening the cache directory without trusting its path.

A path is a name that others may re-point between a check and a use: a symlink
flipped, a directory renamed away in a parent they can write. So the cache is
opened one component at a time from the root, each with O_NOFOLLOW and checked
by fstat on its own descriptor, and everything inside is then resolved relative
to the descriptor of the checked directory (dir_fd), files checked on their own
descriptors too. Whom it trusts:

- a directory above the cache: owned by the user or root, not writable by group
  or others, unless it is root's and sticky (/tmp: others cannot replace our entry);
- a symlink on the path: owned by the user or root, in such a directory (its
  target is walked the same way);
- the cache directory, its __pycache__ and every file in them: the user's own,
  not writable by group or others.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import CacheSecurityError
from .atomic_write import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no flock; publishing by atomic rename still applies
    fcntl = None  # type: ignore[assignment]

POSIX = hasattr(os, "getuid") and hasattr(os, "O_NOFOLLOW") and os.open in os.supports_dir_fd
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC
# O_NONBLOCK: a FIFO planted under a cache name must not hang the open (regular files ignore it)
_O_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_MAX_LINKS = 40  # symlinks followed on one path, as the kernel's own ELOOP limit


@dataclass(frozen=True)
class Problem:
    """A component of the cache that another user could have written (or could replace)."""

    path: str
    what: str   # e.g. "cache directory", "directory above the cache directory"
    text: str   # e.g. "is writable by group or others (mode drwxrwx---)"
    yours: bool  # owned by this user: `chmod go-w` can fix it
    is_file: bool

    def __str__(self) -> str:
        return f"{self.path} {self.text}"

    @property
    def fix(self) -> str:
        if self.yours and self.is_file:
            return (f"Fix it with `chmod go-w {self.path}` (after checking its contents), "
                    f"remove it (`jitgrad cache clear`), or set JITGRAD_CACHE_DIR to a private "
                    f"directory.")
        if self.yours:
            return (f"Fix it with `chmod go-w {self.path}` (after checking what is in it, if "
                    f"nobody else needs to write there), or set JITGRAD_CACHE_DIR to a private "
                    f"directory.")
        if self.is_file:
            return ("It is not yours, so chmod cannot fix it: remove it if you may "
                    "(`jitgrad cache clear` removes jitgrad's files from the cache directory), "
                    "or set JITGRAD_CACHE_DIR to a directory of your own.")
        return ("It is not yours, so chmod cannot fix it: set JITGRAD_CACHE_DIR to a directory "
                "of your own, below directories only you or root can write to.")

    def error(self) -> CacheSecurityError:
        return CacheSecurityError(
            f"refusing to load generated code: the jitgrad {self.what} {self.path} {self.text}. "
            f"jitgrad executes the code it caches, so another user could inject code through "
            f"it. {self.fix}")


def problem(st: os.stat_result, path: str, what: str, private: bool) -> Problem | None:
    """Why the object `st` describes cannot be trusted, or None if it can.

    `private`: the cache directory, its __pycache__ and their files must be the user's
    own; a directory above them (or a symlink on the way) may also be root's.
    """
    me, uid, mode = os.getuid(), st.st_uid, st.st_mode
    is_file = not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode))
    if uid != me and (private or uid != 0):
        also = "" if private else " or root"
        return Problem(path, what, f"is owned by uid {uid}, not by you (uid {me}){also}",
                       yours=False, is_file=is_file)
    if stat.S_ISLNK(mode):  # a link's own mode bits mean nothing; its directory was checked
        return None
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        if not private and uid == 0 and stat.S_ISDIR(mode) and mode & stat.S_ISVTX:
            return None  # root's sticky directory (/tmp): others cannot replace our entry
        return Problem(path, what, f"is writable by group or others (mode {stat.filemode(mode)})",
                       yours=uid == me, is_file=is_file)
    return None


def _components(path: str) -> list[str]:
    return [c for c in path.split(os.sep) if c and c != "."]


def _walk(fd: int, where: str, names: list[str], create: bool, report: list[Problem] | None,
          what: str = "cache directory") -> TrustedDir:
    """Open directory `names` below the open directory `fd` (at path `where`, already
    checked), one component at a time, each checked on its own descriptor; the last
    one (the `what`) must be private. A symlink is followed only if the link passes the check; its
    target is walked the same way. Takes ownership of `fd`.

    A problem raises CacheSecurityError, or with `report` is appended to it and the walk
    goes on (for `jitgrad cache info`, which lists every one).
    """
    todo = names[::-1]
    links = 0
    try:
        while todo:
            name = todo.pop()
            last = not todo
            try:
                sub = os.open(name, _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=fd)
                sub = os.open(name, _O_DIR, dir_fd=fd)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode):
                    raise
                check(st, os.path.join(where, name), "symlink on the cache path", False, report)
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", where) from e
                target = os.readlink(name, dir_fd=fd)
                todo.extend(_components(target)[::-1])
                if os.path.isabs(target):
                    os.close(fd)
                    fd, where = os.open(os.sep, _O_DIR), os.sep
                continue
            os.close(fd)
            fd, where = sub, os.path.normpath(os.path.join(where, name))
            check(os.fstat(fd), where, what if last else "directory above the cache directory",
                   last, report)
        return TrustedDir(where, fd)
    except BaseException:
        os.close(fd)
        raise


def check(st: os.stat_result, path: str, what: str, private: bool,
           report: list[Problem] | None) -> None:
    found = problem(st, path, what, private)
    if found is None:
        return
    if report is None:
        raise found.error()
    report.append(found)


def open_trusted(path: str, create: bool, report: list[Problem] | None = None) -> TrustedDir:
    """The cache directory `path`, opened and checked component by component from the root
    (created private, 0700, where missing if `create`)."""
    if not POSIX:  # no POSIX owners, modes or dir_fd (Windows): nothing to check
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        elif not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        return TrustedDir(path, None)
    fd = os.open(os.sep, _O_DIR)
    try:
        check(os.fstat(fd), os.sep, "directory above the cache directory", False, report)
    except BaseException:
        os.close(fd)
        raise
    return _walk(fd, os.sep, _components(path), create, report)


class TrustedDir:
    """A checked directory, held open: names in it are resolved relative to the open
    descriptor, so a path component replaced after the check changes nothing."""

    def __init__(self, path: str, fd: int | None):
        self.path, self.fd = path, fd

    def __enter__(self) -> TrustedDir:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _at(self, name: str) -> str:
        return name if self.fd is not None else os.path.join(self.path, name)

    def subdir(self, name: str, create: bool, report: list[Problem] | None = None) -> TrustedDir:
        """A private directory in this one (its __pycache__)."""
        if self.fd is None:
            return open_trusted(os.path.join(self.path, name), create)
        return _walk(os.dup(self.fd), self.path, [name], create, report, "Numba cache directory")

    def read(self, name: str, what: str) -> bytes | None:
        """The bytes of file `name`, None if missing. CacheSecurityError if it is not private;
        OSError if it is a symlink (never followed) or not a regular file."""
        try:
            fd = os.open(self._at(name), _O_READ, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if POSIX:
                check(st, os.path.join(self.path, name), what, True, None)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", name)
            return f.read()

    def publish(self, name: str, data: bytes, replace: bool) -> None:
        """Write `data` to `name` atomically: readers see the old file or the whole new one.
        replace=False keeps a file another process published meanwhile (same content: the
        name is its hash)."""
        atomic_write(self._at(name), lambda f: f.write(data), dir_fd=self.fd, replace=replace)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        fd = os.open(self._at(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, 0o600,
                     dir_fd=self.fd)
        try:
            check(os.fstat(fd), os.path.join(self.path, name), "lock file", True, None)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def files(self, names: re.Pattern[str]) -> list[tuple[str, os.stat_result]]:
        """The files (and symlinks, never followed) here whose names match `names`."""
        with os.scandir(self.fd if self.fd is not None else self.path) as it:
            found = [e.name for e in it if names.fullmatch(e.name)]
        result = []
        for name in found:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(self._at(name), dir_fd=self.fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                    result.append((name, st))
        return result

    def rmdir(self, name: str) -> None:
        os.rmdir(self._at(name), dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        os.unlink(self._at(name), dir_fd=self.fd)


__all__ = ["POSIX", "Problem", "TrustedDir", "check", "open_trusted", "problem"]
