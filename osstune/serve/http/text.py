"""Incremental decoding of generated tokens and text stop strings.

Both work on what a client sees: a delta is only emitted once its UTF-8 is complete, and text that
may be the start of a stop string is held back until it is known not to be one (the OpenAI API
never returns the stop string itself).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from osstune.serve.http.delta import Delta

# A character is at most 4 UTF-8 bytes, so at most 4 byte-level tokens are incomplete together;
# past that the replacement character is real (invalid bytes) and is emitted as such.
_MAX_HELD_TOKENS = 4


class IncrementalText:
    """Token ids in, text deltas out. Byte-level BPE text is the concatenation of the tokens' bytes,
    so text decoded up to a complete character never changes: only the incomplete tail is held."""

    def __init__(self, decode: Callable[[list[int]], str], skip: Sequence[int] = ()) -> None:
        self.decode = decode  # lossy: invalid UTF-8 becomes U+FFFD
        self.skip = frozenset(skip)
        self.pending: list[int] = []

    def feed(self, tokens: Sequence[int]) -> str:
        self.pending.extend(t for t in tokens if t not in self.skip)
        if not self.pending:
            return ""
        text = self.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < _MAX_HELD_TOKENS:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


class StopStrings:
    """Watches a text stream for any of `stops`; `feed` returns the text safe to emit and whether a
    stop string was found (the text before it is returned, the stop string and the rest are not)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self.held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return text[:cut], True
        keep = self._partial_suffix(text)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


class PlainParser:
    """The parser of raw completions (/v1/completions): every token is text, nothing is harmony."""

    valid = True
    error = None
    ended_with_call = False
    num_reasoning_tokens = 0

    def __init__(self, decode: Callable[[list[int]], str], skip: Sequence[int]) -> None:
        self._text = IncrementalText(decode, skip)

    def feed(self, token: int) -> Delta:
        return Delta(content=self._text.feed([token]))

    def finish(self, finish_reason: str) -> Delta:
        return Delta(content=self._text.flush())
