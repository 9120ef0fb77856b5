"""Conversation -> harmony tokens, through openai-harmony (the canonical renderer).

We only translate our `Conversation` into harmony messages; openai-harmony renders them, so the
tokens are its own, system message, tool namespace and dropped chain of thought included.
Mapping (docs/DATA.md):
  system      : model identity, knowledge cutoff, optional current date, reasoning effort, channels
  developer   : "# Instructions" from the row's leading system/developer message, "# Tools" from `tools`
  user        : <|start|>user<|message|>...<|end|>
  assistant   : thinking -> analysis channel; content -> final channel;
                each tool call -> to=functions.NAME, commentary channel, "<|constrain|>json", ends <|call|>
  tool        : author functions.NAME, to=assistant, commentary channel
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from osstune.data.conversation import Conversation
from osstune.data.vocab import use_offline_vocab

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."


@dataclass(frozen=True)
class RenderOptions:
    """Dataset-wide defaults of the system message; a row's own keys override the first three."""

    model_identity: str = DEFAULT_MODEL_IDENTITY  # gpt-oss's own default
    reasoning_effort: str = "medium"  # low | medium | high
    current_date: str | None = None  # None: no "Current date:" line, so renders are reproducible
    knowledge_cutoff: str = "2024-06"
    valid_channels: tuple[str, ...] = ("analysis", "commentary", "final")
    builtin_tools: tuple[str, ...] = ()  # "browser" and/or "python" in the system message
    system_message: bool = True  # False renders conversations without one (harmony's bare format)
    # Harmony's rule for earlier chain of thought: when the conversation ends with a final answer,
    # analysis messages before the first final answer are left out. False keeps all of them.
    auto_drop_analysis: bool = True

    def __post_init__(self):
        if self.reasoning_effort not in ("low", "medium", "high"):
            raise ValueError(f"reasoning_effort={self.reasoning_effort!r}; expected 'low', 'medium' or 'high'")
        unknown = set(self.builtin_tools) - {"browser", "python"}
        if unknown:
            raise ValueError(f"builtin_tools {sorted(unknown)} unknown; harmony knows 'browser' and 'python'")


@functools.cache
def harmony_encoding():
    """openai-harmony's gpt-oss encoding, loaded offline (see vocab.use_offline_vocab)."""
    use_offline_vocab()
    from openai_harmony import HarmonyEncodingName, HarmonyError, load_harmony_encoding

    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except HarmonyError as e:
        base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        raise RuntimeError(
            f"openai-harmony could not load o200k_base ({e}); TIKTOKEN_ENCODINGS_BASE={base!r}. "
            "Unset TIKTOKEN_ENCODINGS_BASE to use osstune's offline copy."
        ) from e


def render_for_training(conversation: Conversation, options: RenderOptions = RenderOptions()) -> list[int]:
    """Harmony tokens of a training row: the context as harmony shows it at inference, then the last
    turn (every message after the last user message) in full, its final answer closed by <|return|>.

    Why not one `render_conversation_for_training` call over the whole row: with auto_drop_analysis,
    openai-harmony drops every analysis message before the *first* final answer whenever the row ends
    with a final answer. For a single-turn row that is the answer's own reasoning, and in a turn with
    tool calls it is the reasoning harmony itself keeps in the prompt while the turn is in progress
    (test_does_not_drop_if_ongoing_analysis). Rendering the context with harmony's own rule and the
    last turn without dropping gives the tokens the model sees and writes at inference. When the row
    ends with a final answer and so does the context's last assistant message (the usual multi-turn
    chat), the result is identical to `render_conversation_for_training` (tests/test_data_render.py).
    """
    from openai_harmony import Conversation as HConversation, RenderConversationConfig

    encoding = harmony_encoding()
    last_user = max((i for i, m in enumerate(conversation.messages) if m.role == "user"), default=-1)
    context = _preamble(conversation, options) + _messages(conversation.messages[: last_user + 1])
    turn = _messages(conversation.messages[last_user + 1 :])
    drop = RenderConversationConfig(auto_drop_analysis=options.auto_drop_analysis)
    keep = RenderConversationConfig(auto_drop_analysis=False)
    return encoding.render_conversation(HConversation.from_messages(context), drop) + (
        encoding.render_conversation_for_training(HConversation.from_messages(turn), keep)
    )


