"""Ctrl-C (SIGINT) or SIGTERM during `osstune train`: the step finishes, a checkpoint is saved, the
command exits with 128 + the signal's number and says how to resume; --resume then completes the run,
from the previous checkpoint when the newest is damaged. Saves by time happen without any save_every."""

import json
import os
import re
import signal
import warnings

import pytest

from osstune.cli import main
from osstune.train import trainer as trainer_mod


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_a_signal_saves_the_step_and_the_message_says_how_to_resume(tmp_path, monkeypatch, capsys, sig):
    data = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Osmo here!"}]}
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "run"
    real = trainer_mod._batch_loss
    calls = {"n": 0}

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # during step 2
            os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "_batch_loss", signalled)
    argv = ["train", "--model", "tiny", "--data", str(data), "--output", str(out), "--steps", "4", "--seq-len", "96",
            "--device", "cpu", "--quiet", "--set", "save_every=0", "--set", "save_minutes=1e-9",
            "--set", "keep_checkpoints=9", "--set", "gradient_checkpointing=false"]  # fmt: skip
    assert main(argv) == 128 + sig
    err = capsys.readouterr().err
    assert "stopped at step 2/4" in err and "--resume" in err and "Traceback" not in err
    # step 1 was saved by time (save_minutes), step 2 on the signal
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]
    # The newest checkpoint damaged since (a disk filled, a copy cut short) and the metrics' last line
    # torn: --resume warns, naming the file, goes on from step 1, and trains steps 2-4 again.
    damaged = out / "checkpoints" / "step-0000002" / "trainable.safetensors"
    os.truncate(damaged, 1000)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv + ["--resume"]) == 0
    said = "\n".join(str(w.message) for w in caught)
    assert re.search(rf"{damaged} cannot be read.*previous good checkpoint .*step-0000001", said), said
    assert "metrics.jsonl:3: dropped a torn last line" in said
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
