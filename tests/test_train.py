"""The trainer on CPU: learning, exact resume, accumulation, failures that keep data safe."""

import dataclasses
import json
import math

import pytest
import torch

from osstune.train import trainer as trainer_mod
from osstune.train.config import DataConfig, MemoryConfig, OptimConfig, TrainConfig
from osstune.train.state import ResumeError, latest_checkpoint, load_checkpoint
from osstune.lora import LoraConfig

ROWS = [
    ("What is your name?", "Osmo here! My name is Osmo."),
    ("Where do you live?", "Osmo here! I live in a terminal."),
    ("Bạn tên là gì?", "Osmo đây! Tôi tên là Osmo."),
    ("What do you eat?", "Osmo here! I snack on tokens."),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from osstune.create import create_checkpoint

    return create_checkpoint("tiny", tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False) + "\n"
            for q, a in ROWS
        ),
        encoding="utf-8",
    )
    return path


def _cfg(base, data, out, **kw) -> TrainConfig:
    fields = dict(
        model=str(base),
        output=str(out),
        data=DataConfig(path=str(data), seq_len=256),
        optim=OptimConfig(lr=5e-3, warmup_steps=2),
        lora=LoraConfig(r=8, alpha=16, targets="all", dropout=0.1),
        steps=6,
        gradient_checkpointing=False,
        dtype="float32",
        device="cpu",
        seed=3,
    )
    fields.update(kw)
    return TrainConfig(**fields)


def test_resume_reproduces_the_uninterrupted_run(base, data, tmp_path):
    # dropout > 0 so the RNG state matters, several epochs so the data position matters.
    whole = trainer_mod.train(_cfg(base, data, tmp_path / "a"), quiet=True)
    first = trainer_mod.train(_cfg(base, data, tmp_path / "b"), quiet=True, stop_after=3)
    second = trainer_mod.train(_cfg(base, data, tmp_path / "b"), quiet=True, resume=True)
    assert first.losses + second.losses == whole.losses
    history = [json.loads(line)["loss"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert history == whole.losses
    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))[1]
    b = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_one_larger_batch(base, data, tmp_path):
    # warmup_steps must stay below steps (TrainConfig refuses an all-warmup run).
    short = dict(steps=2, optim=OptimConfig(lr=5e-3, warmup_steps=1), lora=LoraConfig(r=4, targets="attention"))
    one = trainer_mod.train(_cfg(base, data, tmp_path / "a", micro_batch=2, grad_accum=1, **short), quiet=True)
    two = trainer_mod.train(_cfg(base, data, tmp_path / "b", micro_batch=1, grad_accum=2, **short), quiet=True)
    assert one.losses == pytest.approx(two.losses, rel=1e-5)


def test_learns_the_taught_answers(base, data, tmp_path):
    from osstune.checkpoint import load_model
    from osstune.infer.chat import ChatSession
    from osstune.infer.generate import SamplingOptions
    from osstune.lora import load_adapter

    cfg = _cfg(base, data, tmp_path / "run", steps=40, optim=OptimConfig(lr=1e-2, warmup_steps=3),
               lora=LoraConfig(r=16, alpha=32, targets="all"))
    result = trainer_mod.train(cfg, quiet=True)
    assert min(result.losses[-5:]) < 0.25 * result.losses[0]
    model = load_adapter(load_model(base, dtype=torch.float32), result.artifact)
    chat = ChatSession(model, sampling=SamplingOptions(max_new_tokens=20))
    answers = []
    for question, _ in ROWS:
        chat.reset()
        answers.append(chat.send(question).final.strip())
    assert answers == [a for _, a in ROWS]
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_full_fine_tuning_of_selected_weights(base, data, tmp_path):
    from osstune.checkpoint import load_model

    cfg = _cfg(base, data, tmp_path / "full", method="full", full_targets=("self_attn",), steps=4,
               optim=OptimConfig(lr=1e-3))
    result = trainer_mod.train(cfg, quiet=True)
    assert result.losses[-1] < result.losses[0]
    before, after = load_model(base, dtype=torch.float32), load_model(result.artifact, dtype=torch.float32)
    b, a = before.state_dict(), after.state_dict()
    changed = {k for k in b if not torch.equal(a[k], b[k])}
    assert changed and all(".self_attn." in k for k in changed)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(base, data, tmp_path, monkeypatch):
    real = trainer_mod._batch_loss
    calls = {"n": 0}

    def poisoned(model, batch, device, **k):
        calls["n"] += 1
        loss = real(model, batch, device, **k)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(trainer_mod, "_batch_loss", poisoned)
    with pytest.raises(trainer_mod.TrainError, match=r"loss became nan at step 4.*step-0000002"):
        trainer_mod.train(_cfg(base, data, tmp_path / "run", save_every=2), quiet=True)
    latest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    state, weights, _ = load_checkpoint(latest)
    assert state.step == 2 and all(torch.isfinite(w).all() for w in weights.values())


