"""Tensor parallel on CPU processes over gloo against one process on the same global batch: tp=2 on
2 processes (attention heads, experts' intermediates and LoRA factors split over the pair, which
reads the same batches), and tp=2 x data 2 on 4 (FSDP2 shards the split tensors over the data pair).

The split matrices sum their partial products over ranks in another order than one process does:
losses agree to rtol 1e-5, trained weights as `distributed.assert_same_weights` says. Resume from a
sharded checkpoint is exact. The saved adapter is the one-process adapter (and loads in PEFT, see
tests/test_peft_interop.py for that format).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distributed import assert_same_weights, spawn, tiny_model, train_config, write_rows
from osstune.parallel import ParallelConfig
from osstune.train.config import OptimConfig

TP = dict(parallel=ParallelConfig(tp=2))
FULL = dict(method="full", full_targets=("self_attn", "mlp", "norm"), optim=OptimConfig(lr=1e-3), eval_every=2,
            eval_fraction=0.2)  # fmt: skip
# name -> (processes, config changes); the one-process reference reads the same global batch.
CASES = {
    "lora": (2, dict(TP, gradient_checkpointing=True)),
    "full": (2, dict(FULL, **TP)),
    "qlora": (2, dict(TP, method="qlora", model="mxfp4", steps=1)),
    "lora_dp2": (4, dict(TP)),
    "full_dp2": (4, dict(FULL, **TP, steps=1)),
}


def _cfg(bases, data, out, **kw):
    kw = dict(kw)
    return train_config(bases[kw.pop("model", "bf16")], data, out, **kw)


def _run(rank, world, bases, data, root):
    from osstune.train.trainer import train

    for name, (n, kw) in CASES.items():
        if n != world:
            continue
        result = train(_cfg(bases, data, f"{root}/{name}", **kw), quiet=True)
        Path(f"{root}/{name}/losses-{rank}.json").write_text(json.dumps(result.losses + [result.eval_loss]))
    if world == 2:  # interrupted after one step (a sharded checkpoint of split tensors), then resumed
        cfg = _cfg(bases, data, f"{root}/resumed", **TP)
        train(cfg, quiet=True, stop_after=1)
        losses = train(cfg, quiet=True, resume=True).losses
        Path(f"{root}/resumed/losses-{rank}.json").write_text(json.dumps(losses))
    else:  # tp=4 does not divide the tiny model's 2 key-value heads: refused before the model loads
        try:
            train(_cfg(bases, data, f"{root}/bad", parallel=ParallelConfig(tp=4)), quiet=True)
        except ValueError as e:
            Path(f"{root}/bad-{rank}.txt").write_text(str(e))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensor")
    bases = {"bf16": tiny_model(root / "bf16"), "mxfp4": tiny_model(root / "mxfp4", mxfp4=True)}
    data = root / "chat.jsonl"
    write_rows(data)
    for world in (2, 4):
        spawn(_run, world, world, bases, str(data), str(root))
    return bases, data, root


def _losses(root: Path, name: str, world: int) -> list:
    per_rank = [json.loads((root / name / f"losses-{r}.json").read_text()) for r in range(world)]
    assert all(p == per_rank[0] for p in per_rank), "ranks disagree on the logged loss"
    return per_rank[0]


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_equals_one_process(runs, name, tmp_path):
    from osstune.train.trainer import train

    bases, data, root = runs
    world, kw = CASES[name]
    kw = {k: v for k, v in kw.items() if k != "parallel"}
    dp = world // 2
    single = train(_cfg(bases, data, tmp_path / "single", grad_accum=dp, **kw), quiet=True)
    *losses, eval_loss = _losses(root, name, world)
    assert losses == pytest.approx(single.losses, rel=1e-5)
    assert eval_loss == (None if single.eval_loss is None else pytest.approx(single.eval_loss, rel=1e-5))
    kind = single.artifact.name
    file = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    ours, ref = load_file(root / name / kind / file), load_file(single.artifact / file)
    assert_same_weights(ours, ref, _cfg(bases, "", "", **CASES[name][1]).optim.lr)
    if kind == "adapter":
        assert (root / name / kind / "adapter_config.json").read_text() == (single.artifact / "adapter_config.json").read_text()


def test_resume_with_tensor_parallel_equals_the_uninterrupted_run(runs, tmp_path):
    from osstune.train.trainer import train

    bases, data, root = runs
    assert (root / "resumed" / "checkpoints" / "step-0000001" / ".metadata").is_file()
    # Without gradient checkpointing the same arithmetic as the uninterrupted run of the same config.
    whole = _cfg(bases, data, tmp_path / "x", **TP)
    assert whole.steps == 2
    a = load_file(root / "resumed" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "lora" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert _losses(root, "resumed", 2) == pytest.approx(_losses(root, "lora", 2)[1:-1], rel=1e-6)
    assert_same_weights(a, b, whole.optim.lr)


def test_a_tp_that_does_not_divide_the_heads_is_refused(runs):
    _, _, root = runs
    for rank in range(4):
        text = (root / f"bad-{rank}.txt").read_text()
        assert "parallel.tp=4 must divide num_key_value_heads=2" in text
    assert not (root / "bad").exists()  # nothing was written: refused before any compute
