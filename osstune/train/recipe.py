"""Frozen dataclass configs <-> plain dicts (YAML recipes) <-> `key.sub=value` overrides.

The dataclasses are the one source of truth: a recipe may only name their fields, values are
checked against the field types, and `to_dict` writes the complete recipe back out.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from osstune.fields import FieldError, value_problem

T = TypeVar("T")


class RecipeError(ValueError):
    pass


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    return obj


def from_dict(
    cls: type[T], data: dict[str, Any], where: str = "recipe", path: str = "", lines: dict[str, str] | None = None
) -> T:
    """Build `cls` from a mapping; RecipeError naming `where` (a file, "command line") and the key.
    lines: `file:line` of keys that come from a recipe file (key_lines), named instead of `where`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{_at(where, lines, path.rstrip('.'))}: {path.rstrip('.') or 'the recipe'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {path}{near[0]}?)" if near else ""
        raise RecipeError(
            f"{_at(where, lines, path + unknown[0])}: unknown key {path}{unknown[0]}{hint}; "
            f"valid keys{' in ' + path.rstrip('.') if path else ''}: {sorted(fields)}"
        )
    kwargs = {name: _coerce(hints[name], value, where, f"{path}{name}", lines) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except FieldError as e:
        raise RecipeError(f"{_at(where, lines, path + e.field)}: {path}{e}") from None
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{where}: {path}{e}") from None


def _at(where: str, lines: dict[str, str] | None, key: str) -> str:
    return (lines or {}).get(key, where)


def _coerce(tp: Any, value: Any, base: str, path: str, lines: dict[str, str] | None = None) -> Any:
    where = _at(base, lines, path)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, base, path, lines)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{where}: {path}={value!r} is not valid")
    if origin is typing.Literal:
        problem = value_problem(tp, value)  # the choices, and the nearest one to a typo
        if problem is not None:
            raise RecipeError(f"{where}: {path}={value!r}: {problem}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, base, f"{path}.", lines)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where}: {path}={value!r}: expected a list")
        args = typing.get_args(tp)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None:
            if len(args) != len(value):
                raise RecipeError(f"{where}: {path}={value!r}: expected {len(args)} values")
            return tuple(_coerce(a, v, base, path, lines) for a, v in zip(args, value))
        return tuple(_coerce(item, v, base, path, lines) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "2e-4" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise RecipeError(f"{where}: {path}={value!r}: expected {_KIND[tp]}")
    return value


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    f"{self.name}:{line}: key {key!r} is given twice (first on line {seen[key]}); keep one"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe_path(name: str | Path) -> Path:
    """A recipe file, or the name of a shipped one (`gpt-oss-20b-qlora`, osstune/recipes/)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = RECIPES / f"{name}.yaml"
    if not path.suffix and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a directory; give a YAML file, or one of the shipped recipes: {names}")
    raise RecipeError(f"recipe {path} does not exist; give a YAML file, or one of the shipped recipes: {names}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe (a file, or a shipped recipe's name) as a mapping; RecipeError with file and line."""
    path = recipe_path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM some editors write is not part of the recipe
        data = yaml.load(text, Loader=lambda stream: _named_loader(stream, path)) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of options, got {type(data).__name__}")
    return data


def key_lines(path: str | Path) -> dict[str, str]:
    """`file:line` of every key of a recipe, by dotted path ("optim.lr"), for messages."""
    path = recipe_path(path)
    out: dict[str, str] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                out[key] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, key + ".")

    root = yaml.compose(path.read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return out


def _named_loader(stream: str, path: Path) -> _UniqueKeyLoader:
    loader = _UniqueKeyLoader(stream)
    loader.name = str(path)
    return loader


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict in place."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    set_path(data, key, value)


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict in place."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
