"""What a long batch run shows: a progress line on stderr. (How it stops on Ctrl-C or SIGTERM:
`osstune.interrupt.StopRequest`.)"""

from __future__ import annotations

import time
from typing import TextIO


class Progress:
    """rows done / total, tokens/s and time left on one stderr line (redrawn on a terminal, a line
    every 10 s otherwise, so logs stay short)."""

    def __init__(self, total: int, done: int, stream: TextIO) -> None:
        self.total, self.first = total, done
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = 0.25 if self.tty else 10.0
        self.t0 = self.last = time.perf_counter()
        self.shown: tuple[int, int] | None = None

    def update(self, done: int, tokens: int, force: bool = False) -> None:
        now = time.perf_counter()
        if (not force and now - self.last < self.interval) or self.shown == (done, tokens):
            return
        self.last, self.shown = now, (done, tokens)
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.first) / elapsed
        left = f", {_duration((self.total - done) / rate)} left" if rate > 0 and done < self.total else ""
        line = (
            f"generate: {done}/{self.total} rows ({100 * done / self.total:.0f}%), {tokens} tokens, "
            f"{tokens / elapsed:.1f} tokens/s, {_duration(elapsed)}{left}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, done: int, tokens: int) -> None:
        self.update(done, tokens, force=True)
        if self.tty:
            self.stream.write("\n")


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
