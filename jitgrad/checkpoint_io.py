"""Training checkpoints: parameters, optimizer state and metadata in one ``.npz`` file.

Writes are atomic: the archive is written to a temporary file in the target's
directory, flushed and fsync'ed, then moved over the target with
``os.replace``. A run that dies at any moment (Ctrl-C, a crash, a full disk)
leaves either the previous checkpoint or the new one, never a partial file.

Layout inside the archive: one array per pytree leaf, named by its path
(``params/W0``, ``state/momentum/W0``, ...), plus ``__meta__``, a JSON string
holding the caller's metadata and the two tree structures, so that lists,
tuples and nested dicts come back exactly as they were saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import JitgradError

__all__ = ["CheckpointError", "FORMAT", "check_compatible", "load", "restore_into", "save"]

FORMAT = "jitgrad-checkpoint-1"
_META_KEY = "__meta__"


class CheckpointError(JitgradError):
    """A checkpoint is missing, corrupt, or does not fit the model being resumed."""


# ------------------------------------------------------------------ tree <-> flat arrays


def _encode(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> Any:
    """Flatten ``tree`` into ``out`` (path -> array); return a JSON description of its shape."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        spec = {}
        for k in sorted(tree):
            if not isinstance(k, str) or not k or "/" in k:
                raise CheckpointError(f"checkpoint keys must be non-empty strings without '/', "
                                      f"got {k!r} under {prefix!r}")
            spec[k] = _encode(tree[k], f"{prefix}/{k}", out)
        return {"dict": spec}
    if isinstance(tree, (list, tuple)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_encode(t, f"{prefix}/{i}", out) for i, t in enumerate(tree)]}
    arr = np.asarray(tree)
    if arr.dtype.kind not in "biuf":
        raise CheckpointError(f"{prefix}: only numeric arrays can be saved, got {arr.dtype}")
    out[prefix] = arr
    return "leaf"


def _decode(spec: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if spec is None:
        return None
    if spec == "leaf":
        if prefix not in arrays:
            raise CheckpointError(f"array {prefix!r} is missing")
        return arrays[prefix]
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, body), = spec.items()
        if kind == "dict" and isinstance(body, dict):
            return {k: _decode(v, f"{prefix}/{k}", arrays) for k, v in body.items()}
        if kind in ("list", "tuple") and isinstance(body, list):
            items = [_decode(v, f"{prefix}/{i}", arrays) for i, v in enumerate(body)]
            return tuple(items) if kind == "tuple" else items
    raise CheckpointError(f"bad structure description at {prefix!r}")


# ------------------------------------------------------------------------- save / load


def save(path: str | os.PathLike[str], params: Any, opt_state: Any,
         meta: dict[str, Any] | None = None) -> Path:
    """Atomically write ``params``, ``opt_state`` and JSON-serialisable ``meta`` to ``path``.

    The file is written exactly at ``path`` (no suffix is added). Returns the path.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    structure = {"params": _encode(params, "params", arrays),
                 "state": _encode(opt_state, "state", arrays)}
    try:
        header = json.dumps({"format": FORMAT, "structure": structure, "meta": meta or {}})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata must be JSON-serialisable: {e}") from e
    arrays[_META_KEY] = np.array(header)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot save checkpoint {str(path)!r}: directory "
                              f"{str(directory)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt: never leave the temp file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort; not every platform can open a dir).
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def load(path: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save`; returns ``(params, opt_state, meta)``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a jitgrad "
                              f"checkpoint ({type(e).__name__}: {e})") from e
    if _META_KEY not in arrays:
        raise CheckpointError(f"{str(path)!r} is an .npz file but not a jitgrad checkpoint "
                              f"(no {_META_KEY!r} entry)")
    try:
        header = json.loads(str(arrays.pop(_META_KEY)))
        fmt, structure = header["format"], header["structure"]
        meta = header.get("meta", {})
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable header: {e}") from e
    if fmt != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {fmt!r}; this jitgrad "
                              f"reads {FORMAT!r}")
    try:
        params = _decode(structure["params"], "params", arrays)
        state = _decode(structure["state"], "state", arrays)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {e}") from None
    return params, state, meta


# ------------------------------------------------------------------------------ resume


def check_compatible(expected: Any, loaded: Any, what: str = "params") -> None:
    """Raise :class:`CheckpointError` unless ``loaded`` has the structure, shapes and dtypes
    of ``expected``; the message lists what differs."""
    want: dict[str, np.ndarray] = {}
    got: dict[str, np.ndarray] = {}
    _encode(expected, what, want)
    _encode(loaded, what, got)
    problems = []
    missing = sorted(want.keys() - got.keys())
    extra = sorted(got.keys() - want.keys())
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    for k in sorted(want.keys() & got.keys()):
        w, g = want[k], got[k]
        if w.shape != g.shape:
            problems.append(f"{k} has shape {g.shape}, the model needs {w.shape}")
        elif w.dtype != g.dtype:
            problems.append(f"{k} has dtype {g.dtype}, the model needs {w.dtype}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... ({len(problems) - 4} more)"
                                           if len(problems) > 4 else "")
        raise CheckpointError(f"checkpoint does not match the model ({what}): {shown}")


def restore_into(params: Any, opt_state: Any, loaded_params: Any, loaded_state: Any) -> None:
    """Copy a loaded checkpoint into existing (e.g. a TrainStep's) arrays, in place.

    Everything is checked before anything is copied, so a mismatch leaves the
    destination untouched.
    """
    check_compatible(params, loaded_params, "params")
    check_compatible(opt_state, loaded_state, "state")
    dst: dict[str, np.ndarray] = {}
    src: dict[str, np.ndarray] = {}
    _encode(params, "params", dst)
    _encode(opt_state, "state", dst)
    _encode(loaded_params, "params", src)
    _encode(loaded_state, "state", src)
    for k, d in dst.items():
        if not isinstance(d, np.ndarray) or not d.flags.writeable:
            raise CheckpointError(f"cannot restore into {k}: not a writeable numpy array")
    for k, d in dst.items():
        np.copyto(d, src[k])