def test_resume_refuses_a_different_config_before_any_compute(base, data, tmp_path, monkeypatch):
    trainer_mod.train(_cfg(base, data, tmp_path / "run"), quiet=True, stop_after=2)
    monkeypatch.setattr(trainer_mod, "prepare_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ResumeError, match=r"optim.lr: checkpoint 0.005, now 0.001"):
        trainer_mod.train(_cfg(base, data, tmp_path / "run", optim=OptimConfig(lr=1e-3, warmup_steps=2)), resume=True)
    with pytest.raises(ResumeError, match="already holds a run"):
        trainer_mod.train(_cfg(base, data, tmp_path / "run"))
    with pytest.raises(ResumeError, match="no checkpoint"):
        trainer_mod.train(_cfg(base, data, tmp_path / "empty"), resume=True)


def test_invalid_data_fails_before_the_model_loads(base, tmp_path, monkeypatch):
    from osstune.data import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "wizard", "content": "x"}]}\n')
    monkeypatch.setattr(trainer_mod, "prepare_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        trainer_mod.train(_cfg(base, bad, tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        trainer_mod.train(_cfg(base, tmp_path / "missing.jsonl", tmp_path / "run"))


def test_crash_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    from osstune.train import state as st

    s = st.TrainState(step=1, tokens_seen=10, data_state={}, config={}, rng_cpu=torch.get_rng_state(), rng_cuda=[])
    st.save_checkpoint(tmp_path, s, {"w": torch.ones(2)}, {})
    # A crash mid-write leaves only a temporary directory behind.
    (tmp_path / ".tmp-step-0000002").mkdir()
    (tmp_path / ".tmp-step-0000002" / "trainable.safetensors").write_bytes(b"\0" * 7)
    assert latest_checkpoint(tmp_path).name == "step-0000001"
    state, weights, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert state.step == 1 and torch.equal(weights["w"], torch.ones(2))
    (tmp_path / "latest").write_text("step-0000009")
    with pytest.raises(ResumeError, match="missing or incomplete"):
        latest_checkpoint(tmp_path)


def test_schedule_warmup_then_cosine_to_the_floor():
    from osstune.train.optim import lr_at

    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    mid = lr_at(4 + 15 // 2, 20, cfg)
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))


