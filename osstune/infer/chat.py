"""Chatting with a gpt-oss model in the harmony format, rendered and parsed by `openai-harmony`.

A turn: render system (reasoning effort) + optional developer instructions + the history + the new
user message for completion (the prompt ends with `<|start|>assistant`), generate it on the serving
engine (`osstune.serve`) until `<|return|>` or `<|call|>`, streaming each step's new tokens through
harmony's parser, then parse the completion into messages. The analysis channel is the chain of
thought, the final channel the answer. A model that does not speak harmony (random weights, a broken fine-tune)
yields text the parser rejects: then the raw decoded text is the answer and `ChatReply.valid` is False.
"""

from __future__ import annotations

import dataclasses
import warnings
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
from osstune.infer.generate import STOP_TOKENS, SamplingOptions
from osstune.model import GptOss
from osstune.serve.config import EngineConfig
from osstune.serve.engine import LLMEngine
from osstune.serve.kv_blocks import KVCacheManager
from osstune.serve.runner import kv_groups
from osstune.serve.types import RequestError, SamplingParams

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


def chat_engine(
    model: GptOss,
    adapters: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    kernels: str = "auto",
) -> LLMEngine:
    """An engine sized for one conversation: one sequence at a time, and a KV cache that holds one
    sequence of the model's whole context (a few GiB for gpt-oss-20b's 131k tokens) instead of a
    share of the GPU. Finished turns' blocks stay in the prefix cache, so the next turn, whose prompt
    starts with this one's, prefills only what is new.
    """
    base = EngineConfig(max_num_seqs=1, cuda_graph_max_batch=1, kernels=kernels)
    kv = KVCacheManager(2, base.block_size, kv_groups(model), True)  # only to count blocks
    blocks = kv.max_blocks_needed(model.config.max_position_embeddings, base.max_num_batched_tokens)
    config = dataclasses.replace(base, num_kv_blocks=blocks + 1)  # + the reserved null block
    return LLMEngine(model, config, adapters, log=log or (lambda s: None))


class ChatSession:
    """A conversation kept across turns, for interactive use.

    `send(text)` renders the whole history each turn (the rendering stays harmony's; the engine's
    prefix cache keeps what the previous turn computed). Analysis of answered turns is dropped.
    `model`: a GptOss (an engine sized for one conversation is built for it, see `chat_engine`) or
    an `LLMEngine` to share; `adapter` names one of the engine's adapters.
    """

    def __init__(
        self,
        model: GptOss | LLMEngine,
        encoding: HarmonyEncoding | None = None,
        *,
        reasoning_effort: str = "medium",
        developer_instructions: str | None = None,
        sampling: SamplingOptions = SamplingOptions(),
        adapter: str | None = None,
    ) -> None:
        system_message(reasoning_effort)  # validate now, not at the first turn
        self.engine = chat_engine(model) if isinstance(model, GptOss) else model
        self.adapter = adapter
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
        """One turn. `on_text(channel, delta)` receives the text of each channel as it is generated.
        Raises `RequestError` when the conversation no longer fits the context (then `reset`)."""
        prompt = self.prompt_tokens(user_text)
        tokens, stop_reason = self._generate(prompt, _ChannelStream(self.encoding, on_text) if on_text else None)
        reply = parse_completion(self.encoding, tokens, stop_reason)
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

    def _generate(self, prompt: list[int], streamer: _ChannelStream | None) -> tuple[list[int], str]:
        """Run one request on the engine, stepping it here; returns (tokens, "stop" or "length")."""
        opts = self.sampling
        room = self.engine.max_model_len - len(prompt)
        if room < 1:
            raise RequestError(
                f"the conversation has {len(prompt)} tokens; the context is {self.engine.max_model_len}: start a new one",
                field="prompt",
            )
        if opts.max_new_tokens > room:
            # As `osstune.infer.generate` did: the answer may use what is left of the context.
            warnings.warn(
                f"max_new_tokens={opts.max_new_tokens} would run past the context ({self.engine.max_model_len}) "
                f"after a {len(prompt)}-token conversation; generating at most {room}",
                stacklevel=3,
            )
        params = SamplingParams(
            max_tokens=min(opts.max_new_tokens, room),
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            seed=opts.seed,
            stop_token_ids=STOP_TOKENS,
        )
        rid = self.engine.add_request(prompt, params, adapter=self.adapter)
        tokens: list[int] = []
        reason = None
        try:
            while reason is None and self.engine.has_unfinished:
                for update in self.engine.step():
                    if update.request_id != rid:
                        continue
                    tokens.extend(update.new_token_ids)
                    if streamer is not None:
                        for t in update.new_token_ids:
                            streamer(0, t)
                    if update.finished:
                        reason = update.finish_reason
        finally:
            if reason is None:  # interrupted (Ctrl-C): free the request's blocks
                self.engine.abort(rid)
        if reason not in ("stop", "length"):
            raise RuntimeError(f"the engine ended the turn with {reason!r}")
        return tokens, reason
