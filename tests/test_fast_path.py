"""The fast training path (osstune.fast + the loss kernel) against the reference model.

The reference model is itself tested against transformers (tests/test_model.py); here the same model
with LoRA on attention and experts (sinks and router trained too, LoRA B non-zero so that every
factor gets a gradient) computes one packed training step's loss and gradients both ways. CPU: the
Triton kernels under Triton's interpreter in float32 (the interpreter's bf16 dot is wrong, see
docs/KERNELS.md), or the kernels' plain-PyTorch fallbacks where the interpreter cannot run. GPU:
bf16 and float32, and the step must not synchronise with the host.
"""

from __future__ import annotations

import copy

import pytest
import torch

from osstune.kernels._backend import triton_installed, triton_interpreter_problem

# TRITON_INTERPRET=1 on CPU: set for the whole session in conftest.py.

from osstune.config import preset
from osstune.fast import (
    FastPathOptions,
    disable_fast_path,
    enable_fast_path,
    fast_attention,
    fast_experts,
    use_fast_path,
)
from osstune.lora import LoraConfig, apply_lora
from osstune.model import REFERENCE, GptOss, KVCache, init_weights
from osstune.train.loss import IGNORE, cross_entropy_sum, cross_entropy_sum_ref

# Two layers: one sliding-window, one full (Triton's interpreter is slow).
CPU_CFG = preset("tiny").replace(vocab_size=512, num_hidden_layers=2)
# head dim 64 and grouped-query attention as gpt-oss; dims multiples of 8 so grouped_mm runs in bf16.
# Every token uses every expert: with top-k < E, rounding flips the choice between near-tied router
# logits, and in a random model a few flipped routes move every gradient (a 1e-3 relative change of
# the attention output moved them by up to 13% at top-4 of 16, 2% at 8 of 8; measured on the CPU),
# which would hide what is compared. Ragged routing: the CPU case here and tests/test_kernels_moe.py.
GPU_CFG = preset("tiny").replace(
    vocab_size=4096, hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2,
    head_dim=64, num_local_experts=8, num_experts_per_tok=8, sliding_window=32,
)


