"""The errors the `osstune` command prints as a message rather than a traceback.

Most user errors are ValueErrors (a bad option, file or value) and OSErrors (a missing file); the
command line prints those too. `OsstuneError` marks the others: a run that stopped for a reason the
user can act on (a diverged loss, a step that cannot be captured as a CUDA graph, an interrupt).
No imports: every layer may raise these.
"""

from __future__ import annotations


class OsstuneError(Exception):
    """An error whose message says what happened and what to do; the CLI prints it and exits 1."""

    exit_code = 1


class Interrupted(OsstuneError):
    """A run stopped by SIGINT/SIGTERM after saving its state; the message says how to continue."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell's convention for a process ended by a signal
