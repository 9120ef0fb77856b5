"""Our adapters against PEFT on transformers' GptOssForCausalLM, both ways, in float32.

ours -> PEFT: `save_adapter`, then `PeftModel.from_pretrained` gives our logits.
PEFT -> ours: PEFT's `save_pretrained` (random non-zero LoRA weights), then `load_adapter` gives
PEFT's logits, and re-saving reproduces PEFT's file tensor for tensor.
"""

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from osstune.lora import LoraConfig, adapter_state_dict, apply_lora, load_adapter, lora_parameters, save_adapter
from osstune.model import GptOss, init_weights
from tests.hf import hf_model
from tests.test_lora import CFG, assert_logits_close  # the small config all LoRA tests share

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _base(seed: int = 0) -> GptOss:
    return init_weights(GptOss(CFG), seed=seed).eval()


def _logits_hf(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_changes(adapted, base_logits):
    assert (adapted - base_logits).abs().max() > 1e-2, "the adapter did not change the logits; the test would be void"


@pytest.mark.parametrize("targets", ["attention", "experts", "all"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter(tmp_path, targets, rslora):
    base = _base()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = apply_lora(base, LoraConfig(r=4, alpha=8, targets=targets, rslora=rslora), seed=3)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.normal_(0, 0.05)
    save_adapter(ours, tmp_path, base_model="tiny-test")
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    with torch.no_grad():
        expected = ours(ids)

    hf = hf_model(CFG, base_state)
    base_logits = _logits_hf(hf, ids)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    got = _logits_hf(peft_model, ids)
    _assert_changes(got, base_logits)
    assert_logits_close(got, expected)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == "tiny-test"


def test_peft_loads_router_and_sinks(tmp_path):
    base = _base(1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = apply_lora(base, LoraConfig(r=2, targets="all", train_router=True, train_sinks=True), seed=0)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.normal_(0, 0.05)
        for layer in ours.model.layers:
            layer.self_attn.sinks.add_(torch.randn_like(layer.self_attn.sinks))
            layer.mlp.router.weight.add_(0.2 * torch.randn_like(layer.mlp.router.weight))
    save_adapter(ours, tmp_path)
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    with torch.no_grad():
        expected = ours(ids)
    peft_model = PeftModel.from_pretrained(hf_model(CFG, base_state), str(tmp_path)).eval()
    assert_logits_close(_logits_hf(peft_model, ids), expected)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["router"]


def test_dropout_with_experts_is_recorded_as_zero_for_peft(tmp_path):
    base = _base()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ours = apply_lora(base, LoraConfig(r=2, dropout=0.1, targets="all"), seed=0).eval()
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.normal_(0, 0.05)
    with pytest.warns(UserWarning, match="dropout"):
        save_adapter(ours, tmp_path)
    ids = torch.randint(0, CFG.vocab_size, (1, 11))
    peft_model = PeftModel.from_pretrained(hf_model(CFG, base_state), str(tmp_path)).eval()
    with torch.no_grad():
        assert_logits_close(_logits_hf(peft_model, ids), ours(ids))


PEFT_CASES = {
    "attention": dict(target_modules=ATTN),
    "experts": dict(target_parameters=EXPERTS),
    "all_rslora": dict(target_modules=ATTN, target_parameters=EXPERTS, use_rslora=True),
    # Listed in the other order: PEFT nests by the module's parameter order regardless.
    "all_reversed": dict(target_modules=["v_proj", "q_proj"], target_parameters=EXPERTS[::-1]),
    "down_only": dict(target_parameters=["mlp.experts.down_proj"]),
    # The OpenAI cookbook's gpt-oss recipe: all linear layers, experts of a few layers only.
    "cookbook": dict(
        target_modules="all-linear",
        target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj", "3.mlp.experts.down_proj"],
    ),
    "router": dict(target_modules=["o_proj"], target_parameters=EXPERTS, modules_to_save=["router"]),
    "regex": dict(target_modules=r".*\.(1|2)\.self_attn\.(q|v)_proj"),
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_we_load_peft_adapters(tmp_path, case):
    base = _base(2)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    hf = hf_model(CFG, base_state)
    peft_model = get_peft_model(hf, PeftLoraConfig(r=4, lora_alpha=16, **PEFT_CASES[case]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 23))
    expected = _logits_hf(peft_model, ids)
    with torch.no_grad():
        base_logits = base(ids)

    ours = load_adapter(base, tmp_path).eval()
    with torch.no_grad():
        got = ours(ids)
    _assert_changes(got, base_logits)
    assert_logits_close(got, expected)

    # The mapping is exact both ways: our tensors in PEFT form are PEFT's file, name for name.
    theirs = load_file(str(tmp_path / "adapter_model.safetensors"))
    mine = adapter_state_dict(ours)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(mine[key], value), key


def test_peft_ignores_entries_naming_no_gpt_oss_module(tmp_path):
    """A generic recipe's "gate_proj"/"down_proj" module names match nothing in gpt-oss, in PEFT or here."""
    base = _base()
    hf = hf_model(CFG, {k: v.clone() for k, v in base.state_dict().items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(hf, PeftLoraConfig(r=2, target_modules=["q_proj", "gate_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, CFG.vocab_size, (1, 13))
    expected = _logits_hf(peft_model.eval(), ids)
    with pytest.warns(UserWarning, match="gate_proj"):
        ours = load_adapter(base, tmp_path)
    with torch.no_grad():
        assert_logits_close(ours(ids), expected)
