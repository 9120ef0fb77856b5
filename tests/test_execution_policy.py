"""The model's execution policy (osstune.model.ExecutionPolicy): one object, installed in one call,
read by every layer, and reversible: removing it gives the reference's numbers bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from osstune.config import preset
from osstune.lora import LoraConfig, apply_lora
from osstune.model import REFERENCE, ExecutionPolicy, GptOss, init_weights, sink_attention

SMALL = preset("tiny").replace(vocab_size=512, num_hidden_layers=2)


@pytest.fixture(autouse=True)
def _kernel_references(monkeypatch):
    # The policy is under test, not the kernels (tests/test_kernels_*.py, tests/test_fast_path.py): on a
    # CPU the kernel launchers run their plain-PyTorch references instead of Triton's slow interpreter.
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")


def _model(seed: int) -> GptOss:
    """MXFP4 attention under LoRA (so the fast path fuses q/k/v storage), checkpointing on, training."""
    from osstune.quant.linear import quantize_attention

    model = init_weights(GptOss(SMALL), seed=seed)
    quantize_attention(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all"), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # B = 0 at initialisation would leave the adapters out of the outputs
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("bias") or name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.gradient_checkpointing = True
    return model.train()


def _run(model: GptOss, seed: int) -> list[torch.Tensor]:
    """Logits and every gradient of one packed batch drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (2, 24), generator=gen)
    doc_ids = torch.cat([torch.zeros(2, 10, dtype=torch.long), torch.ones(2, 14, dtype=torch.long)], dim=1)
    positions = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, -1)
    model.zero_grad(set_to_none=True)
    logits = model(ids, position_ids=positions, doc_ids=doc_ids)
    (logits.float().square().mean() + logits.float().mean()).backward()
    return [logits.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_default_is_the_reference_and_set_execution_checks_its_argument():
    model = GptOss(SMALL)
    assert model.execution is REFERENCE and REFERENCE.describe() == "reference"
    with pytest.raises(TypeError, match="ExecutionPolicy or None, not str"):
        model.set_execution("fast")
    policy = ExecutionPolicy(attention=sink_attention)
    assert model.set_execution(policy) is REFERENCE and model.execution is policy
    assert model.set_execution(None) is policy and model.execution is REFERENCE
    assert policy.describe() == "attention=sink_attention"


def test_every_layer_reads_the_installed_policy():
    model = _model(seed=1)
    seen = {"qkv": 0, "attention": 0, "experts": 0, "checkpoint": 0}

    def qkv(attention, x):
        seen["qkv"] += 1
        return attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)

    def attention(q, k, v, sinks, window, ctx):
        seen["attention"] += 1
        return sink_attention(q, k, v, sinks, ctx.sliding_allowed if window is not None else ctx.full_allowed)

    def experts(module, x, idx, weights):
        seen["experts"] += 1
        return torch.zeros_like(x)  # a visible change: the experts' contribution is gone

    def checkpoint(layer, x, ctx):
        seen["checkpoint"] += 1
        return layer(x, ctx)

    reference = _run(copy.deepcopy(model), seed=2)
    model.set_execution(ExecutionPolicy(qkv=qkv, attention=attention, experts=experts, checkpoint=checkpoint))
    changed = _run(model, seed=2)
    layers = SMALL.num_hidden_layers
    assert seen == {"qkv": layers, "attention": layers, "experts": layers, "checkpoint": layers}
    assert not torch.equal(changed[0], reference[0])
    model.set_execution(None)
    _assert_bitwise(_run(model, seed=2), reference)
    assert seen["experts"] == layers  # removed: not called again


def test_installing_and_removing_the_fast_path_and_offload_gives_the_reference_bit_for_bit():
    from osstune.fast import FastPathOptions, disable_fast_path, enable_fast_path
    from osstune.offload import ActivationOffload, offload_activations

    model = _model(seed=3)
    untouched = copy.deepcopy(model)
    enable_fast_path(model, FastPathOptions(checkpoint="keep_expert_gemms"))  # fuses q/k/v storage too
    offload_activations(model)
    run = model.execution
    assert isinstance(run.checkpoint, ActivationOffload) and run.qkv is not None and run.experts is not None
    fast = _run(model, seed=4)  # the kernel launchers (their references on a CPU) on the same batch
    ref = _run(untouched, seed=4)
    torch.testing.assert_close(fast[0], ref[0], rtol=1e-4, atol=1e-4)  # float32, summation order differs
    # Removed part by part (the fast path's fields, then the offloaded checkpoint), and whole.
    disable_fast_path(model)
    assert model.execution.replace(checkpoint=None) == REFERENCE
    model.set_execution(model.execution.replace(checkpoint=None))
    assert model.execution == REFERENCE
    for seed in (5, 6):  # fresh inputs each time
        _assert_bitwise(_run(model, seed), _run(untouched, seed))
    previous = model.set_execution(run)
    model.set_execution(previous)
    _assert_bitwise(_run(model, seed=7), _run(untouched, seed=7))
