"""Every way a checkpoint can be bad gives a CheckpointError (a ValueError) that names the file,
the tensor and what to do, and never a half-loaded model."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from osstune.checkpoint import CheckpointError, load_model, resolve_checkpoint, save_model, write_checkpoint
from osstune.checkpoint.random_init import RandomSource
from tests.shapes import CFG

Q = "model.layers.0.self_attn.q_proj.weight"
BLOCKS = "model.layers.1.mlp.experts.down_proj_blocks"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One bf16 and one MXFP4 checkpoint, single-file; tests copy and damage them."""
    root = tmp_path_factory.mktemp("good")
    model = load_model(CFG)
    save_model(model, root / "bf16", write_tokenizer=False)
    save_model(model, root / "mxfp4", format="mxfp4", write_tokenizer=False)
    save_model(model, root / "sharded", max_shard_size="100KB", write_tokenizer=False)
    return root


def copy(saved, tmp_path, which="bf16"):
    dst = tmp_path / which
    dst.mkdir()
    for f in (saved / which).iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite(path, change):
    """Apply change(dict of tensors) to model.safetensors, written with the safetensors library."""
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def edit_config(path, change):
    cfg = json.loads((path / "config.json").read_text())
    change(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def error(path, **kw) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path, **kw)
    assert isinstance(e.value, ValueError)
    return str(e.value)


