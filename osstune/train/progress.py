"""What the user sees during training: a progress line, metrics.jsonl, and the final summary."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from osstune.atomic import write_bytes


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """One updating line on a terminal; one line per logged step when the output is a file or pipe."""

    def __init__(self, total: int, start_step: int = 0, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.total, self.start_step = total, start_step
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def update(self, step: int, m: dict[str, Any]) -> None:
        if self.quiet:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else 0.0
        width = 20
        filled = int(width * step / self.total)
        bar = "#" * filled + "-" * (width - filled)
        parts = [
            f"[{bar}] {step}/{self.total}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"{m['tokens_per_s']:,.0f} tok/s",
        ]
        if m.get("peak_gpu_gb") is not None:
            parts.append(f"peak {m['peak_gpu_gb']:.1f} GB")
        if m.get("comm_s") is not None:
            parts.append(f"comm {m['comm_s']:.3f} s")
        if m.get("eval_loss") is not None:
            parts.append(f"eval {m['eval_loss']:.4f}")
        parts.append(f"ETA {_duration(eta)}")
        line = " | ".join(parts)
        if self.tty:
            self.stream.write("\r" + line.ljust(120)[:160])
            if step == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


class MetricsLog:
    """Appends one JSON object per logged step; flushed each time, so a crash keeps what was logged.
    A crash in the middle of a write leaves a torn last line: it is dropped (with a warning) on
    resume, since the checkpoint's step, not the log, says where the run is."""

    def __init__(self, path: Path, resume_from_step: int = 0) -> None:
        self.path = path
        if path.exists():
            # On resume keep the history up to the checkpoint; drop lines from the lost tail.
            kept = [line for r, line in self._records() if r.get("step", 0) <= resume_from_step]
            write_bytes(path, "".join(line + "\n" for line in kept).encode())
        self.f = open(path, "a")

    def _records(self) -> list[tuple[dict[str, Any], str]]:
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    warnings.warn(f"{self.path}:{i + 1}: dropped a torn last line (a write cut short): {line[:60]!r}")
                    break
                raise ValueError(
                    f"{self.path}:{i + 1}: not a JSON record ({e.msg}); metrics.jsonl is osstune's log of the run, "
                    "fix or delete that line"
                ) from None
        return out

    def write(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def read(self) -> list[dict[str, Any]]:
        return [r for r, _ in self._records()]

    def close(self) -> None:
        self.f.close()
