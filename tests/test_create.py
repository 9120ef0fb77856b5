"""`osstune create`: random checkpoints in the Hugging Face layout, seeded per tensor name."""

from __future__ import annotations

import argparse
import json
import sys
import types

import pytest
import torch

from safetensors.torch import load_file

from osstune.checkpoint import load_model
from osstune.config import preset
from osstune.create import add_command, create_checkpoint
from osstune.quant.mxfp4 import quantize_mxfp4_ref as quantize_mxfp4
from tests.shapes import CFG



def read_all(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_values_depend_on_seed_and_name_only(tmp_path):
    create_checkpoint(CFG, tmp_path / "one", seed=7, write_tokenizer=False)
    create_checkpoint(CFG, tmp_path / "many", seed=7, max_shard_size="30KB", write_tokenizer=False)
    create_checkpoint(CFG.replace(num_hidden_layers=3), tmp_path / "deeper", seed=7, write_tokenizer=False)
    create_checkpoint(CFG, tmp_path / "other", seed=8, write_tokenizer=False)
    one, many, deeper, other = (read_all(tmp_path / d) for d in ("one", "many", "deeper", "other"))
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 3
    assert one.keys() == many.keys()
    for name, t in one.items():
        assert torch.equal(t, many[name]) and torch.equal(t, deeper[name]), name
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(one[q], other[q])
    # The in-memory preset path gives the same weights.
    model = load_model(CFG, seed=7).state_dict()
    for name, t in one.items():
        assert torch.equal(model[name], t), name


def test_initialisation(tmp_path):
    cfg = CFG.replace(hidden_size=256, intermediate_size=256)
    create_checkpoint(cfg, tmp_path / "c", write_tokenizer=False)
    t = read_all(tmp_path / "c")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    for name, v in t.items():
        if name.endswith("norm.weight"):
            assert torch.all(v == 1), name
        elif name.endswith("bias") and ".router." not in name:
            assert torch.all(v == 0), name
        elif v.numel() >= 10_000:  # matrices: normal(0, initializer_range)
            assert v.float().mean().abs() < 1e-3 and v.float().std() == pytest.approx(0.02, rel=0.05), name
        else:  # the router bias and the sinks: too few values for statistics, but drawn
            assert torch.all(v != 0) and v.abs().max() < 0.2, name


def test_mxfp4_is_the_quantized_bf16_checkpoint(tmp_path):
    create_checkpoint(CFG, tmp_path / "bf", seed=3, write_tokenizer=False)
    create_checkpoint(CFG, tmp_path / "mx", mxfp4=True, seed=3, write_tokenizer=False)
    bf, mx = read_all(tmp_path / "bf"), read_all(tmp_path / "mx")
    assert json.loads((tmp_path / "mx" / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    for layer in range(CFG.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = quantize_mxfp4(bf.pop(p + proj).transpose(1, 2))  # the reference quantizer
            assert torch.equal(mx.pop(p + proj + "_blocks"), blocks)
            assert torch.equal(mx.pop(p + proj + "_scales"), scales)
    assert bf.keys() == mx.keys()
    assert all(torch.equal(bf[k], mx[k]) for k in bf)


def test_tokenizer_files(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    create_checkpoint(CFG, tmp_path / "copied", tokenizer_source=src)
    assert (tmp_path / "copied" / "tokenizer.json").read_text() == "{}"
    assert (tmp_path / "copied" / "chat_template.jinja").exists()

    written = []
    fake = types.ModuleType("osstune.data.tokenizer")
    fake.write_tokenizer_files = lambda out: (written.append(out), (out / "tokenizer.json").write_text("[]"))
    monkeypatch.setitem(sys.modules, "osstune.data.tokenizer", fake)
    create_checkpoint(CFG, tmp_path / "generated")
    assert len(written) == 1 and (tmp_path / "generated" / "tokenizer.json").read_text() == "[]"

    monkeypatch.setitem(sys.modules, "osstune.data.tokenizer", None)  # the module is not there
    with pytest.warns(UserWarning, match="without tokenizer files"):
        create_checkpoint(CFG, tmp_path / "none")
    assert (tmp_path / "none" / "config.json").exists()


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert run_cli(["create", "--preset", "tiny", "--output", str(out), "--mxfp4", "--seed", "2", "--no-tokenizer"]) == 0
    assert "wrote tiny (MXFP4 experts, seed 2)" in capsys.readouterr().out
    model = load_model(out)
    assert model.config == preset("tiny").replace(expert_format="mxfp4")
    reference = load_model("tiny", seed=2, packed_experts=True).state_dict()
    assert all(torch.equal(t, reference[n]) for n, t in model.state_dict().items())
    with pytest.raises(ValueError, match="already exists"):
        run_cli(["create", "--preset", "tiny", "--output", str(out), "--no-tokenizer"])
    with pytest.raises(SystemExit):
        run_cli(["create", "--preset", "huge", "--output", str(out)])
