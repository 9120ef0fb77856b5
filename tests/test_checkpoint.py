"""Checkpoint save/load: layout, bit-exact round trips, dtype and packing semantics, streaming.

References: the `safetensors` library reads what we write; `quantize_mxfp4` / `dequantize_mxfp4`
(osstune.quant) are the references for our per-expert conversions. transformers parity lives in
test_checkpoint_parity.py, bad inputs in test_checkpoint_errors.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file

from osstune.checkpoint import load_config, load_model, save_model
from osstune.checkpoint.convert import pack_experts, unpack_experts
from osstune.checkpoint.layout import tensor_specs
from osstune.config import preset
from osstune.model import GptOss
from osstune.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4, quantize_mxfp4_ref
from tests.shapes import CFG


def files_state(path):
    """Every tensor of a checkpoint directory, read with the safetensors library (the reference)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_layout_matches_model_state_dict(fmt):
    cfg = preset("gpt-oss-20b").replace(expert_format=fmt)
    with torch.device("meta"):
        model = GptOss(cfg)
    specs = tensor_specs(cfg)
    assert list(specs) == [n for n in specs if n in model.state_dict()]
    assert {n: tuple(t.shape) for n, t in model.state_dict().items()} == {n: s.shape for n, s in specs.items()}


@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_round_trip_is_bit_exact(tmp_path, fmt, shard):
    model = load_model(CFG, packed_experts=fmt == "mxfp4", seed=1)
    state = model.state_dict()
    save_model(model, tmp_path / "ckpt", max_shard_size=shard or "5GB", write_tokenizer=False)
    on_disk = files_state(tmp_path / "ckpt")
    assert_same_state(on_disk, state)  # what the safetensors library reads back
    assert_same_state(load_model(tmp_path / "ckpt").state_dict(), state)  # what we read back
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    if shard is None:
        assert not index.exists() and (tmp_path / "ckpt" / "model.safetensors").exists()
    else:
        idx = json.loads(index.read_text())
        shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
        assert len(shards) > 2 and sorted(set(idx["weight_map"].values())) == shards
        assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
        for name, file in idx["weight_map"].items():
            with safe_open(tmp_path / "ckpt" / file, "pt") as f:
                assert name in f.keys()
        for s in shards:  # within the limit, unless one tensor alone exceeds it
            in_shard = [state[n] for n, f in idx["weight_map"].items() if f == s]
            assert len(in_shard) == 1 or sum(t.numel() * t.element_size() for t in in_shard) <= 60_000
    cfg = load_config(tmp_path / "ckpt")
    assert cfg == CFG.replace(expert_format=fmt)
    gen = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [200002, 199999, 200012]


def test_float32_model_round_trips_in_float32(tmp_path):
    model = load_model(CFG, dtype=torch.float32)
    save_model(model, tmp_path / "c", write_tokenizer=False)
    assert json.loads((tmp_path / "c" / "config.json").read_text())["torch_dtype"] == "float32"
    assert_same_state(load_model(tmp_path / "c").state_dict(), model.state_dict())


