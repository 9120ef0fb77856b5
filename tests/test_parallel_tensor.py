"""Tensor parallel on CPU processes over gloo against one process: tp=2 on 2 processes (attention
heads, experts' intermediates and LoRA factors split over the pair, which reads the same batches),
and tp=2 x data 2 on 4 (FSDP2 shards the split tensors over the data pair).

The split matrices sum their partial products over ranks in another order than one process does:
every gradient agrees to 2e-5 of its largest value, losses to rtol 1e-5, trained weights as
`distributed.assert_same_weights` says. A LoRA run interrupted after step 1 and resumed from its
sharded checkpoint equals the uninterrupted one exactly. The saved adapter equals the one-process adapter (byte-equal config; the format
that tests/test_peft_interop.py loads in PEFT).
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
# eps 1e-6: a weight whose gradient is ~1e-9 (rounding noise of the reordered sums) would otherwise
# move by up to lr/2 either way in AdamW's first step, g / (|g| + eps).
FULL = dict(method="full", full_targets=("self_attn", "mlp", "norm"), optim=OptimConfig(lr=1e-3, eps=1e-6))
# name -> (processes, config changes); the one-process reference reads the same global batch. "lora"
# is run again, interrupted after step 1 and resumed from its sharded checkpoint (`resumed`). Full
# fine-tuning on 2 x 2 (FSDP sharding the split
# tensors over the data pair): one step keeps the test short. Packed MXFP4 experts (QLoRA): in the
# gradient check, which trains their LoRA factors and biases.
CASES = {
    "lora": (2, dict(TP, gradient_checkpointing=True)),
    "full_dp2": (4, dict(FULL, **TP, steps=1)),
}
EXPERTS = ("bf16", "mxfp4")


def _model(experts: str):
    """The tiny model (2 layers, a small vocabulary) with `experts` ("bf16", or "mxfp4": packed), LoRA
    on everything, every parameter trained and every bias, sink and LoRA B drawn at random (an
    untrained B would hide A's gradient)."""
    import torch

    from osstune.config import PRESETS
    from osstune.lora import LoraConfig, apply_lora
    from osstune.model import GptOss, init_weights

    cfg = PRESETS["tiny"].replace(num_hidden_layers=2, vocab_size=512, expert_format=experts)
    model = init_weights(GptOss(cfg), seed=0)
    apply_lora(model, LoraConfig(r=2, alpha=4, targets="all"), seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lora_B", "bias", "sinks")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            p.requires_grad_(True)
    return model


def _loss(model):
    import torch

    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    return model(ids).float().logsumexp(-1).sum()


def _gradients(rank, root):
    """Every parameter's gradient of one forward and backward, split over tp=2, gathered whole; then
    the model gathered as an export does (parameters and packed MXFP4 blocks)."""
    import torch

    from osstune.parallel import init_world, parallelize
    from osstune.parallel.gather import gather_parameters

    world = init_world(ParallelConfig(tp=2), torch.device("cpu"))
    for experts in EXPERTS:
        model = parallelize(_model(experts), world, torch.float32)
        loss = _loss(model)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        gather_parameters(model, world, torch.float32)  # what a full fine-tuning export writes
        if rank == 0:
            torch.save({"loss": loss.detach(), **grads}, f"{root}/gradients-{experts}.pt")
            torch.save(model.state_dict(), f"{root}/gathered-{experts}.pt")


def _cfg(base, data, out, **kw):
    return train_config(base, data, out, **kw)


def _run(rank, world, base, data, root):
    from osstune.train.trainer import train

    if world == 2:
        _gradients(rank, root)
    for name, (n, kw) in CASES.items():
        if n != world:
            continue
        result = train(_cfg(base, data, f"{root}/{name}", **kw), quiet=True)
        Path(f"{root}/{name}/losses-{rank}.json").write_text(json.dumps(result.losses))
    if world == 2:
        cfg = _cfg(base, data, f"{root}/resumed", **CASES["lora"][1])
        losses = train(cfg, quiet=True, stop_after=1).losses + train(cfg, quiet=True, resume=True).losses
        Path(f"{root}/resumed/losses-{rank}.json").write_text(json.dumps(losses))
    if world == 4:  # tp=4 does not divide the tiny model's 2 key-value heads: refused before the model loads
        try:
            train(_cfg(base, data, f"{root}/bad", parallel=ParallelConfig(tp=4)), quiet=True)
        except ValueError as e:
            Path(f"{root}/bad-{rank}.txt").write_text(str(e))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tensor")
    base = tiny_model(root / "bf16")
    data = root / "chat.jsonl"
    write_rows(data)
    for world in (2, 4):
        spawn(_run, world, world, base, str(data), str(root))
    return base, data, root


def _losses(root: Path, name: str, world: int) -> list:
    per_rank = [json.loads((root / name / f"losses-{r}.json").read_text()) for r in range(world)]
    assert all(p == per_rank[0] for p in per_rank), "ranks disagree on the logged loss"
    return per_rank[0]


@pytest.mark.parametrize("experts", EXPERTS)
def test_split_gradients_equal_one_process(runs, experts):
    # Each rank's partial products summed over the pair in another order: float32 rounding only.
    import torch

    _, _, root = runs
    model = _model(experts)
    loss = _loss(model)
    loss.backward()
    ours = torch.load(root / f"gradients-{experts}.pt")
    assert torch.allclose(ours.pop("loss"), loss.detach(), rtol=1e-6)
    assert ours.keys() == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():  # relative to the gradient's largest value
        assert (ours[name] - p.grad).abs().max() <= 2e-5 * p.grad.abs().max(), name


@pytest.mark.parametrize("experts", EXPERTS)
def test_gathered_model_equals_the_model_before_the_split(runs, experts):
    import torch

    _, _, root = runs
    ours, ref = torch.load(root / f"gathered-{experts}.pt"), _model(experts).state_dict()
    assert ours.keys() == ref.keys()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_equals_one_process(runs, name, tmp_path):
    from osstune.train.trainer import train

    base, data, root = runs
    world, kw = CASES[name]
    kw = {k: v for k, v in kw.items() if k != "parallel"}
    single = train(_cfg(base, data, tmp_path / "single", grad_accum=world // 2, **kw), quiet=True)
    assert _losses(root, name, world) == pytest.approx(single.losses, rel=1e-5)
    kind = single.artifact.name
    file = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    ours, ref = load_file(root / name / kind / file), load_file(single.artifact / file)
    assert_same_weights(ours, ref, _cfg(base, "", "", **CASES[name][1]).optim.lr)
    if kind == "adapter":
        config = "adapter_config.json"
        assert (root / name / kind / config).read_text() == (single.artifact / config).read_text()


def test_resume_with_tensor_parallel_equals_the_uninterrupted_run(runs):
    # The same layout, the same arithmetic: exact.
    import torch

    _, _, root = runs
    assert (root / "resumed" / "checkpoints" / "step-0000001" / ".metadata").is_file()
    assert _losses(root, "resumed", 2) == _losses(root, "lora", 2)
    a = load_file(root / "resumed" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "lora" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_tp_that_does_not_divide_the_heads_is_refused(runs):
    _, _, root = runs
    for rank in range(4):
        text = (root / f"bad-{rank}.txt").read_text()
        assert "parallel.tp=4 must divide num_key_value_heads=2" in text
    assert not (root / "bad").exists()  # nothing was written: refused before any compute
