"""POST /v1/chat/completions: harmony in, content / reasoning / tool calls out, streamed or not."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from osstune.serve.http.context import ServerContext
from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.fields import ANY, Body
from osstune.serve.http.generation import ChoiceUpdate, merged
from osstune.serve.http.harmony_io import OutputParser, render_chat
from osstune.serve.http.sampling import sampling_params
from osstune.serve.http.sse import DONE, event

# OpenAI fields that change nothing here at these values (any value for ANY).
_NOOPS = {
    "user": ANY, "metadata": ANY, "store": False, "parallel_tool_calls": ANY, "service_tier": ANY,
    "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "response_format": {"type": "text"},
}


class ChatReply:
    """A validated chat request with its engine requests started."""

    def __init__(self, ctx: ServerContext, raw: Any) -> None:
        self.arrival = time.perf_counter()
        body = Body(raw, known_noops=_NOOPS)
        self.model = body.string("model")
        adapter = ctx.adapter_for(self.model)
        prompt = render_chat(body.get("messages"), body.get("tools"), body.get("tool_choice"), body.get("reasoning_effort"))
        if body.has("max_completion_tokens") and body.has("max_tokens"):
            raise bad_request("give max_completion_tokens or max_tokens (its older name), not both", "max_tokens")
        limit_name = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
        max_tokens = body.integer(limit_name, None, 1)
        body.used.update(("max_tokens", "max_completion_tokens"))
        self.n = body.integer("n", 1, 1, 16)
        self.stream = body.boolean("stream")
        options = body.get("stream_options", {})
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise bad_request("'stream_options' must be {\"include_usage\": true|false}", "stream_options")
        if options and not self.stream:
            raise bad_request("'stream_options' is only allowed with stream=true", "stream_options")
        self.include_usage = bool(options.get("include_usage", False))
        stops = body.stop()
        params = sampling_params(body, max_tokens, ctx.engine.max_model_len, len(prompt.tokens), self.n)
        body.finish()
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.ctx = ctx
        names = {"max_tokens": limit_name, "prompt": "messages", "prompt_token_ids": "messages", "adapter": "model"}
        self.choices = ctx.start_choices(
            [prompt.tokens] * self.n, params, adapter, lambda: OutputParser(prompt.prefill), stops, names, self.id
        )

    def close(self) -> None:
        for choice in self.choices:
            choice.close()
        self.ctx.admission.give(len(self.choices))
        self.choices = []

    async def complete(self) -> dict:
        messages = [{"content": "", "reasoning": "", "tool_calls": {}} for _ in range(self.n)]
        finish: list[str | None] = [None] * self.n
        usage = _Usage(self.n)
        try:
            async for u in merged(self.choices, self.ctx.metrics, self.arrival):
                m = messages[u.index]
                m["content"] += u.delta.content
                m["reasoning"] += u.delta.reasoning
                for call in u.delta.tool_calls:
                    entry = m["tool_calls"].setdefault(call.index, {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}})
                    entry["function"]["arguments"] += call.arguments
                usage.add(u)
                if u.finish_reason == "error":
                    raise ApiError(500, f"the engine failed: {u.error}")
                if u.finish_reason is not None:
                    finish[u.index] = u.finish_reason
        finally:
            self.close()
        choices = []
        for i, m in enumerate(messages):
            calls = [m["tool_calls"][k] for k in sorted(m["tool_calls"])]
            message = {"role": "assistant", "content": m["content"] or (None if calls else "")}
            # Both names: `reasoning` (the current one) and `reasoning_content` (what clients were written for).
            message["reasoning"] = message["reasoning_content"] = m["reasoning"] or None
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "finish_reason": finish[i], "logprobs": None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage.body()}

    async def events(self) -> AsyncIterator[str]:
        usage = _Usage(self.n)
        try:
            for i in range(self.n):
                yield self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None})
            async for u in merged(self.choices, self.ctx.metrics, self.arrival):
                usage.add(u)
                delta: dict[str, Any] = {}
                if u.delta.reasoning:
                    delta["reasoning"] = delta["reasoning_content"] = u.delta.reasoning
                if u.delta.content:
                    delta["content"] = u.delta.content
                if u.delta.tool_calls:
                    delta["tool_calls"] = [_call_delta(c) for c in u.delta.tool_calls]
                if delta or u.finish_reason is not None:
                    yield self._chunk({"index": u.index, "delta": delta, "finish_reason": u.finish_reason, "logprobs": None})
            if self.include_usage:
                yield self._chunk(None, usage.body())
            yield DONE
        finally:
            self.close()

    def _chunk(self, choice: dict | None, usage: dict | None = None) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                   "choices": [choice] if choice is not None else []}
        if self.include_usage:
            payload["usage"] = usage
        return event(payload)


def _call_delta(call) -> dict:
    if call.id is not None:
        return {"index": call.index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
    return {"index": call.index, "function": {"arguments": call.arguments}}


class _Usage:
    """Token counts of a reply: the prompt once (as OpenAI counts it), the completions of every choice."""

    def __init__(self, n: int) -> None:
        self.prompt = self.cached = 0
        self.completion = [0] * n
        self.reasoning = [0] * n

    def add(self, u: ChoiceUpdate) -> None:
        self.prompt, self.cached = u.prompt_tokens, u.cached_tokens
        self.completion[u.index] = u.completion_tokens
        self.reasoning[u.index] = u.reasoning_tokens

    def body(self) -> dict:
        completion = sum(self.completion)
        return {
            "prompt_tokens": self.prompt, "completion_tokens": completion, "total_tokens": self.prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": sum(self.reasoning)},
        }
