"""Tool calls end to end: a scripted model (see serve_live.scripted_model) that answers every chat
with a harmony call of get_weather, behind the live server, read with the official `openai` client.
The fields must equal openai-harmony's own parse of the tokens the model wrote."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from openai_harmony import Role  # noqa: E402

from osstune.data.render import harmony_encoding  # noqa: E402
from tests.serve_live import live_server, scripted_model, wait_idle  # noqa: E402

REPLY = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served():
    enc = harmony_encoding()
    reply = enc.encode(REPLY, allowed_special="all")
    assistant = enc.encode("assistant", allowed_special="all")[-1]  # every prompt ends with <|start|>assistant
    with live_server(model=scripted_model([assistant, *reply])) as (url, ctx):
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0), ctx, reply


def test_tool_call_fields_equal_harmonys_parse(served):
    client, ctx, reply = served
    [message] = harmony_encoding().parse_messages_from_completion_tokens(reply, Role.ASSISTANT)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert "functions." + call.function.name == message.recipient
    assert call.function.arguments == message.content[0].text and json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens == len(reply)

    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert {d.index for d in deltas} == {0}
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks)  # nothing of the call leaks into the content
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_named_tool_choice_continues_after_the_prefilled_header(served):
    client, _, reply = served
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=40, temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The header was the prompt's: the model wrote only the arguments and <|call|>.
    header = harmony_encoding().encode(REPLY[: REPLY.index("{")], allowed_special="all")
    assert r.usage.completion_tokens == len(reply) - len(header)


def test_tool_result_round_trip_and_responses(served):
    client, ctx, _ = served
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=40, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18}'}]
    second = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=40, temperature=0)
    assert second.choices[0].finish_reason == "tool_calls"  # the scripted model calls again: the history rendered
    assert second.usage.prompt_tokens > first.usage.prompt_tokens

    resp = client.responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=40, temperature=0,
                                   tools=[{"type": "function", **TOOLS[0]["function"]}])
    [item] = resp.output
    assert resp.status == "completed" and item.type == "function_call"
    assert item.name == "get_weather" and json.loads(item.arguments) == {"city": "Paris"}
    assert wait_idle(ctx.engine).kv_blocks_used == 0


LOOP = "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"  # then again, until max_tokens


def test_reasoning_fields_equal_harmonys_parse():
    enc = harmony_encoding()
    cycle = enc.encode(LOOP, allowed_special="all")
    assistant = cycle[-1]
    max_tokens = 2 * len(cycle) + len(cycle) - 2  # three analysis messages, cut right after an <|end|>
    with live_server(model=scripted_model([assistant, *cycle])) as (url, ctx):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=max_tokens, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=ASK, max_tokens=max_tokens, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    generated = (cycle * 3)[:max_tokens]
    messages = enc.parse_messages_from_completion_tokens(generated, Role.ASSISTANT)
    expected = "\n".join(m.content[0].text for m in messages)
    assert len(messages) == 3 and all(m.channel == "analysis" for m in messages)
    message = r.choices[0].message
    assert message.reasoning == message.reasoning_content == expected  # both names, for old and new clients
    assert message.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens_details.reasoning_tokens > 0
    def field(name):  # extra fields of the client's delta type: absent from chunks without them
        return "".join(getattr(c.choices[0].delta, name, None) or "" for c in chunks if c.choices)

    assert field("reasoning_content") == field("reasoning") == expected
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
