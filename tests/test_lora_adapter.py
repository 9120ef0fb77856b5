"""save_adapter / load_adapter with our own model: round trip, and clear errors for adapters that do not fit."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from osstune.lora import AdapterError, LoraConfig, LoRAExperts, LoRALinear, apply_lora, load_adapter, lora_parameters, save_adapter
from osstune.model import GptOss, init_weights
from tests.test_lora import CFG  # the pinned small config all LoRA tests share


def _trained(tmp_path, cfg=LoraConfig(r=4, targets="all", train_router=True, train_sinks=True), model_cfg=CFG):
    model = apply_lora(init_weights(GptOss(model_cfg), seed=0), cfg, seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
        for layer in model.model.layers:
            layer.self_attn.sinks.add_(1.0)
            layer.mlp.router.bias.add_(0.3)
    save_adapter(model, tmp_path, base_model="tiny")
    return model


def _fresh(model_cfg=CFG) -> GptOss:
    return init_weights(GptOss(model_cfg), seed=0)


@pytest.mark.parametrize("expert_format", ["bf16", "mxfp4"])
def test_round_trip(tmp_path, expert_format):
    cfg = CFG.replace(expert_format=expert_format)
    model = _trained(tmp_path, model_cfg=cfg)
    loaded = load_adapter(_fresh(cfg), tmp_path)
    assert loaded.lora_config == model.lora_config
    ids = torch.randint(0, CFG.vocab_size, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    # Trainable after loading exactly as after apply_lora: factors, router, sinks.
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(_fresh(), tmp_path / "nope")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(_fresh(), tmp_path)
    _trained(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(_fresh(), tmp_path)


def test_other_model_shape_names_the_tensor_and_leaves_the_model_alone(tmp_path):
    _trained(tmp_path, model_cfg=CFG.replace(hidden_size=96))
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight.*shape"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, (LoRALinear, LoRAExperts)) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_other_rank(tmp_path):
    _trained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="r=8"):
        load_adapter(_fresh(), tmp_path)


def test_more_layers_than_the_model(tmp_path):
    _trained(tmp_path, cfg=LoraConfig(r=2, targets="attention"), model_cfg=CFG.replace(num_hidden_layers=6))
    with pytest.raises(AdapterError, match=r"layers\.4\."):
        load_adapter(_fresh(), tmp_path)


def test_unknown_targets(tmp_path):
    _trained(tmp_path, cfg=LoraConfig(r=2, targets="attention"))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for bad, match in ((["lm_head"], "lm_head"), (["7.self_attn.q_proj"], "matches no module")):
        config["target_modules"] = bad
        config_path.write_text(json.dumps(config))
        with pytest.raises(AdapterError, match=match):
            load_adapter(_fresh(), tmp_path)
    config["target_modules"], config["target_parameters"] = None, ["mlp.experts.gate_up_proj_bias"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="gate_up_proj_bias"):
        load_adapter(_fresh(), tmp_path)


def test_tensor_missing_or_unexpected(tmp_path):
    _trained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.2.mlp.experts.base_layer.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, str(weights))
    with pytest.raises(AdapterError, match=r"layers\.2\.mlp\.experts\.base_layer\.lora_B\.weight.*missing"):
        load_adapter(_fresh(), tmp_path)
    save_file({**tensors, "base_model.model.model.norm.weight": torch.ones(CFG.hidden_size)}, str(weights))
    with pytest.raises(AdapterError, match=r"model\.norm\.weight"):
        load_adapter(_fresh(), tmp_path)


def test_unsupported_options_and_bad_json(tmp_path):
    _trained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    good = config_path.read_text()
    for key, value in (("use_dora", True), ("bias", "all"), ("peft_type", "IA3"), ("modules_to_save", ["lm_head"])):
        config_path.write_text(json.dumps({**json.loads(good), key: value}))
        with pytest.raises(AdapterError, match=key if key != "peft_type" else "IA3"):
            load_adapter(_fresh(), tmp_path)
    config_path.write_text(good[:-20])
    with pytest.raises(AdapterError, match=r"adapter_config\.json:\d+: invalid JSON"):
        load_adapter(_fresh(), tmp_path)
    assert issubclass(AdapterError, ValueError)
