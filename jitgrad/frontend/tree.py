"""Pytrees: nested containers of arrays, flattened to leaves and back (as in JAX).

Containers: dicts (children in sorted key order), lists, tuples, None (no leaves),
NamedTuples and dataclasses (children in field order; a dataclass field declared with
``field(metadata={"static": True})`` is part of the structure, not a leaf, as in
equinox), and classes registered with `register`. Anything else is a leaf.

A structure (`TreeDef`) is a tuple, hashable and comparable, so that it can be part of
a compiled function's cache key:
``("leaf",)``, ``("none",)``, ``("tuple"|"list", children)``, ``("dict", keys, children)``
or ``("node", node, aux, children)`` for the other containers. The public names follow
JAX's ``jax.tree``: `flatten`, `unflatten`, `leaves`, `structure`, `map`, `register`.

The registry is our own rather than optree's: flattening and unflattening run on every
call of a compiled function, and on a training step's arguments and results (the deep
MLP: 69 leaves) this one measured 6.5 + 2.1 µs against optree 0.20's 12.7 + 0.9 µs, each
in its own process (benchmarks/tree_flatten.py, docs/performance.md); it also takes plain
dataclasses, which optree would need registered one by one, and needs no dependency.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import JitgradError

LEAF: tuple = ("leaf",)
NONE: tuple = ("none",)


class TreeDef(tuple):
    """The structure of a pytree without its leaves (jax.tree.structure); a tuple, so it
    hashes and compares as the plain tuples nested inside it do."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"TreeDef({describe(self)})"

    @property
    def num_leaves(self) -> int:
        return num_leaves(self)


class Node:
    """How one container type flattens: children in order, aux data (hashable: it is
    part of the structure) and, for error messages and checkpoints, a key per child."""

    __slots__ = ("cls", "to_children", "from_children", "keys", "attr_keys")

    def __init__(self, cls: type, to_children: Callable[[Any], tuple[Iterable[Any], Any]],
                 from_children: Callable[[Any, list[Any]], Any],
                 keys: Callable[[Any, int], Sequence[str]], attr_keys: bool):
        self.cls = cls
        self.to_children = to_children
        self.from_children = from_children
        self.keys = keys            # (aux, number of children) -> one key per child
        self.attr_keys = attr_keys  # keys are attribute names (.W) rather than indices ([0])

    def __repr__(self) -> str:
        return self.cls.__name__


_nodes: dict[type, Node | None] = {}  # container types seen so far; None: a leaf type
_nodes[np.ndarray] = None
_registered: set[type] = set()


def register(cls: type, flatten: Callable[[Any], tuple[Iterable[Any], Any]],
             unflatten: Callable[[Any, list[Any]], Any]) -> None:
    """Make instances of cls containers (jax.tree_util.register_pytree_node):
    flatten(obj) -> (children, aux), unflatten(aux, children) -> obj. aux must be
    hashable and comparable: it is part of the structure, so of a compiled function's
    cache key. A NamedTuple or dataclass registered this way flattens as told."""
    if not isinstance(cls, type):
        raise JitgradError(f"jg.tree.register needs a class, got {cls!r}")
    if cls in (dict, list, tuple, type(None), np.ndarray) or cls in _registered:
        raise JitgradError(f"{cls.__name__} is already a pytree container")

    def to_children(x: Any) -> tuple[tuple[Any, ...], Any]:
        children, aux = flatten(x)
        return tuple(children), aux

    _registered.add(cls)
    _nodes[cls] = Node(cls, to_children, unflatten, lambda aux, n: [str(i) for i in range(n)],
                       attr_keys=False)


def _namedtuple_node(cls: type) -> Node:
    return Node(cls, lambda x: (x, None), lambda aux, children: cls(*children),
                lambda aux, n: cls._fields, attr_keys=True)


def _dataclass_node(cls: type) -> Node:
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    static = tuple(f.name for f in fields if f.metadata.get("static"))

    def to_children(x: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(x, n) for n in data], tuple(getattr(x, n) for n in static)

    def from_children(aux: tuple[Any, ...], children: list[Any]) -> Any:
        # Rebuilt without calling __init__ (which may check or convert what it is given:
        # a traced value is not an array), as equinox does; frozen ones too.
        obj = object.__new__(cls)
        for name, value in zip(data + static, [*children, *aux], strict=True):
            object.__setattr__(obj, name, value)
        return obj

    return Node(cls, to_children, from_children, lambda aux, n: data, attr_keys=True)


def _node_of_type(t: type) -> Node | None:
    """The Node of a type met for the first time (None: its instances are leaves)."""
    if t not in _nodes:
        if issubclass(t, tuple) and hasattr(t, "_fields"):
            _nodes[t] = _namedtuple_node(t)
        elif dataclasses.is_dataclass(t):
            _nodes[t] = _dataclass_node(t)
        else:
            _nodes[t] = None
    return _nodes[t]


