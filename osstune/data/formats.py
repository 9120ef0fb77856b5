"""Reading rows from JSONL and JSON-list files, each row with the line it starts on.

JSONL streams (one object per line, blank lines allowed) and is the format for large datasets. A
`.json` file holds one list of rows and is read whole; we locate each element with `raw_decode` so
problems can still name the line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RawRow:
    line: int  # 1-based line where the row starts; with `indexed`, the 0-based row index
    value: Any  # the decoded JSON value, or None when `error` is set
    error: str | None = None  # why the text is not a row (invalid JSON...)
    source: str = ""  # the file (or dataset split) the row comes from (sources.py)
    indexed: bool = False  # True for sources without lines (Parquet, `datasets`): `line` is an index

    # False for the error of a file that has no rows at all (it is not a row read).
    is_row: bool = True

    @property
    def location(self) -> str:
        """`file:line`, or `name[index]` for indexed sources."""
        return f"{self.source}[{self.line}]" if self.indexed else f"{self.source}:{self.line}"


def read_rows(path: str | Path) -> Iterator[RawRow]:
    """Rows of a .jsonl or .json file. An empty file yields one RawRow carrying the error."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory; give a .jsonl or .json data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".json":
        yield from _read_json_list(path)
    else:
        yield from _read_jsonl(path)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    seen = False
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                # A byte-order mark some editors write at the start is not part of the row.
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(number, None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
                seen = True
                continue
            if not text.strip():
                continue
            seen = True
            try:
                # Without its newline, so an error at the end of the line reports that column.
                yield RawRow(number, json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as e:
                yield RawRow(number, None, f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
    if not seen:
        yield RawRow(1, None, "the file has no rows; a JSONL file needs one JSON object per line", is_row=False)


def _read_json_list(path: Path) -> Iterator[RawRow]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        yield RawRow(1, None, f"not UTF-8 text (byte {e.start}); save the file as UTF-8")
        return
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _skip_space(text, 0)
    if pos == len(text):
        yield RawRow(1, None, "the file is empty; a .json data file must hold a list of rows", is_row=False)
        return
    if text[pos] != "[":
        yield RawRow(
            lines.at(pos), None, "a .json data file must hold a list of rows ([{...}, ...]); use .jsonl for one object per line"
        )
        return
    pos = _skip_space(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        yield RawRow(lines.at(pos), None, "the list is empty: no rows", is_row=False)
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRow(e.lineno, None, f"invalid JSON ({e.msg} at column {e.colno}); the rest of the file is not read")
            return
        yield RawRow(lines.at(pos), value)
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_space(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if _skip_space(text, pos + 1) != len(text):
                yield RawRow(lines.at(pos + 1), None, "unexpected text after the closing ']'")
            return
        yield RawRow(
            lines.at(pos), None, "invalid JSON (expected ',' or ']' after a row); the rest of the file is not read"
        )
        return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _LineCounter:
    """Line numbers of increasing positions in one text, counting each newline once."""

    def __init__(self, text: str):
        self._text, self._pos, self._line = text, 0, 1

    def at(self, pos: int) -> int:
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line