def _model(cfg, device, dtype, seed, lora=LoraConfig(targets="all", train_sinks=True, train_router=True)) -> GptOss:
    model = init_weights(GptOss(cfg), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("sinks"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    apply_lora(model, lora, seed=seed)
    with torch.no_grad():  # B = 0 at initialisation would leave A without a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.gradient_checkpointing = True
    return model.to(device=device, dtype=dtype).train()


def _packed_batch(cfg, b, lengths, t, device, gen):
    """Rows of packed documents (contiguous runs of doc ids, -1 padding at the end, positions
    restarting per document) and shifted labels with some untrained tokens."""
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    doc_ids = torch.full((b, t), -1)
    positions = torch.zeros(b, t, dtype=torch.long)
    for row in range(b):
        start = 0
        for d, n in enumerate(lengths[row]):
            doc_ids[row, start : start + n] = d
            positions[row, start : start + n] = torch.arange(n)
            start += n
    labels = torch.randint(0, cfg.vocab_size, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.3] = IGNORE
    labels[doc_ids < 0] = IGNORE
    return [x.to(device) for x in (ids, positions, doc_ids, labels)]


def _step(model, batch, loss_fn):
    """Mean loss over trained tokens and the gradients of every trainable tensor (by name)."""
    ids, positions, doc_ids, labels = batch
    model.zero_grad(set_to_none=True)
    hidden = model(ids, position_ids=positions, doc_ids=doc_ids, return_hidden=True)
    loss = loss_fn(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten()) / (labels != IGNORE).sum()
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().double(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(fast, ref, tol, truth=None, ref_factor=None, tol_for=None):
    bad = _violations(fast, ref, tol, truth, ref_factor, tol_for)
    assert not bad, f"{len(bad)} over the bound: {bad}"


def _violations(fast, ref, tol, truth=None, ref_factor=None, tol_for=None) -> dict:
    """fast vs ref within tol (relative L2 per tensor; tol_for: tolerance by name suffix). With
    `truth` (bf16 mode) each of fast's errors against truth must stay within tol or ref_factor x the
    reference's own error. Returns every violation, not only the first."""
    (loss_f, grads_f), (loss_r, grads_r) = fast, ref
    assert set(grads_f) == set(grads_r) and len(grads_f) > 0
    kinds = {n.rpartition(".")[2] for n in grads_f}
    assert {"lora_A", "lora_B", "gate_up_proj_lora_A", "down_proj_lora_B", "sinks", "weight"} <= kinds, kinds
    bad = {}
    for n, g in [("loss", loss_f)] + sorted(grads_f.items()):
        want = loss_r if n == "loss" else grads_r[n]
        limit = next((t for suffix, t in (tol_for or {}).items() if n.endswith(suffix)), tol)
        if not torch.isfinite(g).all():
            bad[n] = "not finite"
        elif truth is None:
            if _rel(g, want) > limit:
                bad[n] = round(_rel(g, want), 5)
        else:
            true = truth[0] if n == "loss" else truth[1][n]
            err_fast, err_ref = _rel(g, true), _rel(want, true)
            if err_fast > max(limit, ref_factor * err_ref):
                bad[n] = (round(err_fast, 5), round(err_ref, 5))
    return bad


@pytest.mark.parametrize("policy", ["layer", "keep_expert_gemms"])
def test_fast_path_matches_reference_cpu(policy, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU case runs on machines without a GPU")
    # Without a usable interpreter the kernels' plain-PyTorch fallbacks run: the wiring is still tested.
    if triton_installed() and triton_interpreter_problem():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(11)
    model = _model(CPU_CFG, "cpu", torch.float32, seed=3)
    batch = _packed_batch(CPU_CFG, 1, [[17, 1, 15]], 40, "cpu", gen)  # 7 padding tokens at the end
    ref = _step(model, batch, cross_entropy_sum_ref)
    summary = enable_fast_path(model, FastPathOptions(checkpoint=policy))
    assert summary.attention_layers == summary.expert_layers == CPU_CFG.num_hidden_layers and not summary.reference
    fast = _step(model, batch, cross_entropy_sum)
    # float32 on both sides (Triton's interpreter computes in numpy float32): only summation order differs.
    _compare(fast, ref, 1e-4)


def test_enable_keeps_state_dict_and_disable_restores_reference():
    model = _model(CPU_CFG, "cpu", torch.float32, seed=4).eval()
    names = list(model.state_dict())
    ids = torch.randint(0, CPU_CFG.vocab_size, (1, 9))
    ref = model(ids)
    enable_fast_path(model, FastPathOptions(checkpoint="keep_expert_gemms"))
    assert list(model.state_dict()) == names
    run = model.execution
    assert run.attention is fast_attention and run.experts is fast_experts
    assert "context_fn" in run.checkpoint_kwargs()
    disable_fast_path(model)
    assert model.execution == REFERENCE
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)


def test_generation_with_cache_on_fast_path_equals_full_forward():
    # With a KV cache the attention hook falls back to the reference masks (keys outnumber queries).
    model = _model(CPU_CFG, "cpu", torch.float32, seed=5).eval()
    enable_fast_path(model)
    ids = torch.randint(0, CPU_CFG.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(CPU_CFG.num_hidden_layers)
        steps = [model(ids[:, :7], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(7, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


def test_unsupported_experts_stay_on_reference_with_a_warning():
    # LoRA dropout (the kernels apply none).
    model = _model(CPU_CFG.replace(num_hidden_layers=2), "cpu", torch.float32, 0, LoraConfig(targets="experts", dropout=0.1))
    with pytest.warns(UserWarning, match="dropout"):
        summary = enable_fast_path(model)
    assert len(summary.reference) == 2


_QLORA_ALL = LoraConfig(targets="all", train_sinks=True, train_router=True)


@pytest.mark.parametrize("lora, policy", [(_QLORA_ALL, "layer"), (_QLORA_ALL, "keep_expert_gemms"), (None, "layer")],
                         ids=["lora", "lora_keep_expert_gemms", "no_lora"])
def test_qlora_fast_path_matches_reference_cpu(lora, policy, monkeypatch):
    """Packed MXFP4 experts (QLoRA) on the fast path (moe_experts_mxfp4) against the reference model,
    which decodes each expert's weights on use: one packed training step's loss and gradients. With
    "keep_expert_gemms" the checkpoint's recomputation skips the base MXFP4 GEMMs."""
    import osstune.kernels.mxfp4_gemm as mx

    if torch.cuda.is_available():
        pytest.skip("the CPU case runs on machines without a GPU")
    if triton_installed() and triton_interpreter_problem():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = CPU_CFG.replace(expert_format="mxfp4")
    gen = torch.Generator().manual_seed(12)
    model = _model(cfg, "cpu", torch.float32, seed=13, lora=lora or LoraConfig(targets="attention"))
    assert any(type(m).__name__ == "MXFP4Experts" for m in model.modules())
    batch = _packed_batch(cfg, 1, [[20, 13]], 36, "cpu", gen)
    ref = _step(model, batch, cross_entropy_sum_ref)
    summary = enable_fast_path(model, FastPathOptions(checkpoint=policy))
    assert summary.expert_layers == cfg.num_hidden_layers and not summary.reference
    calls = []
    forward = mx.mxfp4_grouped_mm
    monkeypatch.setattr(mx, "mxfp4_grouped_mm", lambda *a, **k: calls.append(1) or forward(*a, **k))
    fast = _step(model, batch, cross_entropy_sum)
    # Two base projections a layer in the forward, again in the recomputation unless they were kept.
    assert len(calls) == 2 * cfg.num_hidden_layers * (1 if policy == "keep_expert_gemms" else 2)
    if lora is not None:
        _compare(fast, ref, 1e-4)
    else:  # no expert adapters: compare what there is (loss, attention LoRA, expert biases are frozen)
        assert _rel(fast[0], ref[0]) < 1e-5
        assert set(fast[1]) == set(ref[1]) and all(_rel(fast[1][n], g) < 1e-4 for n, g in ref[1].items())


def test_packed_scales_beyond_the_gemms_range_are_refused_when_enabling():
    from osstune.kernels.mxfp4_gemm import MXFP4InputError

    model = _model(CPU_CFG.replace(expert_format="mxfp4"), "cpu", torch.float32, seed=3)
    model.model.layers[1].mlp.experts.base_layer.down_proj_scales[0, 0, 0] = 200
    with pytest.raises(MXFP4InputError, match=r"model\.layers\.1\.mlp\.experts\.down_proj_scales: .* 200"):
        enable_fast_path(model)


def test_experts_lora_on_one_projection_only():
    # The kernel takes both pairs: the untargeted projection gets a zero pair, the result is unchanged.
    model = _model(CPU_CFG.replace(num_hidden_layers=2), "cpu", torch.float32, 6, LoraConfig(targets=("down_proj",)))
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(10, CPU_CFG.hidden_size)
    idx = torch.stack([torch.randperm(CPU_CFG.num_local_experts)[:2] for _ in range(10)])
    weights = torch.rand(10, 2).softmax(-1)
    torch.testing.assert_close(fast_experts(experts, x, idx, weights), experts(x, idx, weights), rtol=1e-4, atol=1e-5)


def test_packed_qkv_get_the_fused_hook_and_disable_removes_it():
    # q/k/v stored as MXFP4 (quantize_attention) run as one GEMM; dense ones keep the plain projections.
    from osstune.fast.hooks import fast_qkv
    from osstune.quant.linear import packed_qkv, quantize_attention, shared_mxfp4_weight

    dense = init_weights(GptOss(CPU_CFG), seed=14)
    assert enable_fast_path(dense, FastPathOptions(attention=False, experts=False)).fused_qkv_layers == 0
    assert dense.execution.qkv is None

    model = init_weights(GptOss(CPU_CFG), seed=14)
    quantize_attention(model)
    names = list(model.state_dict())
    off = enable_fast_path(model, FastPathOptions(attention=False, experts=False, fuse_qkv=False))
    assert off.fused_qkv_layers == 0 and model.execution.qkv is None
    summary = enable_fast_path(model, FastPathOptions(attention=False, experts=False))
    assert summary.fused_qkv_layers == CPU_CFG.num_hidden_layers and list(model.state_dict()) == names
    assert model.execution.qkv is fast_qkv
    assert all(shared_mxfp4_weight(packed_qkv(layer.self_attn)) is not None for layer in model.model.layers)
    # LoRA added after enabling: the hook finds the wrappers on its next call.
    apply_lora(model, LoraConfig(r=4, targets="attention"), seed=15)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, CPU_CFG.vocab_size, (1, 9))
    with torch.no_grad():
        fast = model(ids)
        disable_fast_path(model)
        assert model.execution.qkv is None
        ref = model(ids)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fast_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_fast_path("auto", cuda) and not use_fast_path("auto", cpu)
    assert use_fast_path("always", cpu) and not use_fast_path("never", cuda)
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        use_fast_path("on", cpu)
    with pytest.raises(ValueError, match="checkpoint"):
        FastPathOptions(checkpoint="everything")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["layer", "keep_expert_gemms"])
def test_fast_path_matches_reference_gpu(policy):
    gen = torch.Generator().manual_seed(21)
    lengths = [[300, 77, 400, 120], [1000]]  # row 0 ends in 127 padding tokens
    batch = _packed_batch(GPU_CFG, 2, lengths, 1024, "cuda", gen)
    base = _model(GPU_CFG, "cpu", torch.float32, seed=8)

    # Truth: the reference path in float64 (its attention and rotary compute in float32 inside).
    truth = _step(copy.deepcopy(base).to("cuda", torch.float64), batch, cross_entropy_sum_ref)
    # bf16: both paths round activations to 8 bits; gradients through the clamped SwiGLU carry a few %
    # (a value rounded across +-7 switches its derivative; docs/KERNELS.md). The fast path must be as
    # close to float64 truth as the bf16 reference is (within 2x), or within 3%.
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    ref16 = _step(model, batch, cross_entropy_sum_ref)
    enable_fast_path(model, FastPathOptions(checkpoint=policy))
    _step(model, batch, cross_entropy_sum)  # compile and warm up outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host sync in the step raises
    try:
        fast16 = _step_no_sync(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad16 = _violations(fast16, ref16, 3e-2, truth=truth, ref_factor=2.0)

    # float32 with the reference attention: the experts' and the loss's kernels (no tf32 inside) must
    # equal the reference up to summation order.
    model = copy.deepcopy(base).to("cuda")
    ref32 = _step(model, batch, cross_entropy_sum_ref)
    enable_fast_path(model, FastPathOptions(attention=False, checkpoint=policy))
    bad32 = _violations(_step(model, batch, cross_entropy_sum), ref32, 5e-4)
    # float32, whole fast path: the attention kernel's tl.dot runs as tf32 (10-bit mantissa, ~5e-3 on
    # its outputs, see test_kernels_attention), which moves gradients by percents here; the loss must hold.
    enable_fast_path(model, FastPathOptions(checkpoint=policy))
    loss32 = _step(model, batch, cross_entropy_sum)[0]
    assert not bad16 and not bad32, f"bf16 (error vs float64, reference's): {bad16}; float32: {bad32}"
    # The losses, which no gradient cancellation amplifies, held tighter.
    assert _rel(fast16[0], truth[0]) <= max(5e-3, 2 * _rel(ref16[0], truth[0])), (fast16[0], ref16[0], truth[0])
    assert _rel(loss32, ref32[0]) < 1e-3, (loss32, ref32[0])


def _step_no_sync(model, batch):
    ids, positions, doc_ids, labels = batch
    n_trained = (labels != IGNORE).sum()  # kept on the device, like the loss
    model.zero_grad(set_to_none=True)
    hidden = model(ids, position_ids=positions, doc_ids=doc_ids, return_hidden=True)
    loss = cross_entropy_sum(hidden.flatten(0, 1), model.lm_head.weight, labels.flatten()) / n_trained
    loss.backward()
    return _collect(model, loss)


def _collect(model, loss):
    return loss.detach().double(), {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
def test_graphed_steps_equal_eager_steps():
    # Trainer-shaped loop: 3 optimizer steps x 2 accumulated micro-batches. warmup=1 puts the capture on
    # the second micro-batch of the first step, so it must take over gradients accumulated eagerly;
    # later steps check that gradients dropped by the optimizer come back zeroed, not summed on.
    from osstune.fast import GraphedStep
    from osstune.train.config import OptimConfig
    from osstune.train.optim import MasterAdamW

    gen = torch.Generator().manual_seed(31)
    base = _model(GPU_CFG, "cpu", torch.float32, seed=9)
    models = [copy.deepcopy(base).to("cuda", torch.bfloat16) for _ in range(2)]
    for m in models:
        enable_fast_path(m)
    opts = [MasterAdamW([(n, p) for n, p in m.named_parameters() if p.requires_grad], OptimConfig(lr=1e-3)) for m in models]
    graphed = GraphedStep(models[1], cross_entropy_sum, warmup=1)
    for step in range(3):
        batches = [[x.cpu() for x in _packed_batch(GPU_CFG, 2, [[200, 312], [512]], 512, "cuda", gen)] for _ in range(2)]
        n = sum(int((b[3] != IGNORE).sum()) for b in batches)
        losses = [[], []]
        for ids, positions, doc_ids, labels in batches:
            eager = models[0](ids.cuda(), position_ids=positions.cuda(), doc_ids=doc_ids.cuda(), return_hidden=True)
            loss = cross_entropy_sum(eager.flatten(0, 1), models[0].lm_head.weight, labels.cuda().flatten())
            (loss / n).backward()
            losses[0].append(loss.item())
            losses[1].append(graphed(ids, positions, doc_ids, labels, n).item())
        grads = [{k: p.grad.double() for k, p in m.named_parameters() if p.requires_grad} for m in models]
        bad = {k: _rel(grads[1][k], g) for k, g in grads[0].items() if _rel(grads[1][k], g) > 1e-2}
        # Same kernels in the same order: equal up to the rounding of different launch configurations.
        assert not bad, (step, bad)
        assert losses[1] == pytest.approx(losses[0], rel=1e-3), step
        for opt in opts:
            opt.step(1e-3)
    assert graphed.replays == 5  # calls 2..6

    # A batch of another shape runs eagerly, with the same result as the eager model.
    ids, positions, doc_ids, labels = [x.cpu() for x in _packed_batch(GPU_CFG, 1, [[100]], 100, "cuda", gen)]
    n = int((labels != IGNORE).sum())
    want = cross_entropy_sum(models[0](ids.cuda(), position_ids=positions.cuda(), doc_ids=doc_ids.cuda(),
                                       return_hidden=True).flatten(0, 1), models[0].lm_head.weight, labels.cuda().flatten())
    assert graphed(ids, positions, doc_ids, labels, n).item() == pytest.approx(want.item(), rel=1e-3)
    assert graphed.replays == 5


@pytest.mark.gpu
def test_trainer_on_gpu_uses_the_graphed_fast_path(tmp_path, monkeypatch):
    # The whole trainer (synthetic packed batches instead of tokenized files, which need a vocabulary
    # download) with fast="auto" against fast="never": the same losses within bf16 rounding.
    from osstune.fast import graphs
    from osstune.train import trainer as trainer_mod
    from osstune.train.batches import Batch, TrainData
    from osstune.train.config import DataConfig, OptimConfig, TrainConfig

    class Source:
        def __init__(self) -> None:
            self.gen, self.i = torch.Generator().manual_seed(5), 0

        def next_batch(self) -> Batch:
            self.i += 1
            cfg = preset("tiny")
            ids, positions, doc_ids, labels = _packed_batch(cfg, 1, [[90, 100, 50]], 256, "cpu", self.gen)
            return Batch(ids, labels, positions, doc_ids, int((labels != IGNORE).sum()), 240)

        def state_dict(self) -> dict:
            return {"i": self.i}

        def load_state_dict(self, state: dict) -> None:
            raise NotImplementedError

    made = []

    def spy(*args, **kwargs):
        made.append(graphs.graphed_step(*args, **kwargs))
        return made[-1]

    # fast="never" is the reference everywhere, the loss included: the loss kernel never runs.
    from osstune.train import loss as loss_mod

    kernel_calls = {"auto": 0, "never": 0}
    real_kernel, running = loss_mod.chunked_cross_entropy_sum, {}

    def counted(*args, **kwargs):
        kernel_calls[running["fast"]] += 1
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "chunked_cross_entropy_sum", counted)
    monkeypatch.setattr(trainer_mod, "build_data", lambda cfg: TrainData(Source(), [], "synthetic"))
    monkeypatch.setattr(trainer_mod, "graphed_step", spy)
    losses = {}
    for fast in ("auto", "never"):
        running["fast"] = fast
        cfg = TrainConfig(model="tiny", output=str(tmp_path / fast), data=DataConfig(seq_len=256), steps=4, grad_accum=2,
                          optim=OptimConfig(lr=2e-3), lora=LoraConfig(r=8, alpha=16, targets="all"), fast=fast, device="cuda")
        losses[fast] = trainer_mod.train(cfg, quiet=True).losses
    assert len(made) == 1 and made[0] is not None and made[0].replays == 6  # 8 micro-steps, 2 eager warm-ups
    assert kernel_calls["never"] == 0 and kernel_calls["auto"] > 0, kernel_calls
    # bf16 on both paths, the kernels' float32 accumulations differ from the reference's order.
    assert losses["auto"] == pytest.approx(losses["never"], rel=2e-2)


@pytest.mark.gpu
def test_qlora_fast_path_matches_reference_gpu():
    # MXFP4 experts + LoRA on everything, bf16, against the reference in float64 (which decodes the same
    # packed weights exactly); the step must not sync with the host and must record as a CUDA graph.
    from osstune.fast import GraphedStep, why_not_graphed

    cfg = GPU_CFG.replace(expert_format="mxfp4")
    gen = torch.Generator().manual_seed(22)
    batch = _packed_batch(cfg, 2, [[300, 77, 400, 120], [1000]], 1024, "cuda", gen)
    base = _model(cfg, "cpu", torch.float32, seed=10)
    truth = _step(copy.deepcopy(base).to("cuda", torch.float64), batch, cross_entropy_sum_ref)
    model = copy.deepcopy(base).to("cuda", torch.bfloat16)
    ref16 = _step(model, batch, cross_entropy_sum_ref)
    summary = enable_fast_path(model)
    assert summary.expert_layers == cfg.num_hidden_layers and not summary.reference
    _step(model, batch, cross_entropy_sum)  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fast16 = _step_no_sync(model, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    bad16 = _violations(fast16, ref16, 3e-2, truth=truth, ref_factor=2.0)
    assert not bad16, f"bf16 (error vs float64, reference's): {bad16}"
    assert _rel(fast16[0], truth[0]) <= max(5e-3, 2 * _rel(ref16[0], truth[0])), (fast16[0], ref16[0], truth[0])

    assert why_not_graphed(model) is None
    graphed = GraphedStep(model, cross_entropy_sum, warmup=1)
    ids, positions, doc_ids, labels = [x.cpu() for x in batch]
    n = int((labels != IGNORE).sum())
    losses = [graphed(ids, positions, doc_ids, labels, n).item() for _ in range(3)]
    assert graphed.replays == 2
    assert losses == pytest.approx([fast16[0].item() * n] * 3, rel=1e-2)
