"""A tokenized dataset on disk, memory-mapped, so datasets larger than RAM can be trained on.

Layout of one cache entry (a directory named by its key):
  tokens.u32   all rows' token ids, concatenated             (N,) uint32
  mask.u8      1 where the token is a training target        (N,) uint8
  offsets.i64  row r is tokens[offsets[r]:offsets[r+1]]       (R+1,) int64
  lines.i64    the line each row starts on in the source      (R,) int64
  manifest.json  key, source, options, counts and the DataSummary
The key hashes the file's bytes, every option that changes the tokens, and the versions of the
renderer, so a changed file or option builds a new entry. An entry is written into a temporary
directory and renamed into place, so readers never see a partial one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from array import array
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from osstune.atomic import atomic_dir, clean_leftovers
from osstune.data.paths import cache_dir
from osstune.data.pipeline import DataOptions, DataSummary, TokenizedRows
from osstune.data.sources import resolve, source_digest

_FORMAT = 1
_FILES = ("tokens.u32", "mask.u8", "offsets.i64", "lines.i64")


@dataclass(frozen=True)
class TokenCache:
    """Read-only view of a cache entry. Arrays are memory-mapped."""

    path: Path
    tokens: np.ndarray  # (N,) uint32
    mask: np.ndarray  # (N,) uint8
    offsets: np.ndarray  # (R+1,) int64
    lines: np.ndarray  # (R,) int64
    summary: DataSummary
    source: str

    @classmethod
    def open(cls, path: str | Path) -> TokenCache:
        path = Path(path)
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != _FORMAT:
            raise ValueError(f"{path}: cache format {manifest.get('format')} is not {_FORMAT}; delete it to rebuild")
        arrays = {}
        for name in _FILES:
            dtype = {"u32": np.uint32, "u8": np.uint8, "i64": np.int64}[name.rsplit(".", 1)[1]]
            file = path / name
            # np.memmap refuses empty files; an empty dataset cannot reach here (it raises earlier).
            arrays[name] = np.memmap(file, dtype=dtype, mode="r")
        return cls(
            path=path,
            tokens=arrays["tokens.u32"],
            mask=arrays["mask.u8"],
            offsets=arrays["offsets.i64"],
            lines=arrays["lines.i64"],
            summary=DataSummary(**{**manifest["summary"], "ignored_keys": tuple(manifest["summary"]["ignored_keys"]),
                                   "notes": tuple(manifest["summary"]["notes"])}),
            source=manifest["source"],
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(R,) int64 tokens per row."""
        return np.diff(self.offsets)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (T,) uint32, mask (T,) uint8) of row r."""
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        return self.tokens[a:b], self.mask[a:b]


def cache_key(path: str | Path, options: DataOptions) -> str:
    """`path` is a data spec (sources.py): its files' bytes, or a dataset's Arrow files, are hashed."""
    settings = {
        "format": _FORMAT,
        **source_digest(str(path)),
        "options": _options_dict(options),
        # The renderer's version is part of the key: harmony has changed header layouts between releases.
        "openai_harmony": metadata.version("openai-harmony"),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def build_cache(path: str | Path, options: DataOptions = DataOptions(), root: str | Path | None = None) -> TokenCache:
    """The cache entry of the data spec `path` (a file, several, a glob, a saved dataset, hf:org/name)
    under `options`, built if missing. Raises DataError on invalid data."""
    root = Path(root) if root is not None else cache_dir() / "datasets"
    key = cache_key(path, options)
    final = root / key
    if (final / "manifest.json").is_file():
        return _named_for(TokenCache.open(final), path)
    clean_leftovers(root)  # entries half-built by killed processes
    try:
        with atomic_dir(final) as tmp:
            _write_entry(path, options, key, tmp)
    except OSError:
        if not (final / "manifest.json").is_file():  # not a concurrent builder that won the race
            raise
    return TokenCache.open(final)


def _named_for(cache: TokenCache, path: str | Path) -> TokenCache:
    """An entry keyed by content may have been built from a copy of this file elsewhere: its summary
    (and notes, which begin with the file's name) then speak of `path`, the file asked for."""
    old, new = cache.summary.path, str(path)
    if old == new:
        return cache
    notes = tuple(new + n[len(old):] if n.startswith(old + ":") else n for n in cache.summary.notes)
    return dataclasses.replace(cache, summary=dataclasses.replace(cache.summary, path=new, notes=notes))


def _write_entry(path: str | Path, options: DataOptions, key: str, out: Path) -> None:
    offsets, lines = array("q", [0]), array("q")
    reader = TokenizedRows(path, options)
    with open(out / "tokens.u32", "wb") as tokens_f, open(out / "mask.u8", "wb") as mask_f:
        for row in reader:
            tokens_f.write(row.ids.astype(np.uint32, copy=False).tobytes())
            mask_f.write(row.train.astype(np.uint8).tobytes())
            offsets.append(offsets[-1] + len(row.ids))
            lines.append(row.line)
    summary = reader.summary
    if summary.kept == 0:
        raise ValueError(f"{path}: no usable rows ({summary.rows} read)\n{summary.describe()}")
    (out / "offsets.i64").write_bytes(offsets.tobytes())
    (out / "lines.i64").write_bytes(lines.tobytes())
    manifest = {
        "format": _FORMAT,
        "key": key,
        "source": _describe(path),
        "options": _options_dict(options),
        "rows": len(lines),
        "tokens": offsets[-1],
        "summary": dataclasses.asdict(summary),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def _describe(spec: str | Path) -> str:
    """The manifest's `source`: absolute paths for files, the labels of datasets."""
    return ",".join(str(Path(s.name).resolve()) if s.kind not in ("hf", "disk") else s.label for s in resolve(str(spec)))


def _options_dict(options: DataOptions) -> dict:
    d = dataclasses.asdict(options)
    d.pop("max_problems")  # changes error reporting, not tokens
    if not d["columns"]:
        d.pop("columns")  # keys of entries built before column mapping existed stay the same
    return d
