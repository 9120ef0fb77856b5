"""Output parsing and prompt rendering of the server, checked against openai-harmony itself.

The token sequences are built from random text (multi-byte characters included) in harmony's
layout; our streaming parser's accumulated deltas must equal openai-harmony's own parse of the same
tokens, mapped to the OpenAI fields.
"""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("openai_harmony")

from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent, ToolDescription  # noqa: E402

from osstune.data.render import harmony_encoding  # noqa: E402
from osstune.serve.http.errors import ApiError  # noqa: E402
from osstune.serve.http.harmony_io import Delta, OutputParser, render_chat  # noqa: E402
from osstune.serve.http.text import IncrementalText, StopStrings  # noqa: E402

ALPHABET = "abc xyz.,\n{}\"é漢字😀𝔘🦜ꙮ<>|"


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n)).strip() or "x"


def _random_reply(rng: random.Random) -> str:
    """A harmony completion (after `<|start|>assistant`): analysis, preambles, tool calls, a final answer."""
    parts = []
    for _ in range(rng.randint(0, 2)):
        parts.append(f"<|channel|>analysis<|message|>{_text(rng, rng.randint(1, 30))}<|end|>")
    if rng.random() < 0.3:
        parts.append(f"<|channel|>commentary<|message|>{_text(rng, 10)}<|end|>")
    if rng.random() < 0.5:
        args = json.dumps({"q": _text(rng, rng.randint(1, 20))}, ensure_ascii=False)
        parts.append(f"<|channel|>commentary to=functions.tool_{rng.randint(0, 9)} <|constrain|>json<|message|>{args}<|call|>")
    else:
        parts.append(f"<|channel|>final<|message|>{_text(rng, rng.randint(1, 40))}<|return|>")
    return "<|start|>assistant".join(parts)


def _reference(tokens: list[int]) -> dict:
    """openai-harmony's parse, mapped to the OpenAI fields as the server documents it."""
    messages = harmony_encoding().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    content, reasoning, calls = [], [], []
    for m in messages:
        text = "".join(part.text for part in m.content)
        if m.recipient:
            calls.append((m.recipient.removeprefix("functions."), text))
        elif m.channel == "analysis":
            reasoning.append(text)
        else:
            content.append(text)
    return {"content": "\n".join(content), "reasoning": "\n".join(reasoning), "tool_calls": calls}


def _parse(tokens: list[int], prefill: list[int] = (), finish: str = "stop", chunk: int = 1) -> tuple[dict, OutputParser]:
    parser = OutputParser(list(prefill))
    total = Delta()
    for i in range(0, len(tokens), chunk):
        for t in tokens[i : i + chunk]:
            total.add(parser.feed(t))
    total.add(parser.finish(finish))
    calls: dict[int, list] = {}
    for call in total.tool_calls:
        if call.id is not None:
            assert call.id.startswith("call_") and call.index not in calls
            calls[call.index] = [call.name, ""]
        calls[call.index][1] += call.arguments
    out = {"content": total.content, "reasoning": total.reasoning, "tool_calls": [tuple(calls[i]) for i in sorted(calls)]}
    return out, parser


@pytest.mark.parametrize("seed", range(40))
def test_stream_parse_equals_harmony_parse(seed):
    rng = random.Random(seed)
    tokens = harmony_encoding().encode(_random_reply(rng), allowed_special="all")
    ours, parser = _parse(tokens)
    assert parser.valid, parser.error
    assert ours == _reference(tokens)
    assert parser.ended_with_call == (tokens[-1] == 200012)
    for call in ours["tool_calls"]:
        json.loads(call[1])  # the arguments reach the client as the JSON the model wrote


def test_named_tool_choice_prefill_is_part_of_the_reply():
    enc = harmony_encoding()
    prefill = enc.encode("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>", allowed_special="all")
    generated = enc.encode('{"city": "Zürich"}<|call|>', allowed_special="all")
    ours, parser = _parse(generated, prefill)
    assert ours == _reference(prefill + generated)
    assert ours["tool_calls"] == [("get_weather", '{"city": "Zürich"}')] and parser.ended_with_call


def test_required_prefill_lets_the_model_name_the_function():
    enc = harmony_encoding()
    prefill = enc.encode("<|channel|>commentary to=functions.", allowed_special="all")
    generated = enc.encode('lookup <|constrain|>json<|message|>{"k": 1}<|call|>', allowed_special="all")
    ours, _ = _parse(generated, prefill)
    assert ours == _reference(prefill + generated) and ours["tool_calls"][0][0] == "lookup"


