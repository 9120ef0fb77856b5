"""Harmony chat: prompts against openai/harmony's reference renderings, parsing, history, `osstune chat`."""

from __future__ import annotations

import argparse
import copy
import io
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_harmony import Conversation, Message, RenderConversationConfig, Role

from osstune.config import preset
from osstune.infer import cli as chat_cli
from osstune.infer.chat import ChatSession, build_prompt, harmony_encoding, parse_completion
from osstune.infer.generate import STOP_TOKENS, SamplingOptions, generate
from osstune.serve.types import RequestOutput
from osstune.model import GptOss, init_weights

HARMONY_DATA = Path(__file__).resolve().parent / "data_fixtures" / "harmony"  # from openai/harmony's tests
ROBOT = "Answer the user's questions like a robot."
QUESTION = "What is the capital of the largest country in the world?"


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def _tokens(enc, text: str) -> list[int]:
    return enc.encode(text, allowed_special="all")


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
@pytest.mark.parametrize("instructions", [ROBOT, None])
def test_prompt_equals_harmony_reference_rendering(enc, effort, instructions):
    # openai/harmony's expected renderings of its test_simple_convo_* conversations.
    name = f"test_simple_convo_{effort}_effort{'' if instructions else '_no_instruction'}.txt"
    expected = (HARMONY_DATA / name).read_text()
    user = Message.from_role_and_content(Role.USER, QUESTION)
    prompt = build_prompt(enc, [user], reasoning_effort=effort, developer_instructions=instructions)
    assert enc.decode(prompt) == expected
    assert prompt == _tokens(enc, expected)
    assert prompt[-2:] == [200006, 173781]  # <|start|>assistant


def test_parse_completion_channels(enc):
    text = (
        "<|channel|>analysis<|message|>User asks; answer Moscow.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Moscow.<|return|>"
    )
    reply = parse_completion(enc, _tokens(enc, text), "stop")
    assert reply.valid and reply.error is None
    assert (reply.analysis, reply.final) == ("User asks; answer Moscow.", "Moscow.")
    assert reply.tool_call is None


def test_parse_completion_tool_call_and_truncation(enc):
    call = (
        "<|channel|>analysis<|message|>need weather<|end|>"
        '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Oslo"}<|call|>'
    )
    reply = parse_completion(enc, _tokens(enc, call), "stop")
    assert reply.valid and reply.final == "" and reply.tool_call.recipient == "functions.get_weather"
    cut = parse_completion(enc, _tokens(enc, "<|channel|>analysis<|message|>thinking about it"), "length")
    assert cut.valid and cut.final == "" and cut.analysis == "thinking about it"


def test_parse_completion_of_garbage_falls_back_to_raw_text(enc):
    tokens = [13225, 2375, 200005, 200005, 201000]  # "Hello world" then broken headers
    reply = parse_completion(enc, tokens, "length")
    assert not reply.valid and reply.error
    assert reply.final == enc.decode(tokens) and reply.messages == []


# Mostly special tokens, where harmony's grammar breaks, plus ordinary text ids.
_SPECIAL = [200002, 200003, 200005, 200006, 200007, 200008, 200012, 201087]
_ids = st.one_of(st.sampled_from(_SPECIAL), st.integers(0, 201087))


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(_ids, max_size=12))
def test_parse_completion_never_raises(tokens):
    enc = harmony_encoding()
    reply = parse_completion(enc, tokens, "length")
    if not reply.valid:
        assert reply.final == enc.decode(tokens)


class ScriptedEngine:
    """Stands in for the serving engine in a chat: answers each request with a scripted completion,
    streamed two tokens per step, and records each prompt it was given."""

    max_model_len = 8192

    def __init__(self, completions: list[list[int]]) -> None:
        self.completions = list(completions)
        self.prompts: list[list[int]] = []
        self.pending: list[int] = []
        self.rid: str | None = None

    def add_request(self, prompt, params, request_id=None, adapter=None) -> str:
        self.prompts.append(list(prompt))
        self.pending = list(self.completions.pop(0))[: params.max_tokens]
        self.rid = f"r{len(self.prompts)}"
        return self.rid

    @property
    def has_unfinished(self) -> bool:
        return self.rid is not None

    def step(self) -> list[RequestOutput]:
        new, self.pending = self.pending[:2], self.pending[2:]
        done = not self.pending
        out = RequestOutput(self.rid, new, 0, 0, done, ("stop" if new[-1] in STOP_TOKENS else "length") if done else None)
        if done:
            self.rid = None
        return [out]

    def abort(self, request_id: str) -> None:
        self.rid = None


