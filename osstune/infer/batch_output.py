"""The output file of `osstune generate`: one JSON object per line, in input order, resumable.

Results finish in any order; a row is written when every row before it is, and the rows that
finished early wait in memory for their turn. Each batch of lines is flushed and fsynced, so after a
crash or Ctrl-C the file holds whole rows, at worst followed by one torn line. A re-run with the same
output finds how many rows are there, checks that each belongs to the same prompt (its `id` and
`prompt_sha`), cuts the torn tail and appends the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from osstune.infer.batch_rows import PromptRow


class OutputFile:
    def __init__(self, path: str | Path, rows: list[PromptRow], *, overwrite: bool = False, source: str = "") -> None:
        """`rows`: what the run generates, in order; `source` names the input in error messages."""
        self.path = Path(path)
        self.rows = rows
        if self.path.is_dir():
            raise ValueError(f"--output {self.path} is a directory; give a .jsonl file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        done, end = (0, 0) if overwrite or not self.path.exists() else resume_point(self.path, rows, source)
        with self.path.open("ab") as f:
            f.truncate(end)  # drops a torn last line, or everything with --overwrite
            os.fsync(f.fileno())
        self.num_written = done
        self.waiting: dict[int, dict[str, Any]] = {}  # position in `rows` -> finished out of turn
        self._broken = False
        self._file = self.path.open("ab")

    def put(self, position: int, record: dict[str, Any]) -> None:
        """The result of `rows[position]`; written now if every row before it is, else kept."""
        if position < self.num_written or position in self.waiting:
            raise AssertionError(f"row {position} is given twice")
        self.waiting[position] = record

    def sync(self) -> int:
        """Write the rows whose turn has come, flush and fsync; returns how many were written."""
        if self._broken:
            return 0
        end = self.num_written
        while end in self.waiting:
            end += 1
        if end == self.num_written:
            return 0
        text = "".join(json.dumps(self.waiting[k], ensure_ascii=False) + "\n" for k in range(self.num_written, end))
        try:
            self._file.write(text.encode("utf-8"))
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            # Interrupted mid-write: a torn line may be on disk, which the next run cuts; writing
            # more after it would bury it in the middle of the file.
            self._broken = True
            raise
        for k in range(self.num_written, end):
            del self.waiting[k]
        count, self.num_written = end - self.num_written, end
        return count

    def close(self) -> None:
        self.sync()
        self._file.close()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resume_point(path: Path, rows: list[PromptRow], source: str = "") -> tuple[int, int]:
    """(rows already written, byte offset where they end) of an existing output for `rows`.

    Raises ValueError naming `--overwrite` when the file holds results of other prompts.
    """
    data = path.read_bytes()
    count = pos = 0
    where = f" ({source})" if source else ""
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break  # the last line is torn (no newline): it is written again
        try:
            record = json.loads(data[pos:end])
        except ValueError as e:
            if not data[end + 1 :].strip():
                break  # a torn last line
            raise ValueError(
                f"{path}:{count + 1}: not a result row ({e}); this file was not written by osstune generate: "
                "pass --overwrite to replace it, or choose another --output"
            ) from None
        if count >= len(rows):
            raise ValueError(
                f"{path} holds more rows ({count + 1} or more) than the input{where} has prompts ({len(rows)}): it is "
                "the output of another input; pass --overwrite to replace it, or choose another --output"
            )
        row = rows[count]
        got = (record.get("id"), record.get("prompt_sha")) if isinstance(record, dict) else (None, None)
        if got != (row.id, row.digest):
            raise ValueError(
                f"{path}:{count + 1}: this result (id {got[0]!r}) is not the result of row id {row.id!r} "
                f"(line {row.line} of the input{where}) as rendered now: the file is the output of another input "
                "or other rendering options; pass --overwrite to replace it, or choose another --output"
            )
        count += 1
        pos = end + 1
    return count, pos
