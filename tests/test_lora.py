"""LoRA layers against a plain-PyTorch reference that forms W + scale * A @ B explicitly and runs
a dense model with those weights (MXFP4 bases decoded independently of the wrappers)."""

import pytest
import torch
from torch.func import functional_call

from osstune.config import preset
from osstune.lora import LoraConfig, LoRAExperts, LoRALinear, apply_lora, lora_parameters, mark_trainable, merge_lora
from osstune.model import GptOss, MXFP4Experts, init_weights
from osstune.quant.mxfp4 import dequantize_mxfp4

# Every feature of the tiny preset at a pinned small width (these tests run dozens of models; the
# preset's own width may grow), with weights large enough that every sub-layer moves the logits.
CFG = preset("tiny").replace(
    vocab_size=512, hidden_size=64, intermediate_size=64, head_dim=16, initializer_range=0.1
)
TARGETS = ["attention", "experts", "all", ("v_proj", "1.mlp.experts.down_proj")]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 logits computed in another order (W + scale * A @ B formed or not, another summation
    order): rounding grows with the logits' size, so the absolute tolerance scales with their largest
    value (~5 here). A wrong orientation or mapping moves them by more than 1e-2 (checked in tests)."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _model(expert_format: str = "bf16", seed: int = 0) -> GptOss:
    return init_weights(GptOss(CFG.replace(expert_format=expert_format)), seed=seed)


def _is_lora(name: str) -> bool:
    return "lora_" in name.rpartition(".")[2]


def _randomize_lora(model, std: float = 0.05) -> None:
    """Non-zero B (and a fresh A): an untrained adapter would hide orientation mistakes."""
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0.0, std)


def _dense(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, H, 2I), (E, I, H) in float32, read from the tensors, not through the module's methods."""
    if isinstance(experts, MXFP4Experts):
        gu = dequantize_mxfp4(experts.gate_up_proj_blocks, experts.gate_up_proj_scales, torch.float32)
        dn = dequantize_mxfp4(experts.down_proj_blocks, experts.down_proj_scales, torch.float32)
        return gu.transpose(1, 2), dn.transpose(1, 2)
    return experts.gate_up_proj.float(), experts.down_proj.float()


