"""Training checkpoints survive what happens to real runs: a crash while a checkpoint of the same step
is written again, a checkpoint damaged afterwards (truncated file), a torn last metrics line."""

import json
import os
import warnings

import pytest
import torch

from osstune.train import state as st
from osstune.train.progress import MetricsLog


def _save(root, step, value):
    s = st.TrainState(step=step, tokens_seen=step, data_state={}, config={}, rng_cpu=torch.get_rng_state(), rng_cuda=[])
    return st.save_checkpoint(root, s, {"w": torch.full((64,), float(value))}, {"m": torch.zeros(64)}, keep=3)


def test_a_crash_while_a_step_is_saved_again_keeps_that_step(tmp_path, monkeypatch):
    # A run resumed from an older checkpoint writes the same step again; a crash at the moment the new
    # copy is published must leave the old copy, and `latest` naming it.
    _save(tmp_path, 2, 1.0)
    real = os.replace

    def crash(src, dst):
        if str(dst).endswith("step-0000002") and ".partial-" in str(src):
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        _save(tmp_path, 2, 2.0)
    monkeypatch.setattr(os, "replace", real)
    path, (state, weights, _) = st.load_latest(tmp_path)
    assert path.name == "step-0000002" and torch.equal(weights["w"], torch.full((64,), 1.0))


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.safetensors", "state.json"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(tmp_path, damaged):
    _save(tmp_path, 1, 1.0)
    _save(tmp_path, 2, 2.0)
    file = tmp_path / "step-0000002" / damaged
    os.truncate(file, 20)  # as `truncate -s 20` does
    with pytest.warns(UserWarning, match=rf"{file}.*previous good checkpoint .*step-0000001"):
        path, (state, weights, _) = st.load_latest(tmp_path)
    assert state.step == 1 and torch.equal(weights["w"], torch.full((64,), 1.0))


def test_no_readable_checkpoint_is_a_resume_error_naming_the_file(tmp_path):
    _save(tmp_path, 1, 1.0)
    file = tmp_path / "step-0000001" / "trainable.safetensors"
    os.truncate(file, 1000)
    with pytest.raises(st.ResumeError, match=rf"{file} cannot be read"):
        st.load_latest(tmp_path)


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropped a torn last line"):
        log = MetricsLog(path, resume_from_step=2)
    log.write({"step": 3, "loss": 0.5})
    log.close()
    assert log.read() == [rows[0], rows[1], {"step": 3, "loss": 0.5}]
    # A damaged line that is not the last is an error naming it, not a silent loss of history.
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        MetricsLog(path, resume_from_step=2)


def test_pruning_keeps_the_newest_and_latest_always_names_a_complete_one(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, step)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert st.load_latest(tmp_path)[0].name == f"step-{step:07d}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-0000003", "step-0000004", "step-0000005"]