def assistant_parts(conversation: Conversation) -> list[tuple[int, list[int]]]:
    """For each harmony message made from an assistant message, in order: (index of that message in
    `conversation.messages`, its tokens rendered alone). Lets masks.py tell which rendered messages
    come from which row message (for `weight: 0`), whatever harmony dropped from the context."""
    encoding = harmony_encoding()
    out = []
    for index, m in enumerate(conversation.messages):
        if m.role == "assistant":
            out += [(index, encoding.render(h)) for h in _messages((m,))]
    return out


def render_prompt(conversation: Conversation, options: RenderOptions = RenderOptions()) -> list[int]:
    """Harmony prompt tokens ending with `<|start|>assistant`, for generation."""
    from openai_harmony import RenderConversationConfig, Role

    config = RenderConversationConfig(auto_drop_analysis=options.auto_drop_analysis)
    return harmony_encoding().render_conversation_for_completion(
        to_harmony(conversation, options), Role.ASSISTANT, config
    )


def to_harmony(conversation: Conversation, options: RenderOptions = RenderOptions()):
    """The openai_harmony.Conversation for our conversation."""
    from openai_harmony import Conversation as HConversation

    return HConversation.from_messages(_preamble(conversation, options) + _messages(conversation.messages))


def _preamble(conversation: Conversation, options: RenderOptions) -> list:
    from openai_harmony import Message, Role

    out = []
    if options.system_message:
        out.append(Message.from_role_and_content(Role.SYSTEM, _system_content(conversation, options)))
    if conversation.instructions or conversation.tools:
        out.append(Message.from_role_and_content(Role.DEVELOPER, _developer_content(conversation)))
    return out


def _messages(messages) -> list:
    from openai_harmony import Author, Message, Role

    out = []
    for m in messages:
        if m.role == "user":
            out.append(Message.from_role_and_content(Role.USER, m.content))
        elif m.role == "tool":
            author = Author.new(Role.TOOL, f"functions.{m.tool_name}")
            out.append(
                Message.from_author_and_content(author, m.content).with_channel("commentary").with_recipient("assistant")
            )
        else:
            if m.thinking:
                out.append(Message.from_role_and_content(Role.ASSISTANT, m.thinking).with_channel("analysis"))
            for call in m.tool_calls:
                out.append(
                    Message.from_role_and_content(Role.ASSISTANT, call.arguments)
                    .with_channel("commentary")
                    .with_recipient(f"functions.{call.name}")
                    # What gpt-oss writes for JSON arguments (openai-harmony's tests and format guide).
                    .with_content_type("<|constrain|>json")
                )
            if m.content:
                out.append(Message.from_role_and_content(Role.ASSISTANT, m.content).with_channel("final"))
    return out


def _system_content(conversation: Conversation, options: RenderOptions):
    from openai_harmony import ReasoningEffort, SystemContent

    effort = conversation.reasoning_effort or options.reasoning_effort
    content = (
        SystemContent.new()
        .with_model_identity(conversation.model_identity or options.model_identity)
        .with_reasoning_effort(ReasoningEffort(effort.capitalize()))
        .with_knowledge_cutoff(options.knowledge_cutoff)
        .with_required_channels(list(options.valid_channels))
    )
    date = conversation.current_date or options.current_date
    if date:
        content = content.with_conversation_start_date(date)
    if "browser" in options.builtin_tools:
        content = content.with_browser_tool()
    if "python" in options.builtin_tools:
        content = content.with_python_tool()
    return content


def _developer_content(conversation: Conversation):
    from openai_harmony import DeveloperContent, ToolDescription

    content = DeveloperContent.new()
    if conversation.instructions:
        content = content.with_instructions(conversation.instructions)
    if conversation.tools:
        content = content.with_function_tools(
            [ToolDescription.new(t.name, t.description, parameters=t.parameters) for t in conversation.tools]
        )
    return content
