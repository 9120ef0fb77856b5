"""Problems found in data files, each tied to `file:line`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    path: str
    line: int  # with `indexed`, the 0-based row index of a source without lines (Parquet, datasets)
    reason: str
    indexed: bool = False
    # "invalid" (a row osstune cannot read), "too_long" (over the length limit) or "file" (no rows at
    # all): the command that reads the data names its own options for each (DataError.hint_for).
    kind: str = "invalid"

    def __str__(self) -> str:
        where = f"{self.path}[{self.line}]" if self.indexed else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"


class DataError(ValueError):
    """Invalid rows in a data file. `problems` lists the first ones found (file:line: reason)."""

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = list(problems)
        self.hint = hint
        lines = [f"{len(self.problems)} problem(s) in the data:"] + [f"  {p}" for p in self.problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


    def with_hint(self, skip: str, length: str) -> DataError:
        """The same problems, with the remedies named as the caller's user spells them: `skip` (how to
        skip invalid rows) and `length` (how to raise the limit, or truncate or drop long rows)."""
        kinds = {p.kind for p in self.problems}
        hints = ["Fix these rows"]
        if "invalid" in kinds:
            hints.append(f"skip invalid rows (counted) with {skip}")
        if "too_long" in kinds:
            hints.append(length)
        stopped = self.hint.split(". ")[0] + ". " if self.hint.startswith("Stopped") else ""
        return DataError(self.problems, stopped + ", or ".join(hints) + ".")


class RowError(ValueError):
    """One row is invalid; the reader turns it into a `Problem` with the row's file and line."""
