"""Where rows come from: `--data` specs -> raw rows, each with the place it came from.

A spec is one or more of these, joined with commas:
  train.jsonl, train.json        JSON lines / a JSON list (formats.py)          rows named file:line
  train.csv                      a header row, then one row per record          rows named file:line
  train.parquet                  read with pyarrow, in row groups               rows named file[index]
  data/*.jsonl                   a glob: every match, sorted
  ./saved                        a directory written by `datasets`' save_to_disk  rows named dir[index]
  ./saved@test                   ... one split of a saved DatasetDict
  hf:org/name[:config][@split]   a Hugging Face dataset, through `datasets` and its cache (split
                                 default "train"; HF_HUB_OFFLINE=1 uses only the cache)
Indexes count from 0, as `dataset[index]` does. `columns` renames source columns onto the keys
osstune reads ("prompt=question": our "prompt" is the column "question").

Arrow-backed sources (Parquet, `datasets`) give every struct the union of the keys of all rows, with
null where a row had none; those nulls are removed from objects before validation, so they are not
reported as unknown keys. pyarrow and datasets are optional (`pip install 'osstune[data]'`) and
imported only when a spec needs them.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from osstune.data.formats import RawRow, read_rows

FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
# The keys `parse_row` reads at the top of a row: the targets a column may be mapped onto.
ROW_KEYS = (
    "messages", "conversations", "system", "prompt", "completion", "question", "answer", "instruction", "input",
    "output", "tools", "reasoning_effort", "model_identity", "current_date",
)  # fmt: skip
_JSON_CELLS = ("messages", "conversations", "tools")  # CSV cells holding JSON text


@dataclass(frozen=True)
class Source:
    """One part of a spec: a file, a saved `datasets` directory, or a Hugging Face dataset."""

    kind: str  # "jsonl", "json", "csv", "parquet", "disk" or "hf"
    name: str  # the file or directory path, or "hf:org/name[:config]"
    split: str | None = None
    config: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.split}" if self.split and self.kind in ("disk", "hf") else self.name


def resolve(spec: str) -> list[Source]:
    """The sources of a spec, checked to exist (raises FileNotFoundError / ValueError naming the part)."""
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError("no data given: pass a file, a glob, a saved dataset directory or hf:org/name")
    out: list[Source] = []
    for part in parts:
        if part.startswith("hf:"):
            out.append(_hf_source(part))
        elif any(c in part for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(part), recursive=True))
            files = [m for m in matches if Path(m).is_file()]
            if not files:
                raise FileNotFoundError(f"{part}: the pattern matches no file")
            out += [_file_source(Path(m), m) for m in files]
        else:
            path, _, split = part.partition("@") if not Path(part).exists() else (part, "", "")
            p = Path(path).expanduser()
            if p.is_dir():
                out.append(Source("disk", str(p), split or None))
            elif split:
                raise FileNotFoundError(f"{part}: {path} is not a directory saved by datasets (name@split is for those)")
            else:
                out.append(_file_source(p, path))
    return out


def _file_source(path: Path, name: str) -> Source:
    """`name`: the path as the user wrote it (or as the glob matched it), so messages repeat it."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{name} does not exist: no such data file or directory (give a file, a glob, a directory saved by "
            "datasets or hf:org/name)"
        )
    if path.suffix.lower() not in FILE_TYPES:
        raise ValueError(
            f"{name}: unknown data file type {path.suffix!r}; osstune reads {', '.join(FILE_TYPES)} files, a "
            "directory saved by datasets, or hf:org/name"
        )
    return Source(path.suffix.lower().lstrip("."), name)


def _hf_source(part: str) -> Source:
    body, _, split = part[3:].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise ValueError(f"{part}: expected hf:org/name[:config][@split]")
    return Source("hf", f"hf:{body}", split or "train", config or None)


def parse_columns(columns) -> dict[str, str]:
    """("prompt=question", ...) or {"prompt": "question"} -> {our key: source column}, checked."""
    pairs = dict(columns) if isinstance(columns, dict) else dict(_pair(c) for c in columns)
    unknown = sorted(set(pairs) - set(ROW_KEYS))
    if unknown:
        raise ValueError(f"data columns: {unknown} are not keys osstune reads; map columns onto {', '.join(ROW_KEYS)}")
    return pairs


def _pair(entry) -> tuple[str, str]:
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return str(entry[0]), str(entry[1])
    ours, sep, theirs = str(entry).partition("=")
    if not sep or not ours or not theirs:
        raise ValueError(f"data columns: {entry!r} must look like KEY=COLUMN, e.g. prompt=question")
    return ours.strip(), theirs.strip()


def read_source(spec: str, columns: dict[str, str] | None = None) -> Iterator[RawRow]:
    """Raw rows of every source of `spec`, in order, renamed by `columns`."""
    for source in resolve(spec):
        for raw in _rows(source, columns):
            if columns and raw.error is None:
                raw = _rename(raw, columns)
            yield raw


def _rows(source: Source, columns: dict[str, str] | None = None) -> Iterator[RawRow]:
    if source.kind in ("jsonl", "json"):
        for raw in read_rows(source.name):
            yield RawRow(raw.line, raw.value, raw.error, source=source.name, is_row=raw.is_row)
    elif source.kind == "csv":
        yield from _read_csv(source, columns)
    elif source.kind == "parquet":
        yield from _read_parquet(source, columns)
    else:
        dataset = load_dataset(source)
        _check_columns(source.label, dataset.column_names, columns)
        for index, row in enumerate(dataset):
            yield RawRow(index, _drop_nulls(row), source=source.label, indexed=True)


