"""Continuous batching: which tokens of which requests the next forward pass computes.

One step has a token budget (`max_num_batched_tokens`). Running requests come first, in arrival
order: a decoding request takes one token, one still prefilling takes the next chunk of its prompt
that fits. Waiting requests (FCFS) join with what is left, so long prompts are prefilled in chunks
beside running decodes. When the KV pool cannot hold a running request's next tokens, the most
recently arrived running request is preempted: its blocks are freed, its tokens so far (prompt +
generated) become the prompt it is recomputed from when it is scheduled again, and nothing it has
streamed is lost or repeated. Aborts free blocks at once.

A request samples a token when the step computes its last known token; the runner returns those
tokens and `update` appends them, applies stop conditions and says what to stream.

Plain Python: no tensors (the runner turns a `SchedulerOutput` into one forward pass).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from osstune.serve.kv_blocks import KVCacheManager
from osstune.serve.types import RequestError, RequestOutput, SamplingParams


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the sampler's per-request seed (drawn at random when the client gave none)
    adapter: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache (first admission)
    num_emitted: int = 0  # output tokens already streamed
    admitted: bool = False
    finish_reason: str | None = None
    # prompt + output, kept as one list (a step slices it; building it anew each step costs O(length)).
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    def append(self, token: int) -> None:
        self.output_token_ids.append(token)
        self.token_ids.append(token)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def salt(self) -> str:
        return self.adapter or ""


@dataclass
class ScheduledChunk:
    """Positions [start, start + len(token_ids)) of one request, computed in this step."""

    request_id: str
    token_ids: list[int]
    start: int
    tables: dict[str, list[int]]  # group name -> block table (null block where freed)
    sample: bool  # the chunk ends at the request's last known token: pick the next one
    params: SamplingParams
    seed: int
    num_output: int  # output tokens before this step (the sampler's step index)
    adapter: str | None
    row: int = -1  # the request's row in `SchedulerOutput.table_rows`


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[str]
    # group name -> every request's block table as a row (KVCacheManager.rows, as of this step):
    # chunk.tables[g] == table_rows[g][chunk.row, :len(chunk.tables[g])].
    table_rows: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        return all(len(c.token_ids) == 1 and c.sample for c in self.chunks)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preempted_total = 0
        self.prefix_hit_tokens_total = 0

    # ---- requests in and out ----

    def add(self, req: Request) -> None:
        self.check(req)
        if req.request_id in self.requests:
            raise RequestError(f"request id {req.request_id!r} is already in use", field="request_id")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check(self, req: Request) -> None:
        """Raise `RequestError` when the request can never run here (reads no mutable state)."""
        total = len(req.prompt_token_ids) + req.params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"the prompt has {len(req.prompt_token_ids)} tokens and max_tokens is {req.params.max_tokens}: "
                f"{total} tokens exceed the context of {self.max_model_len}; lower max_tokens or shorten the prompt",
                field="max_tokens",
            )
        need = self.kv.max_blocks_needed(total, self.budget)
        have = self.kv.pool.num_blocks - 1
        if need > have:
            raise RequestError(
                f"a request of {total} tokens needs {need} KV blocks and the cache has {have}: "
                "lower max_tokens, shorten the prompt, or give the engine a larger KV cache (--kv-cache-gb)",
                field="max_tokens",
            )

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(request_id)
        req.finish_reason = "abort"
        return req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----

    def schedule(self) -> SchedulerOutput:
        budget = self.budget
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.allocate(req.request_id, req.num_computed, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                chunks.append(self._chunk(req, n))
                budget -= n
                i += 1
        # Waiting requests join only when nothing had to be preempted (they would take its blocks).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if req.num_computed == 0 and not self.kv.requests.get(req.request_id):
                hit = self.kv.cached_prefix(req.request_id, req.token_ids, req.salt)
                req.num_computed = hit
                if not req.admitted:
                    req.num_cached_tokens = hit
                    self.prefix_hit_tokens_total += hit
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.kv.allocate(req.request_id, req.num_computed, n):
                if not chunks and not self.running:
                    raise AssertionError("an admitted request does not fit an empty KV cache")  # add() checks
                self.kv.free(req.request_id)  # give back its prefix hit; it is looked up again later
                req.num_computed = 0
                break
            self.waiting.popleft()
            req.admitted = True
            self.running.append(req)
            chunks.append(self._chunk(req, n))
            budget -= n
        return SchedulerOutput(chunks, preempted, {name: rows.array for name, rows in self.kv.rows.items()})

    def _chunk(self, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed
        return ScheduledChunk(
            request_id=req.request_id,
            token_ids=req.token_ids[start : start + n],
            start=start,
            tables=self.kv.tables(req.request_id),  # read by the runner before the next schedule() changes it
            sample=start + n == req.num_tokens,
            params=req.params,
            seed=req.seed,
            num_output=len(req.output_token_ids),
            adapter=req.adapter,
            row=self.kv.row(req.request_id),
        )

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.num_preempted_total += 1

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        """Advance the scheduled requests by what the step computed and sampled; finished requests
        leave and free their blocks. Returns one update per request that has something new."""
        updates = []
        for chunk in out.chunks:
            req = self.requests.get(chunk.request_id)
            if req is None:  # aborted while the step ran
                continue
            req.num_computed = chunk.start + len(chunk.token_ids)
            token = sampled.get(chunk.request_id) if chunk.sample else None
            if token is not None:
                req.append(token)
                p = req.params
                if not p.ignore_stop and token in p.stop_token_ids:
                    req.finish_reason = "stop"
                elif len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
                    req.finish_reason = "length"
            self.kv.commit(req.request_id, req.token_ids, req.num_computed, req.salt)
            if token is None and req.finish_reason is None:
                continue
            updates.append(self._output(req))
            if req.finish_reason is not None:
                self.running.remove(req)
                del self.requests[req.request_id]
                self.kv.free(req.request_id)
        return updates

    @staticmethod
    def _output(req: Request) -> RequestOutput:
        new = req.output_token_ids[req.num_emitted :]
        req.num_emitted = len(req.output_token_ids)
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new,
            num_output_tokens=len(req.output_token_ids),
            num_prompt_tokens=len(req.prompt_token_ids),
            finished=req.finish_reason is not None,
            finish_reason=req.finish_reason,
            num_cached_tokens=req.num_cached_tokens,
        )
