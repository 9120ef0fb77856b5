"""`osstune export`: merged checkpoints that transformers loads with the adapter's logits.

References: transformers' GptOssForCausalLM on the exported directory, our unmerged model with the
adapter (itself tested against PEFT and an explicit merge), PEFT's own merge_and_unload, and
transformers' MXFP4 decoder for the requantized experts.
"""

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from transformers import GptOssForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from osstune.checkpoint import load_model, save_model
from osstune.export import export_merged
from osstune.export_cli import add_command
from osstune.lora import LoraConfig, apply_lora, lora_parameters, save_adapter
from osstune.model import GptOss, MXFP4Experts, init_weights
from tests.hf import hf_model
from tests.test_lora import CFG as LORA_TEST_CONFIG
from tests.test_lora import assert_logits_close

# Token ids inside the small vocabulary, so that transformers builds the embedding from config.json.
CFG = LORA_TEST_CONFIG.replace(pad_token_id=0, eos_token_id=1)
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "osstune-test": true}\n', "tokenizer_config.json": '{"x": 1}\n'}


def _base_checkpoint(path, expert_format: str) -> None:
    model = init_weights(GptOss(CFG), seed=0)  # float32
    save_model(model, path, format=expert_format, write_tokenizer=False)
    for name, text in TOKENIZER.items():
        (path / name).write_text(text)


def _adapter(base_dir, adapter_dir, targets="all") -> GptOss:
    """A trained-looking adapter on the checkpoint as we load it; returns the unmerged model."""
    model = apply_lora(load_model(base_dir), LoraConfig(r=4, alpha=16, targets=targets), seed=0)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    save_adapter(model, adapter_dir, base_model=str(base_dir))
    return model.eval()


def _hf_logits(path, ids):
    hf = GptOssForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(input_ids=ids).logits


@pytest.mark.parametrize("base_format", ["bf16", "mxfp4"])
def test_bf16_export_loads_in_transformers_with_the_adapters_logits(tmp_path, base_format):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _base_checkpoint(base_dir, base_format)
    unmerged = _adapter(base_dir, adapter_dir)
    ids = torch.randint(0, CFG.vocab_size, (2, 21))
    with torch.no_grad():
        expected = unmerged(ids)
        base_logits = load_model(base_dir)(ids)

    result = export_merged(base_dir, adapter_dir, out, "bf16", log=None)
    assert result.requant_errors == {}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    got = _hf_logits(out, ids)
    assert (got - base_logits).abs().max() > 1e-2, "the adapter did not change the logits"
    assert_logits_close(got, expected)
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text


def test_mxfp4_export_requantizes_the_merge_and_reports_its_error(tmp_path, capsys):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _base_checkpoint(base_dir, "mxfp4")
    _adapter(base_dir, adapter_dir, targets=("q_proj", "1.mlp.experts.gate_up_proj", "3.mlp.experts.down_proj"))
    result = export_merged(base_dir, adapter_dir, out, "mxfp4")
    printed = capsys.readouterr().out
    assert "requantization error" in printed and f"{result.max_error:.4f}" in printed

    # Only the adapted expert tensors are requantized; the others are copied packed as they were.
    assert set(result.requant_errors) == {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.3.mlp.experts.down_proj"}
    assert "quantization_config" in json.loads((out / "config.json").read_text())

    # Independent merge: PEFT on transformers, base experts decoded by transformers.
    dense_base = load_model(base_dir, dtype=torch.float32).state_dict()
    from peft import PeftModel

    merged = PeftModel.from_pretrained(hf_model(CFG, dense_base), str(adapter_dir)).merge_and_unload()
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(base_dir / "model.safetensors"), "pt") as b:
        for layer, kind in ((1, "gate_up_proj"), (3, "down_proj"), (0, "gate_up_proj")):
            name = f"model.layers.{layer}.mlp.experts.{kind}"
            blocks, scales = f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")
            exported = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # (E, in, out)
            reference = getattr(merged.model.layers[layer].mlp.experts, kind).detach()
            error = ((exported - reference).norm() / reference.norm()).item()
            if name in result.requant_errors:
                assert 0 < error < 0.2  # MXFP4 (e2m1, shared power-of-two scale) on Gaussian weights: ~0.1
                assert error == pytest.approx(result.requant_errors[name], rel=1e-3)
            else:
                assert torch.equal(blocks, b.get_tensor(f"{name}_blocks")), name
                assert torch.equal(scales, b.get_tensor(f"{name}_scales")), name

    # The exported checkpoint loads packed, and its attention carries the merged q_proj.
    loaded = load_model(out)
    assert isinstance(loaded.model.layers[1].mlp.experts, MXFP4Experts)
    torch.testing.assert_close(
        loaded.model.layers[2].self_attn.q_proj.weight, merged.model.layers[2].self_attn.q_proj.weight, rtol=1e-6, atol=1e-6
    )


def test_mxfp4_export_of_a_dense_base_packs_every_expert_tensor(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _base_checkpoint(base_dir, "bf16")
    _adapter(base_dir, adapter_dir, targets="attention")
    result = export_merged(base_dir, adapter_dir, out, "mxfp4", log=None)
    assert len(result.requant_errors) == 2 * CFG.num_hidden_layers
    assert 0 < result.mean_error <= result.max_error < 0.2


def test_cli_command(tmp_path):
    base_dir, adapter_dir, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    _base_checkpoint(base_dir, "bf16")
    _adapter(base_dir, adapter_dir, targets="experts")
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    argv = ["export", "--model", str(base_dir), "--adapter", str(adapter_dir), "--output", str(out)]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (out / "config.json").is_file()
    with pytest.raises(ValueError, match="already exists"):  # no silent overwrite
        args.func(args)
    args = parser.parse_args([*argv, "--overwrite", "--format", "mxfp4"])
    assert args.func(args) == 0
    # A clear error for an adapter that is not one.
    args = parser.parse_args(["export", "--model", str(base_dir), "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="adapter directory not found"):
        args.func(args)
