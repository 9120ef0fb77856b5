"""POST /v1/responses, the basic flow: text input or input items (messages, function calls and
their outputs), function tools, reasoning effort; one non-streamed response with reasoning,
message and function_call output items. Items are turned into chat messages and go the chat way."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from osstune.serve.http.chat import ChatReply
from osstune.serve.http.context import ServerContext
from osstune.serve.http.errors import ApiError, bad_request
from osstune.serve.http.fields import ANY, Body, type_name

_NOOPS = {"user": ANY, "metadata": ANY, "store": ANY, "parallel_tool_calls": ANY, "service_tier": ANY,
          "truncation": "disabled", "stream": False, "background": False}


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


async def create_response(ctx: ServerContext, raw: Any) -> dict:
    body = Body(raw, known_noops=_NOOPS)
    reasoning = body.get("reasoning", {})
    if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary"}:
        raise bad_request("'reasoning' must be {\"effort\": \"low\"|\"medium\"|\"high\"}", "reasoning")
    chat: dict[str, Any] = {
        "model": body.string("model"),
        "messages": _messages(body.get("input"), body.string("instructions", None)),
        "tools": _tools(body.get("tools")),
        "tool_choice": _tool_choice(body.get("tool_choice")),
        "reasoning_effort": reasoning.get("effort"),
        "max_completion_tokens": body.integer("max_output_tokens", None, 1),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
    }
    body.finish()
    try:
        reply = ChatReply(ctx, {k: v for k, v in chat.items() if v is not None})
    except ApiError as e:
        # The chat names of the fields -> the Responses names.
        renamed = {"messages": "input", "max_completion_tokens": "max_output_tokens", "reasoning_effort": "reasoning.effort"}
        if e.param:
            head = e.param.split("[")[0].split(".")[0]
            e.param = renamed.get(e.param, "input" if head == "messages" else e.param)
        raise
    result = await reply.complete()
    choice, usage = result["choices"][0], result["usage"]
    message = choice["message"]
    output: list[dict] = []
    if message["reasoning"]:
        output.append({"type": "reasoning", "id": "rs_" + secrets.token_hex(12), "summary": [],
                       "content": [{"type": "reasoning_text", "text": message["reasoning"]}]})
    if message["content"]:
        output.append({"type": "message", "id": "msg_" + secrets.token_hex(12), "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": message["content"], "annotations": []}]})
    for call in message.get("tool_calls", []):
        output.append({"type": "function_call", "id": "fc_" + secrets.token_hex(12), "call_id": call["id"],
                       "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"})
    complete = choice["finish_reason"] in ("stop", "tool_calls")
    return {
        "id": "resp_" + secrets.token_hex(12), "object": "response", "created_at": int(time.time()), "model": chat["model"],
        "status": "completed" if complete else "incomplete",
        "incomplete_details": None if complete else {"reason": "max_output_tokens" if choice["finish_reason"] == "length" else choice["finish_reason"]},
        "output": output, "error": None, "instructions": chat["messages"][0]["content"] if raw.get("instructions") else None,
        "tools": body.raw.get("tools") or [], "tool_choice": body.raw.get("tool_choice", "auto"), "parallel_tool_calls": True,
        "temperature": chat["temperature"], "top_p": chat["top_p"], "max_output_tokens": chat["max_completion_tokens"],
        "reasoning": {"effort": reasoning.get("effort"), "summary": None}, "metadata": body.raw.get("metadata") or {},
        "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                  "total_tokens": usage["total_tokens"],
                  "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
                  "output_tokens_details": {"reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]}},
    }
