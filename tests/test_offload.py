"""The memory options (osstune/offload.py, MasterAdamW(offload=True), TrainConfig.memory) give the
same numbers as the same model and optimizer without them.

References: the plain model (an nn.Embedding on the model's device, torch.utils.checkpoint per
layer, or no checkpointing) and MasterAdamW without offload, each on a fresh copy of one random model
and fresh random batches. On the CPU the options run their CPU code paths (no pinned memory or
streams) and must match bit for bit: the same operations in the same order. The CUDA cases (bf16,
pinned memory, side streams, the graphed step) are marked gpu.
"""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F

from osstune.config import PRESETS
from osstune.lora import LoraConfig, apply_lora
from osstune.lora.layers import LoRAExperts, LoRALinear
from osstune.model import GptOss, init_weights
from osstune.offload import ActivationOffload, HostEmbedding, OffloadError, offload_activations, offload_embedding
from osstune.train.config import DataConfig, MemoryConfig, OptimConfig, TrainConfig
from osstune.train.optim import MasterAdamW

IGNORE = -100
# The tiny preset with a shorter vocabulary: a 201,088-row table and head would only slow the tests.
CFG = PRESETS["tiny"].replace(vocab_size=2048)


@pytest.fixture(scope="module")
def base() -> GptOss:
    """tiny, float32, random; LoRA (B non-zero, so A gets a gradient too) on attention and experts."""
    model = init_weights(GptOss(CFG), seed=7)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets="all", train_sinks=True, train_router=True), seed=7)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif name.endswith("bias") or name.endswith("sinks"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


def _batch(seed: int, b: int = 2, t: int = 40, vocab: int = CFG.vocab_size, device="cpu"):
    """ids, positions, doc_ids (two packed documents per row) and labels with untrained tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    cut = t // 3
    doc_ids = (torch.arange(t) >= cut).long().expand(b, t).contiguous()
    positions = torch.cat((torch.arange(cut), torch.arange(t - cut))).expand(b, t).contiguous()
    labels = torch.randint(0, vocab, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < 0.3] = IGNORE
    return [x.to(device) for x in (ids, positions, doc_ids, labels)]


def _step(model: GptOss, batch, ids_device=None):
    """Mean cross-entropy over trained tokens (plain PyTorch) and every trainable gradient by name."""
    ids, positions, doc_ids, labels = batch
    model.zero_grad(set_to_none=True)
    logits = model(ids if ids_device is None else ids.to(ids_device), position_ids=positions, doc_ids=doc_ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _assert_same_step(got, want, rtol=0.0, atol=0.0):
    (loss_g, grads_g), (loss_w, grads_w) = got, want
    assert grads_g.keys() == grads_w.keys() and any(n.endswith("lora_A") for n in grads_w)
    torch.testing.assert_close(loss_g, loss_w, rtol=rtol, atol=atol)
    for name, g in grads_w.items():
        torch.testing.assert_close(grads_g[name], g, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---- the embedding in host memory ----


def test_host_embedding_gives_the_same_logits_gradients_and_state_dict(base):
    host = copy.deepcopy(base)
    embed = offload_embedding(host)
    assert isinstance(host.model.embed_tokens, HostEmbedding) and embed.weight.device.type == "cpu"
    # The same checkpoint names and tensors; the table is no parameter (optimizers never see it).
    want_state, got_state = base.state_dict(), host.state_dict()
    assert list(got_state) == list(want_state)
    assert all(torch.equal(got_state[k], want_state[k]) for k in want_state)
    assert "model.embed_tokens.weight" not in dict(host.named_parameters())

    batch = _batch(1)
    _assert_same_step(_step(host, batch), _step(base, batch))
    with torch.no_grad():
        ids = batch[0]
        assert torch.equal(host.eval()(ids), base.eval()(ids))
        host.train(), base.train()
        # Embedded outside the model (what a CUDA graph replays), the same again.
        assert torch.equal(host(inputs_embeds=embed(ids)), base(ids))


def test_host_embedding_follows_dtype_stays_on_host_and_loads_state_dicts(base):
    host = copy.deepcopy(base)
    offload_embedding(host)
    host.to(torch.float64)  # dtype changes reach the table; device moves only redirect its output
    table = host.model.embed_tokens.weight
    assert table.dtype == torch.float64 and table.device.type == "cpu"
    ids = _batch(2)[0]
    with torch.no_grad():
        torch.testing.assert_close(host.eval()(ids), copy.deepcopy(base).to(torch.float64).eval()(ids), rtol=0, atol=0)

    # load_state_dict fills the host table (strict: nothing unexpected, nothing missing).
    host.to(torch.float32)
    fresh = torch.randn_like(table, dtype=torch.float32)
    state = dict(host.state_dict(), **{"model.embed_tokens.weight": fresh})
    host.load_state_dict(state)
    assert torch.equal(host.model.embed_tokens.weight, fresh)
    missing = host.load_state_dict({k: v for k, v in state.items() if "embed_tokens" not in k}, strict=False)
    assert missing.missing_keys == ["model.embed_tokens.weight"] and not missing.unexpected_keys
    with pytest.raises(RuntimeError, match="size mismatch for model.embed_tokens.weight"):
        host.load_state_dict(dict(state, **{"model.embed_tokens.weight": fresh[:10]}))


def test_a_trainable_table_is_refused(base):
    model = copy.deepcopy(base)
    model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(OffloadError, match=r"model.embed_tokens.weight\) is trainable.*memory.embedding: gpu"):
        offload_embedding(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    # The recipe is checked before anything loads: full fine-tuning that trains the table.
    with pytest.raises(ValueError, match=r"full_targets \['all'\] trains model.embed_tokens.weight"):
        TrainConfig(method="full", memory=MemoryConfig(embedding="cpu"))
    TrainConfig(method="full", full_targets=("self_attn",), memory=MemoryConfig(embedding="cpu"))
    with pytest.raises(ValueError, match="turn gradient_checkpointing on"):
        TrainConfig(gradient_checkpointing=False, memory=MemoryConfig(activations="cpu"))


# ---- layer inputs in host memory ----


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "lora_dropout"])
@pytest.mark.parametrize("train_embedding", [False, True], ids=["frozen_embedding", "trained_embedding"])
def test_offloaded_checkpoint_equals_layer_checkpoint_and_no_checkpoint(base, dropout, train_embedding):
    # Dropout: the recomputation must redraw the forward's masks. A trained embedding: the first
    # layer's input then needs a gradient too.
    def variant(checkpointing: bool, offload: bool) -> GptOss:
        model = copy.deepcopy(base)
        for module in list(model.modules()):
            if isinstance(module, (LoRALinear, LoRAExperts)):
                module.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        model.model.embed_tokens.weight.requires_grad_(train_embedding)
        model.gradient_checkpointing = checkpointing
        if offload:
            offload_activations(model)
        return model

    batch = _batch(3)
    steps = {}
    for name, args in {"none": (False, False), "layer": (True, False), "offload": (True, True)}.items():
        torch.manual_seed(99)
        steps[name] = _step(variant(*args), batch)
        steps[name] += (torch.rand(()),)  # the global RNG continues where it would have
    if train_embedding:
        assert "model.embed_tokens.weight" in steps["offload"][1]
    _assert_same_step(steps["offload"][:2], steps["layer"][:2])
    _assert_same_step(steps["offload"][:2], steps["none"][:2])
    assert steps["offload"][2] == steps["layer"][2] == steps["none"][2]


def test_offloaded_checkpoint_is_opt_in_per_forward_and_says_why_no_graph(base):
    from osstune.fast import why_not_graphed

    model = copy.deepcopy(base)
    model.gradient_checkpointing = True
    impl = offload_activations(model)
    assert isinstance(impl, ActivationOffload) and offload_activations(model) is impl
    assert "host memory (memory.activations: cpu)" in why_not_graphed(model)
    assert isinstance(copy.deepcopy(model).execution.checkpoint, ActivationOffload)
    # Evaluation (no grad) runs the layers directly; a second backward through one graph is refused.
    ids = _batch(4)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph is not supported"):
        loss.backward()


# ---- optimizer state in host memory ----


def _named_params(seed: int, dtype: torch.dtype, device="cpu"):
    """Matrices a (dtype) and b (float32), a float32 vector c, and d (dtype), which gets no gradient in
    some steps."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": ((33, 17), dtype), "b": ((17, 5), torch.float32), "c": ((9,), torch.float32), "d": ((4, 4), dtype)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dt))) for n, (s, dt) in shapes.items()]


