"""Problems found in data files, each tied to `file:line`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    line: int  # with `indexed`, the 0-based row index of a source without lines (Parquet, datasets)
    reason: str
    indexed: bool = False

    def __str__(self) -> str:
        where = f"{self.path}[{self.line}]" if self.indexed else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"


class DataError(ValueError):
    """Invalid rows in a data file. `problems` lists the first ones found (file:line: reason)."""

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in the data:"] + [f"  {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class RowError(ValueError):
    """One row is invalid; the reader turns it into a `Problem` with the row's file and line."""
