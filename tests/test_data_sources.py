"""Data sources: CSV, Parquet, saved `datasets` directories, hf: specs, several files and globs,
column mapping. Each is compared token for token with the same rows read from JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest

from osstune.data import DataError, DataOptions, build_cache, tokenize_file

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

CALL = {"type": "function", "id": "c1", "function": {"name": "lookup", "arguments": '{"q": "tide"}'}}
ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "thinking": "Greet.", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "When is high tide?"},
                  {"role": "assistant", "thinking": "Look it up.", "tool_calls": [CALL]},
                  {"role": "tool", "tool_call_id": "c1", "content": "14:02"},
                  {"role": "assistant", "content": "At 14:02."}]},
    {"prompt": "2+2?", "completion": "4"},
    {"messages": [{"role": "user", "content": "Xin chào"}, {"role": "assistant", "content": "Chào bạn!"}],
     "reasoning_effort": "low"},
]


def table(rows):
    """Arrow tables have one schema: every row gets every column (null where it had none), and
    nested structs the union of their keys, as in Parquet files and `datasets` written by others."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tokens(spec, **options):
    rows, summary = tokenize_file(spec, DataOptions(**options))
    return [(r.ids.tolist(), r.train.tolist()) for r in rows], summary


@pytest.fixture
def reference(tmp_path):
    return tokens(write_jsonl(tmp_path / "ref.jsonl", ROWS))[0]


def test_parquet_equals_jsonl(tmp_path, reference):
    path = tmp_path / "rows.parquet"
    pq.write_table(table(ROWS), path)  # structs unified: nulls where a row lacks a key
    got, summary = tokens(str(path))
    assert got == reference
    assert summary.kept == 4 and summary.ignored_keys == ()


def test_saved_dataset_directory_equals_jsonl(tmp_path, reference):
    datasets.Dataset(table(ROWS)).save_to_disk(str(tmp_path / "one"))
    assert tokens(str(tmp_path / "one"))[0] == reference
    split = datasets.DatasetDict({"train": datasets.Dataset(table(ROWS[:2])), "test": datasets.Dataset(table(ROWS[2:]))})
    split.save_to_disk(str(tmp_path / "dict"))
    assert tokens(f"{tmp_path / 'dict'}@test")[0] == reference[2:]
    assert tokens(str(tmp_path / "dict"))[0] == reference[:2]  # "train" by default
    with pytest.raises(ValueError, match="holds splits"):
        tokens(f"{tmp_path / 'dict'}@validation")


def test_hf_spec_through_load_dataset_offline(tmp_path):
    """`hf:` goes through datasets.load_dataset (here on a local dataset folder, as for a Hub repo).
    A subprocess: huggingface_hub reads HF_HUB_OFFLINE when it is imported, as in a user's run."""
    import os
    import subprocess
    import sys

    local = tmp_path / "repo"
    local.mkdir()
    pq.write_table(table(ROWS), local / "train.parquet")
    write_jsonl(tmp_path / "ref.jsonl", ROWS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    script = (
        "import json, sys; from osstune.data import tokenize_file\n"
        "out = []\n"
        "for spec in sys.argv[1:]:\n"
        "    rows, s = tokenize_file(spec)\n"
        "    out.append([[r.ids.tolist(), r.train.tolist()] for r in rows])\n"
        "print(json.dumps(out))\n"
        "try:\n"
        "    tokenize_file('hf:no-such-org/no-such-dataset')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, f"hf:{local}@train", str(tmp_path / "ref.jsonl")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    got, ref = json.loads(run.stdout.splitlines()[0])
    assert got == ref and len(got) == 4
    assert "hf:no-such-org/no-such-dataset@train: could not load the dataset (HF_HUB_OFFLINE is set" in run.stdout


def test_csv_with_column_mapping_equals_jsonl(tmp_path):
    import csv

    pairs = [("What is 2+2?", "4"), ("Say hi,\nin two lines", "Hi\nthere"), ("Name a colour", "Blue"), ("Empty", "")]
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "q", "a"])
        w.writerows([(i, q, a) for i, (q, a) in enumerate(pairs)])
    ref = tokens(write_jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "completion": a} for q, a in pairs[:3]]))[0]
    got, summary = tokens(str(tmp_path / "qa.csv"), columns=("prompt=q", "completion=a"), skip_invalid=True)
    assert got == ref and summary.ignored_keys == ("id",)
    # Rows start on lines 2, 3, 6 and 7: the second spans three lines (two cells hold a newline). An
    # empty cell is an absent value.
    assert summary.notes == (f"{tmp_path / 'qa.csv'}:7: skipped: a \"prompt\"/\"completion\" row needs both keys; "
                             '"completion" is missing',)
    with pytest.raises(ValueError, match=r"qa.csv: no column 'question' \(data.columns maps it\); its columns are"):
        tokens(str(tmp_path / "qa.csv"), columns=("prompt=question", "completion=a"))


