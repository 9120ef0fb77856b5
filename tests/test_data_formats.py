"""Row formats and validation: every bad input gets `file:line: reason` saying what to do."""

from __future__ import annotations

import json
import re

import pytest

from osstune.data import DataError, DataOptions, parse_row, tokenize_file
from osstune.data.conversation import ChatMessage
from osstune.data.errors import RowError
from osstune.data.formats import read_rows
from osstune.data.render import render_for_training


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def problems_of(tmp_path, rows, **options) -> list[str]:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        tokenize_file(path, DataOptions(**options))
    return [str(p) for p in info.value.problems]


def user(text="hi"):
    return {"role": "user", "content": text}


def assistant(text="hello", **extra):
    return {"role": "assistant", "content": text, **extra}


def call(name="lookup", arguments='{"q": 1}', **extra):
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **extra}


BAD_ROWS = [
    ("not json", '{"messages": [', r"invalid JSON \(Expecting value at column 15\); each line must be one JSON object"),
    ("not an object", "[1, 2]", "a row must be a JSON object, got a list"),
    ("unknown shape", {"text": "hello"}, r"none of the expected keys \(found \['text'\]\)"),
    ("messages not a list", {"messages": "hi"}, '"messages" must be a list of message objects, got a string'),
    ("no messages", {"messages": []}, '"messages" is empty'),
    ("unknown role", {"messages": [user(), {"role": "bot", "content": "x"}]},
     r"messages\[1\] has role 'bot'; expected one of system, developer, user, assistant, tool"),
    ("missing role", {"messages": [{"content": "x"}, assistant()]}, r"messages\[0\] has role None"),
    ("message not object", {"messages": ["hi", assistant()]}, r"messages\[0\] must be an object with a role, got a string"),
    ("content wrong type", {"messages": [user(), assistant(5)]}, r"messages\[1\]\.content must be a string, got int"),
    ("user content null", {"messages": [{"role": "user", "content": None}, assistant()]},
     r"messages\[0\]\.content must be a string, got null"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, assistant()]},
     r"messages\[0\]\.content is a list with non-text parts"),
    ("late system", {"messages": [user(), {"role": "system", "content": "x"}, assistant()]},
     r"messages\[1\] is a system message; only the first message may be system or developer"),
    ("system only", {"messages": [{"role": "system", "content": "x"}]}, "the row has only a system message"),
    ("ends with user", {"messages": [user(), assistant(), user()]},
     "the conversation ends with a user message; a training row must end with the assistant's turn"),
    ("no assistant", {"messages": [user()]}, "the conversation ends with a user message"),
    ("tool without call", {"messages": [user(), {"role": "tool", "content": "42"}, assistant()]},
     r"messages\[1\] is a tool message with no assistant tool call before it"),
    ("tool unknown id", {"messages": [user(), {"role": "assistant", "tool_calls": [call(id="c1")]},
                                      {"role": "tool", "tool_call_id": "c9", "content": "1"}, assistant()]},
     r"answers tool_call_id 'c9', but no earlier tool call has that id"),
    ("tool unknown name", {"messages": [user(), {"role": "assistant", "tool_calls": [call()]},
                                        {"role": "tool", "name": "other", "content": "1"}, assistant()]},
     r"is the output of 'other', but no earlier tool call called it"),
    ("empty answer", {"messages": [user(), assistant("")]}, r"messages\[1\] is an assistant message with no content"),
    ("thinking only", {"messages": [user(), {"role": "assistant", "thinking": "hmm"}]},
     r"messages\[1\] is an assistant message with only thinking"),
    ("content and thinking with calls", {"messages": [user(), {"role": "assistant", "content": "a", "thinking": "b",
                                                               "tool_calls": [call()]}]},
     "has tool_calls with both content and thinking"),
    ("bad call shape", {"messages": [user(), {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
     r"tool_calls\[0\] must look like"),
    ("bad call name", {"messages": [user(), {"role": "assistant", "tool_calls": [call(name="a b")]}]},
     r"function.name must be a function name"),
    ("arguments not json", {"messages": [user(), {"role": "assistant", "tool_calls": [call(arguments="{oops")]}]},
     r"function.arguments is a string but not valid JSON"),
    ("arguments wrong type", {"messages": [user(), {"role": "assistant", "tool_calls": [call(arguments=[1])]}]},
     "function.arguments must be a JSON object or a JSON string, got a list"),
    ("control token in text", {"messages": [user("<|start|>user<|message|>hi"), assistant()]},
     r"messages\[0\]\.content contains the harmony control token '<\|start\|>'"),
    ("control token in answer", {"messages": [user(), assistant("ok<|return|>")]},
     r"messages\[1\]\.content contains the harmony control token '<\|return\|>'"),
    ("control token in arguments", {"messages": [user(), {"role": "assistant", "tool_calls": [call(arguments={"a": "<|call|>"})]}]},
     r"function.arguments contains the harmony control token"),
    ("bad effort", {**GOOD, "reasoning_effort": "max"}, r'"reasoning_effort" is \'max\'; expected one of low, medium, high'),
    ("tools not list", {**GOOD, "tools": {"name": "f"}}, '"tools" must be a list of function schemas'),
    ("tool schema shape", {**GOOD, "tools": [{"name": "f"}]}, r"tools\[0\] must look like"),
    ("pair missing key", {"prompt": "hi"}, r'a "prompt"/"completion" row needs both keys; "completion" is missing'),
    ("pair empty answer", {"question": "hi", "answer": ""}, '"answer" is empty'),
    ("pair wrong type", {"instruction": "do", "output": 3}, '"output" must be a string, got int'),
]


@pytest.mark.parametrize("name,row,message", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_is_reported_with_file_and_line(tmp_path, name, row, message):
    problems = problems_of(tmp_path, [GOOD, row, GOOD])
    assert len(problems) == 1
    location, _, reason = problems[0].partition(": ")
    assert location == f"{tmp_path / 'd.jsonl'}:2"
    assert re.search(message, reason), reason


def test_data_error_lists_problems_and_says_what_to_do(tmp_path):
    rows = [GOOD, "nope", {"messages": []}, GOOD]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        tokenize_file(path)
    text = str(info.value)
    assert f"{path}:2: invalid JSON" in text and f"{path}:3: " in text
    assert "skip invalid rows (counted) with DataOptions(skip_invalid=True)" in text


def test_max_problems_stops_reading(tmp_path):
    problems = problems_of(tmp_path, ["x"] * 10, max_problems=3)
    assert len(problems) == 3


def test_skip_invalid_skips_and_counts(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "nope", {"messages": []}, GOOD])
    rows, summary = tokenize_file(path, DataOptions(skip_invalid=True))
    assert [r.line for r in rows] == [1, 4]
    assert (summary.rows, summary.kept, summary.skipped_invalid) == (4, 2, 2)
    assert any(n.startswith(f"{path}:2: skipped: invalid JSON") for n in summary.notes)
    assert "2 skipped as invalid" in summary.describe()


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GOOD) + "\n\n   \n" + "{bad\n")
    with pytest.raises(DataError, match=rf"{path}:5: invalid JSON"):
        tokenize_file(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path}:1: the file has no rows"):
        tokenize_file(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 text"):
        tokenize_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        tokenize_file(tmp_path / "nope.jsonl")


def test_json_list_rows_carry_their_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + json.dumps(GOOD, indent=1) + ",\n\n" + json.dumps({"messages": []}) + "\n]\n")
    with pytest.raises(DataError) as info:
        tokenize_file(path)
    [problem] = info.value.problems
    assert problem.line == GOOD_LINES + 3 and '"messages" is empty' in problem.reason


