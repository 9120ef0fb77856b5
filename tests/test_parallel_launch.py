"""Launching: `osstune train --nproc 2` through torchrun, and a failing rank ending the whole job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    return env


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    # Rank 1 raises while rank 0 waits for it in a collective; without torchrun's watch (or with a
    # hang in ours) rank 0 would wait for gloo's 30-minute timeout.
    script = tmp_path / "job.py"
    script.write_text(
        "import torch\n"
        "from osstune.parallel import ParallelConfig, all_sum, init_world\n"
        "world = init_world(ParallelConfig(), torch.device('cpu'))\n"
        "if world.rank == 1:\n"
        "    raise RuntimeError('rank 1 failed on purpose')\n"
        "all_sum(world, 1.0)\n"
        "all_sum(world, 2.0)\n"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True, text=True, env=_env(), timeout=300,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after a rank failed"


def test_nproc_trains_in_two_processes_and_writes_once(tmp_path):
    from distributed import tiny_model

    base = tiny_model(tmp_path / "model")
    data = tmp_path / "chat.jsonl"
    rows = [("Hi?", "Osmo here!"), ("Name?", "Osmo."), ("Where?", "A terminal."), ("Food?", "Tokens.")]
    data.write_text("".join(json.dumps({"prompt": q, "completion": a}) + "\n" for q, a in rows))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "osstune", "train", "--nproc", "2", "--model", str(base), "--data", str(data),
         "--output", str(out), "--steps", "1", "--seq-len", "64", "--device", "cpu", "--set", "dtype=float32",
         "--set", "gradient_checkpointing=false"],
        capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final loss") == 1  # reported by the main process only
    assert "2 processes: data 2" in done.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
