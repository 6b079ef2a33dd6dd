"""How the ``jitgrad`` command spells its values: byte sizes, recomputation policies,
layer widths, argument positions, files to write.

Each parser raises :class:`OptionError`, both a ``ValueError`` (for callers outside
argparse) and an ``argparse.ArgumentTypeError``, so that as an argparse ``type`` it
refuses a bad flag with its own message before any work starts.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from typing import Any

from ..errors import JitgradError


class OptionError(ValueError, argparse.ArgumentTypeError):
    """A value spelled in a way no option accepts; the message says what was expected."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'1048576', '512KiB', '1.5MB', '2G' -> bytes (OptionError if it is not a positive size)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError(f"expected a size in bytes like 1048576, 512KiB or 1.5MB, got {text!r}")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise OptionError(f"memory budget must be positive, got {text!r}")
    return value


def parse_byte_list(text: str) -> list[int]:
    """'40MiB,60MiB' -> [41943040, 62914560]; empty items are skipped."""
    return [parse_bytes(t) for t in text.split(",") if t.strip()]


def format_bytes(n: int | None) -> str:
    """4096 -> '4.0 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def policy_options(policy: str | None) -> dict[str, Any]:
    """A policy as commands spell it -- 'none', 'sqrt', 'full' or a byte budget ('4MiB',
    '4096') -- as jg.jit / jg.train_step keywords."""
    if policy is None or policy == "none":
        return {}
    if policy in ("sqrt", "full"):
        return {"remat": policy}
    try:
        return {"memory_budget": parse_bytes(policy)}
    except ValueError:
        raise JitgradError(f"bad recomputation policy {policy!r}: use none, sqrt, full or a "
                           "byte budget such as 4MiB") from None


def parse_hidden(text: str) -> tuple[int, ...]:
    """'128,64' -> (128, 64); '' or 'none' -> () (a linear model)."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise OptionError(
            f"expected comma-separated layer widths like 128,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise OptionError(f"layer widths must be positive, got {text!r}")
    return sizes


def parse_argnums(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1): argument positions."""
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise OptionError(f"expected argument positions like 0,1, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise OptionError(f"expected a whole number >= 1, got {text!r}")
    return n


def output_path(text: str) -> str:
    """A file jitgrad will write: refused at once (not after the training or the sweep)
    if it names a directory or a place no file can be created."""
    if not text:
        raise OptionError("expected a file name, got an empty one")
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise OptionError(f"{text!r} is a directory, not a file name")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise OptionError(f"cannot write {text!r}: directory {directory!r} does not exist")
    try:  # the only sure test: create a file there (permissions, read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".jitgrad-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OptionError(f"cannot write {text!r}: cannot create files in directory "
                          f"{directory!r} ({e.strerror or e})") from None
    return text