ANSWER_1 = (
    "<|channel|>analysis<|message|>secret thoughts<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello there.<|return|>"
)
ANSWER_2 = "<|channel|>final<|message|>Second.<|return|>"


def test_session_history_drops_answered_analysis(enc):
    model = ScriptedEngine([_tokens(enc, ANSWER_1), _tokens(enc, ANSWER_2)])
    session = ChatSession(model, enc, reasoning_effort="high", developer_instructions=ROBOT)
    streamed: list[tuple[str, str]] = []
    first = session.send("Hi", on_text=lambda ch, d: streamed.append((ch, d)))
    assert (first.analysis, first.final) == ("secret thoughts", "Hello there.")
    assert "".join(d for ch, d in streamed if ch == "analysis") == "secret thoughts"
    assert "".join(d for ch, d in streamed if ch == "final") == "Hello there."
    second = session.send("And now?")
    assert second.final == "Second."

    # Reference: the full transcript, analysis included, rendered by harmony (which drops it).
    user = lambda t: Message.from_role_and_content(Role.USER, t)  # noqa: E731
    said = lambda t, ch: Message.from_role_and_content(Role.ASSISTANT, t).with_channel(ch)  # noqa: E731
    transcript = [user("Hi"), said("secret thoughts", "analysis"), said("Hello there.", "final"), user("And now?")]
    expected = build_prompt(enc, transcript, reasoning_effort="high", developer_instructions=ROBOT)
    assert model.prompts[1] == expected
    assert "secret thoughts" not in enc.decode(model.prompts[1])
    assert enc.decode(model.prompts[1]).endswith(
        "<|start|>assistant<|channel|>final<|message|>Hello there.<|end|>"
        "<|start|>user<|message|>And now?<|end|><|start|>assistant"
    )
    kept = enc.render_conversation_for_completion(
        Conversation.from_messages([transcript[0]]), Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)
    )
    assert model.prompts[0][-len(kept) :] == kept
    session.reset()
    assert session.history == []


def test_session_with_random_tiny_model_does_not_crash(enc):
    model = init_weights(GptOss(preset("tiny")), seed=0).eval()
    session = ChatSession(model, enc, sampling=SamplingOptions(max_new_tokens=6, temperature=1.0, seed=0))
    reply = session.send("hello")
    assert len(reply.tokens) <= 6
    if not reply.valid:
        assert reply.final == enc.decode(reply.tokens)
    assert [m.author.role for m in session.history] == [Role.USER, Role.ASSISTANT]
    session.send("again")  # the garbage of turn one renders into turn two's prompt


def test_two_turn_chat_on_the_engine_equals_reference_generate(enc):
    # The engine (paged cache, prefix cache reused by turn two) against the plain KV-cache
    # `generate`, which chat ran on before; the history follows harmony's rules either way.
    model = init_weights(GptOss(preset("tiny")), seed=5).eval()
    session = ChatSession(model, enc, reasoning_effort="low", sampling=SamplingOptions(max_new_tokens=8))
    texts = ["Hello, who are you?", "Tell me more."]
    replies = [session.send(t) for t in texts]
    history: list[Message] = []
    for text, reply in zip(texts, replies):
        history.append(Message.from_role_and_content(Role.USER, text))
        prompt = build_prompt(enc, history, reasoning_effort="low")
        result = generate(model, prompt, max_new_tokens=8)
        assert reply.tokens == result.tokens[0]
        expected = parse_completion(enc, result.tokens[0], result.stop_reasons[0])
        assert (reply.final, reply.analysis, reply.valid, reply.stop_reason) == (
            expected.final, expected.analysis, expected.valid, expected.stop_reason)
        if expected.valid:
            history.extend(m for m in expected.messages if m.channel != "analysis")
        else:
            history.append(Message.from_role_and_content(Role.ASSISTANT, expected.final).with_channel("final"))
    assert session.engine.stats().prefix_cache_hit_tokens_total > 0  # turn two reused turn one's blocks


def test_bad_reasoning_effort(enc):
    with pytest.raises(ValueError, match="reasoning_effort='extreme'"):
        ChatSession(ScriptedEngine([]), enc, reasoning_effort="extreme")


# ---- the `osstune chat` command ----


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="osstune")
    chat_cli.add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["chat", *argv])


