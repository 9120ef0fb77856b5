"""One engine request followed as a stream of reply deltas, stop strings and metrics included.

Every path out of `follow` (finished, stop string, client gone, error) leaves the engine request
finished or aborted, so its KV blocks are freed; `Admission` caps the requests held at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from osstune.serve.http.delta import Delta
from osstune.serve.http.errors import ApiError
from osstune.serve.http.metrics import Metrics
from osstune.serve.http.text import StopStrings

# Not an OpenAI finish reason: the client learns the text is the model's raw output, not its answer.
UNPARSED = "harmony_parse_error"


class ReplyParser(Protocol):
    valid: bool
    ended_with_call: bool
    num_reasoning_tokens: int

    def feed(self, token: int) -> Delta: ...
    def finish(self, finish_reason: str) -> Delta: ...


@dataclass
class ChoiceUpdate:
    index: int
    delta: Delta
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    error: str | None = None


class Admission:
    """At most `limit` engine requests held by the server; the rest are refused with 429."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics

    def take(self, n: int) -> None:
        if self.metrics.in_flight + n > self.limit:
            raise ApiError(
                429,
                f"the server is full ({self.metrics.in_flight} requests in flight, at most {self.limit}); retry shortly",
                headers={"Retry-After": "1"},
            )
        self.metrics.in_flight += n

    def give(self, n: int = 1) -> None:
        self.metrics.in_flight -= n


class Choice:
    """One engine request of a reply (a reply with `n` choices has n of them)."""

    def __init__(self, engine: Any, stream: Any, parser: ReplyParser, stops: tuple[str, ...], index: int) -> None:
        self.engine = engine
        self.stream = stream
        self.parser = parser
        self.stops = StopStrings(stops)
        self.index = index
        self.done = False  # finished in the engine, or aborted by us

    def close(self) -> None:
        """Abort the engine request unless it is over (frees its KV blocks at once)."""
        if not self.done:
            self.done = True
            self.engine.abort(self.stream.request_id)

    async def follow(self, metrics: Metrics, arrival: float) -> AsyncIterator[ChoiceUpdate]:
        last = None
        try:
            async for out in self.stream:
                now = time.perf_counter()
                if out.new_token_ids:
                    if last is None:
                        metrics.observe_first_token(now - arrival)
                        if len(out.new_token_ids) > 1:
                            metrics.observe_tokens(0.0, len(out.new_token_ids) - 1)
                    else:
                        metrics.observe_tokens((now - last) / len(out.new_token_ids), len(out.new_token_ids))
                    last = now
                delta, hit = Delta(), False
                for token in out.new_token_ids:
                    piece = self.parser.feed(token)
                    piece.content, hit = self.stops.feed(piece.content)
                    delta.add(piece)
                    if hit:
                        break
                if hit:
                    self.close()
                    metrics.observe_request(now - arrival)
                    yield self._update(delta, "stop", out)
                    return
                if out.finished:
                    self.done = True
                    metrics.observe_request(now - arrival)
                    tail = self.parser.finish(out.finish_reason)
                    tail.content, hit = self.stops.feed(tail.content)
                    delta.add(tail)
                    if not hit:
                        delta.content += self.stops.flush()
                    yield self._update(delta, "stop" if hit else self._reason(out.finish_reason), out)
                    return
                if delta:
                    yield self._update(delta, None, out)
        finally:
            self.close()

    def _reason(self, engine_reason: str) -> str:
        if not self.parser.valid:
            return UNPARSED
        if self.parser.ended_with_call and engine_reason == "stop":
            return "tool_calls"
        return engine_reason

    def _update(self, delta: Delta, reason: str | None, out: Any) -> ChoiceUpdate:
        return ChoiceUpdate(
            self.index, delta, reason, out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens,
            self.parser.num_reasoning_tokens, out.error if reason == "error" else None,
        )


async def merged(choices: list[Choice], metrics: Metrics, arrival: float) -> AsyncIterator[ChoiceUpdate]:
    """The updates of several choices as they come; leaving early aborts the unfinished ones."""
    if len(choices) == 1:
        async for update in choices[0].follow(metrics, arrival):
            yield update
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for update in choice.follow(metrics, arrival):
                await queue.put(update)
        except Exception as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            update = await queue.get()
            if update is None:
                remaining -= 1
            elif isinstance(update, Exception):
                raise update
            else:
                yield update
    finally:
        for task in tasks:
            task.cancel()
        for choice in choices:
            choice.close()