def _check_columns(label: str, names, columns: dict[str, str] | None) -> None:
    """Sources with a schema (CSV header, Parquet, datasets) refuse a mapped column they lack. In
    JSON lines a row without the column simply lacks the value, as with a null or empty cell."""
    missing = [c for c in (columns or {}).values() if c not in names]
    if missing:
        raise ValueError(f"{label}: no column {missing[0]!r} (data.columns maps it); its columns are {list(names)}")


def _rename(raw: RawRow, columns: dict[str, str]) -> RawRow:
    row = raw.value
    if not isinstance(row, dict):
        return raw
    renamed = {ours: row[theirs] for ours, theirs in columns.items() if theirs in row}
    taken = set(columns.values())
    renamed.update({k: v for k, v in row.items() if k not in taken and k not in renamed})
    return RawRow(raw.line, renamed, source=raw.source, indexed=raw.indexed)


def _read_csv(source: Source, columns: dict[str, str] | None) -> Iterator[RawRow]:
    try:
        # utf-8-sig: spreadsheet programs start their CSV files with a byte-order mark.
        with open(source.name, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            line = 1
            if reader.fieldnames is None:  # reads the header
                raise csv.Error("no header line")
            _check_columns(source.name, reader.fieldnames, columns)
            line = reader.line_num + 1
            seen = False
            for record in reader:
                seen = True
                yield _csv_row(record, line, source.name)
                line = reader.line_num + 1  # where the next record starts (a quoted cell may span lines)
    except UnicodeDecodeError:
        # The decoder reads ahead of the csv reader, so the line is where reading stopped, roughly.
        yield RawRow(line, None, "not UTF-8 text (at or after this line); save the file as UTF-8", source=source.name)
        return
    except csv.Error as e:
        yield RawRow(line, None, f"invalid CSV ({e})", source=source.name)
        return
    if not seen:
        yield RawRow(1, None, "the file has no rows; a CSV file needs a header line and one line per row",
                     source=source.name, is_row=False)


def _csv_row(record: dict, line: int, name: str) -> RawRow:
    if None in record:
        return RawRow(line, None, f"more cells than the {len(record) - 1} header columns", source=name)
    # An empty cell is an absent value (CSV cannot tell them apart); JSON columns hold JSON text.
    row: dict[str, Any] = {k: v for k, v in record.items() if v not in ("", None)}
    for key in _JSON_CELLS:
        if key in row:
            try:
                row[key] = json.loads(row[key])
            except json.JSONDecodeError as e:
                return RawRow(line, None, f'the "{key}" cell is not JSON text ({e.msg} at column {e.colno})', source=name)
    return RawRow(line, row, source=name)


def _read_parquet(source: Source, columns: dict[str, str] | None) -> Iterator[RawRow]:
    pq = _optional("pyarrow.parquet", "Parquet files")
    try:
        file = pq.ParquetFile(source.name)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
        yield RawRow(0, None, f"not a readable Parquet file ({e})", source=source.name, indexed=True)
        return
    _check_columns(source.name, file.schema_arrow.names, columns)
    index = 0
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield RawRow(index, _drop_nulls(row), source=source.name, indexed=True)
            index += 1
    if index == 0:
        yield RawRow(0, None, "the file has no rows", source=source.name, indexed=True)


def load_dataset(source: Source):
    """The `datasets.Dataset` of a saved directory or a Hugging Face dataset split."""
    datasets = _optional("datasets", "saved datasets and hf: datasets")
    if source.kind == "disk":
        try:
            loaded = datasets.load_from_disk(source.name)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{source.name}: not a directory written by datasets' save_to_disk ({e}); for a folder of data "
                f"files give a glob ({source.name}/*.jsonl)"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            split = source.split or ("train" if "train" in loaded else None)
            if split not in loaded:
                raise ValueError(f"{source.name}: holds splits {sorted(loaded)}; name one as {source.name}@SPLIT")
            return loaded[split]
        if source.split:
            raise ValueError(f"{source.label}: {source.name} holds one dataset, not splits; drop @{source.split}")
        return loaded
    name = source.name[3:].partition(":")[0]
    try:
        return datasets.load_dataset(name, source.config, split=source.split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set: only datasets already in the cache load)" if offline else ""
        raise ValueError(f"{source.label}: could not load the dataset{hint}: {e}") from None


def source_digest(spec: str) -> dict[str, Any]:
    """What the token cache key hashes for `spec`: the bytes of every file (for one file, exactly as
    before multi-source specs, so existing cache entries stay valid), or a dataset's Arrow files."""
    sources = resolve(spec)
    if len(sources) == 1 and sources[0].kind in ("jsonl", "json"):
        return {"file_sha256": _sha256(sources[0].name)}
    parts = []
    for s in sources:
        if s.kind in ("disk", "hf"):
            dataset = load_dataset(s)
            files = [f["filename"] for f in dataset.cache_files]
            # A dataset without Arrow files (in memory) has only its fingerprint, which datasets derives
            # from its inputs and transforms.
            parts.append({"kind": s.kind, "arrow_sha256": [_sha256(f) for f in files] or dataset._fingerprint})
        else:
            parts.append({"kind": s.kind, "sha256": _sha256(s.name)})
    return {"sources": parts}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"reading {what} needs the '{module.split('.')[0]}' package: pip install 'osstune[data]'"
        ) from e