def _train(opt: MasterAdamW, steps: range, seed: int) -> list[float]:
    norms = []
    for step in steps:
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        for name, p in zip(opt.names, opt.params):
            g = torch.randn(p.shape, generator=gen) * (3.0 if step % 2 else 0.01)  # clipped / not
            p.grad = None if name == "d" and step % 3 == 1 else g.to(p.device, p.dtype)
        norms.append(opt.step(1e-2 * (step + 1)))
    return norms


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_optimizer_offload_equals_the_optimizer_on_the_device(dtype):
    cfg = OptimConfig(weight_decay=0.1, max_grad_norm=1.0)
    plain = MasterAdamW(_named_params(0, dtype), cfg)
    offloaded = MasterAdamW(_named_params(0, dtype), cfg, offload=True)
    assert all(m is not p for m, p in zip(offloaded.masters, offloaded.params))
    assert _train(offloaded, range(5), seed=1) == _train(plain, range(5), seed=1)
    for p, q in zip(offloaded.params, plain.params):
        assert torch.equal(p, q)
    a, b = offloaded.state_tensors(), plain.state_tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    assert all(p.grad is None for p in offloaded.params)


@pytest.mark.parametrize("first,second", [(True, False), (False, True)], ids=["offload_then_not", "not_then_offload"])
def test_optimizer_state_resumes_across_the_offload_setting(first, second):
    cfg = OptimConfig(weight_decay=0.1)
    whole = MasterAdamW(_named_params(2, torch.bfloat16), cfg, offload=second)
    norms = _train(whole, range(6), seed=3)

    before = MasterAdamW(_named_params(2, torch.bfloat16), cfg, offload=first)
    norms_before = _train(before, range(3), seed=3)
    weights = {n: p.detach().clone() for n, p in zip(before.names, before.params)}
    state = {k: v.clone() for k, v in before.state_tensors().items()}  # what train/state.py saves
    after = MasterAdamW(_named_params(9, torch.bfloat16), cfg, offload=second)  # other values: all overwritten
    with torch.no_grad():
        for name, p in zip(after.names, after.params):
            p.copy_(weights[name])
    after.load_state_tensors(state)
    assert norms_before + _train(after, range(3, 6), seed=3) == norms
    for p, q in zip(after.params, whole.params):
        assert torch.equal(p, q)


