"""Training checkpoints: parameters, optimizer state and metadata in one ``.npz`` file.

Writes are atomic: the archive is written to a temporary file in the target's
directory, flushed and fsync'ed, then moved over the target with
``os.replace``. A run that dies at any moment (Ctrl-C, a crash, a full disk)
leaves either the previous checkpoint or the new one, never a partial file.

Layout inside the archive: one array per pytree leaf, named by its path
(``params/W0``, ``state/momentum/W0``, ...), plus ``__meta__``, a JSON string
holding the caller's metadata and the two tree structures, so that lists,
tuples and nested dicts come back exactly as they were saved. NamedTuples,
dataclasses and registered pytree classes are saved by field (``params/W``); the file
names their type but does not import it, so they load as dicts of their fields, and
``load(path, target=(params, state))`` rebuilds the caller's own structures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..compiler.atomic_write import atomic_write
from ..errors import JitgradError
from ..frontend import tree as tree_mod
from .npz import read_npz

__all__ = ["CheckpointError", "FORMAT", "check_compatible", "load", "restore_into", "save"]

FORMAT = "jitgrad-checkpoint-1"
_META_KEY = "__meta__"
# How deeply params / state trees may nest. A deeper tree (or structure description in a
# file) is refused with a message instead of being recursed into until RecursionError.
MAX_DEPTH = 64


class CheckpointError(JitgradError):
    """A checkpoint is missing, corrupt, or does not fit the model being resumed."""


# ------------------------------------------------------------------ tree <-> flat arrays


def _too_deep(prefix: str) -> CheckpointError:
    root = prefix.split("/", 1)[0]
    return CheckpointError(f"{root} nests more than {MAX_DEPTH} levels deep")


def _check_numeric(arr: np.ndarray, prefix: str) -> None:
    if arr.dtype.kind not in "biuf":
        raise CheckpointError(f"array {prefix!r} has dtype {arr.dtype}: checkpoints hold "
                              "bool, integer and float arrays only")


def _encode(tree: Any, prefix: str, out: dict[str, np.ndarray], depth: int = 0) -> Any:
    """Flatten ``tree`` into ``out`` (path -> array); return a JSON description of its shape."""
    if depth > MAX_DEPTH:
        raise _too_deep(prefix)
    if tree is None:
        return None
    node = tree_mod.node_children(tree)  # before tuples: a NamedTuple is one
    if node is not None:
        name, fields = node
        return {"node": {"type": name, "fields": [
            [_check_key(k, prefix), _encode(v, f"{prefix}/{k}", out, depth + 1)]
            for k, v in fields]}}
    if isinstance(tree, dict):
        return {"dict": {_check_key(k, prefix): _encode(tree[k], f"{prefix}/{k}", out, depth + 1)
                         for k in sorted(tree)}}
    if isinstance(tree, (list, tuple)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_encode(t, f"{prefix}/{i}", out, depth + 1) for i, t in enumerate(tree)]}
    arr = np.asarray(tree)
    _check_numeric(arr, prefix)
    out[prefix] = arr
    return "leaf"


def _check_key(k: Any, prefix: str) -> str:
    if not isinstance(k, str) or not k or "/" in k:
        raise CheckpointError(f"checkpoint keys must be non-empty strings without '/', "
                              f"got {k!r} under {prefix!r}")
    return k


def _decode(spec: Any, prefix: str, arrays: dict[str, np.ndarray], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _too_deep(prefix)
    if spec is None:
        return None
    if spec == "leaf":
        if prefix not in arrays:
            raise CheckpointError(f"array {prefix!r} is missing")
        _check_numeric(arrays[prefix], prefix)
        return arrays[prefix]
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, body), = spec.items()
        if kind == "dict" and isinstance(body, dict):
            return {k: _decode(v, f"{prefix}/{k}", arrays, depth + 1) for k, v in body.items()}
        if kind in ("list", "tuple") and isinstance(body, list):
            items = [_decode(v, f"{prefix}/{i}", arrays, depth + 1) for i, v in enumerate(body)]
            return tuple(items) if kind == "tuple" else items
        if (kind == "node" and isinstance(body, dict) and isinstance(body.get("fields"), list)
                and all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                        for f in body["fields"])):  # as a dict of its fields (see the top)
            return {k: _decode(v, f"{prefix}/{k}", arrays, depth + 1) for k, v in body["fields"]}
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
    atomic_write(str(path), lambda f: np.savez(f, **arrays), temp_prefix=f".{path.name}.",
                 durable=True)
    return path


def load(path: str | os.PathLike[str], target: tuple[Any, Any] | None = None
         ) -> tuple[Any, Any, dict[str, Any]]:
    """Read a checkpoint written by :func:`save`; returns ``(params, opt_state, meta)``.

    With ``target=(params, state)`` (e.g. a TrainStep's), the loaded trees are checked
    against those and returned in their structures: NamedTuples, dataclasses and
    registered classes as they were, instead of dicts of their fields."""
    path = Path(path)
    name = f"checkpoint {str(path)!r}"
    if not path.exists():
        raise CheckpointError(f"{name} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{name} is not a file")
    arrays = read_npz(path, "checkpoint", CheckpointError)
    if _META_KEY not in arrays:
        raise CheckpointError(f"{name} is an .npz archive but not a jitgrad checkpoint "
                              f"(no {_META_KEY!r} entry)")
    structure, meta = _read_header(arrays.pop(_META_KEY), name)
    try:
        params = _decode(structure["params"], "params", arrays)
        state = _decode(structure["state"], "state", arrays)
    except CheckpointError as e:
        raise CheckpointError(f"{name} is incomplete: {e}") from None
    if target is not None:
        params = _rebuild(target[0], params, "params", name)
        state = _rebuild(target[1], state, "state", name)
    return params, state, meta


def _rebuild(like: Any, loaded: Any, what: str, source: str) -> Any:
    """loaded's arrays in like's structure (their paths match: check_compatible)."""
    check_compatible(like, loaded, what, source)
    want: dict[str, np.ndarray] = {}
    got: dict[str, np.ndarray] = {}
    _encode(like, what, want)  # in flatten order: the walk visits children as flatten does
    _encode(loaded, what, got)
    return tree_mod.unflatten(tree_mod.structure(like), [got[k] for k in want])


def _read_header(entry: np.ndarray, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(structure, meta) from the checkpoint's JSON header, every part of it checked."""
    if entry.shape != () or entry.dtype.kind != "U":
        raise CheckpointError(f"{name} has an unreadable header: {_META_KEY!r} is a "
                              f"{entry.dtype} array of shape {entry.shape}, not a JSON string")
    try:
        header = json.loads(str(entry))
    except RecursionError:
        raise CheckpointError(f"{name} has an unreadable header: its JSON nests too deeply"
                              ) from None
    except ValueError as e:
        raise CheckpointError(f"{name} has an unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} has an unreadable header: not a JSON object")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{name} has format {header.get('format')!r}; this jitgrad "
                              f"reads {FORMAT!r}")
    structure, meta = header.get("structure"), header.get("meta", {})
    if not (isinstance(structure, dict) and {"params", "state"} <= structure.keys()):
        raise CheckpointError(f"{name} has an unreadable header: no params/state structure")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{name} has an unreadable header: its metadata is a "
                              f"{type(meta).__name__}, not a JSON object")
    return structure, meta


