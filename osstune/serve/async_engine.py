"""`AsyncEngine`: the engine for asyncio code (the HTTP server).

The engine steps in one background thread (a forward pass blocks, and the GPU works best fed
back to back); asyncio callers add requests and read their updates from per-request streams.
Requests are checked at once in the caller's thread (`RequestError`), so a bad request never
reaches the loop. Aborts (a client that went away) are handed to the loop thread and free the
request's KV blocks before its next step. Updates cross threads with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import AsyncIterator

from osstune.model import GptOss
from osstune.serve.engine import LLMEngine
from osstune.serve.types import EngineStats, RequestError, RequestOutput, SamplingParams


class RequestStream:
    """The updates of one request, as an async iterator; ends after the finished update."""

    def __init__(self, engine: AsyncEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def _put(self, out: RequestOutput) -> None:  # called in the loop's thread
        self._queue.put_nowait(out)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._queue.get()
                self.finished = out.finished
                yield out
        finally:
            if not self.finished:  # the consumer stopped early (disconnect, cancellation)
                self.engine.abort(self.request_id)

    def cancel(self) -> None:
        self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self._lock = threading.Lock()  # guards the lists below; the engine itself is the loop thread's
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._pending: list = []  # checked requests for the loop thread to queue
        self._aborts: list[str] = []
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None  # set when the loop died; every request then fails with it

    @classmethod
    def from_model(cls, model: str | GptOss, **options) -> AsyncEngine:
        """`LLMEngine.from_model(model, **options)` (adapters, config, device, dtype, log), stepped
        in a background thread once `start()` is called."""
        return cls(LLMEngine.from_model(model, **options))

    @property
    def adapter_names(self) -> list[str]:
        return self.engine.adapters.names

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="osstune-engine", daemon=True)
            self._thread.start()

    def add_request(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue a request from a coroutine; raises `RequestError` at once for a bad one."""
        loop = asyncio.get_running_loop()
        if self.error is not None:
            raise RuntimeError(f"the engine stopped after an internal error: {self.error}")
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        req = self.engine.make_request(prompt_token_ids, params, request_id, adapter)
        with self._lock:  # held for list operations only, never across a step
            if req.request_id in self._streams:
                raise RequestError(f"request id {req.request_id!r} is already in use", field="request_id")
            stream = RequestStream(self, req.request_id, loop)
            self._streams[req.request_id] = stream
            self._pending.append(req)
        self._wake.set()
        return stream

    async def generate(self, prompt_token_ids, params, request_id=None, adapter=None) -> AsyncIterator[RequestOutput]:
        stream = self.add_request(prompt_token_ids, params, request_id, adapter)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request's stream ends with finish_reason "abort" (if anyone still reads it)."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        """As of the last step (never waits for a running step)."""
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort every request and stop the loop thread."""
        self._stopping = True
        with self._lock:
            self._aborts.extend(self._streams)
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- the loop thread ----

    def _deliver(self, outs: list[RequestOutput]) -> None:
        with self._lock:
            targets = []
            for out in outs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                targets.append((stream, out))
        for stream, out in targets:
            try:
                stream._loop.call_soon_threadsafe(stream._put, out)
            except RuntimeError:  # the reader's event loop is closed: nobody will read, free its blocks
                if not out.finished:
                    with self._lock:
                        self._aborts.append(out.request_id)
                        self._streams.pop(out.request_id, None)

    def _loop(self) -> None:
        eng = self.engine
        while True:
            with self._lock:
                pending, self._pending = self._pending, []
                aborts, self._aborts = self._aborts, []
            for req in pending:
                eng.add_checked(req)
            self._deliver([o for o in (eng.abort(r) for r in aborts) if o is not None])
            busy = eng.has_unfinished
            self._stats = eng.stats()
            if not busy:
                if self._stopping:
                    return
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._deliver(eng.step())
            except Exception as e:  # noqa: BLE001 - an engine bug must end every request, not hang them
                self.error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                finals = eng.shutdown()
                for f in finals:
                    f.finish_reason, f.error = "error", self.error
                self._deliver(finals)
                self._stats = eng.stats()
                return