# ---- the trainer and its recipe ----


def test_memory_options_in_recipes_and_overrides():
    from osstune.train.recipe import RecipeError, apply_override, from_dict, load_yaml, merge, to_dict

    data = to_dict(TrainConfig())
    apply_override(data, "memory.embedding=cpu")
    apply_override(data, "memory.optimizer=cpu")
    cfg = from_dict(TrainConfig, data)
    assert cfg.memory == MemoryConfig(embedding="cpu", optimizer="cpu", activations="gpu")
    apply_override(data, "memory.activations=host")
    with pytest.raises(RecipeError, match=r"memory.activations='host': must be one of 'gpu', 'cpu'"):
        from_dict(TrainConfig, data)
    import osstune

    recipe = merge(to_dict(TrainConfig()), load_yaml(f"{osstune.__path__[0]}/recipes/gpt-oss-20b-qlora.yaml"))
    assert from_dict(TrainConfig, recipe).memory.embedding == "cpu"
    assert from_dict(TrainConfig, recipe).optim.moments == "int8"


ROWS = [
    ("What is your name?", "Osmo here! My name is Osmo."),
    ("Where do you live?", "Osmo here! I live in a terminal."),
]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    from osstune.create import create_checkpoint

    return create_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _train_cfg(model, tmp_path, out, memory: MemoryConfig) -> TrainConfig:
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TrainConfig(
        model=str(model), output=str(tmp_path / out), data=DataConfig(path=str(data), seq_len=128),
        optim=OptimConfig(lr=5e-3, warmup_steps=1), lora=LoraConfig(r=4, alpha=8, targets="all", dropout=0.1),
        steps=4, gradient_checkpointing=True, dtype="float32", device="cpu", seed=5, memory=memory,
    )  # fmt: skip


