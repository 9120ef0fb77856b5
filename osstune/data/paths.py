"""Where osstune keeps its offline files, and where the packaged sample dataset lives."""

from __future__ import annotations

import os
from pathlib import Path

from osstune.atomic import write_bytes


def cache_dir() -> Path:
    """The root of osstune's cache: `$OSSTUNE_CACHE`, else `~/.cache/osstune`."""
    root = os.environ.get("OSSTUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "osstune"


def sample_dataset_path() -> Path:
    """The persona dataset shipped with the package (used by the demo)."""
    return Path(__file__).resolve().parent / "samples" / "persona.jsonl"


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename (osstune/atomic.py).

    Several processes (test workers, data-parallel ranks) may build the same cached file at once; the
    rename makes each reader see either no file or a complete one.
    """
    write_bytes(path, data)
