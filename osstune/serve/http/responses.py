"""POST /v1/responses, the basic flow: text input or input items (messages, function calls and
their outputs), function tools, reasoning effort; one non-streamed response with reasoning,
message and function_call output items, streamed as Responses events or not. Input items are
turned into chat messages and go the chat way."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from osstune.serve.http.chat import ChatReply
from osstune.serve.http.context import ServerContext
from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.fields import ANY, Body, type_name
from osstune.serve.http.generation import merged

_NOOPS = {"user": ANY, "metadata": ANY, "store": ANY, "parallel_tool_calls": ANY, "service_tier": ANY,
          "truncation": "disabled", "background": False}


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise bad_request(f"{where}.content must be a string or an array of input_text parts, got {type_name(content)}", where)


def _messages(input_value: Any, instructions: str | None) -> list[dict]:
    out: list[dict] = [{"role": "developer", "content": instructions}] if instructions else []
    items = [{"role": "user", "content": input_value}] if isinstance(input_value, str) else input_value
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty array of input items", "input")
    thinking = None
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object, got {type_name(item)}", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}.role is {role!r}; expected user, assistant, system or developer", f"{where}.role")
            message = {"role": role, "content": _text_of(item.get("content"), where)}
            if role == "assistant" and thinking:
                message["thinking"], thinking = thinking, None
            out.append(message)
        elif kind == "reasoning":
            thinking = "".join(str(p.get("text", "")) for p in item.get("content") or [] if isinstance(p, dict))
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call], **({"thinking": thinking} if thinking else {})})
                thinking = None
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise bad_request(f"{where}.type {kind!r} is not supported; use message, function_call or function_call_output", f"{where}.type")
    return out


def _tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function" for t in tools):
        raise bad_request("'tools' must be an array of function tools ({\"type\": \"function\", \"name\": ...})", "tools")
    return [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters") if k in t}} for t in tools]


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


class ResponsesReply:
    """A /v1/responses request, run as a chat reply; `complete()` or, with stream=true, `events()`."""

    def __init__(self, ctx: ServerContext, raw: Any) -> None:
        body = Body(raw, known_noops=_NOOPS)
        reasoning = body.get("reasoning", {})
        if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary"}:
            raise bad_request("'reasoning' must be {\"effort\": \"low\"|\"medium\"|\"high\"}", "reasoning")
        self.stream = body.boolean("stream")
        instructions = body.string("instructions", None)
        chat: dict[str, Any] = {
            "model": body.string("model"),
            "messages": _messages(body.get("input"), instructions),
            "tools": _tools(body.get("tools")),
            "tool_choice": _tool_choice(body.get("tool_choice")),
            "reasoning_effort": reasoning.get("effort"),
            "max_completion_tokens": body.integer("max_output_tokens", None, 1),
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
        }
        body.finish()
        try:
            self.chat = ChatReply(ctx, {k: v for k, v in chat.items() if v is not None})
        except ApiError as e:
            # The chat names of the fields -> the Responses names.
            renamed = {"messages": "input", "max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort"}
            if e.param:
                head = e.param.split("[")[0].split(".")[0]
                e.param = renamed.get(e.param, "input" if head == "messages" else e.param)
            raise
        self.id = "resp_" + secrets.token_hex(12)
        self.created = int(time.time())
        self.echo = {
            "model": chat["model"], "instructions": instructions, "tools": raw.get("tools") or [],
            "tool_choice": raw.get("tool_choice", "auto"), "parallel_tool_calls": True,
            "temperature": chat["temperature"], "top_p": chat["top_p"], "max_output_tokens": chat["max_completion_tokens"],
            "reasoning": {"effort": reasoning.get("effort"), "summary": None}, "metadata": raw.get("metadata") or {},
        }

    def close(self) -> None:
        self.chat.close()

    def _response(self, status: str, output: list[dict], finish: str | None = None, usage: dict | None = None) -> dict:
        incomplete = None
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens" if finish == "length" else finish}
        out = {"id": self.id, "object": "response", "created_at": self.created, "status": status,
               "incomplete_details": incomplete, "output": output, "error": None, **self.echo}
        if usage is not None:
            out["usage"] = {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]},
            }
        return out

    @staticmethod
    def _status(finish: str | None) -> str:
        return "completed" if finish in ("stop", "tool_calls") else "incomplete"

    async def complete(self) -> dict:
        result = await self.chat.complete()
        choice, message = result["choices"][0], result["choices"][0]["message"]
        output: list[dict] = []
        if message["reasoning"]:
            output.append(_reasoning_item(message["reasoning"]))
        if message["content"]:
            output.append(_message_item(message["content"]))
        for call in message.get("tool_calls", []):
            output.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        return self._response(self._status(choice["finish_reason"]), output, choice["finish_reason"], result["usage"])

    async def events(self) -> AsyncIterator[str]:
        """The Responses streaming events: an output item per run of one kind (reasoning, message,
        function call), opened at its first delta and closed when another kind starts."""
        seq = 0
        output: list[dict] = []
        open_item: dict | None = None
        calls: dict[int, dict] = {}  # the chat tool-call index -> its item

        def emit(kind: str, **fields) -> str:
            nonlocal seq
            seq += 1
            return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **fields}, ensure_ascii=False)}\n\n"

        def close_open() -> list[str]:
            nonlocal open_item
            item, open_item = open_item, None
            if item is None:
                return []
            index = output.index(item)
            if item["type"] == "reasoning":
                text = item["content"][0]["text"]
                events = [emit("response.reasoning_text.done", item_id=item["id"], output_index=index, content_index=0, text=text)]
            elif item["type"] == "message":
                part = item["content"][0]
                events = [emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                               text=part["text"], logprobs=[]),
                          emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0, part=part)]
            else:
                events = [emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"])]
            item["status"] = "completed"
            return events + [emit("response.output_item.done", output_index=index, item=item)]

        def start(item: dict) -> list[str]:
            nonlocal open_item
            events = close_open()
            output.append(item)
            open_item = item
            shown = {**item, "status": "in_progress"}
            if item["type"] == "message":
                shown["content"] = []
            elif item["type"] == "reasoning":
                shown["content"] = []
            events.append(emit("response.output_item.added", output_index=len(output) - 1, item=shown))
            if item["type"] == "message":
                events.append(emit("response.content_part.added", item_id=item["id"], output_index=len(output) - 1,
                                   content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
            return events

        usage, finish = _Totals(), None
        try:
            yield emit("response.created", response=self._response("in_progress", []))
            yield emit("response.in_progress", response=self._response("in_progress", []))
            async for u in merged(self.chat.choices, self.chat.ctx.metrics, self.chat.arrival):
                usage.add(u)
                finish = u.finish_reason or finish
                d = u.delta
                if d.reasoning:
                    if open_item is None or open_item["type"] != "reasoning":
                        for e in start(_reasoning_item("")):
                            yield e
                    open_item["content"][0]["text"] += d.reasoning
                    yield emit("response.reasoning_text.delta", item_id=open_item["id"], output_index=len(output) - 1,
                               content_index=0, delta=d.reasoning)
                if d.content:
                    if open_item is None or open_item["type"] != "message":
                        for e in start(_message_item("")):
                            yield e
                    open_item["content"][0]["text"] += d.content
                    yield emit("response.output_text.delta", item_id=open_item["id"], output_index=len(output) - 1,
                               content_index=0, delta=d.content, logprobs=[])
                for call in d.tool_calls:
                    if call.id is not None:
                        calls[call.index] = _call_item(call.id, call.name, "")
                        for e in start(calls[call.index]):
                            yield e
                    item = calls[call.index]
                    item["arguments"] += call.arguments
                    if call.arguments:
                        yield emit("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=output.index(item), delta=call.arguments)
            for e in close_open():
                yield e
            status = self._status(finish)
            yield emit(f"response.{status}", response=self._response(status, output, finish, usage.body()))
        finally:
            self.close()


class _Totals:
    def __init__(self) -> None:
        self.prompt = self.cached = self.completion = self.reasoning = 0

    def add(self, u) -> None:
        self.prompt, self.cached, self.completion, self.reasoning = (
            u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens)

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion, "prompt_tokens_details": {"cached_tokens": self.cached},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning}}


def _reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": "rs_" + secrets.token_hex(12), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _message_item(text: str) -> dict:
    return {"type": "message", "id": "msg_" + secrets.token_hex(12), "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _call_item(call_id: str, name: str, arguments: str) -> dict:
    return {"type": "function_call", "id": "fc_" + secrets.token_hex(12), "call_id": call_id, "name": name,
            "arguments": arguments, "status": "completed"}
