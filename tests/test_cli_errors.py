"""What a user can get wrong reaches them as one line from `osstune`, never a traceback: a run that
stopped for a stated reason, a GPU that is not there, an output that is a file, a closed pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from osstune.cli import main

REPO = Path(__file__).resolve().parent.parent
ROW = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Osmo here!"}]}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    return path


@pytest.mark.parametrize("error", ["TrainError", "GraphCaptureError"])
def test_a_run_that_stops_for_a_reason_prints_it(data, tmp_path, monkeypatch, capsys, error):
    import osstune.fast as fast
    import osstune.train.trainer as trainer_mod

    cls = getattr(trainer_mod, error, None) or getattr(fast, error)

    def stops(*a, **k):
        raise cls("loss became nan at step 4; lower optim.lr")

    monkeypatch.setattr(trainer_mod, "train", stops)
    assert main(["train", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err == "osstune: error: loss became nan at step 4; lower optim.lr\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_chat_on_cuda_without_a_gpu(capsys):
    assert main(["chat", "--model", "tiny", "--device", "cuda", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert "--device 'cuda': no CUDA GPU is available here" in err and "Traceback" not in err


def test_output_that_is_a_file(data, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert main(["create", "--preset", "tiny", "--output", str(taken)]) == 1
    assert f"{taken}: is a file" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--data", str(data), "--output", str(taken)]) == 1
    assert f"output {taken} is a file" in capsys.readouterr().err
    assert taken.read_text() == "mine"


def test_data_that_is_a_directory_or_empty(tmp_path, capsys):
    assert main(["train", "--model", "tiny", "--data", str(tmp_path), "--output", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "not a directory written by datasets" in err and "does not exist" not in err and "Traceback" not in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["data", "check", str(empty), "--skip-invalid"]) == 1
    out, err = capsys.readouterr()
    assert "the file has no rows" in err and "rows read" not in out


def test_check_with_skip_invalid_and_no_usable_row_fails(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n[1]\n")
    assert main(["data", "check", str(bad), "--skip-invalid"]) == 1
    out, err = capsys.readouterr()
    assert "2 rows read, 0 kept" in out and "no usable rows" in err


def test_a_bom_is_not_an_invalid_row(tmp_path, capsys):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n")
    assert main(["data", "check", str(path)]) == 0
    assert "1 rows read, 1 kept" in capsys.readouterr().out


def test_train_hint_names_a_flag_train_accepts(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n{oops\n")
    assert main(["train", "--model", "tiny", "--data", str(bad), "--output", str(tmp_path / "run"), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "--skip-invalid" in err and "skip_invalid=True" not in err
    # ... and train accepts it: the run gets past the data (stopped right after by --print-config).
    argv = ["train", "--model", "tiny", "--data", str(bad), "--skip-invalid", "--print-config"]
    assert main(argv) == 0 and "skip_invalid: true" in capsys.readouterr().out


def test_a_closed_pipe_is_not_an_error(tmp_path):
    # `osstune data render FILE | head -1`: more output than a pipe buffer holds, reader gone after a line.
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(ROW) + "\n" for _ in range(400)))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "osstune.cli", "data", "render", str(path), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_gpu_oom_message_keeps_the_allocator_text():
    from osstune.train.config import TrainConfig
    from osstune.train.trainer import _oom_message

    allocator = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
    text = _oom_message(torch.OutOfMemoryError(allocator), TrainConfig(), torch.device("cpu"), step_tokens=2048)
    assert allocator in text and "2,048 tokens per micro-batch" in text and "data.seq_len" in text


def test_host_out_of_memory_while_loading_says_what_the_model_needs(monkeypatch):
    # The host allocator's own failure (a RuntimeError), raised where a tensor is produced.
    from osstune.checkpoint import load as load_mod
    from osstune.checkpoint.errors import CheckpointError

    allocator = "DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes."

    def fails(self, name, device=None):
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] . {allocator}")

    monkeypatch.setattr(load_mod.LayoutConverter, "get", fails)
    with pytest.raises(CheckpointError, match=r"out of host memory while loading the model: its weights take") as info:
        load_mod.load_model("tiny", dtype=torch.float32)
    assert allocator in str(info.value)


def test_a_preset_never_reaches_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from osstune.checkpoint import resolve_checkpoint
    from osstune.checkpoint.errors import CheckpointError
    from osstune.train import trainer as trainer_mod
    from osstune.train.config import TrainConfig

    def network(*a, **k):
        raise AssertionError("the Hugging Face Hub was asked for a preset")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", network)
    with pytest.raises(CheckpointError, match="tiny is a preset"):
        resolve_checkpoint("tiny")
    # Full fine-tuning of a preset writes the model without looking for tokenizer files to copy.
    written = {}
    monkeypatch.setattr("osstune.checkpoint.save_model", lambda model, out, tokenizer_source=None: written.update(source=tokenizer_source))
    trainer_mod._export(TrainConfig(model="tiny", method="full"), None, tmp_path)
    assert written == {"source": None}