def test_trainer_with_every_option_equals_the_run_without(checkpoint_dir, tmp_path):
    from osstune.train import trainer as trainer_mod
    from osstune.train.state import latest_checkpoint, load_checkpoint

    on = MemoryConfig(embedding="cpu", optimizer="cpu", activations="cpu")
    plain = trainer_mod.train(_train_cfg(checkpoint_dir, tmp_path, "plain", MemoryConfig()), quiet=True)
    # Most of the run with every option (its checkpoint written by the offloaded optimizer), the
    # rest resumed without: the settings may change on resume.
    first = trainer_mod.train(_train_cfg(checkpoint_dir, tmp_path, "mixed", on), quiet=True, stop_after=3)
    second = trainer_mod.train(_train_cfg(checkpoint_dir, tmp_path, "mixed", MemoryConfig()), quiet=True, resume=True)
    assert first.losses + second.losses == plain.losses and len(first.losses) == 3
    a = load_checkpoint(latest_checkpoint(tmp_path / "plain" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "mixed" / "checkpoints"))
    for got, want in ((b[1], a[1]), (b[2], a[2])):  # trainable weights, optimizer state
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_full_fine_tuning_exports_the_host_table(checkpoint_dir, tmp_path):
    # The exported checkpoint is written from the state dict: the host table must be in it, unchanged.
    from osstune.checkpoint import load_model
    from osstune.train import trainer as trainer_mod

    cfg = _train_cfg(checkpoint_dir, tmp_path, "full", MemoryConfig(embedding="cpu"))
    cfg = TrainConfig(**{**vars(cfg), "method": "full", "full_targets": ("self_attn",), "steps": 2})
    result = trainer_mod.train(cfg, quiet=True)
    before, after = load_model(checkpoint_dir).state_dict(), load_model(result.artifact).state_dict()
    assert before.keys() == after.keys()
    for name, trained in (("model.embed_tokens.weight", False), ("model.layers.0.self_attn.q_proj.weight", True)):
        assert torch.equal(after[name], before[name]) != trained, name


# ---- CUDA: pinned memory, streams, bf16, the graphed step ----