def _reference_logits(model: GptOss, scale: float, ids: torch.Tensor, lora: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a dense GptOss whose weights are W + scale * A @ B, with A, B taken from `lora`
    (name -> tensor, our parameter names), so gradients flow to those tensors."""
    state = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer"):
            continue
        if isinstance(module, LoRALinear):
            a, b = lora[f"{name}.lora_A"], lora[f"{name}.lora_B"]
            state[f"{name}.weight"] = module.base_layer.weight + scale * b @ a
            state[f"{name}.bias"] = module.base_layer.bias
        elif isinstance(module, (LoRAExperts, MXFP4Experts)):
            base = module.base_layer if isinstance(module, LoRAExperts) else module
            w = dict(zip(("gate_up_proj", "down_proj"), _dense(base)))
            for kind in getattr(module, "kinds", ()):
                a, b = lora[f"{name}.{kind}_lora_A"], lora[f"{name}.{kind}_lora_B"]
                w[kind] = w[kind] + scale * torch.einsum("eir,ero->eio", a, b)
            state.update({f"{name}.{k}": v for k, v in w.items()})
            state[f"{name}.gate_up_proj_bias"] = base.gate_up_proj_bias
            state[f"{name}.down_proj_bias"] = base.down_proj_bias
    for name, p in model.named_parameters():
        if not _is_lora(name) and ".base_layer." not in name:
            state.setdefault(name, p)
    dense = GptOss(CFG)
    return functional_call(dense, state, (ids,))


@pytest.mark.parametrize(
    "expert_format, targets, rslora",
    [(f, t, False) for f in ("bf16", "mxfp4") for t in TARGETS] + [("bf16", "all", True)],
)
def test_forward_and_gradients_match_explicit_merge(expert_format, targets, rslora):
    model = apply_lora(_model(expert_format), LoraConfig(r=4, alpha=8, targets=targets, rslora=rslora), seed=1)
    _randomize_lora(model)
    scale = 8 / (2.0 if rslora else 4.0)
    ids = torch.randint(0, CFG.vocab_size, (2, 21))
    weights = torch.randn(2, 21, CFG.vocab_size)

    out = model(ids)
    (out * weights).sum().backward()
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if _is_lora(n)}
    ref = _reference_logits(model, scale, ids, leaves)
    (ref * weights).sum().backward()

    assert_logits_close(out, ref)
    assert leaves, "no LoRA factors were created"
    for n, p in model.named_parameters():
        if _is_lora(n):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            g = leaves[n].grad  # float32 sums over 42 tokens x 512 logits: tolerance scaled to the largest entry
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=n)
        else:
            assert p.grad is None, f"frozen base parameter {n} received a gradient"


def test_targets_select_exactly_the_named_modules():
    model = apply_lora(_model(), LoraConfig(r=2, targets=("v_proj", "1.mlp.experts.down_proj")))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}
    assert wrapped == {f"model.layers.{i}.self_attn.v_proj" for i in range(4)} | {"model.layers.1.mlp.experts"}
    assert model.model.layers[1].mlp.experts.kinds == ("down_proj",)
    assert not hasattr(model.model.layers[1].mlp.experts, "gate_up_proj_lora_A")


@pytest.mark.parametrize("expert_format", ["bf16", "mxfp4"])
def test_untrained_adapter_is_a_no_op(expert_format):
    base = _model(expert_format)
    ids = torch.randint(0, CFG.vocab_size, (1, 17))
    expected = base(ids)
    model = apply_lora(base, LoraConfig(r=8, targets="all"), seed=0)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            assert torch.count_nonzero(p) == 0, n
        elif n.endswith("lora_A"):
            # PEFT's init: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = A's input size.
            fan_in = p.shape[-1] if p.dim() == 2 else p.shape[1]
            assert 0.5 * fan_in**-0.5 < p.abs().max() <= fan_in**-0.5, n
    torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)


def test_mxfp4_base_stays_packed_and_frozen():
    model = apply_lora(_model("mxfp4"), LoraConfig(targets="experts", train_router=True, train_sinks=True))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.base_layer, MXFP4Experts)
    assert experts.base_layer.gate_up_proj_blocks.dtype == torch.uint8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(_is_lora(n) or ".router." in n or n.endswith(".sinks") for n in trainable)
    assert any(n.endswith("router.weight") for n in trainable) and any(n.endswith("sinks") for n in trainable)
    assert not any("bias" in n and "router" not in n for n in trainable)


def test_mark_trainable_counts_and_flags():
    model = apply_lora(_model(), LoraConfig(r=2, targets="attention"))
    h, q, kv = CFG.hidden_size, CFG.num_attention_heads * CFG.head_dim, CFG.num_key_value_heads * CFG.head_dim
    per_layer = 2 * (h + q) + 2 * (2 * (h + kv)) + 2 * (q + h)  # r=2: r*(in+out) per projection
    n = mark_trainable(model, LoraConfig(r=2, targets="attention", train_sinks=True))
    assert n == CFG.num_hidden_layers * (per_layer + CFG.num_attention_heads)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n


def test_dropout_applies_to_the_lora_branch_only_in_training():
    model = apply_lora(_model(), LoraConfig(r=4, dropout=0.5, targets="all"), seed=0)
    _randomize_lora(model)
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    merged_ref = _reference_logits(model, 16 / 4, ids, dict(model.named_parameters()))
    model.eval()
    assert_logits_close(model(ids), merged_ref)
    model.train()
    assert not torch.allclose(model(ids), merged_ref, atol=1e-3)


@pytest.mark.parametrize("expert_format", ["bf16", "mxfp4"])
@pytest.mark.parametrize("targets", TARGETS)
def test_merged_logits_equal_unmerged(expert_format, targets):
    """Expert LoRA must survive merging (the bug other tools had: merged experts silently dropped)."""
    model = apply_lora(_model(expert_format), LoraConfig(r=4, alpha=8, targets=targets), seed=2)
    _randomize_lora(model)
    ids = torch.randint(0, CFG.vocab_size, (2, 19))
    with torch.no_grad():
        before = model(ids)
        base = _model(expert_format)(ids)
        merge_lora(model)
        after = model(ids)
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
    assert not any(_is_lora(n) for n in model.state_dict())
    assert (before - base).abs().max() > 1e-2, "the adapter did not change the logits; the test would be void"
    assert_logits_close(after, before)
    if expert_format == "mxfp4" and targets != "attention":
        assert model.config.expert_format == "bf16"
        assert set(model.state_dict()) == set(GptOss(CFG).state_dict())


def test_config_validation():
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(targets="mlp"), dict(targets=("router",)), dict(targets=())):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
    assert LoraConfig(targets=["q_proj"]).targets == ("q_proj",)
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(_model(), LoraConfig(targets=("9.self_attn.q_proj",)))
    model = apply_lora(_model(), LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(targets="experts"))
