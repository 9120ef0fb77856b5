"""Attention projections stored as MXFP4 (osstune.quant.linear): the layer, `quantize_attention`, LoRA
over it, merging, adapters, the refusal to save, and q/k/v in one buffer and one GEMM (the fast path's
`fast_qkv`, checked against the same projections called one by one).

Truth: weights decoded here from the e2m1 table and E8M0 rule of the OCP MX spec v1.0 (float64, not
through osstune's decoder), then plain `F.linear` / a dense GptOss holding those decoded weights. CPU
cases run the layer's Triton kernel under Triton's interpreter in float32 (conftest sets
TRITON_INTERPRET=1; its bf16 dot is wrong, so bf16 takes the kernel module's reference there), and
float64 through the layer's decoded fallback; GPU cases run bf16 on the kernel, the fast path and a
CUDA graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from osstune.checkpoint import CheckpointError, save_model
from osstune.config import PRESETS
from osstune.kernels import mxfp4_gemm
from osstune.kernels._backend import triton_interpreter_problem, triton_interpreting
from osstune.lora import LoraConfig, LoRALinear, apply_lora, load_adapter, lora_parameters, merge_lora, save_adapter
from osstune.model import GptOss, init_weights
from osstune.quant.linear import (
    ATTENTION_PROJECTIONS,
    QKV_PROJECTIONS,
    MXFP4Linear,
    QuantizationError,
    fuse_mxfp4_storage,
    fused_mxfp4_linear,
    packed_qkv,
    quantize_attention,
    shared_mxfp4_weight,
)

# The tiny preset with a small vocabulary: the unembedding plays no part in what is tested here.
CFG = PRESETS["tiny"].replace(vocab_size=512)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E2M1 = E2M1 + [-v for v in E2M1]
# Relative L2 error against float64 truth. float32: summation order only. bf16: inputs and decoded
# weights are exact in bf16; the output is rounded to bf16 twice (the GEMM's result, then + bias),
# each <= 2**-9 per element. float64: the decoded fallback, summation order only.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., G, 16) bytes + (..., G) scales -> (..., G * 32) float64; low nibble first."""
    table = torch.tensor(E2M1, dtype=torch.float64, device=blocks.device)
    b = blocks.long()
    codes = torch.stack((b % 16, b // 16), dim=-1).flatten(-2)  # (..., G, 32)
    return (table[codes] * torch.exp2(scales.double() - 127).unsqueeze(-1)).flatten(-2)


def _truth_weight(layer: MXFP4Linear) -> torch.Tensor:
    return _decode(layer.weight_blocks[0], layer.weight_scales[0])  # (out, in)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _model(seed: int = 0, cfg=CFG) -> GptOss:
    return init_weights(GptOss(cfg), seed=seed)


def _projections(model: GptOss) -> dict[str, nn.Module]:
    return {
        f"model.layers.{i}.self_attn.{kind}": getattr(layer.self_attn, kind)
        for i, layer in enumerate(model.model.layers)
        for kind in ATTENTION_PROJECTIONS
    }


def _decoded_reference(original: GptOss, quantized: GptOss) -> GptOss:
    """`original` with each attention weight replaced by the truth decoding of `quantized`'s blocks."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for path, lin in _projections(ref).items():
            packed = quantized.get_submodule(path)
            packed = getattr(packed, "base_layer", packed)
            lin.weight.copy_(_truth_weight(packed))
    return ref


def _randomize_b(model: GptOss, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at initialisation would leave A without a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # float32 logits summed in another order: rounding grows with the logits' size.
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "dtype, path",
    [(torch.float32, "triton"), (torch.bfloat16, "reference"), (torch.float64, "decoded")],
)
def test_forward_and_input_gradient_cpu(dtype, path):
    if path == "triton" and not triton_interpreting():
        pytest.skip("needs Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest on machines without a GPU)")
    if path == "triton" and triton_interpreter_problem():
        pytest.skip(triton_interpreter_problem())
    gen = torch.Generator().manual_seed(5)
    linear = nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.05)
        linear.bias.copy_(torch.randn(40, generator=gen))
    layer = MXFP4Linear.from_linear(linear).to(dtype)
    assert layer.weight_blocks.shape == (1, 40, 3, 16) and layer.weight_scales.shape == (1, 40, 3)
    assert layer.weight_blocks.dtype == torch.uint8 and layer.dtype == dtype
    x = torch.randn(2, 7, 96, generator=gen).to(dtype).requires_grad_(True)  # (B, T, in)
    g = torch.randn(2, 7, 40, generator=gen).to(dtype)
    if dtype != torch.float64:  # the case runs the path it names
        assert mxfp4_gemm._use_triton(x) == (path == "triton")

    y = layer(x)
    (y * g).sum().backward()

    w = _truth_weight(layer)  # (out, in)
    assert y.shape == (2, 7, 40) and y.dtype == dtype and x.grad.dtype == dtype
    assert _rel(y.detach(), F.linear(x.detach().double(), w, layer.bias.detach().double())) < TOL[dtype]
    assert _rel(x.grad, g.double() @ w) < TOL[dtype]
    assert _rel(layer.bias.grad, g.double().sum((0, 1))) < TOL[dtype]
    assert [n for n, p in layer.named_parameters() if p.grad is not None] == ["bias"]


def test_from_linear_takes_the_bias_and_packs_like_the_spec():
    linear = nn.Linear(64, 24)
    layer = MXFP4Linear.from_linear(linear)
    assert layer.bias is linear.bias and (layer.in_features, layer.out_features) == (64, 24)
    _assert_nearest_mxfp4(linear.weight.detach().double(), _truth_weight(layer))
    dense = layer.dequantized()
    assert type(dense) is nn.Linear and dense.bias is linear.bias and not dense.weight.requires_grad
    assert torch.equal(dense.weight.double(), _truth_weight(layer))
    no_bias = MXFP4Linear.from_linear(nn.Linear(32, 8, bias=False))
    assert no_bias.bias is None and no_bias(torch.randn(3, 32)).shape == (3, 8)


def _assert_nearest_mxfp4(w: torch.Tensor, q: torch.Tensor) -> None:
    """q is w on the MXFP4 grid: per block of 32, scale 2**(floor(log2 amax) - 2) (OCP MX v1.0 6.3),
    and every element the nearest scaled e2m1 value (saturating at +-6 * scale)."""
    wb, qb = w.unflatten(-1, (-1, 32)), q.unflatten(-1, (-1, 32))  # (..., G, 32)
    amax = wb.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax)) - 2), torch.ones_like(amax))
    grid = torch.tensor(E2M1, dtype=torch.float64) * scale.unsqueeze(-1)  # (..., G, 1, 16)
    best = (wb.unsqueeze(-1) - grid).abs().amin(-1)
    assert torch.all((wb - qb).abs() <= best + 1e-12 * scale)
    assert torch.all(torch.isin(qb / scale, torch.tensor(E2M1, dtype=torch.float64)))


def test_in_features_not_a_multiple_of_32_names_the_module_and_changes_nothing():
    with pytest.raises(QuantizationError, match=r"model\.layers\.3\.self_attn\.q_proj: in_features=40 .* multiple of 32"):
        MXFP4Linear.from_linear(nn.Linear(40, 8), name="model.layers.3.self_attn.q_proj")
    # o_proj's input is heads x head_dim = 4 x 12: q/k/v of layer 0 would pass, o_proj not.
    model = _model(cfg=CFG.replace(head_dim=12, num_hidden_layers=2))
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.self_attn\.o_proj: in_features=48"):
        quantize_attention(model)
    assert all(type(m) is nn.Linear for m in _projections(model).values())
    assert not getattr(model, "quantized_attention", False)


def test_weights_too_large_for_the_mxfp4_gemms_are_refused_before_anything_changes():
    model = _model(cfg=CFG.replace(num_hidden_layers=2))
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 3] = 2.0**66
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight .* below 2\*\*65"):
        quantize_attention(model)
    assert all(type(m) is nn.Linear for m in _projections(model).values())


def test_quantize_attention_replaces_every_projection_and_reports_its_error():
    model = _model(seed=1)
    original = copy.deepcopy(model)
    biases = {path: lin.bias for path, lin in _projections(model).items()}
    report = quantize_attention(model)

    projections = _projections(model)
    assert len(projections) == 4 * CFG.num_hidden_layers
    assert all(type(m) is MXFP4Linear for m in projections.values())
    assert all(m.bias is biases[p] for p, m in projections.items())
    assert model.quantized_attention is True
    assert not any(n.endswith("_proj.weight") and "self_attn" in n for n, _ in model.named_parameters())

    errors = {}
    for path, lin in _projections(original).items():
        w = lin.weight.detach().double()
        q = _truth_weight(projections[path])
        _assert_nearest_mxfp4(w, q)
        errors[path] = ((w - q).norm() / w.norm()).item()
    worst = max(errors, key=errors.get)
    assert report.projections == len(errors) and report.worst == worst
    assert report.max_error == pytest.approx(errors[worst], rel=1e-5)
    assert report.mean_error == pytest.approx(sum(errors.values()) / len(errors), rel=1e-5)
    dense = sum(lin.weight.numel() * 4 for lin in _projections(original).values())  # float32
    assert (report.dense_bytes, report.packed_bytes) == (dense, dense // 4 // 32 * 17)  # 4.25 bits a weight
    assert worst in report.summary()

    ids = torch.randint(0, CFG.vocab_size, (2, 13))
    with torch.no_grad():
        got = model(ids)
        want = _decoded_reference(original, model)(ids)
        unquantized = original(ids)
    _assert_logits_close(got, want)
    assert (got - unquantized).abs().max() > 1e-2, "quantizing changed nothing; the comparison would be void"

    with pytest.raises(QuantizationError, match="MXFP4 already"):
        quantize_attention(model)


def test_lora_over_quantized_attention_trains_like_lora_over_decoded_weights():
    original = _model(seed=2)
    model = copy.deepcopy(original)
    quantize_attention(model)
    ref = _decoded_reference(original, model)
    lora = LoraConfig(r=4, alpha=8, targets="attention", train_sinks=True)
    for m in (model, ref):
        apply_lora(m, lora, seed=3)
        _randomize_b(m, seed=4)
        m.gradient_checkpointing = True
        m.train()
    assert all(type(w) is LoRALinear and type(w.base_layer) is MXFP4Linear for w in _projections(model).values())
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    ids = torch.randint(0, CFG.vocab_size, (2, 11))
    labels = torch.randint(0, CFG.vocab_size, (2, 11))

    losses, grads = [], []
    for m in (model, ref):
        loss = F.cross_entropy(m(ids).flatten(0, 1), labels.flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    assert set(grads[0]) == set(grads[1]) and any(n.endswith("lora_A") for n in grads[0])
    for n, g in grads[1].items():
        assert grads[0][n] is not None and g.abs().sum() > 0, n
        assert _rel(grads[0][n], g) < 1e-4, n
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_quantize_after_apply_lora_packs_the_base_beneath_the_adapter():
    original = _model(seed=5)
    first = copy.deepcopy(original)
    quantize_attention(first)
    apply_lora(first, LoraConfig(r=4, targets="all"), seed=6)
    later = apply_lora(copy.deepcopy(original), LoraConfig(r=4, targets="all"), seed=6)
    report = quantize_attention(later)
    assert report.worst.endswith(".base_layer") and report.projections == 4 * CFG.num_hidden_layers
    assert all(type(w.base_layer) is MXFP4Linear for w in _projections(later).values())
    _randomize_b(first, seed=7)
    _randomize_b(later, seed=7)
    ids = torch.randint(0, CFG.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(later(ids), first(ids), rtol=0, atol=0)


def test_merge_gives_dense_decoded_plus_delta_and_keeps_the_mark():
    model = _model(seed=8)
    quantize_attention(model)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), seed=9)
    _randomize_b(model, seed=10)
    wrappers = {p: w for p, w in _projections(model).items() if isinstance(w, LoRALinear)}
    want = {
        p: _truth_weight(w.base_layer) + 2.0 * w.lora_B.double() @ w.lora_A.double() for p, w in wrappers.items()
    }
    ids = torch.randint(0, CFG.vocab_size, (2, 10))
    with torch.no_grad():
        before = model(ids)
        merge_lora(model)
        after = model(ids)
    _assert_logits_close(after, before)
    merged = _projections(model)
    for path, w in want.items():
        assert type(merged[path]) is nn.Linear
        torch.testing.assert_close(merged[path].weight.double(), w, rtol=0, atol=1e-6)
    assert all(type(m) is MXFP4Linear for p, m in merged.items() if p.endswith(("k_proj", "o_proj")))
    assert model.quantized_attention is True


def test_save_model_refuses_quantized_attention(tmp_path):
    model = _model(seed=11)
    quantize_attention(model)
    with pytest.raises(CheckpointError, match=r"MXFP4.*lossy.*adapter.*osstune export"):
        save_model(model, tmp_path / "out", write_tokenizer=False)
    apply_lora(model, LoraConfig(r=2), seed=0)
    merge_lora(model)  # dense again, but built on the decoded weights
    with pytest.raises(CheckpointError, match="quantize_attention"):
        save_model(model, tmp_path / "out", write_tokenizer=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_adapter_names_do_not_depend_on_the_base_storage(tmp_path):
    lora = LoraConfig(r=4, targets="all", train_sinks=True)
    plain = apply_lora(_model(seed=12), lora, seed=13)
    packed = _model(seed=12)
    quantize_attention(packed)
    apply_lora(packed, lora, seed=13)
    _randomize_b(packed, seed=14)
    save_adapter(plain, tmp_path / "plain")
    save_adapter(packed, tmp_path / "packed")
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(".self_attn.q_proj.lora_A.weight" in k for k in b)

    fresh = _model(seed=12)
    quantize_attention(fresh)
    load_adapter(fresh, tmp_path / "packed")
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), packed(ids), rtol=0, atol=0)


def test_dtype_follows_the_model():
    model = _model(seed=15).to(torch.bfloat16)
    quantize_attention(model)
    apply_lora(model, LoraConfig(r=2), seed=0)
    assert {p.dtype for p in lora_parameters(model)} == {torch.bfloat16}
    model.to(torch.float32)
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.dtype == torch.float32 and layer.weight_blocks.dtype == torch.uint8
    assert model(torch.randint(0, CFG.vocab_size, (1, 5))).dtype == torch.float32


# ---------------------------------------------------------------- q/k/v in one GEMM

QKV_CFG = CFG.replace(num_hidden_layers=2)


def _fuse_all(model: GptOss) -> None:
    """What enable_fast_path does for the projections, without the attention and expert kernels."""
    from osstune.fast.hooks import fast_qkv

    for layer in model.model.layers:
        fuse_mxfp4_storage(packed_qkv(layer.self_attn))
    model.set_execution(model.execution.replace(qkv=fast_qkv))


def _randomize_biases(model: GptOss, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # init_weights zeroes them: a mixed-up bias would go unseen
        for name, p in model.named_parameters():
            if ".self_attn." in name and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    return t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()


def _assert_one_buffer(model: GptOss) -> None:
    """q/k/v's blocks (and scales) are consecutive slices of one buffer holding nothing else."""
    for layer in model.model.layers:
        bases = packed_qkv(layer.self_attn)
        for name in ("weight_blocks", "weight_scales"):
            tensors = [getattr(m, name) for m in bases]
            assert len({_storage(t) for t in tensors}) == 1, name
            assert _storage(tensors[0])[1] == sum(t.numel() for t in tensors), "extra weight memory"
            offsets = [t.storage_offset() for t in tensors]
            assert offsets == [0, tensors[0].numel(), tensors[0].numel() + tensors[1].numel()]


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, targets="attention")], ids=["packed", "lora"])
def test_fusing_qkv_storage_keeps_state_dict_memory_and_adapters(lora, tmp_path):
    model = _model(seed=21, cfg=QKV_CFG)
    quantize_attention(model)
    if lora:
        apply_lora(model, lora, seed=22)
        _randomize_b(model, seed=23)
    unfused = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = [(n, b.shape, b.dtype) for n, b in model.named_buffers()]
    nbytes = sum(b.numel() * b.element_size() for _, b in model.named_buffers())
    _fuse_all(model)

    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and after[k].shape == v.shape and torch.equal(after[k], v), k
    assert [(n, b.shape, b.dtype) for n, b in model.named_buffers()] == buffers
    _assert_one_buffer(model)
    assert sum(_storage(b)[1] for b in {_storage(b): b for _, b in model.named_buffers()}.values()) == nbytes
    attn = model.model.layers[1].self_attn
    blocks, scales = shared_mxfp4_weight(packed_qkv(attn))  # views of the whole buffer, in q, k, v order
    want = [unfused.get_submodule(f"model.layers.1.self_attn.{k}") for k in QKV_PROJECTIONS]
    want = [getattr(m, "base_layer", m) for m in want]
    assert torch.equal(blocks, torch.cat([m.weight_blocks for m in want], 1))
    assert torch.equal(scales, torch.cat([m.weight_scales for m in want], 1))
    rows = (CFG.num_attention_heads + 2 * CFG.num_key_value_heads) * CFG.head_dim
    assert blocks.shape == (1, rows, CFG.hidden_size // 32, 16)

    # Fusing again changes nothing; loading, casting and copying the model keep the one buffer.
    ptr = _storage(blocks)
    _fuse_all(model)
    model.load_state_dict(before)
    model.to(torch.float64).to(torch.float32)
    _assert_one_buffer(model)
    assert _storage(shared_mxfp4_weight(packed_qkv(attn))[0]) == ptr
    _assert_one_buffer(copy.deepcopy(model))
    if lora:
        save_adapter(model, tmp_path / "fused")
        save_adapter(unfused, tmp_path / "unfused")
        a = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "unfused" / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_QKV_CASES = {
    "packed, trained biases": (None, True),
    "lora": (LoraConfig(r=4, alpha=8, targets="attention"), False),
    "lora, trained biases": (LoraConfig(r=4, alpha=8, targets="attention"), True),
    "lora dropout": (LoraConfig(r=4, alpha=8, targets="attention", dropout=0.25), False),
}


@pytest.mark.parametrize("case", list(_QKV_CASES))
def test_fused_qkv_equals_the_projections_one_by_one(case, monkeypatch):
    # float32 on the layer's Triton kernel (the interpreter) or its reference: the fused model does the
    # same products as the unfused one, only the input gradient sums q, k and v's parts in one GEMM.
    lora, train_biases = _QKV_CASES[case]
    model = _model(seed=24, cfg=QKV_CFG)
    _randomize_biases(model, seed=24)
    quantize_attention(model)
    if lora:
        apply_lora(model, lora, seed=25)
        _randomize_b(model, seed=26)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")) or (train_biases and ".self_attn." in name and "bias" in name))
    model.train()
    model.gradient_checkpointing = lora is not None and lora.dropout > 0  # the recomputation redraws dropout
    fused = copy.deepcopy(model)
    _fuse_all(fused)

    calls = {"fwd": 0, "dgrad": 0}

    def counted(real, kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)

        return call

    for fn, kind in (("mxfp4_grouped_mm", "fwd"), ("mxfp4_grouped_mm_t", "dgrad")):
        monkeypatch.setattr(mxfp4_gemm, fn, counted(getattr(mxfp4_gemm, fn), kind))
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(2, 11, CFG.hidden_size, generator=gen)
    g = torch.randn(2, 11, CFG.hidden_size, generator=gen)
    results = []
    for m in (model, fused):
        calls.update(fwd=0, dgrad=0)
        torch.manual_seed(28)  # the same dropout masks: the fused path draws them in the same order
        xi = x.clone().requires_grad_(True)
        out = m(inputs_embeds=xi, return_hidden=True)
        (out * g).sum().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((out.detach(), xi.grad, grads, dict(calls)))
    (out_u, dx_u, grads_u, calls_u), (out_f, dx_f, grads_f, calls_f) = results
    layers = QKV_CFG.num_hidden_layers
    recompute = 2 if model.gradient_checkpointing else 1
    # q, k, v, o one by one; fused: q/k/v and o. Each once more when checkpointing recomputes the layer.
    assert calls_u == {"fwd": 4 * layers * recompute, "dgrad": 4 * layers}
    assert calls_f == {"fwd": 2 * layers * recompute, "dgrad": 2 * layers}
    assert _rel(out_f, out_u) < 1e-6 and _rel(dx_f, dx_u) < 1e-6
    # LoRA A and B of q/k/v/o, q/k/v/o's biases
    assert set(grads_f) == set(grads_u) and len(grads_u) == 4 * layers * ((2 if lora else 0) + train_biases)
    for n, want in grads_u.items():
        assert want is not None and want.abs().sum() > 0, n
        assert _rel(grads_f[n], want) < 1e-6, n


def test_fused_qkv_falls_back_when_the_buffer_is_no_longer_shared():
    # What `.to(another device)` does to the slices: each becomes a tensor of its own.
    model = _model(seed=29, cfg=QKV_CFG)
    _randomize_biases(model, seed=29)
    quantize_attention(model)
    apply_lora(model, LoraConfig(r=4, targets="attention"), seed=30)
    _randomize_b(model, seed=31)
    ids = torch.randint(0, CFG.vocab_size, (1, 7))
    with torch.no_grad():
        want = model(ids)
        _fuse_all(model)
        k = model.model.layers[0].self_attn.k_proj.base_layer
        k.weight_blocks = k.weight_blocks.clone()
        assert shared_mxfp4_weight(packed_qkv(model.model.layers[0].self_attn)) is None
        with pytest.warns(UserWarning, match="layer 0: .* no longer share one buffer"):
            got = model(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # float64 has no kernel: the layers run one by one (their decoded fallback), without a warning.
    layers = packed_qkv(model.model.layers[1].self_attn)
    assert fused_mxfp4_linear(torch.randn(3, CFG.hidden_size, dtype=torch.float64), layers) is None


def test_only_packed_qkv_of_one_input_can_share_a_buffer():
    model = _model(seed=32, cfg=QKV_CFG)
    assert packed_qkv(model.model.layers[0].self_attn) is None  # bf16/float nn.Linear
    quantize_attention(model)
    attn = model.model.layers[0].self_attn
    assert [m is getattr(attn, k) for m, k in zip(packed_qkv(attn), QKV_PROJECTIONS)] == [True] * 3
    other = MXFP4Linear.from_linear(nn.Linear(64, 8))
    with pytest.raises(QuantizationError, match="in_features 128 .* and 64 .* cannot share one buffer"):
        fuse_mxfp4_storage([attn.q_proj, other])
    assert shared_mxfp4_weight([attn.q_proj, attn.k_proj]) is None  # nothing was moved


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True], ids=["packed", "lora"])
def test_fused_qkv_equals_the_projections_one_by_one_gpu(lora):
    # gpt-oss-20b's shapes: hidden 2880, q 64 heads x 64, k/v 8 heads x 64, 2,048 tokens, bf16 on the kernel.
    from osstune.fast.hooks import fast_qkv
    from osstune.model import Attention

    cfg = PRESETS["gpt-oss-20b"]
    gen = torch.Generator().manual_seed(33)
    attn = Attention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    attn = attn.to("cuda", torch.bfloat16)
    for kind in QKV_PROJECTIONS:
        packed = MXFP4Linear.from_linear(getattr(attn, kind))
        setattr(attn, kind, LoRALinear(packed, 8, 2.0, generator=gen) if lora else packed)
        if lora:
            with torch.no_grad():
                getattr(attn, kind).lora_B.copy_(torch.randn(getattr(attn, kind).lora_B.shape, generator=gen) * 0.02)
    x = torch.randn(1, 2048, cfg.hidden_size, generator=gen).to("cuda", torch.bfloat16)
    gs = [torch.randn(1, 2048, n, generator=gen).to("cuda", torch.bfloat16) for n in (4096, 512, 512)]
    params = [p for n, p in attn.named_parameters() if n.startswith(QKV_PROJECTIONS) and n.endswith(("lora_A", "lora_B", "bias"))]

    def run(fn):
        xi = x.clone().requires_grad_(True)
        ys = fn(xi)
        grads = torch.autograd.grad(sum((y.float() * g).sum() for y, g in zip(ys, gs)), [xi] + params)
        return [y.detach() for y in ys] + list(grads)

    unfused = run(lambda xi: [getattr(attn, k)(xi) for k in QKV_PROJECTIONS])
    fuse_mxfp4_storage(packed_qkv(attn))
    fused = run(lambda xi: fast_qkv(attn, xi))
    # Float64 truth from the decoded weights, to see both paths' bf16 rounding against it.
    bases = [getattr(attn, k) for k in QKV_PROJECTIONS]
    x64 = x.double().requires_grad_(True)
    ys = []
    for m in bases:
        base = getattr(m, "base_layer", m)
        y = F.linear(x64, _truth_weight(base), base.bias.double())
        if lora:
            y = y + m.scale * F.linear(F.linear(x64, m.lora_A.double()), m.lora_B.double())
        ys.append(y)
    truth = [y.detach() for y in ys] + list(torch.autograd.grad(sum((y * g.double()).sum() for y, g in zip(ys, gs)), [x64]))
    for i, (f, u) in enumerate(zip(fused, unfused)):
        # bf16 outputs rounded once more or less (the input gradient's three parts summed inside one
        # GEMM instead of by autograd in bf16): both within bf16 rounding of each other.
        assert _rel(f, u) < TOL[torch.bfloat16], i
    for i, t in enumerate(truth):
        assert _rel(fused[i], t) < TOL[torch.bfloat16], i


