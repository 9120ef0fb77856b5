"""Checking a config dataclass's values at construction: the one place every way of building a
config goes through (Python, YAML recipes, `--set`, command-line flags).

A field's annotation says what it accepts: a `Literal[...]` its choices (a typo such as
schedule="cosin" is refused with the nearest choice named, not run as something else), `int`,
`float`, `bool`, `str`, tuples and unions of those, a nested config. `bounded(default, gt=..., ...)`
adds a range. Each config calls `check_fields(self)` first in `__post_init__`, then checks what
relates fields to each other. No torch: the bottom layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

_BOUNDS = "osstune_bounds"


class FieldError(ValueError):
    """A value its field refuses; `field` names it, so a recipe reader can point at its line."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def bounded(
    default: Any, *, gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None
) -> Any:
    """A dataclass field with a default and a range: `lr: float = bounded(2e-4, gt=0)`."""
    return dataclasses.field(default=default, metadata={_BOUNDS: (gt, ge, lt, le)})


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """ValueError naming the field, the bad value and what is allowed, for the first field of
    dataclass `obj` that its annotation or bounds refuse."""
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        problem = _type_problem(hints[f.name], value)
        if problem is None and _BOUNDS in f.metadata:
            problem = _bounds_problem(f.metadata[_BOUNDS], value)
        if problem is not None:
            raise FieldError(f"{f.name}={value!r}: {problem}", f.name)


def choices(cls: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a Literal field (None for other fields): for command-line choices."""
    tp = _hints(cls)[name]
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def value_problem(tp: Any, value: Any) -> str | None:
    """Why annotation `tp` refuses `value` ("must be one of ..."), or None when it accepts it."""
    return _type_problem(tp, value)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _type_problem(tp: Any, value: Any) -> str | None:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) is type(allowed[0]):
            return None
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        if isinstance(value, bool):
            hint = " (YAML reads on/off/yes/no as true/false: quote the word)"
        return f"must be {_describe(tp)}{hint}"
    if origin in (typing.Union, types.UnionType):
        if any(_type_problem(a, value) is None for a in typing.get_args(tp)):
            return None
        return f"must be {_describe(tp)}"
    if origin is tuple:
        if not isinstance(value, tuple):
            return "must be a tuple (a list in YAML)"
        args = typing.get_args(tp)
        items = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(items) != len(value):
            return f"must have {len(items)} values"
        for item_tp, item in zip(items, value):
            problem = _type_problem(item_tp, item)
            if problem is not None:
                return f"item {item!r} {problem}"
        return None
    if tp is type(None):
        return None if value is None else "must be null"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if tp in (bool, str):
        return None if isinstance(value, tp) else f"must be a {'boolean (true/false)' if tp is bool else 'string'}"
    if dataclasses.is_dataclass(tp):
        return None if isinstance(value, tp) else f"must be a {tp.__name__}"
    return None  # an annotation this checker does not know (Any, ...): the class checks it itself


def _bounds_problem(bounds: tuple, value: Any) -> str | None:
    gt, ge, lt, le = bounds
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if value != value:  # NaN passes no comparison
        return "must be a number, not NaN"
    if gt is not None and not value > gt:
        return f"must be greater than {gt}"
    if ge is not None and not value >= ge:
        return f"must be at least {ge}"
    if lt is not None and not value < lt:
        return f"must be less than {lt}"
    if le is not None and not value <= le:
        return f"must be at most {le}"
    return None
