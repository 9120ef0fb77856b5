"""Typed reads of a decoded JSON request body: every wrong value becomes a 400 naming the field.

Hand-written rather than pydantic models so the message says what the OpenAI API expects in the
words of its reference, and so fields the server does not implement are refused by name instead of
being dropped (an option a client set and the server ignored is a silent change of behaviour).
"""

from __future__ import annotations

from typing import Any

from osstune.serve.http.errors import bad_request

_MISSING = object()


def type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


class Body:
    """A request body; `used` collects the fields read, `finish()` refuses the rest."""

    def __init__(self, raw: Any, *, known_noops: dict[str, Any] | None = None) -> None:
        if not isinstance(raw, dict):
            raise bad_request(f"the request body must be a JSON object, got {type_name(raw)}")
        self.raw = raw
        self.used: set[str] = set()
        # Fields of the OpenAI API that change nothing here at their default value (e.g. `user`,
        # `store`); any other value is refused, since the server would not honour it.
        self.known_noops = known_noops or {}

    def get(self, name: str, default: Any = None) -> Any:
        self.used.add(name)
        value = self.raw.get(name, default)
        return default if value is None else value

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def string(self, name: str, default: Any = _MISSING) -> str:
        value = self.get(name, None)
        if value is None:
            if default is _MISSING:
                raise bad_request(f"'{name}' is required", name)
            return default
        if not isinstance(value, str):
            raise bad_request(f"'{name}' must be a string, got {type_name(value)}", name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise bad_request(f"'{name}' must be true or false, got {type_name(value)}", name)
        return value

    def integer(self, name: str, default: int | None, low: int | None = None, high: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"'{name}' must be an integer, got {type_name(value)}", name)
        if (low is not None and value < low) or (high is not None and value > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise bad_request(f"'{name}'={value} must be {span}", name)
        return value

    def number(self, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"'{name}' must be a number, got {type_name(value)}", name)
        if not low <= value <= high or (low_open and value == low):  # NaN fails every comparison
            span = f"in ({low}, {high}]" if low_open else f"between {low} and {high}"
            raise bad_request(f"'{name}'={value} must be {span}", name)
        return float(value)

    def stop(self, name: str = "stop") -> tuple[str, ...]:
        value = self.get(name, None)
        if value is None:
            return ()
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values) or len(values) > 4:
            raise bad_request(f"'{name}' must be a non-empty string or an array of up to 4 of them", name)
        return tuple(values)

    def finish(self) -> None:
        """Refuse fields the endpoint does not read: unknown names and OpenAI options we do not honour."""
        for name, value in self.raw.items():
            if name in self.used or value is None:
                continue
            if name in self.known_noops:
                if value != self.known_noops[name] and self.known_noops[name] is not _ANY:
                    raise bad_request(
                        f"'{name}'={value!r} is not supported by this server (only {self.known_noops[name]!r}); "
                        "leave it out",
                        name,
                    )
                continue
            raise bad_request(f"unknown field '{name}'; check its spelling or leave it out", name)


_ANY = object()
ANY = _ANY  # a no-op field whose every value is accepted (e.g. `user`, `metadata`)
