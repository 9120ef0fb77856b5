"""A data spec (files, a saved dataset, hf:...; sources.py) -> tokenized rows (ids + train mask),
validated, with a summary of what was kept.

`TokenizedRows(path, options)` streams rows (so files larger than memory can be cached); its
`summary` is complete once the iteration ends. Invalid rows raise `DataError` listing the first
problems as `file:line: reason` (`name[index]: reason` for Parquet and datasets), unless `skip_invalid`, which skips and counts them. Nothing is
dropped or changed without being counted in the summary and named in its notes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from osstune.data.conversation import parse_row
from osstune.data.errors import DataError, Problem, RowError
from osstune.data.masks import TRAIN_ON, train_mask, untrained_mask
from osstune.data.render import RenderOptions, harmony_encoding, render_for_training
from osstune.data.sources import parse_columns, read_source

log = logging.getLogger("osstune.data")

OVERFLOW = ("error", "truncate", "drop")
_MAX_NOTES = 50


@dataclass(frozen=True)
class DataOptions:
    max_length: int | None = None  # tokens per row; None: no limit
    overflow: str = "error"  # rows over max_length: "error" (list them), "truncate" (keep the start) or "drop"
    train_on: str = "last"  # assistant messages trained: "last" turn, its "final" answers, or "all" (masks.py)
    skip_invalid: bool = False  # False: invalid rows raise DataError; True: skipped and counted
    max_problems: int = 20  # how many problems a DataError lists before reading stops
    render: RenderOptions = field(default_factory=RenderOptions)
    # Source columns renamed onto the keys osstune reads: ("prompt=question", ...) (sources.py)
    columns: tuple[str, ...] = ()

    def __post_init__(self):
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow={self.overflow!r}; expected one of {', '.join(OVERFLOW)}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"train_on={self.train_on!r}; expected one of {', '.join(TRAIN_ON)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length={self.max_length}; a row needs at least 2 tokens to train on")
        if self.max_problems < 1:
            raise ValueError(f"max_problems={self.max_problems}; expected at least 1")
        parse_columns(self.columns)


@dataclass(frozen=True)
class TokenizedRow:
    line: int  # where the row starts in its file (the row index for Parquet and `datasets` sources)
    ids: np.ndarray  # (T,) uint32 harmony tokens
    train: np.ndarray  # (T,) bool, True for training targets (see masks.py)


@dataclass(frozen=True)
class DataSummary:
    path: str  # the data spec: a file, several (comma-separated), a glob, a saved dataset or hf:org/name
    rows: int  # rows read, valid or not
    kept: int
    skipped_invalid: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int  # rows left with no trained token (policy "final" or truncation)
    tokens: int  # tokens of the kept rows
    trained_tokens: int  # of which training targets
    truncated_tokens: int  # tokens cut off by truncation
    ignored_keys: tuple[str, ...]  # keys present in the data that osstune does not read
    notes: tuple[str, ...]  # "file:line: what happened" for skipped, dropped and truncated rows (first 50)

    def describe(self) -> str:
        lines = [
            f"{self.path}: {self.rows} rows read, {self.kept} kept, {self.tokens} tokens "
            f"({self.trained_tokens} trained)",
        ]
        changes = [
            (self.skipped_invalid, "skipped as invalid"),
            (self.truncated, f"truncated ({self.truncated_tokens} tokens cut)"),
            (self.dropped_too_long, "dropped as too long"),
            (self.dropped_no_target, "dropped with no trained token"),
        ]
        lines += [f"  {n} {what}" for n, what in changes if n]
        if self.ignored_keys:
            lines.append(f"  keys not used by osstune: {', '.join(self.ignored_keys)}")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


class TokenizedRows:
    """Iterate over the valid, rendered rows of a data spec (one or more sources, sources.py)."""

    def __init__(self, path: str | Path, options: DataOptions = DataOptions()):
        self.path = path if isinstance(path, Path) else str(path)
        self.options = options
        self.summary: DataSummary | None = None

    def __iter__(self) -> Iterator[TokenizedRow]:
        o = self.options
        encoding = harmony_encoding()
        counts = dict.fromkeys(
            ("rows", "kept", "skipped_invalid", "truncated", "dropped_too_long", "dropped_no_target",
             "tokens", "trained_tokens", "truncated_tokens"), 0
        )
        ignored: dict[str, None] = {}
        notes: list[str] = []
        problems: list[Problem] = []

        def note(raw, text: str) -> None:
            if len(notes) < _MAX_NOTES:
                notes.append(f"{raw.location}: {text}")

        for raw in read_source(self.path, parse_columns(o.columns)):
            if not raw.is_row:  # a file with no rows: nothing to skip
                problems.append(Problem(raw.source, raw.line, raw.error or "", raw.indexed, kind="file"))
                break
            counts["rows"] += 1
            try:
                if raw.error:
                    raise RowError(raw.error)
                parsed = parse_row(raw.value)
            except RowError as e:
                if not o.skip_invalid:
                    problems.append(Problem(raw.source, raw.line, str(e), raw.indexed))
                    if len(problems) >= o.max_problems:
                        break
                    continue
                counts["skipped_invalid"] += 1
                note(raw, f"skipped: {e}")
                continue
            ignored.update(dict.fromkeys(parsed.ignored_keys))
            ids = np.asarray(render_for_training(parsed.conversation, o.render), dtype=np.uint32)
            train = train_mask(ids, o.train_on, encoding)
            untrained = untrained_mask(ids, parsed.conversation, encoding)
            if untrained is not None:
                train &= ~untrained
            if o.max_length is not None and len(ids) > o.max_length:
                if o.overflow == "error":
                    problems.append(
                        Problem(
                            raw.source, raw.line,
                            f"{len(ids)} tokens, more than the limit of {o.max_length}", raw.indexed,
                            kind="too_long",
                        )
                    )
                    if len(problems) >= o.max_problems:
                        break
                    continue
                if o.overflow == "drop":
                    counts["dropped_too_long"] += 1
                    note(raw, f"dropped: {len(ids)} tokens > max_length={o.max_length}")
                    continue
                counts["truncated"] += 1
                counts["truncated_tokens"] += len(ids) - o.max_length
                note(raw, f"truncated from {len(ids)} to {o.max_length} tokens")
                ids, train = ids[: o.max_length], train[: o.max_length]
            if not train.any():
                # A row with no target would add nothing but a 0/0 to the loss.
                counts["dropped_no_target"] += 1
                note(raw, f"dropped: no trained token left (train_on={o.train_on!r}, {len(ids)} tokens)")
                continue
            counts["kept"] += 1
            counts["tokens"] += len(ids)
            counts["trained_tokens"] += int(train.sum())
            yield TokenizedRow(raw.line, ids, train)

        if problems:
            stopped = f"Stopped after {o.max_problems} problems. " if len(problems) >= o.max_problems else ""
            raise DataError(problems, stopped).with_hint(
                skip="DataOptions(skip_invalid=True)",
                length="raise DataOptions.max_length, or set overflow='truncate' or 'drop' for rows over it",
            )
        self.summary = DataSummary(str(self.path), **counts, ignored_keys=tuple(ignored), notes=tuple(notes))
        s = self.summary
        if s.kept < s.rows or s.truncated:
            log.warning(
                "%s: %d of %d rows not used (%d invalid, %d too long, %d without a trained token), %d truncated",
                self.path, s.rows - s.kept, s.rows, s.skipped_invalid, s.dropped_too_long, s.dropped_no_target,
                s.truncated,
            )


def tokenize_file(path: str | Path, options: DataOptions = DataOptions()) -> tuple[list[TokenizedRow], DataSummary]:
    """All rows of a file in memory, with the summary (for small files; see cache.py for large ones)."""
    reader = TokenizedRows(path, options)
    rows = list(reader)
    return rows, reader.summary