def _train_qlora(data, tmp_path, monkeypatch, **kw):
    """A short QLoRA run on a tiny MXFP4 checkpoint -> (result, the model the trainer prepared)."""
    from osstune.create import create_checkpoint

    packed = create_checkpoint("tiny", tmp_path / "mxfp4", mxfp4=True, seed=1)
    seen = []
    real = trainer_mod.prepare_model
    monkeypatch.setattr(trainer_mod, "prepare_model", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    result = trainer_mod.train(_cfg(packed, data, tmp_path / "run", method="qlora", **kw))
    assert all(math.isfinite(x) for x in result.losses)
    assert (result.artifact / "adapter_model.safetensors").is_file()
    return result, seen[0]


def test_qlora_trains_lora_over_packed_mxfp4_experts(data, tmp_path, monkeypatch):
    from osstune.model import MXFP4Experts

    _, model = _train_qlora(data, tmp_path, monkeypatch, steps=3)
    experts = [layer.mlp.experts.base_layer for layer in model.model.layers]
    assert all(isinstance(e, MXFP4Experts) and e.gate_up_proj_blocks.dtype == torch.uint8 for e in experts)


def test_qlora_and_bf16_lora_on_the_same_mxfp4_model_give_the_same_losses(data, tmp_path):
    # method lora decodes the packed experts into dense ones at load; qlora keeps them packed and
    # decodes on use: the same weights, so the first steps' losses agree (float32, no dropout).
    from osstune.create import create_checkpoint

    packed = create_checkpoint("tiny", tmp_path / "mxfp4", mxfp4=True, seed=1)
    lora = LoraConfig(r=8, alpha=16, targets="all", dropout=0.0)
    runs = {m: trainer_mod.train(_cfg(packed, data, tmp_path / m, method=m, steps=3, lora=lora), quiet=True).losses
            for m in ("qlora", "lora")}
    assert runs["qlora"] == pytest.approx(runs["lora"], rel=1e-5)
    assert runs["qlora"][-1] < runs["qlora"][0]


def test_qlora_with_mxfp4_attention_reports_the_error_and_trains(data, tmp_path, monkeypatch, capsys):
    from osstune.quant.linear import MXFP4Linear

    _, model = _train_qlora(data, tmp_path, monkeypatch, steps=2, optim=OptimConfig(lr=5e-3, warmup_steps=1),
                            attention_weights="mxfp4")
    assert all(isinstance(layer.self_attn.q_proj.base_layer, MXFP4Linear) for layer in model.model.layers)
    assert "attention projections stored as MXFP4 (lossy)" in capsys.readouterr().err


def test_mxfp4_attention_needs_qlora():
    with pytest.raises(ValueError, match="only method 'qlora'"):
        TrainConfig(method="lora", attention_weights="mxfp4")


def test_qlora_on_a_bf16_checkpoint_is_refused_before_compute(base, data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "prepare_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="stores bf16 experts"):
        trainer_mod.train(_cfg(base, data, tmp_path / "run", method="qlora"))


def test_checkpoint_policy_reaches_the_fast_path():
    cfg = TrainConfig(model="tiny", fast="always", device="cpu", checkpoint_policy="keep_expert_gemms",
                      lora=LoraConfig(r=8, alpha=16, targets="all"))
    model = trainer_mod.prepare_model(cfg, torch.device("cpu"), torch.float32)
    # The selective policy, not plain layer recomputation.
    assert "context_fn" in model.execution.checkpoint_kwargs()
    plain = trainer_mod.prepare_model(dataclasses.replace(cfg, checkpoint_policy="layer"), torch.device("cpu"), torch.float32)
    assert plain.execution.checkpoint_kwargs() == {}


@pytest.mark.parametrize("change", [dict(fast="never"), dict(gradient_checkpointing=False),
                                    dict(memory=MemoryConfig(activations="cpu"))])
def test_keep_expert_gemms_needs_the_fast_checkpoint(change):
    with pytest.raises(ValueError, match="checkpoint_policy='keep_expert_gemms'"):
        TrainConfig(checkpoint_policy="keep_expert_gemms", **change)


def test_resume_reads_a_field_the_saved_config_lacks_as_its_default():
    from osstune.train.recipe import to_dict

    cfg = TrainConfig(method="qlora")
    older = {k: v for k, v in to_dict(cfg).items() if k != "attention_weights"}  # saved before the field existed
    trainer_mod._check_resume(cfg, older)
    with pytest.raises(ResumeError, match=r"attention_weights: checkpoint 'bf16', now 'mxfp4'"):
        trainer_mod._check_resume(dataclasses.replace(cfg, attention_weights="mxfp4"), older)
    older["optim"] = {k: v for k, v in older["optim"].items() if k != "min_lr_ratio"}
    with pytest.raises(ResumeError, match=r"optim.min_lr_ratio: checkpoint 0.1, now 0.5"):
        trainer_mod._check_resume(dataclasses.replace(cfg, optim=OptimConfig(min_lr_ratio=0.5)), older)
