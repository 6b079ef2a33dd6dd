"""Pytrees: nested dicts, lists and tuples of arrays, flattened to leaves and back (as in JAX)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

TreeDef = tuple  # ("leaf",) | ("none",) | ("tuple"|"list", children) | ("dict", keys, children)

LEAF: TreeDef = ("leaf",)


def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    leaves: list[Any] = []
    return leaves, _flatten(tree, leaves)


def _flatten(tree: Any, leaves: list[Any]) -> TreeDef:
    if type(tree) is np.ndarray:  # the common case first: this runs on every call
        leaves.append(tree)
        return LEAF
    if tree is None:
        return ("none",)
    if isinstance(tree, (tuple, list)) and not hasattr(tree, "_fields"):
        return (type(tree).__name__, tuple(_flatten(t, leaves) for t in tree))
    if isinstance(tree, dict):
        keys = sorted(tree)
        return ("dict", tuple(keys), tuple(_flatten(tree[k], leaves) for k in keys))
    leaves.append(tree)
    return LEAF


def unflatten(treedef: TreeDef, leaves: Any) -> Any:
    it = iter(leaves)
    out = _unflatten(treedef, it)
    if next(it, _END) is not _END:
        raise ValueError("too many leaves for the tree structure")
    return out


_END = object()


def _unflatten(td: TreeDef, it: Any) -> Any:
    kind = td[0]
    if kind == "leaf":
        return next(it)
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _unflatten(c, it) for k, c in zip(td[1], td[2], strict=True)}
    children = [_unflatten(c, it) for c in td[1]]
    return tuple(children) if kind == "tuple" else children


def describe(td: TreeDef) -> str:
    """A short human description of a structure, for error messages."""
    kind = td[0]
    if kind == "leaf":
        return "*"
    if kind == "none":
        return "None"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {describe(c)}" for k, c in zip(td[1], td[2])) + "}"
    inner = ", ".join(describe(c) for c in td[1])
    return f"({inner},)" if kind == "tuple" and len(td[1]) == 1 else (
        f"({inner})" if kind == "tuple" else f"[{inner}]")


def leaf_paths(td: TreeDef, prefix: str = "", key: Callable[[Any], str] = "[{!r}]".format,
               index: Callable[[int], str] = "[{}]".format) -> list[str]:
    """Where each leaf sits, in flatten order, as indexing text: "[0]['W'][1]" (or, with
    key=".{}".format, "[0].W[1]"; checkpoints name arrays "params/W0" with "/{}".format
    for both)."""
    kind = td[0]
    if kind == "leaf":
        return [prefix]
    if kind == "none":
        return []
    if kind == "dict":
        return [p for k, c in zip(td[1], td[2], strict=True)
                for p in leaf_paths(c, prefix + key(k), key, index)]
    return [p for i, c in enumerate(td[1]) for p in leaf_paths(c, prefix + index(i), key, index)]
