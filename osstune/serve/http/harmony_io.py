"""Chat requests -> harmony prompt tokens, and generated tokens -> content, reasoning and tool calls.

Rendering goes through `osstune.data` exactly as training does: the OpenAI messages are read by
`parse_row` (the rules of training rows, minus "must end with an answer") and rendered by
`render_prompt` (openai-harmony's renderer, system message and `# Tools` namespace included), so a
fine-tuned model sees at serving time the context it was trained on.

Parsing feeds each token to openai-harmony's `StreamableParser`. Messages map to the OpenAI fields:
analysis -> `reasoning`; a message with a recipient (`to=functions.NAME`) -> a tool call whose
content is the JSON arguments; final and commentary without a recipient -> `content`. Messages of
one kind are joined by a newline. Output that stops being harmony (a random or broken model) is
shown as its decoded text from the first token not yet shown, and `error` says why.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from osstune.data.conversation import parse_row
from osstune.data.errors import RowError
from osstune.data.render import RenderOptions, harmony_encoding, render_prompt
from osstune.serve.http.delta import Delta, ToolCallDelta
from osstune.serve.http.errors import bad_request
from osstune.serve.http.text import IncrementalText
from osstune.serve.types import HARMONY_STOP_TOKENS

# The longest header (`<|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json
# <|message|>`) is about 15 tokens plus the function name; one that runs past this is not harmony.
MAX_HEADER_TOKENS = 40
RETURN_TOKEN, CALL_TOKEN = HARMONY_STOP_TOKENS


@dataclass
class ChatPrompt:
    tokens: list[int]  # the prompt, ending with <|start|>assistant and the prefill
    prefill: list[int]  # the tokens after <|start|>assistant that steer tool_choice (part of the reply)
    tool_names: tuple[str, ...]


def render_chat(
    messages: Any, tools: Any, tool_choice: Any, reasoning_effort: Any, options: RenderOptions = RenderOptions()
) -> ChatPrompt:
    """The harmony prompt of an OpenAI chat request. Raises ApiError(400) naming the field."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of message objects", "messages")
    row: dict[str, Any] = {"messages": [_as_training_message(m, i) for i, m in enumerate(messages)]}
    if tools is not None:
        _check_tools(tools)
        row["tools"] = tools
    if reasoning_effort is not None:
        row["reasoning_effort"] = reasoning_effort
    try:
        conversation = parse_row(row, training=False).conversation
    except RowError as e:
        raise bad_request(str(e), _param_of(str(e))) from None
    if not conversation.messages or conversation.messages[-1].role not in ("user", "tool"):
        raise bad_request(
            "the last message must be a user message or a tool result: the reply continues from it", "messages"
        )
    names = tuple(t.name for t in conversation.tools)
    choice = _tool_choice(tool_choice, names)
    if choice == "none":
        # No tools rendered: the model is not told about them, so it cannot call them.
        conversation = type(conversation)(**{**conversation.__dict__, "tools": ()})
    prefill = _prefill(choice, names)
    return ChatPrompt(list(render_prompt(conversation, options)) + prefill, prefill, names)


def _as_training_message(message: Any, index: int) -> Any:
    """OpenAI's names for the assistant's reasoning (`reasoning_content`, `reasoning`) -> `thinking`;
    unknown keys with a value are refused (parse_row would only report them)."""
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("role") == "assistant":
        for alias in ("reasoning_content", "reasoning"):  # both given: the first wins
            if alias in out:
                out.setdefault("thinking", out.pop(alias))
    allowed = {"role", "content", "name", "thinking", "tool_calls", "tool_call_id", "refusal"}
    for key in out:
        if key not in allowed:
            raise bad_request(f"messages[{index}].{key} is not supported; leave it out", f"messages[{index}].{key}")
    if out.get("role") in ("user", "system", "developer") and "name" in out:
        out.pop("name")  # a participant's display name: harmony has no place for it
    if out.get("refusal"):
        raise bad_request(f"messages[{index}].refusal is not supported; put the text in content", f"messages[{index}]")
    out.pop("refusal", None)
    return out


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array of function tools", "tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', f"tools[{i}]")


def _tool_choice(choice: Any, names: tuple[str, ...]) -> str:
    """"auto", "none", "required" or the name of the function that must be called."""
    if choice is None:
        return "auto" if names else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise bad_request("tool_choice 'required' needs at least one tool in 'tools'", "tool_choice")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "'tool_choice' must be 'auto', 'none', 'required' or "
            '{"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not in 'tools' ({', '.join(names) or 'none'})", "tool_choice")
    return "function:" + name


