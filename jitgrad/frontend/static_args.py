"""How a call of a jitted function splits into traced and static arguments (as jax.jit).

`jg.jit(f, static_argnums=..., static_argnames=...)`: a static argument is passed to f
as the Python value it is (a shape, a loop count, a flag) and is part of the cache key,
so a new value traces and compiles again and an equal one does not. As in JAX, a
position and a name denote the same parameter: static_argnums also covers that
parameter passed by keyword, and static_argnames the same parameter passed by position
(through f's signature). Keyword arguments that are not static are traced like
positional ones.

A call with keyword arguments or static ones is traced as `Bound(*traced_positional,
traced_keywords)`: the traced positional arguments in order, then one dict of the
traced keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import JitgradError
from .core import user_frame_loc


def _as_tuple(x: Any, kind: type, what: str) -> tuple[Any, ...]:
    items = () if x is None else (x,) if isinstance(x, kind) else tuple(x)
    if not all(isinstance(i, kind) and not isinstance(i, bool) for i in items):
        raise JitgradError(f"{what} must be {kind.__name__}s, got {x!r}")
    return items


class StaticArgs:
    """Which arguments of fn are static."""

    def __init__(self, fn: Callable[..., Any], static_argnums: Any = None,
                 static_argnames: Any = None):
        nums = _as_tuple(static_argnums, int, "static_argnums")
        names = _as_tuple(static_argnames, str, "static_argnames")
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: take them as given
            params = None
        if params is not None:
            nums, names = _through_signature(fn, params, nums, names)
        elif any(n < 0 for n in nums):
            raise JitgradError(f"negative static_argnums {nums} need a function with a "
                               "signature")
        self.nums, self.names = frozenset(nums), frozenset(names)
        self._params = params

    def __bool__(self) -> bool:
        return bool(self.nums or self.names)

    def split(self, args: Sequence[Any], kwargs: dict[str, Any]
              ) -> tuple[tuple[Any, ...], Any, list[int]]:
        """(what is traced: the traced positional arguments then a dict of the traced
        keyword arguments; the cache key of the static ones; the positions traced)."""
        static_pos = tuple((i, type(a), a) for i, a in enumerate(args) if i in self.nums)
        static_kw = tuple(sorted((k, type(v), v) for k, v in kwargs.items()
                                 if k in self.names))
        key = (len(args), static_pos, static_kw)
        try:
            hash(key)
        except TypeError:
            raise self._unhashable(static_pos, static_kw) from None
        traced_pos = [i for i in range(len(args)) if i not in self.nums]
        traced_kw = {k: v for k, v in kwargs.items() if k not in self.names}
        return (*(args[i] for i in traced_pos), traced_kw), key, traced_pos

    def _unhashable(self, static_pos: tuple, static_kw: tuple) -> JitgradError:
        for where, t, v in [*static_pos, *static_kw]:
            try:
                hash(v)
            except TypeError:
                what = f"argument {where}" if isinstance(where, int) else f"argument {where!r}"
                return JitgradError(
                    f"static {what} is a {t.__name__}, which is not hashable: static "
                    f"arguments are part of the cache key (pass a tuple instead of a list, "
                    f"or make an array a traced argument) (at {user_frame_loc()})")
        return JitgradError("static arguments are not hashable")

    def bound(self, fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
        """fn taking what split traces, with the static values of key in place."""
        n_args, static_pos, static_kw = key
        statics = {i: v for i, _, v in static_pos}
        kw = {k: v for k, _, v in static_kw}

        def bound_fn(*traced: Any) -> Any:
            it = iter(traced[:-1])
            args = [statics[i] if i in statics else next(it) for i in range(n_args)]
            return fn(*args, **traced[-1], **kw)

        bound_fn.__name__ = getattr(fn, "__name__", "function")
        if self._params is not None:  # `jitgrad show` names the inputs after fn's parameters
            traced_params = [p for i, p in enumerate(self._params)
                             if i not in statics and p.name not in kw
                             and p.kind != p.VAR_KEYWORD]
            bound_fn.__signature__ = inspect.Signature(traced_params)  # type: ignore[attr-defined]
        return bound_fn


def _through_signature(fn: Callable[..., Any], params: list[inspect.Parameter],
                       nums: tuple[int, ...], names: tuple[str, ...]
                       ) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """static_argnums and static_argnames completed with each other, checked against
    fn's parameters (as jax.jit's infer_argnums_and_argnames)."""
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                        p.POSITIONAL_OR_KEYWORD)]
    by_keyword = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                        p.KEYWORD_ONLY)}
    star_args = any(p.kind == p.VAR_POSITIONAL for p in params)
    star_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
    name = getattr(fn, "__name__", "the function")
    resolved = []
    for n in nums:
        if n < 0:
            if star_args:
                raise JitgradError(f"negative static_argnums {n} of {name}, which takes "
                                   "*args: count from the start")
            n += len(positional)
        if not (0 <= n < len(positional) or star_args):
            raise JitgradError(f"static_argnums {n} is out of range: {name} takes "
                               f"{len(positional)} positional argument(s)")
        resolved.append(n)
    for k in names:
        if k not in by_keyword and not star_kwargs:
            raise JitgradError(f"static_argnames {k!r} is not a parameter of {name} "
                               f"(its parameters: {', '.join(p.name for p in params)})")
    all_names = set(names) | {positional[n] for n in resolved
                              if n < len(positional) and positional[n] in by_keyword}
    all_nums = set(resolved) | {positional.index(k) for k in names if k in positional}
    return tuple(sorted(all_nums)), tuple(sorted(all_names))
