"""Rendering: OpenAI's harmony fixtures rebuilt from our row format, and a property test against an
independent string rendering of the harmony format encoded by openai-harmony's tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from osstune.data.conversation import parse_row
from osstune.data.masks import train_mask
from osstune.data.render import RenderOptions, harmony_encoding, render_for_training, render_prompt

FIXTURES = Path(__file__).parent / "data_fixtures" / "harmony"
ROBOT = "Answer the user's questions like a robot."
CAPITAL = "What is the capital of the largest country in the world?"


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def fixture_text(name: str) -> str:
    # openai/harmony's tests compare against the file with trailing whitespace stripped.
    return (FIXTURES / f"{name}.txt").read_text(encoding="utf-8").rstrip()


def prompt_of(row: dict, options: RenderOptions = RenderOptions()) -> list[int]:
    return render_prompt(parse_row(row, training=False).conversation, options)


def assert_renders(enc, tokens: list[int], expected_text: str):
    assert enc.decode_utf8(tokens) == expected_text
    assert tokens == enc.encode(expected_text, allowed_special="all")


CHANNELS_NO_COMMENTARY = RenderOptions(valid_channels=("analysis", "final"))

PROMPT_FIXTURES = {
    "test_simple_convo": ({"messages": [{"role": "user", "content": "What is 2 + 2?"}]}, RenderOptions()),
    **{
        f"test_simple_convo_{effort}_effort": (
            {"messages": [{"role": "system", "content": ROBOT}, {"role": "user", "content": CAPITAL}],
             "reasoning_effort": effort},
            RenderOptions(),
        )
        for effort in ("low", "medium", "high")
    },
    **{
        f"test_simple_convo_{effort}_effort_no_instruction": (
            {"messages": [{"role": "user", "content": CAPITAL}], "reasoning_effort": effort},
            RenderOptions(),
        )
        for effort in ("low", "medium", "high")
    },
    "test_reasoning_system_message": (
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}, CHANNELS_NO_COMMENTARY
    ),
    "test_reasoning_system_message_no_instruction": (
        {"messages": [{"role": "user", "content": "What is the best place to eat candy in the world?"}],
         "reasoning_effort": "high"},
        CHANNELS_NO_COMMENTARY,
    ),
    "test_reasoning_system_message_with_dates": (
        {"messages": [{"role": "user", "content": "What is 42 * pi?"}], "current_date": "2021-01-01"},
        RenderOptions(valid_channels=("analysis", "final"), knowledge_cutoff="2021-01"),
    ),
    "test_no_tools": ({"messages": [], "current_date": "2025-06-28"}, RenderOptions()),
    "test_browser_tool_only": ({"messages": []}, RenderOptions(current_date="2025-06-28", builtin_tools=("browser",))),
    "test_browser_and_python_tool": (
        {"messages": []}, RenderOptions(current_date="2025-06-28", builtin_tools=("browser", "python"))
    ),
    "test_browser_and_function_tool": (
        {
            "messages": [],
            "tools": [{"type": "function", "function": {
                "name": "lookup_weather",
                "description": "Use this tool to lookup the weather in a given location. Call it with the parameter "
                "'location', can be any textual description of a location.",
                "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                               "required": ["location"]},
            }}],
        },
        RenderOptions(current_date="2025-06-28", builtin_tools=("browser",)),
    ),
    "test_dropping_cot_by_default": (
        {"messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "thinking": "User asks: “What is 2 + 2?” Simple arithmetic. Provide answer.",
             "content": "2 + 2 equals 4."},
            {"role": "user", "content": "What about 9 / 2?"},
        ]},
        RenderOptions(system_message=False),
    ),
    "test_preserve_cot": (
        {"messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "thinking": 'User asks a simple question: "What is 2 + 2?" The answer: 4.',
             "content": "2 + 2 equals 4."},
            {"role": "user", "content": "What about 9 / 2?"},
        ]},
        RenderOptions(system_message=False, auto_drop_analysis=False),
    ),
}


@pytest.mark.parametrize("name", sorted(PROMPT_FIXTURES))
def test_prompt_fixture(enc, name):
    row, options = PROMPT_FIXTURES[name]
    assert_renders(enc, prompt_of(row, options), fixture_text(name))


def kitchen_sink_tools() -> list[dict]:
    # The tools of openai/harmony's test_render_functions_with_parameters, in OpenAI's schema format.
    fmt = {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}
    schemas = [
        ("get_location", "Gets the location of the user.", None),
        ("get_current_weather", "Gets the current weather in the provided location.", {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                           "format": fmt},
            "required": ["location"],
        }),
        ("get_multiple_weathers", "Gets the current weather in the provided list of locations.", {
            "type": "object",
            "properties": {
                "locations": {"type": "array", "items": {"type": "string"},
                              "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
                "format": fmt,
            },
            "required": ["locations"],
        }),
        ("kitchensink", "A function with various complex schemas.", {
            "description": "params object",
            "type": "object",
            "properties": {
                "string": {"type": "string", "title": "STRING", "description": "A string", "examples": ["hello", "world"]},
                "string_nullable": {"type": "string", "nullable": True, "description": "A nullable string",
                                    "default": "the default"},
                "string_enum": {"type": "string", "enum": ["a", "b", "c"]},
                "oneof_string_or_number": {
                    "oneOf": [{"type": "string", "default": "default_string_in_oneof"},
                              {"type": "number", "description": "numbers can happen too"}],
                    "description": "a oneof",
                    "default": 20,
                },
            },
        }),
    ]
    return [{"type": "function", "function": {"name": n, "description": d, **({"parameters": p} if p else {})}}
            for n, d, p in schemas]


def test_render_functions_with_parameters(enc):
    row = {
        "messages": [{"role": "system", "content": "Always respond in riddles"},
                     {"role": "user", "content": "What is the weather like in SF?"}],
        "tools": kitchen_sink_tools(),
        "reasoning_effort": "high",
        "current_date": "2025-06-28",
    }
    assert_renders(enc, prompt_of(row), fixture_text("test_render_functions_with_parameters"))


def test_does_not_drop_if_ongoing_analysis(enc):
    row = {"messages": [
        {"role": "user", "content": "What is the weather in SF?"},
        {"role": "assistant", "thinking": "User asks: “What is the weather in SF?” We need to use lookup_weather tool.",
         "tool_calls": [{"type": "function", "function": {"name": "lookup_weather",
                                                          "arguments": '{"location": "San Francisco"}'}}]},
        {"role": "tool", "content": '{"temperature": 20, "description": "sunny"}'},
    ]}
    # The one convention where we differ from this fixture's conversation, which gives its tool message
    # no recipient and no channel: we write tool outputs as harmony's format guide and gpt-oss's Hugging
    # Face template do, `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>`.
    expected = fixture_text("test_does_not_drop_if_ongoing_analysis").replace(
        "<|start|>functions.lookup_weather<|message|>",
        "<|start|>functions.lookup_weather to=assistant<|channel|>commentary<|message|>",
    )
    assert_renders(enc, prompt_of(row, RenderOptions(system_message=False)), expected)


def test_keep_analysis_between_finals_for_training(enc):
    from openai_harmony import Conversation, Message, Role

    row = {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "thinking": "thinking 2+2", "content": "4"},
        {"role": "user", "content": "What is 3 + 5?"},
        {"role": "assistant", "thinking": "thinking 3+5", "content": "8"},
    ]}
    tokens = render_for_training(parse_row(row).conversation, RenderOptions(system_message=False))
    # The fixture is `render_conversation`; for training the last final ends with <|return|>.
    expected = fixture_text("test_keep_analysis_between_finals")
    assert expected.endswith("<|end|>")
    assert_renders(enc, tokens, expected[: -len("<|end|>")] + "<|return|>")
    # Here the earlier turn holds a final answer, so harmony's one-call training render agrees with ours.
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.USER, "What is 2 + 2?"),
        Message.from_role_and_content(Role.ASSISTANT, "thinking 2+2").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "4").with_channel("final"),
        Message.from_role_and_content(Role.USER, "What is 3 + 5?"),
        Message.from_role_and_content(Role.ASSISTANT, "thinking 3+5").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "8").with_channel("final"),
    ])
    assert tokens == enc.render_conversation_for_training(convo)


def test_single_turn_keeps_its_reasoning_unlike_harmonys_one_call_render(enc):
    """Why render_for_training splits the row (render.py): harmony's one-call training render drops the
    analysis of a single-turn row. If a harmony release changes that, this test says so."""
    from openai_harmony import Conversation, Message, Role

    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "thinking": "greet back", "content": "Hello!"}]}
    ours = enc.decode_utf8(render_for_training(parse_row(row).conversation, RenderOptions(system_message=False)))
    assert ours == ("<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>analysis<|message|>greet back"
                    "<|end|><|start|>assistant<|channel|>final<|message|>Hello!<|return|>")
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.USER, "hi"),
        Message.from_role_and_content(Role.ASSISTANT, "greet back").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "Hello!").with_channel("final"),
    ])
    theirs = enc.decode_utf8(enc.render_conversation_for_training(convo))
    assert "greet back" not in theirs


def test_row_level_system_keys_override_the_options(enc):
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent

    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
           "model_identity": "You are Osmo.", "current_date": "2025-01-02", "reasoning_effort": "LOW"}
    system = (SystemContent.new().with_model_identity("You are Osmo.").with_conversation_start_date("2025-01-02")
              .with_reasoning_effort(ReasoningEffort.LOW))
    expected = enc.render_conversation_for_training(Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.USER, "hi"),
        Message.from_role_and_content(Role.ASSISTANT, "yo").with_channel("final"),
    ]))
    options = RenderOptions(model_identity="ignored", current_date="1999-01-01", reasoning_effort="high")
    assert render_for_training(parse_row(row).conversation, options) == expected


def test_render_options_are_checked():
    with pytest.raises(ValueError, match="reasoning_effort='max'"):
        RenderOptions(reasoning_effort="max")
    with pytest.raises(ValueError, match=r"builtin_tools \['web'\] unknown"):
        RenderOptions(builtin_tools=("web",))


# ---- property test: our rendering vs the harmony format written out as strings ----

_CONTROL = re.compile(r"<\|[a-z_0-9]+\|>")
_ALPHABET = list("abcdefxyz ABC 012 .,!?'\"{}[]:<>|/\\\n\t") + ["é", "ệ", "中", "文", "😊", "  ", "\n\n"]
texts = st.lists(st.sampled_from(_ALPHABET), max_size=12).map("".join).filter(lambda s: not _CONTROL.search(s))
nonempty = texts.filter(lambda s: s != "")
names = st.sampled_from(["lookup", "get_time", "f-1"])
arguments = st.dictionaries(st.sampled_from(["a", "city", "n"]), st.one_of(st.integers(-5, 99), texts), max_size=2)


@st.composite
def assistant_steps(draw, tool_names):
    """One assistant turn: tool rounds (call messages + outputs), then a final answer or, at the end of
    a row only, a last tool call."""
    steps = []
    for _ in range(draw(st.integers(0, 2)) if tool_names else 0):
        calls = [{"type": "function", "function": {"name": draw(st.sampled_from(tool_names)),
                                                   "arguments": draw(arguments)}}
                 for _ in range(draw(st.integers(1, 2)))]
        message = {"role": "assistant", "tool_calls": calls}
        reason_key = draw(st.sampled_from(["thinking", "content", None]))
        if reason_key:
            message[reason_key] = draw(texts)
        steps.append(message)
        steps += [{"role": "tool", "content": draw(texts)} for _ in calls]
    final = {"role": "assistant", "content": draw(nonempty)}
    if draw(st.booleans()):
        final["thinking"] = draw(texts)
    steps.append(final)
    return steps


@st.composite
def rows(draw):
    tool_names = draw(st.lists(names, unique=True, max_size=2))
    row: dict = {"messages": []}
    if tool_names:
        row["tools"] = [{"type": "function", "function": {"name": n, "description": draw(nonempty.filter(
            lambda s: "\n" not in s and s.strip() == s))}} for n in tool_names]
    if draw(st.booleans()):
        row["messages"].append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(nonempty)})
    if draw(st.booleans()):
        row["reasoning_effort"] = draw(st.sampled_from(["low", "medium", "high"]))
    for _ in range(draw(st.integers(1, 3))):
        row["messages"].append({"role": "user", "content": draw(texts)})
        row["messages"] += draw(assistant_steps(tool_names))
    if tool_names and draw(st.booleans()):
        row["messages"][-1] = {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": tool_names[0], "arguments": draw(arguments)}}]}  # the row ends with a call
    return row


def reference_pieces(row: dict, options: RenderOptions) -> list[tuple[str, bool]]:
    """(text, trained) pieces of the row rendered by hand from the harmony format (docs/DATA.md), with
    harmony's rule for earlier analysis applied to the context, and the default train_on="last"."""
    messages = list(row["messages"])
    instructions = messages.pop(0)["content"] if messages[0]["role"] in ("system", "developer") else None
    tools = row.get("tools", [])
    effort = row.get("reasoning_effort", options.reasoning_effort)
    system = f"{options.model_identity}\nKnowledge cutoff: {options.knowledge_cutoff}\n\nReasoning: {effort}\n\n" \
             "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    if tools:
        system += "\nCalls to these tools must go to the commentary channel: 'functions'."
    head = [("system", None, f"<|start|>system<|message|>{system}<|end|>")]
    if instructions or tools:
        sections = ["# Instructions", instructions] if instructions else []
        if tools:
            lines = ["## functions\n", "namespace functions {\n"]
            for t in tools:
                lines += [f"// {t['function']['description']}", f"type {t['function']['name']} = () => any;\n"]
            sections.append("# Tools\n\n" + "\n".join(lines + ["} // namespace functions"]))
        developer = "\n\n".join(sections)
        head.append(("developer", None, f"<|start|>developer<|message|>{developer}<|end|>"))
    # (author, channel, text) per harmony message
    body, last_call = [], None
    for m in messages:
        if m["role"] == "user":
            body.append(("user", None, f"<|start|>user<|message|>{m['content']}<|end|>"))
        elif m["role"] == "tool":
            body.append(("tool", "commentary", f"<|start|>functions.{last_call} to=assistant<|channel|>commentary"
                                               f"<|message|>{m['content']}<|end|>"))
        else:
            reasoning = m.get("thinking") or (m.get("content") if m.get("tool_calls") else None)
            if reasoning:
                body.append(("assistant", "analysis", f"<|start|>assistant<|channel|>analysis<|message|>{reasoning}<|end|>"))
            for call in m.get("tool_calls", []):
                last_call = call["function"]["name"]
                args = json.dumps(call["function"]["arguments"], ensure_ascii=False)
                body.append(("assistant", "commentary", f"<|start|>assistant to=functions.{last_call}<|channel|>"
                                                        f"commentary <|constrain|>json<|message|>{args}<|call|>"))
            if not m.get("tool_calls"):
                body.append(("assistant", "final", f"<|start|>assistant<|channel|>final<|message|>{m['content']}<|end|>"))
    last_user = max(i for i, b in enumerate(body) if b[0] == "user")
    context, turn = body[: last_user + 1], body[last_user + 1 :]
    # Harmony: if the context's last assistant message is a final answer, analysis before the first final goes.
    assistants = [b for b in context if b[0] == "assistant"]
    if assistants and assistants[-1][1] == "final":
        first_final = next(i for i, b in enumerate(context) if b[1] == "final")
        context = [b for i, b in enumerate(context) if not (i < first_final and b[1] == "analysis")]
    if turn[-1][1] == "final":
        turn[-1] = turn[-1][:2] + (turn[-1][2][: -len("<|end|>")] + "<|return|>",)
    pieces = [(text, False) for _, _, text in head + context]
    previous = context[-1]
    for author, channel, text in turn:
        if author != "assistant":
            pieces.append((text, False))
        elif previous[0] == "assistant" and previous[2].endswith("<|end|>"):
            pieces.append((text, True))  # the model wrote this <|start|>assistant after its own <|end|>
        else:
            pieces += [("<|start|>assistant", False), (text[len("<|start|>assistant"):], True)]
        previous = (author, channel, text)
    return pieces


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows())
def test_rendering_and_mask_match_the_written_out_format(row):
    enc = harmony_encoding()
    options = RenderOptions()
    conversation = parse_row(row).conversation
    tokens = render_for_training(conversation, options)
    pieces = reference_pieces(row, options)
    expected_tokens, expected_mask = [], []
    for text, trained in pieces:
        ids = enc.encode(text, allowed_special="all")
        expected_tokens += ids
        expected_mask += [trained] * len(ids)
    assert enc.decode_utf8(tokens) == "".join(text for text, _ in pieces)
    assert tokens == expected_tokens
    assert train_mask(np.asarray(tokens), "last").tolist() == expected_mask

    # The context part is exactly the inference prompt of the conversation up to the last user message.
    messages = row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    prompt = prompt_of({**row, "messages": messages[: last_user + 1]}, options)
    first_trained = expected_mask.index(True)
    assert tokens[: first_trained] == prompt

    # Where harmony's one-call training render applies its drop rule as at inference, it agrees with ours.
    context_assistants = [m for m in messages[:last_user] if m["role"] == "assistant"]
    if context_assistants and not context_assistants[-1].get("tool_calls") and not messages[-1].get("tool_calls"):
        from openai_harmony import RenderConversationConfig

        from osstune.data.render import to_harmony

        one_call = enc.render_conversation_for_training(to_harmony(conversation, options), RenderConversationConfig())
        assert tokens == one_call
