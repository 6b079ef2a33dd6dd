"""Writing a file so that readers see the old one or the whole new one, never a part of
it: the cache's generated modules and compiled code, training checkpoints."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from typing import BinaryIO

# Private, new (never an existing file or a symlink planted under the temporary name).
_O_CREATE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_CLOEXEC", 0))


def atomic_write(name: str, write: Callable[[BinaryIO], object], *, dir_fd: int | None = None,
                 temp_prefix: str = "jg_tmp_", replace: bool = True,
                 durable: bool = False) -> None:
    """``write(file)`` fills a new temporary file beside ``name`` (mode 0600), which then
    takes ``name``'s place with one rename.

    dir_fd: ``name`` is relative to this open directory (the cache's checked descriptor).
    replace=False: an existing ``name`` is kept (a hard link never replaces a file; for
    names that are hashes of their content, another process's copy is as good).
    durable: the file and the rename are fsync'ed, so they survive a crash of the machine.
    On any error, Ctrl-C included, the temporary file is removed.
    """
    directory = os.path.dirname(name)
    tmp = os.path.join(directory, f"{temp_prefix}{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, _O_CREATE, 0o600, dir_fd=dir_fd)
    moved = {"src_dir_fd": dir_fd, "dst_dir_fd": dir_fd}
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, name, **moved)
        else:
            try:
                os.link(tmp, name, **moved)
            except FileExistsError:
                pass
            except OSError:  # no hard links here: same bytes, so replacing is safe
                os.replace(tmp, name, **moved)
    finally:
        with contextlib.suppress(OSError):  # gone already once renamed
            os.unlink(tmp, dir_fd=dir_fd)
    if durable:  # best effort: not every platform can open a directory
        with contextlib.suppress(OSError):
            dfd = os.open(directory or ".", os.O_RDONLY, dir_fd=dir_fd)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