# ---------------------------------------------------------------- flatten / unflatten

def flatten(tree: Any) -> tuple[list[Any], TreeDef]:
    """(leaves, structure), as jax.tree.flatten."""
    out: list[Any] = []
    return out, TreeDef(_flatten(tree, out))


def _flatten(x: Any, out: list[Any]) -> tuple:
    t = type(x)
    if t is np.ndarray:  # the common case first: this runs on every call
        out.append(x)
        return LEAF
    if t is list or t is tuple:
        return ("list" if t is list else "tuple", _flatten_all(x, out))
    if t is dict:
        keys = _sorted_keys(x)
        return ("dict", keys, _flatten_all([x[k] for k in keys], out))
    if x is None:
        return NONE
    node = _nodes[t] if t in _nodes else _node_of_type(t)
    if node is not None:
        children, aux = node.to_children(x)
        return ("node", node, aux, _flatten_all(children, out))
    if isinstance(x, dict):  # subclasses (OrderedDict, defaultdict) as plain dicts
        keys = _sorted_keys(x)
        return ("dict", keys, _flatten_all([x[k] for k in keys], out))
    if isinstance(x, (list, tuple)):
        return ("list" if isinstance(x, list) else "tuple", _flatten_all(x, out))
    out.append(x)
    return LEAF


def _flatten_all(children: Iterable[Any], out: list[Any]) -> tuple:
    if all(type(c) is np.ndarray for c in children):  # a list of parameters: no recursion
        out.extend(children)
        return (LEAF,) * len(children)
    return tuple([_flatten(c, out) for c in children])


def _sorted_keys(d: dict) -> tuple:
    try:
        return tuple(sorted(d))
    except TypeError:
        raise JitgradError(f"the keys of a dict in a pytree must be sortable (as in JAX), "
                           f"got {sorted(builtins.map(repr, d))}") from None


def unflatten(treedef: tuple, leaves: Iterable[Any]) -> Any:
    """The pytree of this structure holding these leaves (jax.tree.unflatten)."""
    it = iter(leaves)
    try:
        out = _unflatten(treedef, it)
    except StopIteration:
        raise JitgradError(f"too few leaves for the structure {describe(treedef)}") from None
    if next(it, _END) is not _END:
        raise JitgradError(f"too many leaves for the structure {describe(treedef)}")
    return out


_END = object()


def _unflatten(td: tuple, it: Any) -> Any:
    kind = td[0]
    if kind == "leaf":
        return next(it)
    if kind == "none":
        return None
    cs = td[-1]
    if cs.count(LEAF) == len(cs):  # all leaves: taken at once
        children = list(itertools.islice(it, len(cs)))
        if len(children) < len(cs):
            raise StopIteration
    else:
        children = [_unflatten(c, it) for c in cs]
    if kind == "dict":
        return dict(zip(td[1], children, strict=True))
    if kind == "node":
        return td[1].from_children(td[2], children)
    return tuple(children) if kind == "tuple" else children


def children_of(td: tuple) -> tuple:
    """The structures of td's children (none for a leaf or None)."""
    return () if td[0] in ("leaf", "none") else td[-1]


def num_leaves(td: tuple) -> int:
    return 1 if td[0] == "leaf" else sum(num_leaves(c) for c in children_of(td))


def child_keys(td: tuple) -> list[str]:
    """A key per child: dict keys as they are, field names, or indices as strings."""
    kind = td[0]
    if kind == "dict":
        return list(td[1])
    if kind == "node":
        return list(td[1].keys(td[2], len(td[3])))
    return [str(i) for i in range(len(children_of(td)))]


def describe(td: tuple) -> str:
    """A short human description of a structure, for error messages."""
    kind = td[0]
    if kind == "leaf":
        return "*"
    if kind == "none":
        return "None"
    if kind == "dict":
        return "{" + ", ".join(f"{k!r}: {describe(c)}" for k, c in zip(td[1], td[2])) + "}"
    inner = [describe(c) for c in children_of(td)]
    if kind == "node":
        node = td[1]
        if node.attr_keys:
            inner = [f"{k}={d}" for k, d in zip(child_keys(td), inner, strict=True)]
        return f"{node.cls.__name__}({', '.join(inner)})"
    if kind == "tuple":
        return f"({inner[0]},)" if len(inner) == 1 else f"({', '.join(inner)})"
    return f"[{', '.join(inner)}]"


