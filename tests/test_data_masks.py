"""Loss masks: only what the model generates is trained; over-long rows; rows with nothing to train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from osstune.data import DataError, DataOptions, parse_row, tokenize_file
from osstune.data.masks import segments, train_mask
from osstune.data.render import RenderOptions, harmony_encoding, render_for_training

FIXTURES = Path(__file__).parent / "data_fixtures" / "harmony"


@pytest.fixture(scope="module")
def enc():
    return harmony_encoding()


def rendered(row, options=RenderOptions()):
    return np.asarray(render_for_training(parse_row(row).conversation, options))


def trained_spans(enc, tokens, mask) -> list[str]:
    change = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    return [enc.decode_utf8(tokens[run].tolist()) for run in np.split(np.arange(len(tokens)), change) if mask[run[0]]]


def test_trained_tokens_parse_as_the_models_completion(enc):
    """The trained tokens are a completion as harmony's parser reads model output after `<|start|>assistant`:
    they parse to the same messages as gpt-oss's output in test_simple_reasoning_response.txt."""
    from openai_harmony import Role

    fixture = [int(t) for t in (FIXTURES / "test_simple_reasoning_response.txt").read_text().split()]
    row = {"messages": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "thinking": 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.',
         "content": "2 + 2 = 4."},
    ]}
    tokens = rendered(row)
    mask = train_mask(tokens, "last")
    first = int(np.argmax(mask))
    assert mask[first:].all()  # one contiguous run to the end
    assert enc.decode_utf8(tokens[:first].tolist()).endswith("<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")
    ours = enc.parse_messages_from_completion_tokens(tokens[first:].tolist(), role=Role.ASSISTANT)
    assert ours == enc.parse_messages_from_completion_tokens(fixture, role=Role.ASSISTANT)
    assert [m.channel for m in ours] == ["analysis", "final"]
    assert tokens[-1] == enc.encode("<|return|>", allowed_special="all")[0]


TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "add", "description": "Adds numbers."}}],
    "messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "thinking": "easy", "content": "2"},
        {"role": "user", "content": "and 2+3?"},
        {"role": "assistant", "thinking": "use the tool", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "thinking": "it said 5", "content": "5"},
    ],
}


def test_policies_on_a_multi_turn_tool_row(enc):
    tokens = rendered(TOOL_ROW)
    call = ('<|channel|>analysis<|message|>use the tool<|end|><|start|>assistant to=functions.add<|channel|>commentary'
            ' <|constrain|>json<|message|>{"a": 2, "b": 3}<|call|>')
    answer = "<|channel|>analysis<|message|>it said 5<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>"
    assert trained_spans(enc, tokens, train_mask(tokens, "last")) == [call, answer]
    assert trained_spans(enc, tokens, train_mask(tokens, "final")) == [
        "<|start|>assistant<|channel|>final<|message|>5<|return|>"
    ]
    # The earlier turn: its analysis was dropped by harmony, its final answer closed with <|end|>.
    assert trained_spans(enc, tokens, train_mask(tokens, "all")) == [
        "<|channel|>final<|message|>2<|end|>", call, answer
    ]


@pytest.mark.parametrize("train_on", ["last", "final", "all"])
def test_only_assistant_messages_are_ever_trained(train_on):
    tokens = rendered(TOOL_ROW)
    mask = train_mask(tokens, train_on)
    for seg in segments(tokens):
        if seg.author != "assistant":
            assert not mask[seg.start : seg.stop].any(), seg.author
        else:
            assert mask[seg.stop - 1] == mask[seg.start + 2]  # a message is trained through its closing token


def test_unknown_policy():
    with pytest.raises(ValueError, match="train_on='first'; expected one of last, final, all"):
        train_mask(rendered(TOOL_ROW), "first")
    with pytest.raises(ValueError, match="train_on='first'"):
        DataOptions(train_on="first")


def write(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SHORT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LONG = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok " * 50}]}


def test_overflow_error_names_the_rows(tmp_path):
    path = write(tmp_path, [SHORT, LONG])
    n = len(rendered(LONG))
    with pytest.raises(DataError, match=rf"(?s){path}:2: {n} tokens, more than the limit of 150\n.*raise "
                                        r"DataOptions.max_length, or set overflow='truncate' or 'drop'"):
        tokenize_file(path, DataOptions(max_length=150))


def test_overflow_drop_counts(tmp_path):
    rows, summary = tokenize_file(write(tmp_path, [SHORT, LONG]), DataOptions(max_length=150, overflow="drop"))
    assert [r.line for r in rows] == [1]
    assert summary.dropped_too_long == 1 and summary.kept == 1
    assert "1 dropped as too long" in summary.describe()


def test_overflow_truncate_keeps_the_start(tmp_path):
    full = rendered(LONG)
    cut = len(full) - 20  # inside the answer, so some trained tokens remain
    rows, summary = tokenize_file(write(tmp_path, [LONG]), DataOptions(max_length=cut, overflow="truncate"))
    assert rows[0].ids.tolist() == full[:cut].tolist()
    assert rows[0].train.tolist() == train_mask(full)[:cut].tolist()
    assert (summary.truncated, summary.truncated_tokens) == (1, 20)
    assert f"truncated from {len(full)} to {cut} tokens" in summary.notes[0]


def test_truncation_leaving_no_target_drops_the_row(tmp_path):
    rows, summary = tokenize_file(write(tmp_path, [SHORT, LONG]), DataOptions(max_length=100, overflow="truncate"))
    assert [r.line for r in rows] == [1]
    assert summary.dropped_no_target == 1
    assert "2: dropped: no trained token left" in summary.notes[-1]


def test_final_policy_drops_rows_ending_with_a_call(tmp_path):
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}
    rows, summary = tokenize_file(write(tmp_path, [SHORT, row]), DataOptions(train_on="final"))
    assert len(rows) == 1 and summary.dropped_no_target == 1
    rows, summary = tokenize_file(write(tmp_path, [SHORT, row]), DataOptions(train_on="last"))
    assert len(rows) == 2 and summary.dropped_no_target == 0


def test_summary_counts_match_rows(tmp_path):
    rows, summary = tokenize_file(write(tmp_path, [SHORT, LONG, SHORT]))
    assert summary.tokens == sum(len(r.ids) for r in rows)
    assert summary.trained_tokens == sum(int(r.train.sum()) for r in rows)
    assert all(not r.train[0] for r in rows)  # the first token is never a target (nothing predicts it)