def test_chat_command_with_prompt_on_tiny_preset(capsys):
    from osstune.cli import main

    rc = main(["chat", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "5", "--seed", "0", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "not valid harmony" in err  # random weights do not speak harmony
    assert out.strip()


def test_chat_command_bad_model_path(capsys, tmp_path):
    from osstune.cli import main

    missing = tmp_path / "no-such-checkpoint"
    rc = main(["chat", "--model", str(missing), "--prompt", "hi"])
    _, err = capsys.readouterr()
    assert rc != 0
    assert str(missing) in err


def test_chat_repl_reset_exit_and_reasoning(enc, monkeypatch, capsys):
    model = ScriptedEngine([_tokens(enc, ANSWER_1), _tokens(enc, ANSWER_2)])
    monkeypatch.setattr("osstune.load_model", lambda name, **kw: None)
    monkeypatch.setattr("osstune.infer.chat.chat_engine", lambda *a, **kw: model)
    args = _parse(["--model", "scripted", "--show-reasoning", "--temperature", "0"])
    stdin = io.StringIO("Hi\n\n/bogus\n/reset\nAnd now?\n/exit\nnever sent\n")
    assert args.func(args, stdin=stdin) == 0
    out, err = capsys.readouterr()
    assert out == "[reasoning]\nsecret thoughts\n[answer]\nHello there.\n[answer]\nSecond.\n"
    assert "unknown command /bogus" in err and "(new conversation)" in err
    # After /reset the second prompt holds no trace of the first turn.
    second_prompt = enc.decode(model.prompts[1])
    assert second_prompt.count("<|start|>user") == 1 and "Hello there." not in second_prompt


def test_chat_command_applies_the_adapter(enc, tmp_path, capsys):
    from osstune import load_model
    from osstune.cli import main
    from osstune.lora import LoraConfig, apply_lora, save_adapter

    base = load_model("tiny", dtype=torch.float32)
    tuned = apply_lora(copy.deepcopy(base), LoraConfig(r=4), seed=0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(len(name)))  # B starts at 0: make it count
    save_adapter(tuned, tmp_path / "adapter")
    prompt = ChatSession(tuned, enc).prompt_tokens("hi")
    with_adapter = generate(tuned, prompt, max_new_tokens=4).tokens[0]
    # Otherwise this test could not tell whether the adapter was applied.
    assert with_adapter != generate(base, prompt, max_new_tokens=4).tokens[0]

    argv = ["chat", "--model", "tiny", "--dtype", "float32", "--device", "cpu", "--temperature", "0"]
    argv += ["--max-new-tokens", "4", "--prompt", "hi", "--adapter", str(tmp_path / "adapter")]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    assert out == parse_completion(enc, with_adapter, "length").final + "\n"

    assert main([*argv[:-1], str(tmp_path / "missing")]) != 0
    _, err = capsys.readouterr()
    assert str(tmp_path / "missing") in err


@pytest.mark.parametrize("effort", ["low", "high"])
def test_chat_prompt_equals_the_training_renderer_context(enc, effort):
    # A model fine-tuned on osstune.data renderings must see the same context when chatting.
    from osstune.data.conversation import parse_row
    from osstune.data.render import RenderOptions, render_prompt

    row = {"messages": [{"role": "developer", "content": ROBOT}, {"role": "user", "content": QUESTION}]}
    conversation = parse_row(row, training=False).conversation
    expected = render_prompt(conversation, RenderOptions(reasoning_effort=effort))
    user = Message.from_role_and_content(Role.USER, QUESTION)
    assert build_prompt(enc, [user], reasoning_effort=effort, developer_instructions=ROBOT) == expected


def test_chat_repl_outlives_a_conversation_longer_than_the_context(enc, monkeypatch, capsys):
    engine = ScriptedEngine([_tokens(enc, ANSWER_1), _tokens(enc, ANSWER_2)])
    engine.max_model_len = 110  # the first turn fits, the second outgrows it
    monkeypatch.setattr("osstune.load_model", lambda name, **kw: None)
    monkeypatch.setattr("osstune.infer.chat.chat_engine", lambda *a, **kw: engine)
    args = _parse(["--model", "scripted", "--temperature", "0"])
    stdin = io.StringIO("Hi\n" + "And now? " * 20 + "\n/reset\nHi\n")
    with pytest.warns(UserWarning, match="max_new_tokens=2048 would run past the context"):
        assert args.func(args, stdin=stdin) == 0
    out, err = capsys.readouterr()
    assert out == "Hello there.\nSecond.\n"
    assert "error: the conversation has" in err and "the context is 110" in err and "/reset starts a new conversation" in err
    assert len(engine.prompts) == 2  # the one that did not fit never reached the engine
