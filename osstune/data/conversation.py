"""Chat rows -> `Conversation`, following the conventions of gpt-oss's Hugging Face chat template.

Accepted rows (docs/DATA.md has the details and examples):
  {"messages": [...], "tools"?: [...], "reasoning_effort"?, "model_identity"?, "current_date"?}
  {"prompt": ..., "completion": ...}, {"question": ..., "answer": ...},
  {"instruction": ..., "input"?: ..., "output": ...}
  {"conversations": [{"from": "human", "value": ...}, ...]}   (ShareGPT, mapped in sharegpt.py)
Messages: roles system/developer (first message only: it becomes the developer instructions),
user, assistant (`content` = final answer, `thinking` = analysis, `tool_calls`, `weight` 0/1 as in
OpenAI's fine-tuning rows: 0 keeps the message as context, untrained), tool.
Every rule that rejects a row raises `RowError` with a message saying what to change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from osstune.data.errors import RowError
from osstune.data.sharegpt import sharegpt_to_messages

ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("low", "medium", "high")

# Harmony's control tokens. openai-harmony renders them inside text as plain characters, but in a data
# file they almost always mean the row was pre-rendered, and the model would learn to print them.
_CONTROL_TOKEN = re.compile(r"<\|(?:start|end|message|channel|constrain|return|call|startoftext|endoftext|endofprompt|reserved_\d+)\|>")

_ROW_OPTION_KEYS = ("tools", "reasoning_effort", "model_identity", "current_date")
_PAIR_SHAPES = (("prompt", "completion"), ("question", "answer"), ("instruction", "output"))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the model writes it
    id: str | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "user", "assistant" or "tool"
    content: str | None = None  # user text, assistant final answer, tool output
    thinking: str | None = None  # assistant analysis (chain of thought)
    tool_calls: tuple[ToolCall, ...] = ()
    tool_name: str | None = None  # tool messages: the function that produced this output
    trained: bool = True  # False: an assistant message with OpenAI's `"weight": 0`, kept as context only


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict | None = None  # JSON schema of the arguments


@dataclass(frozen=True)
class Conversation:
    messages: tuple[ChatMessage, ...]
    instructions: str | None = None  # developer instructions (from a leading system/developer message)
    tools: tuple[FunctionTool, ...] = ()
    reasoning_effort: str | None = None  # None: the render options' default
    model_identity: str | None = None
    current_date: str | None = None


@dataclass(frozen=True)
class ParsedRow:
    conversation: Conversation
    ignored_keys: tuple[str, ...]  # keys we do not use, reported in the summary rather than dropped silently


def parse_row(row: Any, training: bool = True) -> ParsedRow:
    """Validate one decoded JSON row and turn it into a Conversation (raises RowError).

    `training=False` accepts prompts too: rows that do not end with the assistant's turn, or that
    have no message (the system message alone), as an inference server receives them.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {_type_name(row)}; {_SHAPES_HINT}")
    if "messages" in row:
        return _parse_chat_row(row, training)
    if "conversations" in row:
        messages_row, ignored, shift = sharegpt_to_messages(row)
        parsed = _parse_chat_row(messages_row, training, key="conversations", shift=shift)
        return ParsedRow(parsed.conversation, tuple(dict.fromkeys([*ignored, *parsed.ignored_keys])))
    for first, second in _PAIR_SHAPES:
        if first in row or second in row:
            return _parse_pair_row(row, first, second)
    raise RowError(f"the row has none of the expected keys (found {sorted(row)}); {_SHAPES_HINT}")


_SHAPES_HINT = (
    'expected {"messages": [...]} (OpenAI chat), {"conversations": [...]} (ShareGPT) or a pair '
    '{"prompt", "completion"}, {"question", "answer"} or {"instruction", "input", "output"}'
)


def _parse_chat_row(row: dict, training: bool, key: str = "messages", shift: int = 0) -> ParsedRow:
    """`key` names the list in messages as the user wrote it, and messages[i] is the user's
    key[i - shift] (ShareGPT rows arrive converted, their `system` key as a first message)."""
    raw_messages = row["messages"]
    if not isinstance(raw_messages, list):
        raise RowError(f'"{key}" must be a list of message objects, got {_type_name(raw_messages)}')
    if not raw_messages and training:
        raise RowError(f'"{key}" is empty; a row needs at least a user message and an assistant answer')
    ignored = [k for k in row if k not in ("messages", *_ROW_OPTION_KEYS)]
    instructions = None
    start = 0
    first = raw_messages[0] if raw_messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        instructions = _text(first.get("content"), f"{key}[0].content ({first['role']})")
        ignored += [f"{key}[].{k}" for k in first if k not in ("role", "content")]
        start = 1
    builder = _MessageBuilder(key, shift)
    for index in range(start, len(raw_messages)):
        ignored += builder.add(raw_messages[index], index)
    messages = builder.finish() if training else tuple(builder.messages)
    conversation = Conversation(
        messages=messages,
        instructions=instructions,
        tools=_parse_tools(row.get("tools")),
        reasoning_effort=_reasoning_effort(row.get("reasoning_effort")),
        model_identity=_optional_text(row, "model_identity"),
        current_date=_optional_text(row, "current_date"),
    )
    return ParsedRow(conversation, tuple(dict.fromkeys(ignored)))


