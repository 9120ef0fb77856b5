"""On a CUDA GPU: --gpu-memory-limit really caps the process, and `train --plan auto` plans then trains.
Each run is its own process (a memory fraction stays set for the process that set it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def _data(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(4)))  # fmt: skip
    return path


def _train(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "osstune.cli", "train", "--model", "tiny", "--data", str(_data(tmp_path)),
           "--steps", "2", "--set", "data.seq_len=256", "--output", str(tmp_path / "run"), *flags]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def test_gpu_memory_limit_caps_the_process(tmp_path):
    # The tiny model's weights alone (two 201,088 x 128 tables) take ~100 MB: a 64 MB cap cannot hold them.
    r = _train(tmp_path, "--gpu-memory-limit", "64MB")
    assert r.returncode != 0
    assert "out of memory" in (r.stderr + r.stdout).lower()


def test_train_plan_auto_plans_then_trains(tmp_path):
    r = _train(tmp_path, "--plan", "auto", "--gpu-memory-limit", "8GB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "plan: predicted peak" in r.stderr
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
