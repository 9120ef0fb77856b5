"""ShareGPT rows and OpenAI fine-tuning rows (`weight: 0`) against the equivalent `messages` rows."""

from __future__ import annotations

import numpy as np
import pytest

from osstune.data import DataOptions, parse_row, render_for_training
from osstune.data.errors import RowError
from osstune.data.masks import train_mask, untrained_mask
from osstune.data.render import harmony_encoding

TOOLS = [{"type": "function", "function": {"name": "get_tide", "description": "Tide times.",
          "parameters": {"type": "object", "properties": {"port": {"type": "string"}}}}}]


def rendered(row, train_on="last"):
    conversation = parse_row(row).conversation
    ids = np.asarray(render_for_training(conversation), dtype=np.uint32)
    mask = train_mask(ids, train_on)
    untrained = untrained_mask(ids, conversation)
    return ids, mask if untrained is None else mask & ~untrained


def test_sharegpt_equals_messages():
    sharegpt = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "Tide at Vung Tau?"},
            {"from": "function_call", "value": '{"name": "get_tide", "arguments": {"port": "Vung Tau"}}'},
            {"from": "observation", "value": "high 14:02"},
            {"from": "gpt", "value": "High tide is at 14:02."},
            {"from": "human", "value": "Thanks!"},
            {"from": "gpt", "value": "You're welcome."},
        ],
        "tools": TOOLS,
        "id": "r1",
    }
    messages = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Tide at Vung Tau?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_tide", "arguments": {"port": "Vung Tau"}}}]},
            {"role": "tool", "content": "high 14:02"},
            {"role": "assistant", "content": "High tide is at 14:02."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome."},
        ],
        "tools": TOOLS,
    }
    for train_on in ("last", "all"):
        a, b = rendered(sharegpt, train_on), rendered(messages, train_on)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
    assert parse_row(sharegpt).ignored_keys == ("id",)


@pytest.mark.parametrize(
    "turn, message",
    [
        ({"from": "bot", "value": "x"}, r"conversations\[1\]\.from is 'bot'; expected one of human, user, gpt"),
        ({"from": "gpt", "value": 3}, r"conversations\[1\]\.value must be a string, got int"),
        ({"from": "function_call", "value": "get_tide()"}, r"conversations\[1\] is a function_call whose value is not JSON"),
        ({"from": "gpt", "value": "ok", "weight": 2}, r"conversations\[1\]\.weight is 2; OpenAI's fine-tuning format takes 0"),
    ],
)
def test_sharegpt_errors_name_the_turn(turn, message):
    with pytest.raises(RowError, match=message):
        parse_row({"conversations": [{"from": "human", "value": "hi"}, turn]})


def _segment_of(ids, conversation_tokens):
    """Where the tokens of one message, rendered alone by harmony, sit in the row (searched, unique)."""
    n = len(conversation_tokens)
    hits = [i for i in range(len(ids) - n + 1) if ids[i : i + n].tolist() == conversation_tokens]
    assert len(hits) == 1
    return hits[0], hits[0] + n


def test_weight_zero_turns_are_context_only():
    from openai_harmony import Message, Role

    enc = harmony_encoding()
    turns = [("2+2?", "Four."), ("3+3?", "Six, said wrongly once."), ("4+4?", "Eight.")]
    messages = []
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    weighted = {"messages": [dict(m, weight=0) if m["content"] == turns[1][1] else m for m in messages]}
    ids, mask = rendered({"messages": messages}, "all")
    ids_w, mask_w = rendered(weighted, "all")
    assert ids.tolist() == ids_w.tolist()  # the same tokens; only the mask changes
    # The reference: harmony's rendering of the untrained answer alone, located in the row.
    answer = enc.render(Message.from_role_and_content(Role.ASSISTANT, turns[1][1]).with_channel("final"))
    start, stop = _segment_of(ids, answer)
    expected = mask.copy()
    expected[start:stop] = False
    assert mask[start + 2 : stop].all() and mask_w.tolist() == expected.tolist()
    # With the default train_on="last" the earlier turns are context anyway; a row whose last answer
    # has weight 0 has nothing left to train and is dropped (counted) by the pipeline.
    assert rendered(weighted)[1].tolist() == rendered({"messages": messages})[1].tolist()
    last_untrained = {"messages": [*messages[:-1], dict(messages[-1], weight=0)]}
    assert not rendered(last_untrained)[1].any()


def test_weight_zero_with_thinking_and_tool_calls():
    """Each harmony message of a weight-0 assistant message (analysis, call) is left untrained; the
    ones of trained messages keep their mask, whatever harmony dropped from the context."""
    call = {"type": "function", "function": {"name": "get_tide", "arguments": {"port": "Hue"}}}
    messages = [
        {"role": "user", "content": "Tide?"},
        {"role": "assistant", "thinking": "Call the tool.", "tool_calls": [call], "weight": 0},
        {"role": "tool", "content": "14:02"},
        {"role": "assistant", "thinking": "Answer now.", "content": "14:02."},
    ]
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    ids, mask = rendered({"messages": plain, "tools": TOOLS})
    ids_w, mask_w = rendered({"messages": messages, "tools": TOOLS})
    assert ids.tolist() == ids_w.tolist()
    enc = harmony_encoding()
    text = enc.decode(ids[mask_w].tolist())
    assert "Call the tool." not in text and "Hue" not in text and "Answer now." in text and "14:02." in text
    assert set(np.flatnonzero(mask_w)) < set(np.flatnonzero(mask))


def test_weight_only_on_assistant_messages():
    with pytest.raises(RowError, match=r"messages\[0\] is a user message with weight 1; only assistant messages"):
        parse_row({"messages": [{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "b"}]})
    zero = parse_row({"messages": [{"role": "user", "content": "a", "weight": 0}, {"role": "assistant", "content": "b"}]})
    assert zero.ignored_keys == ()  # weight 0 on a user message says what is true anyway


def test_sharegpt_system_key_keeps_turn_indexes():
    with pytest.raises(RowError, match=r"conversations\[2\] is a system message; only the first"):
        parse_row({"system": "S", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                                     {"from": "system", "value": "late"}]})


def test_pipeline_drops_rows_left_without_targets(tmp_path):
    import json

    from osstune.data import tokenize_file

    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 1}]},
    ]
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, summary = tokenize_file(path, DataOptions())
    assert [r.line for r in kept] == [2] and summary.dropped_no_target == 1 and summary.ignored_keys == ()
