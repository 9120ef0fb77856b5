"""`osstune data check` / `osstune data render`, through a small argparse harness."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from osstune.data.cli import add_commands, length_histogram
from osstune.data.masks import train_mask
from osstune.data.render import harmony_encoding

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "thinking": "greet", "content": "hello"}]}


def run(argv) -> int:
    parser = argparse.ArgumentParser(prog="osstune")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    return path


def test_check_ok_prints_a_summary(data_file, capsys):
    assert run(["data", "check", str(data_file)]) == 0
    out = capsys.readouterr().out
    assert f"{data_file}: 2 rows read, 2 kept" in out
    assert "trained" in out and "tokens per row: min" in out


def test_check_lists_problems_and_exits_1(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    assert run(["data", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err
    assert f"{path}:3: messages[0] has role 'robot'" in err
    assert "--skip-invalid" in err


def test_check_skip_invalid(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    assert run(["data", "check", str(path), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "1 skipped as invalid" in out and f"{path}:2: skipped: invalid JSON" in out


def test_check_max_length(data_file, capsys):
    assert run(["data", "check", str(data_file), "--max-length", "20"]) == 1
    err = capsys.readouterr().err
    # The remedies are named as this command spells them, not as the Python API does.
    assert "more than the limit of 20" in err and "--max-length" in err and "--overflow truncate" in err
    assert "DataOptions" not in err
    # Every row dropped: the counts are shown, and the check fails (nothing would train).
    assert run(["data", "check", str(data_file), "--max-length", "20", "--overflow", "drop"]) == 1
    out, err = capsys.readouterr()
    assert "2 dropped as too long" in out and "no usable rows" in err


def test_render_json(data_file, capsys):
    assert run(["data", "render", str(data_file), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["line"] for o in lines] == [1, 2]
    enc = harmony_encoding()
    for o in lines:
        assert enc.decode_utf8(o["tokens"]) == o["text"]
        assert o["train_mask"] == train_mask(np.asarray(o["tokens"])).astype(int).tolist()
    assert lines[0]["text"].endswith("<|start|>assistant<|channel|>analysis<|message|>greet<|end|>"
                                     "<|start|>assistant<|channel|>final<|message|>hello<|return|>")


def test_render_one_row_as_plain_text_when_not_a_terminal(data_file, capsys):
    assert run(["data", "render", str(data_file), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {data_file}:2")
    assert "<|start|>user<|message|>2+2?<|end|>" in out and "\x1b[" not in out


def test_render_highlights_in_a_terminal(data_file, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    assert run(["data", "render", str(data_file), "--index", "0", "--train-on", "final"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[32m<|start|>assistant<|channel|>final<|message|>hello<|return|>\x1b[0m" in out


def test_render_errors(data_file, tmp_path, capsys):
    assert run(["data", "render", str(data_file), "--index", "5"]) == 1
    assert "no row 5" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": 3}\n')
    assert run(["data", "render", str(bad)]) == 1
    assert f"{bad}:1: \"messages\" must be a list" in capsys.readouterr().err


def test_length_histogram_counts_every_row():
    lengths = np.array([10, 64, 65, 300, 3000])
    text = length_histogram(lengths)
    counts = [int(line.split()[1]) for line in text.splitlines()[1:]]
    assert sum(counts) == len(lengths)
    assert text.splitlines()[1].split()[:2] == ["1-64", "2"]
