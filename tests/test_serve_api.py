"""`osstune serve` end to end: a live server on loopback (real engine, tiny random model, CPU),
driven by the official `openai` client and raw HTTP.

With random weights the model does not write harmony, so its replies come back as raw text with
finish_reason "harmony_parse_error"; that makes the content checkable against the tokens of a
plain greedy `osstune.infer.generate` on the same weights. Reasoning/tool-call parsing against
openai-harmony is in test_serve_harmony_io.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from osstune.data.render import harmony_encoding  # noqa: E402
from osstune.serve.http.harmony_io import render_chat  # noqa: E402
from osstune.serve.types import HARMONY_STOP_TOKENS  # noqa: E402
from tests.serve_live import MAX_MODEL_LEN, base_model, live_server, wait_idle, write_adapter  # noqa: E402

KEY = "test-key"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    adapter = tmp_path_factory.mktemp("adapter")
    write_adapter(adapter)
    with live_server(adapters={"persona": str(adapter)}, api_key=KEY) as (url, ctx):
        yield url, ctx, adapter


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def _user(text):
    return [{"role": "user", "content": text}]


def _greedy_text(model, prompt, max_tokens):
    from osstune.infer.generate import generate

    tokens = generate(model, prompt, max_new_tokens=max_tokens, temperature=0.0).tokens[0]
    return harmony_encoding().decode([t for t in tokens if t not in HARMONY_STOP_TOKENS])


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "persona"]
    assert client.models.retrieve("persona").id == "persona"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_chat_equals_greedy_generate_and_adapter_equals_merged(server, client):
    from osstune.lora import load_adapter, merge_lora

    messages = _user("What is your name?")
    prompt = render_chat(messages, None, None, None).tokens
    base = base_model()
    merged = merge_lora(load_adapter(base_model(), server[2]))
    for model_id, reference in (("tiny", base), ("persona", merged)):
        r = client.chat.completions.create(model=model_id, messages=messages, max_tokens=10, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "harmony_parse_error"  # random weights: raw text, never a 500
        assert choice.message.content == _greedy_text(reference, prompt, 10), model_id
        assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 10
        assert r.usage.total_tokens == len(prompt) + 10
    assert _greedy_text(base, prompt, 10) != _greedy_text(merged, prompt, 10)  # the adapter matters


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(model="tiny", messages=_user("Count to three."), max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content and finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_seed_and_stop_strings(client):
    kwargs = dict(model="tiny", messages=_user("Tell me a story."), max_tokens=5, temperature=1.0, seed=7, n=2)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) == 2  # seed + i per choice
    assert a.usage.completion_tokens == 10
    texts = ["", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in a.choices]  # the choices' chunks interleave, each whole

    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop], stream=stream)
        pieces = list(r) if stream else [r]
        got = "".join(p.choices[0].text for p in pieces if p.choices)
        assert got == text[: text.index(stop)], stream
        assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == "stop"


def test_completions_text_and_token_prompts(client):
    ids = harmony_encoding().encode("The capital of France is")
    by_text = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == _greedy_text(base_model(), ids, 6)
    assert by_text.usage.prompt_tokens == len(ids)
    two = client.completions.create(model="persona", prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens == len(ids) + 3


def test_tool_choice_named_and_responses_api(client):
    messages = _user("Weather in Paris?")
    kwargs = dict(model="tiny", messages=messages, tools=TOOLS, max_tokens=6, temperature=0,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
    r = client.chat.completions.create(**kwargs)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_") and call.type == "function"
    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments

    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    resp = client.responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=6, temperature=0)
    assert resp.output_text == plain.choices[0].message.content and resp.usage.output_tokens == 6
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", max_output_tokens=6, temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"  # max_output_tokens hit
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert events[-1].response.output_text == resp.output_text and [e.sequence_number for e in events] == list(range(len(events)))
    resp = client.responses.create(
        model="tiny", input="Weather in Paris?", max_output_tokens=6, temperature=0,
        tools=[{"type": "function", **TOOLS[0]["function"]}], tool_choice={"type": "function", "name": "get_weather"},
    )
    calls = [o for o in resp.output if o.type == "function_call"]
    assert calls[0].name == "get_weather" and calls[0].arguments == call.function.arguments
    events = list(client.responses.create(
        model="tiny", input="Weather in Paris?", max_output_tokens=6, temperature=0, stream=True,
        tools=[{"type": "function", **TOOLS[0]["function"]}], tool_choice={"type": "function", "name": "get_weather"},
    ))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert added[0].type == "function_call" and added[0].name == "get_weather"
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.function.arguments


def _post(url, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(url + path, content=raw if raw is not None else json.dumps(body), headers=headers, timeout=60)


LONG = "word " * (MAX_MODEL_LEN + 50)
BAD = [
    ("/v1/chat/completions", None, "{not json", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hi"}, None, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "temperature": "hot"}, None, "temperature"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "max_tokens": "ten"}, None, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "n": 0}, None, "n"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "frobnicate": 1}, None, "frobnicate"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "logprobs": True}, None, "logprobs"),
    ("/v1/chat/completions", {"model": "gpt-5", "messages": _user("a")}, None, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, None, "messages[0]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a") + [{"role": "system", "content": "s"}]}, None, "messages[1]"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user(LONG)}, None, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "max_completion_tokens": MAX_MODEL_LEN}, None, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "stream_options": {"include_usage": True}}, None, "stream_options"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "reasoning_effort": "max"}, None, "reasoning_effort"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, None, "tool_choice"),
    ("/v1/chat/completions", None, "[1, 2]", None),
    ("/v1/chat/completions", None, '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}', None),
    ("/v1/completions", None, '{"model": "tiny", "prompt": "\\udc00"}', None),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "top_p": 0}, None, "top_p"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "max_tokens": 2, "max_completion_tokens": 2}, None, "max_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "stream": True, "stream_options": {"include_usage": "y"}}, None, "stream_options"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "stream": "yes"}, None, "stream"),
    ("/v1/chat/completions", {"model": "tiny", "messages": _user("a"), "stop": ["a", "b", "c", "d", "e"]}, None, "stop"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None, "messages[0].content"),
    ("/v1/chat/completions", {"messages": _user("a")}, None, "model"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, "a"]}, None, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10**9]}, None, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": MAX_MODEL_LEN}, None, "max_tokens"),
    ("/v1/responses", {"model": "tiny", "input": 5}, None, "input"),
    # NaN and Infinity: Python's json reads them, JSON has no such numbers (they once reached the engine: a 500).
    ("/v1/completions", None, '{"model": "tiny", "prompt": "a", "temperature": NaN}', None),
    ("/v1/responses", None, '{"model": "tiny", "input": "a", "temperature": Infinity}', None),
    ("/v1/chat/completions", None, '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_p": -Infinity}', None),
]


@pytest.mark.parametrize("path, body, raw, param", BAD)
def test_bad_requests_are_400_naming_the_field(server, path, body, raw, param):
    r = _post(server[0], path, body, raw=raw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param, error


def test_api_key_and_open_routes(server):
    url = server[0]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert _post(url, "/v1/chat/completions", {}, key="wrong").status_code == 401
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/v1/nothing").status_code == 404


def test_queue_full_is_429_with_retry_after(server):
    from osstune.serve.http.context import ServerContext
    from osstune.serve.http.server import BackgroundServer

    ctx = ServerContext(server[1].engine, "tiny", max_in_flight=1)
    with BackgroundServer(ctx) as url:
        # Sampled, so it does not stop early at a stop token as a greedy reply might.
        body = {"model": "tiny", "messages": _user("a"), "max_tokens": 400, "stream": True, "temperature": 1.0, "seed": 0}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
            assert first.status_code == 200, first.read()
            lines = first.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the first client holds the only slot
            r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
        ok = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200  # the slot came back when the first client left
    assert wait_idle(server[1].engine).kv_blocks_used == 0


def test_disconnect_frees_the_request(server):
    url, ctx, _ = server
    before = wait_idle(ctx.engine).generation_tokens_total
    # Sampled, so it does not end early at a stop token as a greedy reply might.
    body = {"model": "tiny", "messages": _user("go on"), "max_tokens": 450, "temperature": 1.0, "seed": 3}
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    stats = wait_idle(ctx.engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and ctx.metrics.in_flight == 0
    assert stats.generation_tokens_total - before < 450  # aborted: it did not run to its end


def _concurrent_streams(url, ctx, key, models=("tiny", "persona")):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    cancelled = {5, 17, 33, 60}

    async def one(i: int, stream: bool):
        kwargs = dict(model=models[i % len(models)], messages=_user(f"Question number {i}?"), max_tokens=5, temperature=0)
        if not stream:
            r = await client.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason
        s = await client.chat.completions.create(**kwargs, stream=True)
        text, finish = "", None
        async for chunk in s:
            if i in cancelled:
                await s.close()  # leave mid-stream
                return None
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run():
        # Streamed and non-streamed twins run together, in the same engine steps: the same numbers
        # even where a batch's composition changes them (bf16 kernels).
        async with client:
            return await asyncio.gather(
                asyncio.gather(*(one(i, True) for i in range(64))),
                asyncio.gather(*(one(i, False) for i in range(64) if i not in cancelled)),
            )

    streamed, reference = asyncio.run(run())
    complete = [s for i, s in enumerate(streamed) if i not in cancelled]
    assert complete == reference  # each stream whole, and nobody else's tokens in it
    assert len({text for text, _ in complete}) > 32
    assert all(finish == "harmony_parse_error" for _, finish in complete)
    stats = wait_idle(ctx.engine)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert ctx.metrics.in_flight == 0


def test_64_concurrent_streams_some_cancelled(server):
    _concurrent_streams(server[0], server[1], KEY)


@pytest.mark.gpu
def test_64_concurrent_streams_on_the_gpu_engine():
    """The same through the CUDA engine (Triton kernels, CUDA graphs)."""
    import torch

    with live_server(device="cuda", dtype=torch.bfloat16, max_num_seqs=128) as (url, ctx):
        _concurrent_streams(url, ctx, "unused", models=("tiny",))


def test_metrics_are_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families

    url = server[0]
    assert _post(url, "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 1}).status_code == 200
    assert _post(url, "/v1/completions", {"model": "tiny", "prompt": "a", "n": 0}).status_code == 400
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("osstune_requests", "osstune_time_to_first_token_seconds", "osstune_inter_token_latency_seconds",
                 "osstune_num_requests_waiting", "osstune_kv_cache_usage_ratio", "osstune_generation_tokens"):
        assert name in families, sorted(families)
    counted = {code: sum(s.value for s in families["osstune_requests"].samples if s.labels.get("status") == code)
               for code in ("200", "400", "500")}
    assert counted["200"] >= 1 and counted["400"] >= 1 and counted["500"] == 0, counted
    ttft_count = [s.value for s in families["osstune_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft_count[0] >= 1


def test_mutated_requests_never_get_a_500(server):
    """Valid requests with one value replaced by a random JSON value: a 200 or a 400, never a 500."""
    import random

    rng = random.Random(0)
    values = [None, True, 0, -1, 1.5, 10**12, "", "x", "<|start|>", [], [1], ["a"], {}, {"a": 1}, [{"role": "user"}],
              {"type": "function", "function": {}}, [{"type": "function", "function": {"name": 3}}], "required", "none"]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "tools": TOOLS, "tool_choice": "auto", "stop": ["z"], "n": 1, "temperature": 0.5, "seed": 1,
            "reasoning_effort": "low", "stream": False}
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 1, "n": 1, "stop": "z", "temperature": 0.5}
    response = {"model": "tiny", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 1,
                "instructions": "be brief", "reasoning": {"effort": "low"}, "tools": [{"type": "function", "name": "f"}]}
    message_paths = [("messages", 0, "role"), ("messages", 0, "content"), ("messages", 0, "tool_calls")]
    for path, base in (("/v1/chat/completions", chat), ("/v1/completions", completion), ("/v1/responses", response)):
        for _ in range(15):
            body = json.loads(json.dumps(base))
            if path.endswith("chat/completions") and rng.random() < 0.3:
                _, i, key = rng.choice(message_paths)
                body["messages"][i][key] = rng.choice(values)
            else:
                body[rng.choice(sorted(body))] = rng.choice(values)
            if body.get("max_tokens") is None and body.get("max_output_tokens") is None:
                body["max_tokens" if "max_tokens" in base else "max_output_tokens"] = 1
            r = _post(server[0], path, body)
            assert r.status_code in (200, 400), (path, body, r.status_code, r.text)
            if r.status_code == 400:
                assert r.json()["error"]["message"]