def _parse_pair_row(row: dict, first: str, second: str) -> ParsedRow:
    for key in (first, second):
        if key not in row:
            raise RowError(f'a "{first}"/"{second}" row needs both keys; "{key}" is missing')
    user = _text(row[first], f'"{first}"')
    if first == "instruction":
        extra = "" if row.get("input") is None else _text(row["input"], '"input"')
        if extra:
            user = f"{user}\n\n{extra}"  # the Alpaca convention: instruction, blank line, input
    answer = _text(row[second], f'"{second}"')
    if not answer:
        raise RowError(f'"{second}" is empty; there is nothing to train on')
    used = {first, second, "input"} if first == "instruction" else {first, second}
    ignored = tuple(k for k in row if k not in used and k not in _ROW_OPTION_KEYS)
    conversation = Conversation(
        messages=(ChatMessage("user", user), ChatMessage("assistant", answer)),
        tools=_parse_tools(row.get("tools")),
        reasoning_effort=_reasoning_effort(row.get("reasoning_effort")),
        model_identity=_optional_text(row, "model_identity"),
        current_date=_optional_text(row, "current_date"),
    )
    return ParsedRow(conversation, ignored)


class _MessageBuilder:
    """Checks messages in order; tool outputs are matched to the calls made before them."""

    def __init__(self, key: str = "messages", shift: int = 0):
        self.key, self.shift = key, shift
        self.messages: list[ChatMessage] = []
        self.calls: list[ToolCall] = []

    def add(self, raw: Any, index: int) -> list[str]:
        where = f"{self.key}[{index - self.shift}]"
        if not isinstance(raw, dict):
            raise RowError(f"{where} must be an object with a role, got {_type_name(raw)}")
        role = raw.get("role")
        if role not in ROLES:
            raise RowError(f"{where} has role {role!r}; expected one of {', '.join(ROLES)}")
        if role in ("system", "developer"):
            raise RowError(
                f"{where} is a {role} message; only the first message may be system or developer "
                "(it becomes the developer instructions): merge it into the first message"
            )
        known = {"role", "content"}
        if role == "user":
            message = ChatMessage("user", _text(raw.get("content"), f"{where}.content"))
        elif role == "assistant":
            known |= {"thinking", "tool_calls", "weight"}
            message = self._assistant(raw, where)
        else:
            known |= {"tool_call_id", "name"}
            message = self._tool(raw, where)
        self.messages.append(message)
        if role != "assistant" and raw.get("weight") not in (None, 0):
            # OpenAI's fine-tuning format puts `weight` on assistant messages; 0 elsewhere says what
            # is true anyway (only assistant messages are trained), anything else cannot be honoured.
            raise RowError(
                f"{where} is a {role} message with weight {raw['weight']!r}; only assistant messages are "
                "trained (remove the weight)"
            )
        known.add("weight")
        return [f"{self.key}[].{k}" for k in raw if k not in known]

    def _assistant(self, raw: dict, where: str) -> ChatMessage:
        weight = raw.get("weight")
        if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
            raise RowError(f"{where}.weight is {weight!r}; OpenAI's fine-tuning format takes 0 (not trained) or 1")
        trained = weight != 0
        content = raw.get("content")
        content = None if content is None else _text(content, f"{where}.content")
        thinking = raw.get("thinking")
        thinking = None if thinking is None else _text(thinking, f"{where}.thinking")
        calls = _parse_tool_calls(raw.get("tool_calls"), where)
        if calls:
            if content and thinking:
                # The HF template renders `content` next to tool calls as the analysis message.
                raise RowError(
                    f"{where} has tool_calls with both content and thinking; put the reasoning before "
                    "the call in one of them (both are the analysis message)"
                )
            self.calls.extend(calls)
            return ChatMessage("assistant", None, thinking or content or None, calls, trained=trained)
        if not content:
            what = "only thinking" if thinking else "no content"
            raise RowError(
                f"{where} is an assistant message with {what}; give the final answer in \"content\" "
                "(and the reasoning in \"thinking\")"
            )
        return ChatMessage("assistant", content, thinking or None, trained=trained)

    def _tool(self, raw: dict, where: str) -> ChatMessage:
        if not self.calls:
            raise RowError(
                f"{where} is a tool message with no assistant tool call before it; tool messages answer "
                'the latest "tool_calls" entry'
            )
        name = self._called_name(raw, where)
        content = raw.get("content")
        if isinstance(content, (dict, list)) and not _is_text_parts(content):
            content = json.dumps(content, ensure_ascii=False)  # structured tool output, as JSON text
        return ChatMessage("tool", _text(content, f"{where}.content"), tool_name=name)

    def _called_name(self, raw: dict, where: str) -> str:
        call_id, name = raw.get("tool_call_id"), raw.get("name")
        if call_id is not None:
            for call in self.calls:
                if call.id == call_id:
                    return call.name
            raise RowError(f"{where} answers tool_call_id {call_id!r}, but no earlier tool call has that id")
        if name is not None:
            if not any(call.name == name for call in self.calls):
                raise RowError(f"{where} is the output of {name!r}, but no earlier tool call called it")
            return name
        return self.calls[-1].name

    def finish(self) -> tuple[ChatMessage, ...]:
        if not self.messages:
            raise RowError("the row has only a system message; add the user message and the assistant answer")
        last = self.messages[-1]
        if last.role != "assistant":
            raise RowError(
                f"the conversation ends with a {last.role} message; a training row must end with the "
                "assistant's turn (remove the trailing messages or add the answer)"
            )
        return tuple(self.messages)