def test_csv_messages_cells_hold_json(tmp_path, reference):
    """Cells of `messages` hold JSON text; a spreadsheet's byte-order mark is not part of the header."""
    import csv

    with open(tmp_path / "chat.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a byte-order mark
        w = csv.writer(f)
        w.writerow(["messages", "reasoning_effort"])
        w.writerows([(json.dumps(r["messages"]), r.get("reasoning_effort", "")) for r in ROWS if "messages" in r])
    assert tokens(str(tmp_path / "chat.csv"))[0] == [reference[i] for i in (0, 1, 3)]


def test_several_files_and_globs(tmp_path, reference):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "d" / "b.jsonl", ROWS[1:3])
    pq.write_table(table(ROWS[3:]), tmp_path / "c.parquet")
    assert tokens(f"{tmp_path}/d/*.jsonl,{tmp_path}/c.parquet")[0] == reference
    with pytest.raises(FileNotFoundError, match="matches no file"):
        tokens(f"{tmp_path}/d/*.csv")
    with pytest.raises(ValueError, match="unknown data file type '.txt'"):
        (tmp_path / "x.txt").write_text("{}")
        tokens(str(tmp_path / "x.txt"))


def test_problems_name_the_source_and_index(tmp_path):
    bad = [ROWS[0], {"messages": [{"role": "user", "content": "no answer"}]}, {"foo": 1}]
    pq.write_table(table(bad), tmp_path / "bad.parquet")
    datasets.Dataset(table(bad)).save_to_disk(str(tmp_path / "saved"))
    for spec in (str(tmp_path / "bad.parquet"), str(tmp_path / "saved")):
        with pytest.raises(DataError) as e:
            tokens(spec)
        assert [str(p).split(": ")[0] for p in e.value.problems] == [f"{spec}[1]", f"{spec}[2]"]
        assert "ends with a user message" in str(e.value) and "none of the expected keys" in str(e.value)
    _, summary = tokens(str(tmp_path / "saved"), skip_invalid=True)
    assert summary.kept == 1 and summary.notes[0].startswith(f"{tmp_path / 'saved'}[1]: skipped")


def test_token_cache_of_a_parquet_file_and_a_saved_dataset(tmp_path, reference):
    pq.write_table(table(ROWS), tmp_path / "rows.parquet")
    datasets.Dataset(table(ROWS)).save_to_disk(str(tmp_path / "saved"))
    root = tmp_path / "cache"
    for spec in (str(tmp_path / "rows.parquet"), str(tmp_path / "saved")):
        cache = build_cache(spec, root=root)
        got = [(cache.row(r)[0].tolist(), cache.row(r)[1].astype(bool).tolist()) for r in range(len(cache))]
        assert got == reference and cache.lines.tolist() == [0, 1, 2, 3]
        assert build_cache(spec, root=root).path == cache.path  # hit
    pq.write_table(table(ROWS[:2]), tmp_path / "rows.parquet")
    assert len(build_cache(str(tmp_path / "rows.parquet"), root=root)) == 2  # changed bytes: new entry
    renamed = build_cache(str(tmp_path / "saved"), DataOptions(columns=("completion=prompt", "prompt=completion")), root=root)
    assert renamed.path != cache.path and renamed.row(2)[0].tolist() != cache.row(2)[0].tolist()


def test_bad_column_mapping_is_refused():
    with pytest.raises(ValueError, match="not keys osstune reads"):
        DataOptions(columns=("promt=question",))
    with pytest.raises(ValueError, match="KEY=COLUMN"):
        DataOptions(columns=("prompt",))


def test_data_check_and_render_on_a_parquet_file_with_columns(tmp_path, capsys):
    from osstune.cli import main

    rows = [{"q": "2+2?", "a": "4"}, {"q": "Capital of France?", "a": ""}]
    pq.write_table(table(rows), tmp_path / "qa.parquet")
    spec = str(tmp_path / "qa.parquet")
    assert main(["data", "check", spec, "--column", "prompt=q", "--column", "completion=a"]) == 1
    assert f'{spec}[1]: "completion" is empty' in capsys.readouterr().err
    assert main(["data", "render", spec, "--column", "prompt=q", "--column", "completion=a", "--index", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {spec}[0]") and "<|start|>user<|message|>2+2?<|end|>" in out


def test_missing_extra_is_named(tmp_path, monkeypatch):
    import sys

    datasets.Dataset(table(ROWS)).save_to_disk(str(tmp_path / "saved"))
    pq.write_table(table(ROWS), tmp_path / "rows.parquet")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for spec in (str(tmp_path / "saved"), str(tmp_path / "rows.parquet")):
        with pytest.raises(ModuleNotFoundError, match=r"pip install 'osstune\[data\]'"):
            tokens(spec)
