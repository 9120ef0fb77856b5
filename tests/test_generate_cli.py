"""`osstune generate` on the tiny model (CPU): results in input order and equal to `osstune.infer.generate`
(itself tested against transformers) on the same harmony prompts, resumed after an interrupt and a torn
line, bad rows named by file and line before the model is loaded."""

from __future__ import annotations

import io
import json
from array import array
import os
import signal

import pytest
import torch

from osstune.cli import build_parser, main
from osstune.data.conversation import parse_row
from osstune.data.render import RenderOptions, harmony_encoding, render_prompt
from osstune.infer.batch import _result_record
from osstune.infer.batch_output import OutputFile, resume_point
from osstune.infer.batch_rows import PromptRow
from osstune.infer.chat import parse_completion
from osstune.infer.generate import generate
from osstune.serve.types import RequestOutput

SYSTEM = {"role": "system", "content": "Be brief."}
WHY = {"role": "user", "content": "Why is the sky blue? Explain it."}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# (input line, the reference's own chat row or None for a bad row)
LINES = [
    ({"messages": [{"role": "user", "content": "Hi"}]}, {"messages": [{"role": "user", "content": "Hi"}]}),
    ({"prompt": "What is two plus two?", "id": "sum"}, {"messages": [{"role": "user", "content": "What is two plus two?"}]}),
    ('{"messages": [', None),  # invalid JSON
    ({"question": "Capital of France?", "answer": "Paris", "reasoning_effort": "high"},
     {"messages": [{"role": "user", "content": "Capital of France?"}], "reasoning_effort": "high"}),
    ({"messages": [SYSTEM, WHY, {"role": "assistant", "content": "Because.", "thinking": "hmm"}]},
     {"messages": [SYSTEM, WHY]}),
    ({"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS}, None),  # 111 tokens: too long
    ({"messages": [{"role": "robot", "content": "beep"}]}, None),  # unknown role
]
CONTEXT = 77  # --max-model-len: the 75-token row may write 2 tokens, the others 4 (so it finishes first)
BASE = ["generate", "--model", "tiny", "--dtype", "float32", "--device", "cpu", "--temperature", "0",
        "--max-tokens", "4", "--max-model-len", str(CONTEXT), "--kv-cache-gb", "0.01",
        "--max-num-batched-tokens", "512"]


def _write_input(path, lines) -> None:
    path.write_text("".join((v if isinstance(v, str) else json.dumps(v)) + "\n" for v, _ in lines))


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_cache(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "cached_tokens"} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    _write_input(d / "in.jsonl", LINES)
    args = build_parser().parse_args([*BASE, "--input", str(d / "in.jsonl"), "--output", str(d / "out.jsonl"), "--skip-invalid"])
    log = io.StringIO()
    assert args.func(args, log=log) == 0
    d.joinpath("log.txt").write_text(log.getvalue())
    return d


def test_run_reports_skipped_rows_and_progress(full_run):
    log = (full_run / "log.txt").read_text()
    assert f"skipping 3 invalid row(s) (--skip-invalid), the first: {full_run / 'in.jsonl'}:3: invalid JSON" in log
    assert f"{full_run / 'in.jsonl'}: 4 prompts, 254 tokens (longest 75)" in log
    assert "1 row(s): --max-tokens lowered to what the context (77) leaves" in log
    assert "generate: 4/4 rows (100%), 14 tokens" in log and "tokens/s" in log


def test_outputs_in_input_order_equal_generate(full_run):
    from osstune import load_model

    model = load_model("tiny", dtype=torch.float32).eval()
    enc = harmony_encoding()
    records = _records(full_run / "out.jsonl")
    kept = [(line, v, ref) for line, (v, ref) in enumerate(LINES, start=1) if ref is not None]
    assert [r["line"] for r in records] == [line for line, _, _ in kept]
    assert [r["id"] for r in records] == [1, "sum", 4, 5]
    for record, (line, value, ref_row) in zip(records, kept):
        prompt = render_prompt(parse_row(ref_row, training=False).conversation, RenderOptions())
        n = min(4, CONTEXT - len(prompt))
        result = generate(model, prompt, max_new_tokens=n)
        expected = parse_completion(enc, result.tokens[0], result.stop_reasons[0])
        assert record["prompt_tokens"] == len(prompt)
        assert record["completion_tokens"] == len(result.tokens[0])
        assert (record["final"], record["reasoning"], record["valid"], record["finish_reason"]) == (
            expected.final, expected.analysis, expected.valid, result.stop_reasons[0]), line
    assert records[-1]["completion_tokens"] == 2 and records[-1]["reference"] == "Because."
    assert records[2]["reference"] == "Paris" and "reference" not in records[1]


def test_results_wait_for_their_turn(tmp_path):
    rows = [PromptRow(i, i + 1, i + 1, array("I", [1, 2, i])) for i in range(4)]
    with OutputFile(tmp_path / "o.jsonl", rows) as out:
        for pos in (2, 3):
            out.put(pos, {"id": pos + 1})
        assert out.sync() == 0 and (tmp_path / "o.jsonl").read_text() == ""
        out.put(0, {"id": 1})
        assert out.sync() == 1
        out.put(1, {"id": 2})
        assert out.sync() == 3
    assert [r["id"] for r in _records(tmp_path / "o.jsonl")] == [1, 2, 3, 4]


def test_resume_point_at_every_cut(full_run):
    # A run stopped anywhere leaves a prefix of the file: the whole rows in it are kept, the rest redone.
    from osstune.infer.batch_rows import read_prompts

    rows, _ = read_prompts(full_run / "in.jsonl")
    rows = [r for r in rows if len(r.prompt) < CONTEXT]
    data = (full_run / "out.jsonl").read_bytes()
    ends = [i + 1 for i, b in enumerate(data) if b == ord("\n")]
    path = full_run / "cut.jsonl"
    cuts = {c for e in [0, *ends] for c in range(e - 2, e + 3)} | {e - 40 for e in ends}  # about each line end
    for cut in sorted(c for c in cuts if 0 <= c <= len(data)):
        path.write_bytes(data[:cut])
        whole = [e for e in ends if e <= cut]
        assert resume_point(path, rows) == (len(whole), whole[-1] if whole else 0), cut


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_run_resumes_to_the_same_output(full_run, monkeypatch, capsys, sig):
    """Ctrl-C, or a scheduler's SIGTERM: the step finishes, its rows are written, the exit status is
    the shell's 128 + signal, and the same command finishes the file."""
    out = full_run / f"resumed-{sig.name}.jsonl"
    argv = [*BASE, "--input", str(full_run / "in.jsonl"), "--output", str(out), "--skip-invalid", "--max-num-seqs", "1"]
    real_sync = OutputFile.sync

    def sync_then_ctrl_c(self):
        written = real_sync(self)
        if written:
            os.kill(os.getpid(), sig)  # as soon as the first row is on disk
        return written

    monkeypatch.setattr(OutputFile, "sync", sync_then_ctrl_c)
    assert main(argv) == 128 + sig
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"{sig.name} received: finishing this step, then writing its rows" in err
    assert "run the same command again" in err
    partial = _records(out)
    assert 1 <= len(partial) < 4
    full = (full_run / "out.jsonl").read_text().splitlines(keepends=True)
    with out.open("a") as f:
        f.write(full[len(partial)][:40])  # and a torn line, as a second Ctrl-C could leave
    assert main(argv) == 0
    assert f"resuming {out}: {len(partial)} of 4 rows" in capsys.readouterr().err
    assert _without_cache(_records(out)) == _without_cache(_records(full_run / "out.jsonl"))
    assert main(argv) == 0
    assert "nothing to do" in capsys.readouterr().err


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not be loaded")


def test_bad_rows_are_named_before_the_model_loads(full_run, monkeypatch, capsys):
    monkeypatch.setattr("osstune.serve.engine.load_for_serving", _no_model)
    path = full_run / "in.jsonl"
    assert main([*BASE, "--input", str(path), "--output", str(full_run / "bad.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: invalid JSON" in err
    assert f"{path}:6: the prompt has 111 tokens; the context is {CONTEXT}" in err
    assert f"{path}:7: messages[0] has role 'robot'" in err
    assert "--skip-invalid" in err and f"{path}:1:" not in err
    assert not (full_run / "bad.jsonl").exists()


def test_output_of_another_input_is_refused(full_run, monkeypatch, capsys):
    monkeypatch.setattr("osstune.serve.engine.load_for_serving", _no_model)
    other = full_run / "other.jsonl"
    _write_input(other, [LINES[0], ({"prompt": "Something else entirely"}, None)])
    before = (full_run / "out.jsonl").read_bytes()
    assert main([*BASE, "--input", str(other), "--output", str(full_run / "out.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "--overwrite" in err and f"{full_run / 'out.jsonl'}:2:" in err
    assert (full_run / "out.jsonl").read_bytes() == before


def test_bad_options_are_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("osstune.serve.engine.load_for_serving", _no_model)
    _write_input(tmp_path / "in.jsonl", LINES[:1])
    argv = [*BASE, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert main([*argv, "--temperature", "-1"]) == 1
    assert "--temperature: temperature=-1.0 must be >= 0" in capsys.readouterr().err
    assert main([*argv, "--block-size", "12"]) == 1
    assert "block_size=12" in capsys.readouterr().err
    assert main([*argv, "--max-model-len", "9000"]) == 1
    assert "--max-model-len 9000 exceeds the model's context (8192)" in capsys.readouterr().err
    assert main([*argv, "--adapter", str(tmp_path / "nope")]) == 1
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_tool_call_row():
    enc = harmony_encoding()
    text = (
        "<|channel|>analysis<|message|>need weather<|end|><|start|>assistant to=functions.get_weather"
        '<|channel|>commentary <|constrain|>json<|message|>{"city": "Oslo"}<|call|>'
    )
    tokens = enc.encode(text, allowed_special="all")
    row = PromptRow(0, 3, "w", array("I", [1, 2, 3]))
    record = _result_record(enc, row, tokens, RequestOutput("0", tokens, len(tokens), 3, True, "stop"))
    assert record["tool_call"] == {"recipient": "functions.get_weather", "content_type": "<|constrain|>json",
                                   "arguments": '{"city": "Oslo"}'}
    assert (record["final"], record["reasoning"], record["valid"], record["finish_reason"]) == ("", "need weather", True, "stop")
    assert (record["id"], record["line"], record["completion_tokens"], record["prompt_sha"]) == ("w", 3, len(tokens), row.digest)


def test_rows_the_cache_cannot_hold_fail_alone(full_run):
    # 11 KV blocks of 16 tokens (float32 tiny: 16 KiB each): rows of up to 64 tokens in all fit (4 full-
    # attention + 5 sliding-window blocks), the 66- and 77-token rows never can; the others go on.
    out = full_run / "small-cache.jsonl"
    args = build_parser().parse_args([*BASE, "--input", str(full_run / "in.jsonl"), "--output", str(out),
                                      "--skip-invalid", "--kv-cache-gb", str(11 * 16384 / 2**30 + 1e-9)])
    log = io.StringIO()
    assert args.func(args, log=log) == 0
    assert "2 row(s) could not run" in log.getvalue()
    got, full = _records(out), _records(full_run / "out.jsonl")
    assert [r["id"] for r in got] == [1, "sum", 4, 5]
    for i in (1, 3):
        assert got[i]["finish_reason"] == "error" and "KV blocks" in got[i]["error"] and "--kv-cache-gb" in got[i]["error"]
    assert _without_cache([got[0], got[2]]) == _without_cache([full[0], full[2]])


@pytest.mark.gpu
def test_generate_on_the_gpu(tmp_path, capsys):
    # The kernels path (CUDA graphs, paged attention kernels): every row answered, in input order,
    # and with a seed the same answers again.
    rows = [{"messages": [{"role": "user", "content": f"Question number {i}: " + "why? " * (i * 7)}]} for i in range(24)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["generate", "--model", "tiny", "--device", "cuda", "--input", str(tmp_path / "in.jsonl"),
            "--max-tokens", "32", "--seed", "7", "--max-num-seqs", "8", "--kv-cache-gb", "1"]
    assert main([*argv, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main([*argv, "--output", str(tmp_path / "b.jsonl")]) == 0
    a, b = _records(tmp_path / "a.jsonl"), _records(tmp_path / "b.jsonl")
    assert [r["line"] for r in a] == list(range(1, 25))
    assert all(r["finish_reason"] in ("stop", "length") and r["completion_tokens"] >= 1 for r in a)
    assert _without_cache(a) == _without_cache(b)
    assert "tokens/s" in capsys.readouterr().err
