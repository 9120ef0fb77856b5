"""Chatting with a gpt-oss model in the harmony format, rendered and parsed by `openai-harmony`.

A turn: render system (reasoning effort) + optional developer instructions + the history + the new
user message for completion (the prompt ends with `<|start|>assistant`), generate until `<|return|>`
or `<|call|>`, parse the completion into messages. The analysis channel is the chain of thought, the
final channel the answer. A model that does not speak harmony (random weights, a broken fine-tune)
yields text the parser rejects: then the raw decoded text is the answer and `ChatReply.valid` is False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    HarmonyError,
    Message,
    ReasoningEffort,
    Role,
    StreamableParser,
    SystemContent,
)

from osstune.data.render import harmony_encoding  # o200k_harmony, loaded offline
from osstune.infer.generate import STOP_TOKENS, SamplingOptions, generate
from osstune.model import GptOss

REASONING_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


def system_message(reasoning_effort: str = "medium") -> Message:
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort={reasoning_effort!r}; expected one of {', '.join(REASONING_EFFORTS)}")
    content = SystemContent.new().with_reasoning_effort(REASONING_EFFORTS[reasoning_effort])
    return Message.from_role_and_content(Role.SYSTEM, content)


def build_prompt(
    encoding: HarmonyEncoding,
    history: list[Message],
    *,
    reasoning_effort: str = "medium",
    developer_instructions: str | None = None,
) -> list[int]:
    """Token ids of system + developer + `history` (ending with the user's message) + `<|start|>assistant`.

    The system message is harmony's default (identity, knowledge cutoff, no date), as
    `osstune.data.render` renders training rows, so a fine-tuned model sees its training context.
    harmony's renderer drops the analysis of turns that ended in a final answer (the model only ever
    sees the chain of thought of the turn it is in).
    """
    messages = [system_message(reasoning_effort)]
    if developer_instructions:
        developer = DeveloperContent.new().with_instructions(developer_instructions)
        messages.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    conversation = Conversation.from_messages(messages + list(history))
    return list(encoding.render_conversation_for_completion(conversation, Role.ASSISTANT))


@dataclass
class ChatReply:
    final: str  # the answer; the raw decoded completion when it was not valid harmony
    analysis: str  # the chain of thought ("" when none)
    valid: bool  # False: the completion did not parse as harmony (see `error`)
    stop_reason: str  # "stop" (<|return|> or <|call|>) or "length"
    tokens: list[int]  # the completion, stop token included
    messages: list[Message]  # the parsed assistant messages ([] when not valid)
    error: str | None = None  # the parser's complaint when not valid

    @property
    def tool_call(self) -> Message | None:
        """The message addressed to a tool when the turn ended with `<|call|>`."""
        last = self.messages[-1] if self.messages else None
        return last if last is not None and last.recipient else None


def _text(message: Message) -> str:
    return "".join(getattr(part, "text", "") for part in message.content)


def parse_completion(encoding: HarmonyEncoding, tokens: list[int], stop_reason: str) -> ChatReply:
    """The assistant messages in a completion; never raises on malformed output."""
    try:
        messages = encoding.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    except HarmonyError as e:
        # Not harmony: show what the model wrote (special tokens spelled out) instead of failing.
        raw = encoding.decode(tokens)
        return ChatReply(raw, "", False, stop_reason, tokens, [], error=str(e))
    final = "".join(_text(m) for m in messages if m.channel == "final")
    analysis = "\n".join(_text(m) for m in messages if m.channel == "analysis")
    return ChatReply(final, analysis, True, stop_reason, tokens, list(messages))


class _ChannelStream:
    """Feeds completion tokens to harmony's streaming parser and reports text deltas per channel.

    Stops reporting (silently: the final parse says what went wrong) once the tokens stop being harmony.
    """

    def __init__(self, encoding: HarmonyEncoding, on_text: Callable[[str | None, str], None]) -> None:
        self.parser = StreamableParser(encoding, Role.ASSISTANT)
        self.on_text = on_text
        self.broken = False

    def __call__(self, row: int, token: int) -> None:
        if self.broken:
            return
        try:
            self.parser.process(token)
        except HarmonyError:
            self.broken = True
            return
        delta = self.parser.last_content_delta
        if delta:
            self.on_text(self.parser.current_channel, delta)


class ChatSession:
    """A conversation kept across turns, for interactive use.

    `send(text)` renders the whole history each turn (no cache is kept between turns: prefill is the
    cheap part on a GPU and the rendering stays harmony's). Analysis of answered turns is dropped.
    """

    def __init__(
        self,
        model: GptOss,
        encoding: HarmonyEncoding | None = None,
        *,
        reasoning_effort: str = "medium",
        developer_instructions: str | None = None,
        sampling: SamplingOptions = SamplingOptions(),
    ) -> None:
        system_message(reasoning_effort)  # validate now, not at the first turn
        self.model = model
        self.encoding = encoding if encoding is not None else harmony_encoding()
        self.reasoning_effort = reasoning_effort
        self.developer_instructions = developer_instructions
        self.sampling = sampling
        self.history: list[Message] = []

    def reset(self) -> None:
        self.history = []

    def prompt_tokens(self, user_text: str) -> list[int]:
        user = Message.from_role_and_content(Role.USER, user_text)
        return build_prompt(
            self.encoding,
            self.history + [user],
            reasoning_effort=self.reasoning_effort,
            developer_instructions=self.developer_instructions,
        )

    def send(self, user_text: str, on_text: Callable[[str | None, str], None] | None = None) -> ChatReply:
        """One turn. `on_text(channel, delta)` receives the text of each channel as it is generated."""
        prompt = self.prompt_tokens(user_text)
        streamer = _ChannelStream(self.encoding, on_text) if on_text is not None else None
        result = generate(
            self.model, prompt, stop_tokens=STOP_TOKENS, streamer=streamer, **dataclasses.asdict(self.sampling)
        )
        reply = parse_completion(self.encoding, result.tokens[0], result.stop_reasons[0])
        self.history.append(Message.from_role_and_content(Role.USER, user_text))
        if not reply.valid:
            # Keep what the user was shown, so the next turn's context matches the transcript.
            self.history.append(Message.from_role_and_content(Role.ASSISTANT, reply.final).with_channel("final"))
        elif any(m.channel == "final" for m in reply.messages):
            # harmony: once a final answer is given, that turn's chain of thought is not shown again.
            self.history.extend(m for m in reply.messages if m.channel != "analysis")
        else:
            # A tool call or a cut-off answer: the turn is still open, its analysis stays.
            self.history.extend(reply.messages)
        return reply