def _prefill(choice: str, names: tuple[str, ...]) -> list[int]:
    """Tokens written for the model after `<|start|>assistant` to force a tool call.

    Named (or "required" with a single tool): the whole header of that call, so the model writes
    only the JSON arguments. "required" with several tools: the header up to `to=functions.`, so the
    model still picks the function (it writes the name and the rest of the header), but a call it
    must make. Either way the reply starts with the call: the chain of thought is skipped.
    """
    if choice == "required" and len(names) == 1:
        choice = "function:" + names[0]
    if choice.startswith("function:"):
        header = f"<|channel|>commentary to=functions.{choice[len('function:'):]} <|constrain|>json<|message|>"
    elif choice == "required":
        header = "<|channel|>commentary to=functions."
    else:
        return []
    return list(harmony_encoding().encode(header, allowed_special="all"))


def _param_of(message: str) -> str | None:
    """The field a RowError message starts with (`messages[2].content`, `tools[0]`, `"reasoning_effort"`)."""
    match = re.match(r'(messages\[\d+\](?:\.[A-Za-z_]+(?:\[\d+\])?)*|tools\[\d+\]|"(\w+)")', message)
    if not match:
        return "messages"
    return match.group(2) or match.group(1)


class OutputParser:
    """Generated tokens -> Deltas, through openai-harmony's streaming parser."""

    def __init__(self, prefill: list[int] = ()) -> None:
        from openai_harmony import Role, StreamableParser, StreamState

        self.encoding = harmony_encoding()
        self._header_state = StreamState.HEADER
        self._content_state = StreamState.CONTENT
        self._parser = StreamableParser(self.encoding, Role.ASSISTANT)
        for token in prefill:
            self._parser.process(token)  # our own header text: it parses
        self._prefilled = len(prefill)
        self.tokens: list[int] = []  # generated tokens fed so far
        self._shown = 0  # tokens before this index are shown (content) or consumed (complete headers)
        self._kind: str | None = None  # the message being written: "content", "reasoning" or "tool"
        self._seen: set[str] = set()
        self.num_tool_calls = 0
        self.ended_with_call = False
        self.num_reasoning_tokens = 0
        self.error: str | None = None
        self._raw: IncrementalText | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    def feed(self, token: int) -> Delta:
        from openai_harmony import HarmonyError

        self.tokens.append(token)
        if self._raw is not None:
            return Delta(content=self._raw.feed([token]))
        try:
            self._parser.process(token)
        except HarmonyError as e:
            return self._break(f"the output is not harmony ({e})")
        state = self._parser.state
        if state == self._header_state:
            if len(self.tokens) - self._shown + (self._prefilled if self._kind is None else 0) > MAX_HEADER_TOKENS:
                return self._break(f"a message header ran past {MAX_HEADER_TOKENS} tokens")
            return Delta()
        self._shown = len(self.tokens)
        if state != self._content_state:  # after <|end|>, <|call|> or <|return|>
            self.ended_with_call = token == CALL_TOKEN and self._kind == "tool"
            self._kind = None
            self._prefilled = 0
            return Delta()
        delta = Delta()
        if self._kind is None:
            delta = self._start_message()
        text = self._parser.last_content_delta or ""
        if self._kind == "reasoning":
            self.num_reasoning_tokens += 1
            delta.reasoning += text
        elif self._kind == "tool":
            if text:
                delta.tool_calls.append(ToolCallDelta(self.num_tool_calls - 1, arguments=text))
        else:
            delta.content += text
        return delta

    def _start_message(self) -> Delta:
        recipient = self._parser.current_recipient
        channel = self._parser.current_channel
        if recipient:
            self._kind = "tool"
            name = recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
            call = ToolCallDelta(self.num_tool_calls, id="call_" + secrets.token_hex(12), name=name)
            self.num_tool_calls += 1
            return Delta(tool_calls=[call])
        self._kind = "reasoning" if channel == "analysis" else "content"
        separator = "\n" if self._kind in self._seen else ""
        self._seen.add(self._kind)
        return Delta(content=separator) if self._kind == "content" else Delta(reasoning=separator)

    def _break(self, reason: str) -> Delta:
        self.error = reason
        self.ended_with_call = False
        self._raw = IncrementalText(self.encoding.decode, skip=HARMONY_STOP_TOKENS)
        return Delta(content=self._raw.feed(self.tokens[self._shown :]))

    def finish(self, finish_reason: str) -> Delta:
        """The end of the reply: flush what is held. Tokens left in an unfinished header are not
        harmony (shown as text), except a header cut by max_tokens after complete messages."""
        if self._raw is None and self._shown < len(self.tokens):
            cut_by_length = finish_reason == "length" and self._parser.messages
            if not cut_by_length:
                return self._break("the output ended inside a message header") + self._flush()
        return self._flush()

    def _flush(self) -> Delta:
        return Delta(content=self._raw.flush()) if self._raw is not None else Delta()
