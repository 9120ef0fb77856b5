"""POST /v1/completions: raw text or token prompts, no harmony; the text is the decoded tokens."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from osstune.serve.http.context import ServerContext
from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.fields import ANY, Body
from osstune.serve.http.generation import merged
from osstune.serve.http.sampling import sampling_params
from osstune.serve.http.sse import DONE, event
from osstune.serve.http.text import PlainParser
from osstune.serve.types import HARMONY_STOP_TOKENS

_NOOPS = {"user": ANY, "echo": False, "logprobs": None, "best_of": 1, "suffix": None, "presence_penalty": 0,
          "frequency_penalty": 0, "metadata": ANY}


def _prompts(value: Any, ctx: ServerContext) -> list[list[int]]:
    """A string, an array of strings, an array of token ids, or an array of such arrays."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [ctx.tokenizer.encode(value)]
    if is_ids(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        return [ctx.tokenizer.encode(p) for p in value]
    if isinstance(value, list) and value and all(is_ids(p) for p in value):
        return value
    raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays", "prompt")


class CompletionReply:
    def __init__(self, ctx: ServerContext, raw: Any) -> None:
        self.arrival = time.perf_counter()
        body = Body(raw, known_noops=_NOOPS)
        self.model = body.string("model")
        adapter = ctx.adapter_for(self.model)
        prompts = _prompts(body.get("prompt"), ctx)
        max_tokens = body.integer("max_tokens", 16, 1)  # OpenAI's default for this endpoint
        self.n = body.integer("n", 1, 1, 16)
        self.stream = body.boolean("stream")
        options = body.get("stream_options", {})
        if (not isinstance(options, dict) or set(options) - {"include_usage"} or (options and not self.stream)
                or not isinstance(options.get("include_usage", False), bool)):
            raise bad_request("'stream_options' must be {\"include_usage\": true|false}, with stream=true", "stream_options")
        self.include_usage = bool(options.get("include_usage", False))
        stops = body.stop()
        per_prompt = sampling_params(body, max_tokens, ctx.engine.max_model_len, max(map(len, prompts)), self.n)
        body.finish()
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.ctx = ctx
        all_prompts = [p for p in prompts for _ in range(self.n)]
        decode = ctx.tokenizer.decode
        names = {"prompt_token_ids": "prompt", "adapter": "model"}
        self.choices = ctx.start_choices(
            all_prompts, per_prompt * len(prompts), adapter, lambda: PlainParser(decode, HARMONY_STOP_TOKENS), stops, names, self.id
        )
        self.num_choices = len(all_prompts)
        self.prompt_lens = [len(p) for p in all_prompts]

    def close(self) -> None:
        for choice in self.choices:
            choice.close()
        self.ctx.admission.give(len(self.choices))
        self.choices = []

    def _usage(self, completion: list[int]) -> dict:
        # Each prompt counted once, though it is prefilled for each of its n choices.
        prompt = sum(self.prompt_lens[:: self.n])
        return {"prompt_tokens": prompt, "completion_tokens": sum(completion), "total_tokens": prompt + sum(completion)}

    async def complete(self) -> dict:
        texts, finish, completion = [""] * self.num_choices, [None] * self.num_choices, [0] * self.num_choices
        try:
            async for u in merged(self.choices, self.ctx.metrics, self.arrival):
                if u.finish_reason == "error":
                    raise ApiError(500, f"the engine failed: {u.error}")
                texts[u.index] += u.delta.content
                completion[u.index] = u.completion_tokens
                finish[u.index] = u.finish_reason or finish[u.index]
        finally:
            self.close()
        choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(completion)}

    async def events(self) -> AsyncIterator[str]:
        completion = [0] * self.num_choices
        try:
            async for u in merged(self.choices, self.ctx.metrics, self.arrival):
                completion[u.index] = u.completion_tokens
                if u.delta.content or u.finish_reason is not None:
                    yield self._chunk([{"index": u.index, "text": u.delta.content, "finish_reason": u.finish_reason, "logprobs": None}])
            if self.include_usage:
                yield self._chunk([], self._usage(completion))
            yield DONE
        finally:
            self.close()

    def _chunk(self, choices: list, usage: dict | None = None) -> str:
        payload = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            payload["usage"] = usage
        return event(payload)
