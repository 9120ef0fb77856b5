"""ShareGPT rows -> our `messages` rows, so they go through the same validation and rendering.

ShareGPT: {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}],
"system"?: "...", "tools"?: [...]}. Speakers (the names found in the field):
  human, user                  -> user
  gpt, assistant, chatgpt      -> assistant (its `value` is the final answer)
  system                       -> system (first turn only, like a leading system message)
  function_call                -> an assistant tool call; `value` is JSON {"name": ..., "arguments": ...}
  observation, tool            -> the output of the latest call
A turn's `weight` (0 or 1) is kept, as in OpenAI's fine-tuning rows.
"""

from __future__ import annotations

import json
from typing import Any

from osstune.data.errors import RowError

SPEAKERS = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "system": "system",
    "function_call": "call",
    "observation": "tool", "tool": "tool",
}  # fmt: skip


def sharegpt_to_messages(row: dict) -> tuple[dict, list[str], int]:
    """The equivalent `messages` row, the ShareGPT keys it does not use (for the summary), and how
    many messages come before conversations[0] (1 when the row's `system` key became the first)."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError(f'"conversations" must be a list of {{"from", "value"}} turns, got {type(turns).__name__}')
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise RowError(f'"system" must be a string, got {type(system).__name__}')
        if system:
            messages.append({"role": "system", "content": system})
    ignored = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f'{where} must be an object {{"from": ..., "value": ...}}, got {type(turn).__name__}')
        speaker = turn.get("from")
        role = SPEAKERS.get(speaker.lower() if isinstance(speaker, str) else speaker)
        if role is None:
            raise RowError(f"{where}.from is {speaker!r}; expected one of {', '.join(SPEAKERS)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise RowError(f'{where}.value must be a string, got {"null" if value is None else type(value).__name__}')
        ignored += [f"conversations[].{k}" for k in turn if k not in ("from", "value", "weight")]
        if role == "call":
            message = {"role": "assistant", "tool_calls": [_call(value, where)]}
        else:
            message = {"role": role, "content": value}
        if "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    out = {"messages": messages}
    for key in ("tools", "reasoning_effort", "model_identity", "current_date"):
        if key in row:
            out[key] = row[key]
    ignored += [k for k in row if k not in ("conversations", "system", *out)]
    return out, ignored, len(messages) - len(turns)


def _call(value: str, where: str) -> dict:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise RowError(
            f'{where} is a function_call whose value is not JSON ({e.msg}); write {{"name": ..., "arguments": {{...}}}}'
        ) from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise RowError(f'{where} is a function_call; its value must be JSON {{"name": ..., "arguments": {{...}}}}')
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}