def test_not_harmony_is_returned_as_text_never_raised():
    enc = harmony_encoding()
    # Valid analysis, then text where harmony expects <|start|>: harmony refuses it.
    good = enc.encode("<|channel|>analysis<|message|>ok<|end|>", allowed_special="all")
    bad = enc.encode("日本語 text<|start|>assistant<|message|>", allowed_special="all")
    with pytest.raises(Exception):
        enc.parse_messages_from_completion_tokens(good + bad, Role.ASSISTANT)
    ours, parser = _parse(good + bad, finish="length")
    assert not parser.valid and parser.error
    assert ours["reasoning"] == "ok"
    # Everything not shown as parsed text comes back as the decoded text, nothing lost.
    assert ours["content"] == enc.decode(bad)

    # Plain text with no header at all (a random model): the whole output is the content.
    plain = enc.encode("just some words, 漢字 😀<|end|>", allowed_special="all")
    ours, parser = _parse(plain, finish="length")
    assert not parser.valid and ours["content"] == enc.decode(plain) and ours["reasoning"] == ""


def test_header_cut_by_max_tokens_after_a_message_is_not_an_error():
    enc = harmony_encoding()
    tokens = enc.encode("<|channel|>analysis<|message|>think<|end|><|start|>assistant<|channel|>fin", allowed_special="all")
    ours, parser = _parse(tokens, finish="length")
    assert parser.valid and ours == {"content": "", "reasoning": "think", "tool_calls": []}


def test_incremental_text_and_stop_strings():
    enc = harmony_encoding()
    text = "héllo 😀 wörld 𝔘 stop here ꙮ and more"
    tokens = enc.encode(text)
    inc, stops = IncrementalText(enc.decode), StopStrings(["stop here", "zzz"])
    shown, hit = "", False
    for t in tokens:
        piece, hit = stops.feed(inc.feed([t]))
        assert "\ufffd" not in piece
        shown += piece
        if hit:
            break
    assert hit and shown == text[: text.index("stop here")]
    assert StopStrings(["ab"]).feed("xa") == ("x", False)  # "a" may start "ab": held back


def _render(messages, tools=None, tool_choice=None, effort=None):
    return render_chat(messages, tools, tool_choice, effort)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_render_matches_harmony_with_tools_and_tool_results():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
    ]
    prompt = _render(messages, TOOLS, "auto", "high")
    from osstune.data.render import DEFAULT_MODEL_IDENTITY
    from openai_harmony import Author, ReasoningEffort

    system = (SystemContent.new().with_model_identity(DEFAULT_MODEL_IDENTITY).with_reasoning_effort(ReasoningEffort.HIGH)
              .with_knowledge_cutoff("2024-06").with_required_channels(["analysis", "commentary", "final"]))
    developer = DeveloperContent.new().with_instructions("Be brief.").with_function_tools(
        [ToolDescription.new("get_weather", "Weather.", parameters=TOOLS[0]["function"]["parameters"])])
    expected = harmony_encoding().render_conversation_for_completion(Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, developer),
        Message.from_role_and_content(Role.USER, "Weather in Paris?"),
        Message.from_role_and_content(Role.ASSISTANT, "Need the tool.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, '{"city": "Paris"}').with_channel("commentary")
        .with_recipient("functions.get_weather").with_content_type("<|constrain|>json"),
        Message.from_author_and_content(Author.new(Role.TOOL, "functions.get_weather"), "18C")
        .with_channel("commentary").with_recipient("assistant"),
    ]), Role.ASSISTANT)
    assert prompt.tokens == list(expected) and prompt.prefill == []
    # tool_choice "none": the tools are not rendered at all.
    assert "get_weather" not in harmony_encoding().decode(_render(messages[:2], TOOLS, "none").tokens)
    named = _render(messages[:2], TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert harmony_encoding().decode(named.tokens).endswith(
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>")


@pytest.mark.parametrize(
    "messages, tools, choice, param",
    [
        ([], None, None, "messages"),
        ([{"role": "user", "content": 3}], None, None, "messages[0].content"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], None, None, "messages[1]"),
        ([{"role": "tool", "content": "x"}], None, None, "messages[0]"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None, None, "messages"),
        ([{"role": "user", "content": "a"}], None, "required", "tool_choice"),
        ([{"role": "user", "content": "a"}], TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([{"role": "user", "content": "a"}], "x", None, "tools"),
        ([{"role": "user", "content": "<|start|>"}], None, None, "messages[0].content"),
    ],
)
def test_render_errors_name_the_field(messages, tools, choice, param):
    with pytest.raises(ApiError) as e:
        _render(messages, tools, choice)
    assert e.value.status == 400 and e.value.param == param, e.value.message