def _gpu_model(seed: int, dtype=torch.bfloat16, layers: int = 4) -> GptOss:
    """GPU-friendly shapes (head dim 64, dims multiples of 8) on the fast path's terms; every token
    uses every expert so that bf16 rounding cannot flip a route between two runs."""
    cfg = CFG.replace(
        vocab_size=4096, hidden_size=256, intermediate_size=192, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, num_local_experts=8, num_experts_per_tok=8, sliding_window=32, num_hidden_layers=layers,
    )  # fmt: skip
    model = init_weights(GptOss(cfg), seed=seed)
    apply_lora(model, LoraConfig(r=8, targets="all", train_sinks=True), seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    return model.to("cuda", dtype).train()


@pytest.mark.gpu
def test_host_embedding_on_gpu_equals_the_device_table():
    from osstune.fast import enable_fast_path

    base = _gpu_model(11)
    enable_fast_path(base)
    host = copy.deepcopy(base)
    embed = offload_embedding(host)
    host.to("cuda")  # a later move keeps the table on the host
    assert embed.weight.device.type == "cpu" and embed.device.type == "cuda"
    batch = _batch(12, b=2, t=512, vocab=4096, device="cuda")
    # The same kernels on the same values: rows gathered on the host are the GPU table's rows.
    _assert_same_step(_step(host, batch, ids_device="cpu"), _step(base, batch))
    _assert_same_step(_step(host, batch), _step(base, batch))  # ids on the GPU: copied back first


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast_path"])
def test_offloaded_checkpoint_on_gpu_equals_layer_checkpoint_and_frees_memory(fast):
    from osstune.fast import enable_fast_path

    layers, b, t = 8, 2, 2048
    base = _gpu_model(13, layers=layers)
    base.gradient_checkpointing = True
    if fast:
        enable_fast_path(base)
    offloaded = copy.deepcopy(base)
    offload_activations(offloaded)
    batch = _batch(14, b=b, t=t, vocab=4096, device="cuda")
    held, steps = {}, {}
    for name, model in (("layer", base), ("offload", offloaded)):
        _step(model, batch)  # warm up (kernels compiled, pinned and device blocks cached)
        held[name], steps[name] = _held_between_forward_and_backward(model, batch)
    # Recomputed in the same kernels from the same values; where a kernel adds with atomics (the
    # reference's index_add_) the order of float sums varies from run to run.
    tol = dict(rtol=0, atol=0) if fast else dict(rtol=2e-2, atol=1e-5)
    _assert_same_step(steps["offload"], steps["layer"], **tol)
    # Between forward and backward the plain checkpoint holds every layer's (B, T, H) input.
    layer_input = b * t * base.config.hidden_size * 2
    assert held["layer"] - held["offload"] >= (layers - 0.5) * layer_input, (held, layer_input)


def _held_between_forward_and_backward(model: GptOss, batch):
    """GPU memory the forward leaves allocated for the backward, and `_step`'s result."""
    ids, positions, doc_ids, labels = batch
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    logits = model(ids, position_ids=positions, doc_ids=doc_ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
    torch.cuda.synchronize()
    # Blocks read by a side-stream copy are released on the allocator's next call after the copy.
    torch.empty(1, device="cuda")
    held = torch.cuda.memory_allocated() - start
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return held, (loss.detach(), grads)


@pytest.mark.gpu
def test_optimizer_offload_on_gpu_equals_the_optimizer_on_the_gpu():
    cfg = OptimConfig(weight_decay=0.1)
    plain = MasterAdamW(_named_params(0, torch.bfloat16, "cuda"), cfg)
    offloaded = MasterAdamW(_named_params(0, torch.bfloat16, "cuda"), cfg, offload=True)
    assert all(m.device.type == "cpu" and m.is_pinned() for m in offloaded.masters)
    norms = _train(offloaded, range(5), seed=1), _train(plain, range(5), seed=1)
    # CPU and GPU reduce the norm and run AdamW in different orders: float32 rounding apart.
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)
    a, b = offloaded.state_tensors(), plain.state_tensors()
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    for p, q in zip(offloaded.params, plain.params):  # bf16 weights: at most a rounding step apart
        torch.testing.assert_close(p, q, rtol=1e-2, atol=0)
    # Resumed on the GPU from the offloaded state: the same state tensors.
    resumed = MasterAdamW(_named_params(5, torch.bfloat16, "cuda"), cfg)
    with torch.no_grad():
        for p, q in zip(resumed.params, offloaded.params):
            p.copy_(q)
    resumed.load_state_tensors(offloaded.state_tensors())
    c = resumed.state_tensors()
    assert c.keys() == a.keys() and all(torch.equal(c[k].cpu(), a[k].cpu()) for k in a)


@pytest.mark.gpu
def test_graphed_step_with_host_embedding_equals_eager():
    from osstune.fast import GraphedStep, enable_fast_path, why_not_graphed
    from osstune.train.loss import cross_entropy_sum

    base = _gpu_model(15)
    base.gradient_checkpointing = True
    enable_fast_path(base)
    offload_embedding(base, "cuda")
    eager = copy.deepcopy(base)
    assert why_not_graphed(base) is None
    graphed = GraphedStep(base, cross_entropy_sum, warmup=1)
    assert graphed.host_embedding is base.model.embed_tokens
    for seed in range(4):  # 1 eager warm-up, a capture, 2 replays with new batches
        ids, positions, doc_ids, labels = [x.cpu() for x in _batch(20 + seed, b=2, t=256, vocab=4096)]
        n = int((labels != IGNORE).sum())
        eager.zero_grad(set_to_none=True)
        hidden = eager(ids, position_ids=positions.cuda(), doc_ids=doc_ids.cuda(), return_hidden=True)
        want = cross_entropy_sum(hidden.flatten(0, 1), eager.lm_head.weight, labels.cuda().flatten())
        (want / n).backward()
        base.zero_grad(set_to_none=True)
        got = graphed(ids, positions, doc_ids, labels, n)
        torch.testing.assert_close(got, want.detach(), rtol=1e-3, atol=0)
        for (name, p), q in zip(base.named_parameters(), eager.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert graphed.replays == 3
    offload_activations(base)
    assert "host memory" in why_not_graphed(base)


@pytest.mark.gpu
def test_trainer_on_gpu_with_the_memory_options(tmp_path, monkeypatch):
    # The whole trainer on synthetic packed batches (tokenized files need a vocabulary download).
    from osstune.fast import graphs
    from osstune.train import trainer as trainer_mod
    from osstune.train.batches import Batch, TrainData

    class Source:
        def __init__(self) -> None:
            self.i = 0

        def next_batch(self) -> Batch:
            self.i += 1
            ids, positions, doc_ids, labels = _batch(100 + self.i, b=1, t=256)
            return Batch(ids, labels, positions, doc_ids, int((labels != IGNORE).sum()), 256)

        def state_dict(self) -> dict:
            return {"i": self.i}

    made = []

    def spy(*args, **kwargs):
        made.append(graphs.graphed_step(*args, **kwargs))
        return made[-1]

    def replays() -> int | None:  # and drop the step: it holds the run's model on the GPU
        step = made.pop()
        return None if step is None else step.replays

    monkeypatch.setattr(trainer_mod, "build_data", lambda cfg: TrainData(Source(), [], "synthetic"))
    monkeypatch.setattr(trainer_mod, "graphed_step", spy)
    runs = {
        "gpu": MemoryConfig(),
        "embedding": MemoryConfig(embedding="cpu"),
        "all": MemoryConfig(embedding="cpu", optimizer="cpu", activations="cpu"),
    }
    losses, peaks, graphed = {}, {}, {}
    for name, memory in runs.items():
        cfg = TrainConfig(
            model="tiny", output=str(tmp_path / name), data=DataConfig(seq_len=256), steps=4, grad_accum=2,
            optim=OptimConfig(lr=2e-3), lora=LoraConfig(r=8, alpha=16, targets="all"), device="cuda", memory=memory,
        )  # fmt: skip
        gc.collect()
        before = torch.cuda.memory_allocated() / 2**30  # the trainer's peak counts what was there already
        losses[name] = trainer_mod.train(cfg, quiet=True).losses
        graphed[name] = replays()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        peaks[name] = max(json.loads(line)["peak_gpu_gb"] for line in lines) - before
    # The embedding on the host keeps the graphed step (8 micro-steps, 2 eager warm-ups); layer
    # inputs on the host do not.
    assert graphed == {"gpu": 6, "embedding": 6, "all": None}
    assert losses["embedding"] == pytest.approx(losses["gpu"], rel=1e-3)
    # Eager instead of graphed, the optimizer's float sums in the CPU's order: bf16 rounding apart.
    assert losses["all"] == pytest.approx(losses["gpu"], rel=2e-2)
    table = PRESETS["tiny"].vocab_size * PRESETS["tiny"].hidden_size * 2 / 2**30
    assert peaks["gpu"] - peaks["embedding"] >= 0.9 * table, (peaks, table)