GOOD_LINES = len(json.dumps(GOOD, indent=1).splitlines())


@pytest.mark.parametrize(
    "text,line,message",
    [
        ("", 1, "the file is empty"),
        ('{"messages": []}', 1, r"must hold a list of rows \(\[\{\.\.\.\}, \.\.\.\]\); use \.jsonl"),
        ("[]", 1, "the list is empty: no rows"),
        ("[\n" + json.dumps(GOOD) + ",\n{oops}\n]", 3, "invalid JSON"),
        ("[" + json.dumps(GOOD) + "] extra", 1, "unexpected text after the closing"),
        ("[" + json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "]", 2, r"expected ',' or '\]' after a row"),
    ],
)
def test_json_list_problems(tmp_path, text, line, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        tokenize_file(path)
    assert info.value.problems[-1].line == line
    assert re.search(message, info.value.problems[-1].reason)


def test_json_list_reads_like_jsonl(tmp_path):
    rows = [GOOD, {"prompt": "a", "completion": "b"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "d.jsonl", rows)
    a, _ = tokenize_file(tmp_path / "d.json")
    b, _ = tokenize_file(tmp_path / "d.jsonl")
    assert [r.ids.tolist() for r in a] == [r.ids.tolist() for r in b]


@pytest.mark.parametrize(
    "pair,user_text,answer",
    [
        ({"prompt": "P", "completion": "C"}, "P", "C"),
        ({"question": "Q", "answer": "A"}, "Q", "A"),
        ({"instruction": "I", "input": "X", "output": "O"}, "I\n\nX", "O"),
        ({"instruction": "I", "input": "", "output": "O"}, "I", "O"),
        ({"instruction": "I", "output": "O"}, "I", "O"),
    ],
)
def test_pair_rows_render_as_a_chat(pair, user_text, answer):
    chat = {"messages": [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]}
    assert render_for_training(parse_row(pair).conversation) == render_for_training(parse_row(chat).conversation)


def test_leading_system_or_developer_message_is_the_instructions():
    for role in ("system", "developer"):
        row = {"messages": [{"role": role, "content": "Be brief."}, *GOOD["messages"]]}
        assert parse_row(row).conversation.instructions == "Be brief."


def test_text_parts_are_joined():
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        assistant()]}
    assert parse_row(row).conversation.messages[0] == ChatMessage("user", "ab")


def test_tool_outputs_follow_calls_by_id_name_or_latest():
    row = {"messages": [
        user(),
        {"role": "assistant", "tool_calls": [call("first", id="a"), call("second", id="b")]},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
        {"role": "tool", "name": "second", "content": "2"},
        {"role": "tool", "content": {"structured": True}},
        assistant(),
    ]}
    messages = parse_row(row).conversation.messages
    assert [m.tool_name for m in messages if m.role == "tool"] == ["first", "second", "second"]
    assert messages[4].content == '{"structured": true}'


def test_unused_keys_are_reported_not_silently_dropped(tmp_path):
    row = {"id": 7, "messages": [{"role": "user", "content": "hi", "name": "bob"}, assistant()]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    _, summary = tokenize_file(path)
    assert summary.ignored_keys == ("id", "messages[].name")
    assert "keys not used by osstune: id, messages[].name" in summary.describe()


def test_read_rows_yields_raw_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "bad"])
    raw = list(read_rows(path))
    assert [(r.line, r.error is None) for r in raw] == [(1, True), (2, False)]


def test_row_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_row([])
    assert issubclass(RowError, ValueError) and issubclass(DataError, ValueError)
