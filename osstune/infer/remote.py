"""Chatting with a running `osstune serve` (or any OpenAI-compatible server) over HTTP.

Standard library only (urllib + server-sent events), so `osstune chat --url` needs no extra
package. The conversation is kept here and sent whole each turn, as the chat completions API
expects; the reasoning of answered turns is not sent back (harmony drops it anyway).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from osstune.infer.generate import GenerationError, SamplingOptions


@dataclass
class _Call:
    recipient: str


@dataclass
class RemoteReply:
    """The fields of `osstune.infer.chat.ChatReply` that `osstune chat` shows."""

    final: str
    analysis: str
    valid: bool
    stop_reason: str
    error: str | None = None
    tool_call: _Call | None = None


class RemoteChatSession:
    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        reasoning_effort: str = "medium",
        developer_instructions: str | None = None,
        sampling: SamplingOptions = SamplingOptions(),
        timeout: float = 600.0,
    ) -> None:
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self.reasoning_effort = reasoning_effort
        self.developer_instructions = developer_instructions
        self.sampling = sampling
        self.model = model or self._first_model()
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _request(self, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise GenerationError(f"{self.base}{path}: HTTP {e.code}: {message}") from None
        except urllib.error.URLError as e:
            raise ValueError(f"{self.base}: cannot connect ({e.reason}); is `osstune serve` running there?") from None

    def _first_model(self) -> str:
        with self._request("/models") as response:
            models = json.loads(response.read())["data"]
        if not models:
            raise ValueError(f"{self.base}/models lists no model")
        return models[0]["id"]

    def _events(self, response) -> Iterator[dict]:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)

    def send(self, user_text: str, on_text: Callable[[str | None, str], None] | None = None) -> RemoteReply:
        messages = list(self.history)
        if self.developer_instructions:
            messages.insert(0, {"role": "developer", "content": self.developer_instructions})
        messages.append({"role": "user", "content": user_text})
        s = self.sampling
        body = {
            "model": self.model, "messages": messages, "stream": True, "reasoning_effort": self.reasoning_effort,
            "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
        }
        if s.top_k:
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed
        final, analysis, finish, call = "", "", "stop", None
        with self._request("/chat/completions", body) as response:
            for chunk in self._events(response):
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    reasoning = delta.get("reasoning") or delta.get("reasoning_content")
                    if reasoning:
                        analysis += reasoning
                        if on_text:
                            on_text("analysis", reasoning)
                    if delta.get("content"):
                        final += delta["content"]
                        if on_text:
                            on_text("final", delta["content"])
                    for tc in delta.get("tool_calls") or []:
                        if tc.get("function", {}).get("name"):
                            call = _Call("functions." + tc["function"]["name"])
                    finish = choice.get("finish_reason") or finish
        valid = finish != "harmony_parse_error"
        self.history.append({"role": "user", "content": user_text})
        if valid and final:
            self.history.append({"role": "assistant", "content": final})
        elif not valid or not call:
            # Raw text may hold harmony's control tokens, which a message may not: the turn is dropped.
            self.history.pop()
        error = None if valid else "the server returned the raw text (finish_reason harmony_parse_error)"
        return RemoteReply(final, analysis, valid, "length" if finish == "length" else "stop", error, call)