def _parse_tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RowError(f"{where}.tool_calls must be a list, got {_type_name(raw)}")
    calls = []
    for i, call in enumerate(raw):
        at = f"{where}.tool_calls[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise RowError(f'{at} must look like {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise RowError(f"{at}.function.name must be a function name (letters, digits, _ or -), got {name!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False)
        elif isinstance(arguments, str):
            try:
                json.loads(arguments)
            except json.JSONDecodeError as e:
                raise RowError(f"{at}.function.arguments is a string but not valid JSON ({e.msg}); write a JSON object") from None
        else:
            raise RowError(f"{at}.function.arguments must be a JSON object or a JSON string, got {_type_name(arguments)}")
        _check_plain(arguments, f"{at}.function.arguments")
        call_id = call.get("id")
        calls.append(ToolCall(name, arguments, call_id if isinstance(call_id, str) else None))
    return tuple(calls)


def _parse_tools(raw: Any) -> tuple[FunctionTool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RowError(f'"tools" must be a list of function schemas, got {_type_name(raw)}')
    tools = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(
                f'tools[{i}] must look like {{"type": "function", "function": {{"name": ..., '
                '"description": ..., "parameters": {...}}}}'
            )
        description = function.get("description") or ""
        parameters = function.get("parameters")
        if not isinstance(description, str) or not (parameters is None or isinstance(parameters, dict)):
            raise RowError(f"tools[{i}]: description must be a string and parameters a JSON schema object")
        _check_plain(description, f"tools[{i}].function.description")
        tools.append(FunctionTool(function["name"], description, parameters))
    return tuple(tools)


def _reasoning_effort(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or raw.lower() not in REASONING_EFFORTS:
        raise RowError(f'"reasoning_effort" is {raw!r}; expected one of {", ".join(REASONING_EFFORTS)}')
    return raw.lower()


def _optional_text(row: dict, key: str) -> str | None:
    return None if row.get(key) is None else _text(row[key], f'"{key}"')


def _text(value: Any, where: str) -> str:
    """A string, or OpenAI-style text parts [{"type": "text", "text": ...}] joined together."""
    if isinstance(value, str):
        _check_plain(value, where)
        return value
    if _is_text_parts(value):
        text = "".join(part["text"] for part in value)
        _check_plain(text, where)
        return text
    if isinstance(value, list):
        raise RowError(f'{where} is a list with non-text parts; only {{"type": "text", "text": ...}} parts are supported')
    raise RowError(f"{where} must be a string, got {_type_name(value)}")


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    )


def _check_plain(text: str, where: str) -> None:
    match = _CONTROL_TOKEN.search(text)
    if match:
        raise RowError(
            f"{where} contains the harmony control token {match.group()!r}; rows hold plain text and osstune "
            "adds the control tokens (if the row was pre-rendered, convert it back to messages)"
        )


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
