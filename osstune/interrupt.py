"""Stop a long run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption): the step under
way finishes, what it produced is saved (training: a checkpoint; `osstune generate`: its rows), and
the run ends with a message saying how to continue it.

A second signal while that happens stops at once (the default behaviour: KeyboardInterrupt or
termination). Handlers are installed only in the main thread (Python's rule) and restored on exit.
No imports beyond the standard library: every layer may use it.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TextIO


class StopRequest:
    """`stop = StopRequest().install()` ... `if stop.signal_number:` save and end ... `stop.restore()`,
    or `with StopRequest(...) as stop:`. `then` completes the notice printed on the first signal:
    "NAME received: finishing this step, then {then}"."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, then: str = "saving a checkpoint", stream: TextIO | None = None) -> None:
        self.signal_number: int | None = None
        self.then = then
        self.stream = stream
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            if handler is None:  # set outside Python: the default is the closest
                handler = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_number is not None:  # asked twice: stop now
            self.restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.raise_signal(signum)
            return
        self.signal_number = signum
        name = signal.Signals(signum).name
        print(
            f"\nosstune: {name} received: finishing this step, then {self.then} "
            f"({name} again stops at once, without saving)",
            file=self.stream or sys.stderr,
            flush=True,
        )