# ------------------------------------------------------------------------------ resume


def check_compatible(expected: Any, loaded: Any, what: str = "params",
                     source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` unless ``loaded`` has the structure, shapes and dtypes
    of ``expected``; the message names ``source`` and lists what differs."""
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
        raise CheckpointError(f"{source} does not match the model ({what}): {shown}")


def restore_into(params: Any, opt_state: Any, loaded_params: Any, loaded_state: Any,
                 source: str = "checkpoint") -> None:
    """Copy a loaded checkpoint into existing (e.g. a TrainStep's) arrays, in place.

    Everything is checked before anything is copied, so a mismatch (or a NaN or Inf in
    the checkpoint: training from it could only diverge) leaves the destination
    untouched. ``source`` names the checkpoint in error messages.
    """
    check_compatible(params, loaded_params, "params", source)
    check_compatible(opt_state, loaded_state, "state", source)
    dst: dict[str, np.ndarray] = {}
    src: dict[str, np.ndarray] = {}
    _encode(params, "params", dst)
    _encode(opt_state, "state", dst)
    _encode(loaded_params, "params", src)
    _encode(loaded_state, "state", src)
    for k, d in dst.items():
        if not isinstance(d, np.ndarray) or not d.flags.writeable:
            raise CheckpointError(f"cannot restore into {k}: not a writeable numpy array")
        if src[k].dtype.kind == "f" and not np.all(np.isfinite(src[k])):
            raise CheckpointError(f"{source} holds NaN or infinity in {k}")
    for k, d in dst.items():
        np.copyto(d, src[k])


def step_meta(step: Any) -> dict[str, Any]:
    """What a TrainStep needs besides its arrays to continue exactly where it was: the
    number of steps taken and its random key (None without one), for ``save``'s meta."""
    key = getattr(step, "key", None)
    return {"step": step.t, "key": None if key is None else [int(k) for k in key]}


def restore_step(step: Any, meta: dict[str, Any], source: str = "checkpoint") -> None:
    """Set a TrainStep's step count and key from ``step_meta``'s entries in a loaded
    checkpoint's meta (the dropout masks after a resume are then those an uninterrupted
    run draws). A checkpoint without a key (saved without one) leaves the step's own."""
    t, key = meta.get("step"), meta.get("key")
    # a step count must also survive the float it becomes in the optimizer's update
    if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 2**53:
        raise CheckpointError(f"{source} has step={t!r} in its metadata, not a non-negative "
                              "integer")
    if key is not None and not (isinstance(key, list) and len(key) == 2 and all(
            isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 2**32 for k in key)):
        raise CheckpointError(f"{source} has key={key!r} in its metadata, not two 32-bit "
                              "unsigned integers")
    step.t = t
    if key is not None and getattr(step, "key", None) is not None:
        step.key[...] = key