def test_packed_to_bf16_and_back_keeps_bytes(tmp_path):
    packed = load_model(CFG, packed_experts=True, seed=2)
    save_model(packed, tmp_path / "bf16", format="bf16", write_tokenizer=False)
    dense = load_model(tmp_path / "bf16")
    assert dense.config.expert_format == "bf16"
    for layer in range(CFG.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            blocks, scales = packed.state_dict()[p + proj + "_blocks"], packed.state_dict()[p + proj + "_scales"]
            ref = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(1, 2)  # (E, in, out)
            assert torch.equal(dense.state_dict()[p + proj], ref)
    # Re-packing decoded MXFP4 finds the same scales and codes again.
    save_model(dense, tmp_path / "mx", format="mxfp4", write_tokenizer=False)
    assert_same_state(files_state(tmp_path / "mx"), packed.state_dict())


def test_dtype_and_packing_semantics(tmp_path):
    save_model(load_model(CFG, packed_experts=True), tmp_path / "mx", write_tokenizer=False)
    e = "model.layers.0.mlp.experts."

    m = load_model(tmp_path / "mx")  # storage kept: packed, bf16
    sd = m.state_dict()
    assert m.config.expert_format == "mxfp4" and sd[e + "gate_up_proj_blocks"].dtype == torch.uint8
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16

    m32 = load_model(tmp_path / "mx", dtype=torch.float32)  # explicit dtype decodes
    sd32 = m32.state_dict()
    assert m32.config.expert_format == "bf16"
    assert all(t.dtype == torch.float32 for t in sd32.values())
    ref = dequantize_mxfp4(sd[e + "down_proj_blocks"], sd[e + "down_proj_scales"], torch.float32).transpose(1, 2)
    assert torch.equal(sd32[e + "down_proj"], ref)

    kept = load_model(tmp_path / "mx", dtype=torch.float32, packed_experts=True)
    assert kept.config.expert_format == "mxfp4"
    assert kept.state_dict()[e + "down_proj_bias"].dtype == torch.float32
    assert torch.equal(kept.state_dict()[e + "down_proj_blocks"], sd[e + "down_proj_blocks"])

    forced = load_model(tmp_path / "mx", packed_experts=False)
    assert forced.config.expert_format == "bf16" and forced.state_dict()[e + "down_proj"].dtype == torch.bfloat16


def test_packing_a_bf16_checkpoint_at_load_matches_the_reference_quantizer(tmp_path):
    save_model(load_model(CFG), tmp_path / "bf", write_tokenizer=False)
    dense = load_model(tmp_path / "bf").state_dict()
    packed = load_model(tmp_path / "bf", packed_experts=True).state_dict()
    e = "model.layers.1.mlp.experts."
    blocks, scales = quantize_mxfp4_ref(dense[e + "gate_up_proj"].transpose(1, 2))
    assert torch.equal(packed[e + "gate_up_proj_blocks"], blocks)
    assert torch.equal(packed[e + "gate_up_proj_scales"], scales)


def test_loaded_model_runs_and_preset_is_seeded():
    a, b, c = load_model(CFG, seed=0), load_model(CFG, seed=0), load_model(CFG, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb, lc = a(ids), b(ids), c(ids)
    assert la.shape == (2, 20, CFG.vocab_size) and torch.isfinite(la).all()
    assert torch.equal(la, lb) and not torch.equal(la, lc)
    assert not any(t.is_meta for t in [*a.parameters(), *a.buffers()])
    assert not a.training


def test_named_preset_loads():
    model = load_model("tiny")
    assert model.config == preset("tiny")
    assert model.state_dict()["lm_head.weight"].shape == (201088, preset("tiny").hidden_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_quantizer_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, 128, generator=g) * torch.logspace(-30, 30, 6).view(6, 1, 1)
    w[0, 0, :32] = 0  # an all-zero block
    # Values exactly on rounding midpoints (ties go to the even code) and beyond +-6 (saturation).
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.5, 7.0, 6.5, -0.25, -0.75, -5.0, 0.1, -7.9, 8])
    w[1, :, :] = ties.repeat(8).view(1, 128) * torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 2**-20, 2**20, 1.0]).view(8, 1)
    w = w.to(dtype)
    fast_blocks, fast_scales = quantize_mxfp4(w)
    ref_blocks, ref_scales = quantize_mxfp4_ref(w)
    assert torch.equal(fast_blocks, ref_blocks) and torch.equal(fast_scales, ref_scales)


def test_pack_unpack_experts_against_reference():
    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(3))  # (E, in, out)
    blocks, scales = pack_experts(w)
    assert blocks.shape == (3, 96, 2, 16) and scales.shape == (3, 96, 2)
    ref_b, ref_s = quantize_mxfp4_ref(w.transpose(1, 2))
    assert torch.equal(blocks, ref_b) and torch.equal(scales, ref_s)
    assert torch.equal(unpack_experts(blocks, scales, torch.float32), dequantize_mxfp4(ref_b, ref_s, torch.float32).transpose(1, 2))


def test_load_streams_without_a_second_copy(tmp_path):
    """Peak RSS of a load stays near the model's size (mmap-based readers add a shard's worth)."""
    cfg = CFG.replace(vocab_size=201088, hidden_size=128, intermediate_size=128, num_local_experts=16)
    model = load_model(cfg)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_model(model, tmp_path / "c", write_tokenizer=False)
    del model
    script = textwrap.dedent(
        f"""
        import resource, torch
        from osstune.checkpoint import load_model
        import osstune.model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        m = load_model({str(tmp_path / "c")!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(after - before)  # bytes
        """
    )
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    assert nbytes > 100e6
    assert grown < 1.15 * nbytes + 20e6, (grown, nbytes)


def test_host_tensors_stay_on_the_host_and_keep_their_values(tmp_path):
    from osstune.checkpoint.errors import CheckpointError

    model = load_model(CFG, seed=4)
    save_model(model, tmp_path / "c", write_tokenizer=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(tmp_path / "c", device=device, host=["model.embed_tokens.weight"])
    table = loaded.model.embed_tokens.weight
    assert table.device.type == "cpu" and loaded.lm_head.weight.device.type == device
    assert torch.equal(table, model.model.embed_tokens.weight)
    if device == "cuda":  # the table never took GPU memory, not even during the load
        on_gpu = sum(t.numel() * t.element_size() for t in loaded.state_dict().values() if t.is_cuda)
        assert torch.cuda.max_memory_allocated() < on_gpu + table.numel() * table.element_size()
    with pytest.raises(CheckpointError, match="'model.embed_token' is not a tensor of this model"):
        load_model(tmp_path / "c", host=["model.embed_token"])
