"""Data parallel (FSDP2) on 2 CPU processes over gloo against one process on the same global batch.

One spawned job runs every case; the one-process references run here. Each process reads its share
of the global batch, so 2 processes x grad_accum 1 must equal 1 process x grad_accum 2. They agree up
to the order of float32 sums (gradients summed over ranks instead of accumulated in one tensor):
losses to rtol 1e-5, trained weights as `distributed.assert_same_weights` says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed import assert_same_weights, spawn, tiny_model, train_config, write_rows
from osstune.train.config import OptimConfig
from osstune.parallel import ParallelConfig

WORLD = 2


def _cfg(base, data, out, **kw):
    return train_config(base, data, out, **kw)


# With an eval loss at the end (every rank evaluates the held-out row).
FULL = dict(
    method="full", full_targets=("self_attn", "mlp", "norm"), optim=OptimConfig(lr=1e-3), eval_every=2,
    eval_fraction=0.2,
)  # fmt: skip
# name -> (config changes of the distributed run, name of its one-process reference)
CASES = {
    # Gradient checkpointing recomputes each layer (FSDP gathers it again): the same numbers.
    "lora": (dict(parallel=ParallelConfig(reshard_after_forward=True), gradient_checkpointing=True), "lora"),
    "lora_replicated": (dict(parallel=ParallelConfig(data="replicate")), "lora"),
    "full_keep_gathered": (dict(FULL, parallel=ParallelConfig(reshard_after_forward=False)), "full"),
}
REFERENCES = {"lora": dict(grad_accum=WORLD), "full": dict(FULL, grad_accum=WORLD)}
RESUMED = dict(parallel=ParallelConfig(reshard_after_forward=False))


def _cases(rank, base, data, root):
    from osstune.train.trainer import train

    for name, (kw, _) in CASES.items():
        result = train(_cfg(base, data, f"{root}/{name}", **kw), quiet=True)
        Path(f"{root}/{name}/losses-{rank}.json").write_text(json.dumps(result.losses + [result.eval_loss]))
    # Interrupted after one step (a sharded checkpoint), then resumed.
    train(_cfg(base, data, f"{root}/resumed", **RESUMED), quiet=True, stop_after=1)
    result = train(_cfg(base, data, f"{root}/resumed", **RESUMED), quiet=True, resume=True)
    Path(f"{root}/resumed/losses-{rank}.json").write_text(json.dumps(result.losses))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    base = tiny_model(root / "model")
    data = root / "chat.jsonl"
    write_rows(data)
    spawn(_cases, WORLD, str(base), str(data), str(root))
    return base, data, root


@pytest.fixture(scope="module")
def references(runs, tmp_path_factory):
    from osstune.train.trainer import train

    base, data, _ = runs
    out = tmp_path_factory.mktemp("single")
    return {name: train(_cfg(base, data, out / name, **kw), quiet=True) for name, kw in REFERENCES.items()}


def _losses(root: Path, name: str) -> list[float]:
    """Training losses, then the eval loss (None without eval)."""
    per_rank = [json.loads((root / name / f"losses-{r}.json").read_text()) for r in range(WORLD)]
    assert all(p == per_rank[0] for p in per_rank), "ranks disagree on the logged loss"
    return per_rank[0]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_run_equals_one_process_on_the_global_batch(runs, references, name):
    _, _, root = runs
    single = references[CASES[name][1]]
    *losses, eval_loss = _losses(root, name)
    assert losses == pytest.approx(single.losses, rel=1e-5)
    assert eval_loss == (None if single.eval_loss is None else pytest.approx(single.eval_loss, rel=1e-5))
    assert all(math.isfinite(x) for x in single.losses) and single.losses[-1] < single.losses[0]
    kind = single.artifact.name  # "adapter" or "model", written once, by the main rank
    file = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    ours, ref = load_file(root / name / kind / file), load_file(single.artifact / file)
    assert_same_weights(ours, ref, _cfg("", "", "", **CASES[name][0]).optim.lr)
    if kind == "adapter":
        assert (root / name / kind / "adapter_config.json").read_text() == (single.artifact / "adapter_config.json").read_text()
    records = [json.loads(x) for x in (root / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["comm_s"] > 0  # the first step is a sampled one (parallel.comm_every)


def test_resume_from_a_sharded_checkpoint_equals_the_uninterrupted_run(runs):
    # The uninterrupted run resharded after the forward, this one kept the layers gathered: the same
    # arithmetic, so the same numbers.
    _, _, root = runs
    assert (root / "resumed" / "checkpoints" / "step-0000001" / ".metadata").is_file()
    assert _losses(root, "resumed") == _losses(root, "lora")[1:-1]  # step 2 (no eval in either)
    a = load_file(root / "resumed" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "lora" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_process_refuses_to_resume_a_sharded_checkpoint(runs):
    from osstune.parallel.checkpoint import ShardedResumeError
    from osstune.train.trainer import train

    base, data, root = runs
    with pytest.raises(ShardedResumeError, match="written by 2 processes; resume it with --nproc 2"):
        train(_cfg(base, data, root / "resumed", **RESUMED), quiet=True, resume=True)