@pytest.mark.gpu
def test_forward_and_input_gradient_gpu():
    # gpt-oss-20b's q_proj: hidden 2880 -> 64 heads x 64, bf16 on the kernel.
    gen = torch.Generator().manual_seed(16)
    linear = nn.Linear(2880, 4096)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4096, 2880, generator=gen) * 0.02)
        linear.bias.copy_(torch.randn(4096, generator=gen) * 0.1)
    layer = MXFP4Linear.from_linear(linear.to("cuda", torch.bfloat16))
    x = torch.randn(2, 515, 2880, generator=gen).to("cuda", torch.bfloat16).requires_grad_(True)
    g = torch.randn(2, 515, 4096, generator=gen).to("cuda", torch.bfloat16)
    y = layer(x)
    (y * g).sum().backward()
    w = _truth_weight(layer)
    assert _rel(y.detach(), F.linear(x.detach().double(), w, layer.bias.detach().double())) < TOL[torch.bfloat16]
    assert _rel(x.grad, g.double() @ w) < TOL[torch.bfloat16]


@pytest.mark.gpu
def test_fast_path_and_cuda_graph_match_eager_gpu():
    from osstune.fast import GraphedStep, enable_fast_path, why_not_graphed
    from osstune.train.loss import IGNORE, cross_entropy_sum

    # Every token uses every expert: with top-k < E, bf16 rounding flips near-tied routes between the
    # paths and moves the loss by more than what is compared (see tests/test_fast_path.py).
    cfg = CFG.replace(vocab_size=4096, num_experts_per_tok=CFG.num_local_experts)
    model = _model(seed=17, cfg=cfg).to("cuda", torch.bfloat16)
    quantize_attention(model)
    apply_lora(model, LoraConfig(r=8, alpha=16, targets="all"), seed=18)
    _randomize_b(model, seed=19)
    model.gradient_checkpointing = True
    model.train()
    gen = torch.Generator().manual_seed(20)
    b, t = 2, 512
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    doc_ids = torch.cat([torch.zeros(b, 300, dtype=torch.long), torch.ones(b, t - 300, dtype=torch.long)], 1)
    positions = torch.cat([torch.arange(300), torch.arange(t - 300)]).expand(b, t).contiguous()
    labels = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.3] = IGNORE
    n = int((labels != IGNORE).sum())
    batch = [x.cuda() for x in (ids, positions, doc_ids, labels)]

    def step(kernel: bool | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        hidden = model(batch[0], position_ids=batch[1], doc_ids=batch[2], return_hidden=True)
        loss = cross_entropy_sum(hidden.flatten(0, 1), model.lm_head.weight, batch[3].flatten(), kernel=kernel)
        (loss / n).backward()
        return loss.detach(), {k: p.grad.double() for k, p in model.named_parameters() if p.requires_grad}

    reference_loss, reference_grads = step(kernel=False)  # the reference model and the reference loss
    summary = enable_fast_path(model)
    assert summary.attention_layers == summary.fused_qkv_layers == cfg.num_hidden_layers and not summary.reference
    step()  # compile the kernels outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # the packed projections must not read a device value
    try:
        fast_loss, fast_grads = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # bf16 on both; other attention and expert kernels, so another float32 accumulation order.
    assert fast_loss.item() == pytest.approx(reference_loss.item(), rel=2e-2)
    # The gradients too: every expert on every token (no route flips), so the paths differ by bf16
    # rounding in other places (a few 1e-3 relative per tensor), far under what a wrong term would move.
    bad = {k: round(_rel(fast_grads[k], g), 4) for k, g in reference_grads.items() if _rel(fast_grads[k], g) > 5e-2}
    assert set(fast_grads) == set(reference_grads) and not bad, bad

    assert why_not_graphed(model) is None
    model.zero_grad(set_to_none=True)
    graphed = GraphedStep(model, cross_entropy_sum, warmup=1)
    losses = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        losses.append(graphed(ids, positions, doc_ids, labels, n).item())
    assert graphed.replays == 2
    # Same kernels in the same order: equal up to the rounding of other launch configurations.
    assert losses == pytest.approx([fast_loss.item()] * 3, rel=1e-3)
    graph_grads = {k: p.grad.double() for k, p in model.named_parameters() if p.requires_grad}
    bad = {k: _rel(graph_grads[k], g) for k, g in fast_grads.items() if _rel(graph_grads[k], g) > 1e-2}
    assert not bad, bad