def leaf_paths(td: tuple, prefix: str = "", key: Callable[[Any], str] = "[{!r}]".format
               ) -> list[str]:
    """Where each leaf sits, in flatten order, as indexing text: "[0]['W'][1]" (or, with
    key=".{}".format, "[0].W[1]"); fields of NamedTuples and dataclasses as ".W"."""
    kind = td[0]
    if kind == "leaf":
        return [prefix]
    if kind == "none":
        return []
    if kind == "dict":
        return [p for k, c in zip(td[1], td[2], strict=True)
                for p in leaf_paths(c, prefix + key(k), key)]
    attr = kind == "node" and td[1].attr_keys
    return [p for k, c in zip(child_keys(td), children_of(td), strict=True)
            for p in leaf_paths(c, f"{prefix}.{k}" if attr else f"{prefix}[{k}]", key)]


def node_children(x: Any) -> tuple[str, list[tuple[str, Any]]] | None:
    """For a NamedTuple, dataclass or registered instance: its type's name and its
    children with their keys, in flatten order; None for anything else (checkpoints)."""
    t = type(x)
    node = _nodes[t] if t in _nodes else _node_of_type(t)
    if node is None:
        return None
    children, aux = node.to_children(x)
    children = list(children)
    return t.__name__, list(zip(node.keys(aux, len(children)), children, strict=True))


def same_leaves(tree: Any) -> Callable[[Any], bool]:
    """A function telling whether a tree still holds the very leaves `tree` holds now, in
    the same places: train_step's thin path must see a parameter array replaced inside
    the user's dict. It reads dicts, lists, tuples, NamedTuples and dataclasses by key in
    one generated expression (a third of flatten's time at the deep MLP's step arguments,
    69 + 69 leaves); a registered class is flattened."""
    held: list[Any] = []    # V: the leaves and the dict keys, by position
    nodes: list[Any] = []   # F: a registered subtree's check (flattening it)
    terms: list[str] = []

    def const(value: Any) -> str:
        held.append(value)
        return f"V[{len(held) - 1}]"

    def walk(x: Any, expr: str) -> None:
        t = type(x)
        node = _nodes[t] if t in _nodes else _node_of_type(t)
        if x is None:
            terms.append(f"{expr} is None")
        elif node is not None and node.attr_keys:
            children, aux = node.to_children(x)
            children = list(children)
            terms.append(f"type({expr}) is {const(t)}")
            for k, c in zip(node.keys(aux, len(children)), children, strict=True):
                walk(c, f"{expr}.{k}")
        elif node is not None:
            want = flatten(x)
            nodes.append(lambda y, want=want: _same_flat(flatten(y), want))
            terms.append(f"F[{len(nodes) - 1}]({expr})")
        elif isinstance(x, (dict, list, tuple)):
            terms.append(f"type({expr}) is {const(t)} and len({expr}) == {len(x)}")
            keys = _sorted_keys(x) if isinstance(x, dict) else range(len(x))
            for k in keys:
                walk(x[k], f"{expr}[{const(k) if isinstance(x, dict) else k}]")
        else:
            terms.append(f"{expr} is {const(x)}")

    walk(tree, "t")
    return eval(f"lambda t: {' and '.join(terms)}", {"V": held, "F": nodes})


def _same_flat(got: tuple[list[Any], TreeDef], want: tuple[list[Any], TreeDef]) -> bool:
    return got[1] == want[1] and all(a is b for a, b in zip(got[0], want[0], strict=True))


def first_unhashable(td: tuple) -> str | None:
    """A description of the first part of a structure that is not hashable (the aux data
    of a registered class, a static dataclass field), or None."""
    if td[0] == "node":
        try:
            hash(td[2])
        except TypeError:
            return (f"the static part of a {td[1].cls.__name__} "
                    f"({type(td[2]).__name__} {td[2]!r:.60})")
    for c in children_of(td):
        bad = first_unhashable(c)
        if bad is not None:
            return bad
    return None


# ---------------------------------------------------------------- jax.tree's names

def leaves(tree: Any) -> list[Any]:
    """The leaves of tree, in flatten order (jax.tree.leaves)."""
    return flatten(tree)[0]


def structure(tree: Any) -> TreeDef:
    """The structure of tree without its leaves (jax.tree.structure)."""
    return flatten(tree)[1]


def map(f: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """f applied to each leaf of tree (and the matching leaves of rest, which must have
    the same structure), in a tree of the same structure (jax.tree.map)."""
    xs, td = flatten(tree)
    others = []
    for r in rest:
        ys, rtd = flatten(r)
        if rtd != td:
            raise JitgradError(f"jg.tree.map: structures differ: {describe(td)} and "
                               f"{describe(rtd)}")
        others.append(ys)
    return unflatten(td, [f(*args) for args in zip(xs, *others, strict=True)])