def test_missing_tensor(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    rewrite(ckpt, lambda t: t.pop(Q))
    msg = error(ckpt)
    assert f"missing tensor {Q}" in msg and "model.safetensors" in msg and "nothing was loaded" in msg


def test_unexpected_tensor(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    rewrite(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    msg = error(ckpt)
    assert "unexpected tensor model.layers.0.mlp.extra.weight in model.safetensors" in msg


def test_wrong_shape(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    rewrite(ckpt, lambda t: t.update({Q: torch.zeros(32, 64, dtype=torch.bfloat16)}))
    msg = error(ckpt)
    assert f"tensor {Q} in model.safetensors has shape [32, 64], config.json implies [64, 64]" in msg
    assert "num_attention_heads*head_dim=64" in msg


@pytest.mark.parametrize(
    "which,name,dtype,expect",
    [("bf16", Q, torch.int32, "expected a floating-point dtype"), ("mxfp4", BLOCKS, torch.float32, "must be U8")],
)
def test_wrong_dtype(saved, tmp_path, which, name, dtype, expect):
    ckpt = copy(saved, tmp_path, which)
    rewrite(ckpt, lambda t: t.update({name: t[name].to(dtype)}))
    msg = error(ckpt)
    assert f"tensor {name} in model.safetensors has dtype" in msg and expect in msg


@pytest.mark.parametrize("cut", [1, 1000, 10**9])
def test_truncated_file(saved, tmp_path, cut):
    ckpt = copy(saved, tmp_path)
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: max(len(data) - cut, 5)])
    msg = error(ckpt)
    assert str(f) in msg and "truncated or corrupt" in msg


def test_corrupt_header(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    assert "header is not JSON" in error(ckpt)


def test_index_names_missing_shard(saved, tmp_path):
    ckpt = copy(saved, tmp_path, "sharded")
    second = sorted(ckpt.glob("model-*.safetensors"))[1]
    second.unlink()
    msg = error(ckpt)
    assert "model.safetensors.index.json" in msg and f"names shard {second.name}" in msg
    assert "for tensor model.layers." in msg and "download the missing shard" in msg


def test_index_and_shard_disagree(saved, tmp_path):
    ckpt = copy(saved, tmp_path, "sharded")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][Q] = next(s for s in shards if s != index["weight_map"][Q])
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    msg = error(ckpt)
    assert Q in msg and "disagree" in msg


def test_unknown_quant_method(saved, tmp_path):
    ckpt = copy(saved, tmp_path, "mxfp4")
    edit_config(ckpt, lambda c: c["quantization_config"].update(quant_method="gptq"))
    msg = error(ckpt)
    assert "config.json" in msg and "'gptq'" in msg and "mxfp4" in msg


def test_config_contradicts_experts(saved, tmp_path):
    ckpt = copy(saved, tmp_path, "mxfp4")
    edit_config(ckpt, lambda c: c.update(num_local_experts=8))
    msg = error(ckpt)
    blocks = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    assert f"tensor {blocks} in model.safetensors has shape [4, 128, 2, 16], config.json implies [8, 128, 2, 16]" in msg
    assert "dim 0 is 4 but config.json gives num_local_experts=8" in msg


def test_config_contradicts_layer_count(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    edit_config(ckpt, lambda c: c.update(num_hidden_layers=1, layer_types=["sliding_attention"]))
    msg = error(ckpt)
    assert "unexpected tensor model.layers.1." in msg and "num_hidden_layers=1" in msg


def test_packed_weights_without_quantization_config(saved, tmp_path):
    ckpt = copy(saved, tmp_path, "mxfp4")
    edit_config(ckpt, lambda c: c.pop("quantization_config"))
    msg = error(ckpt)
    assert "unexpected tensor model.layers.0.mlp.experts.gate_up_proj_blocks" in msg
    assert "missing tensor model.layers.0.mlp.experts.gate_up_proj" in msg
    assert "no quantization_config" in msg


class _Boom:
    def __reduce__(self):
        return (os.mkdir, ("/tmp/osstune-unpickled-a-checkpoint",))


def test_pickled_weights_are_never_read(tmp_path, saved):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((saved / "bf16" / "config.json").read_bytes())
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    msg = error(ckpt)
    assert "pytorch_model.bin" in msg and "safetensors only" in msg and "never unpickles" in msg
    assert not os.path.exists("/tmp/osstune-unpickled-a-checkpoint")


def test_no_config(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    (ckpt / "config.json").unlink()
    assert str(ckpt / "config.json") in error(ckpt)


def test_not_a_model_type_we_load(saved, tmp_path):
    ckpt = copy(saved, tmp_path)
    edit_config(ckpt, lambda c: c.update(model_type="llama", auto_map={"AutoModel": "evil.Model"}))
    assert "model_type is 'llama'" in error(ckpt)


def test_bad_names():
    with pytest.raises(CheckpointError, match=r"not a preset \(gpt-oss-20b, gpt-oss-120b, tiny\)"):
        load_model("tinyy")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model("./no/such/dir")


def test_offline_without_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="openai/gpt-oss-20b: not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_checkpoint("openai/gpt-oss-20b", cache_dir=tmp_path)


def test_save_refuses_to_clobber_and_can_overwrite(tmp_path):
    model = load_model(CFG)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        save_model(model, tmp_path / "out", write_tokenizer=False)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    save_model(model, tmp_path / "out", write_tokenizer=False, overwrite=True)
    assert not (tmp_path / "out" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs left


def test_interrupted_save_leaves_nothing(tmp_path):
    class Failing(RandomSource):
        def get(self, name):
            if name.startswith("model.layers.1."):
                raise OSError("disk full")
            return super().get(name)

    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path / "out", CFG, Failing(CFG), max_shard_size="50KB", write_tokenizer=False)
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_unknown_tensors_and_options(tmp_path):
    model = load_model(CFG)
    model.model.layers[0].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 64)))
    with pytest.raises(CheckpointError, match="q_proj.lora_A.*merge or remove adapters"):
        save_model(model, tmp_path / "a", write_tokenizer=False)
    with pytest.raises(CheckpointError, match="format='fp8'"):
        save_model(load_model(CFG), tmp_path / "b", format="fp8")
    with pytest.raises(CheckpointError, match="max_shard_size='5 bananas'"):
        save_model(load_model(CFG), tmp_path / "c", max_shard_size="5 bananas")
    with pytest.raises(CheckpointError, match="tokenizer_source .* has none of tokenizer.json"):
        save_model(load_model(CFG), tmp_path / "d", tokenizer_source=tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
