"""The trainer's model preparation (osstune/train/prepare.py): one pipeline whose order is checked.

Every adjacent swap of two steps either stops with a PipelineOrderError naming the steps, or builds the
same model as PIPELINE's order: the same modules, tensors (bit for bit), trainable set, q/k/v buffer
sharing and execution policy. A swap that silently builds another model fails here."""

from __future__ import annotations

import pytest
import torch

from osstune.config import preset
from osstune.lora import LoraConfig
from osstune.train.config import MemoryConfig, TrainConfig
from osstune.train.prepare import PIPELINE, PipelineOrderError, Step, prepare_model

SMALL = preset("tiny").replace(vocab_size=512, num_hidden_layers=2)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from osstune.create import create_checkpoint

    out = tmp_path_factory.mktemp("small") / "mxfp4"
    return str(create_checkpoint(SMALL, out, mxfp4=True, seed=2, write_tokenizer=False))


def _configs(packed: str) -> dict[str, TrainConfig]:
    common = dict(model=packed, device="cpu", dtype="float32", fast="always", gradient_checkpointing=True)
    return {
        # Every step does something: MXFP4 attention under LoRA, the table and layer inputs in host memory.
        "qlora": TrainConfig(method="qlora", attention_weights="mxfp4", lora=LoraConfig(r=4, alpha=8, targets="all"),
                             memory=MemoryConfig(embedding="cpu", activations="cpu"), **common),
        # Full-training targets, packed frozen experts, the selective checkpoint of the fast path.
        "full": TrainConfig(method="full", full_targets=("self_attn", "router"), checkpoint_policy="keep_expert_gemms",
                            memory=MemoryConfig(embedding="cpu"), **common),
    }  # fmt: skip


def _prepare(cfg: TrainConfig, steps=PIPELINE):
    torch.manual_seed(7)  # LoRA's factors are drawn from the global generator
    return prepare_model(cfg, CPU, torch.float32, fast=True, steps=tuple(steps))


def _fingerprint(model) -> dict:
    """Everything a training step computes with."""
    from osstune.quant.linear import packed_qkv, shared_mxfp4_weight

    run = model.execution
    return {
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "state": model.state_dict(),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "fused_qkv": [shared_mxfp4_weight(packed_qkv(layer.self_attn)) is not None
                      for layer in model.model.layers] if getattr(model, "quantized_attention", False) else [],
        "checkpointing": model.gradient_checkpointing,
        # Functions by identity; objects (an ActivationOffload, a selective-checkpoint partial) by kind.
        "execution": {k: v if v is None or isinstance(v, bool) or hasattr(v, "__name__") else type(v).__name__
                      for k, v in vars(run).items()},
        "selective": "context_fn" in run.checkpoint_kwargs(),
    }  # fmt: skip


def _assert_same(a: dict, b: dict, what: str) -> None:
    for key in a:
        if key == "state":
            assert list(a["state"]) == list(b["state"]), what
            for name, t in a["state"].items():
                assert torch.equal(t, b["state"][name]), f"{what}: {name}"
        else:
            assert a[key] == b[key], f"{what}: {key}"


def _swapped(i: int, steps=PIPELINE) -> list[Step]:
    steps = list(steps)
    steps[i], steps[i + 1] = steps[i + 1], steps[i]
    return steps


@pytest.mark.parametrize("name", ["qlora", "full"])
def test_every_adjacent_swap_of_the_pipeline_stops_or_builds_the_same_model(packed, name):
    cfg = _configs(packed)[name]
    reference = _fingerprint(_prepare(cfg))
    assert reference["trainable"] and reference["execution"]["attention"] is not None
    outcomes = {}
    for i in range(len(PIPELINE) - 1):
        order = _swapped(i)
        what = " -> ".join(s.name for s in order)
        try:
            model = _prepare(cfg, order)
        except PipelineOrderError as e:
            later, earlier = order[i], order[i + 1]
            assert f"step {later.name!r} ran before" in str(e) and repr(earlier.name) in str(e), str(e)
            outcomes[what] = "refused"
            continue
        _assert_same(_fingerprint(model), reference, what)
        outcomes[what] = "same"
    # Both kinds occur: a pipeline that refused every swap would test nothing about the free ones.
    assert set(outcomes.values()) == {"refused", "same"}, outcomes


def test_the_swap_check_sees_an_undeclared_dependency(packed):
    # The test above must be able to fail: without `trainable`'s `after`, freezing after choosing
    # what trains leaves nothing trainable, and the fingerprint says so.
    cfg = _configs(packed)["qlora"]
    reference = _fingerprint(_prepare(cfg))
    loose = tuple(Step(s.name, s.run) if s.name == "trainable" else s for s in PIPELINE)
    i = [s.name for s in loose].index("freeze")
    order = [*loose[:i], loose[i + 2], loose[i + 1], loose[i], *loose[i + 3 :]]  # trainable, mxfp4, freeze
    assert [s.name for s in order][1:4] == ["trainable", "mxfp4_attention", "freeze"]
    with pytest.raises(AssertionError, match=r"^loose order: trainable(\n|$)"):
        _assert_same(_fingerprint(_prepare(cfg, order)), reference, "loose order")


def test_pipeline_order_is_the_documented_one():
    # Every step's predecessors come before it in PIPELINE, and the module docstring shows that order.
    import osstune.train.prepare as prepare

    names = [s.name for s in PIPELINE]
    for i, step in enumerate(PIPELINE):
        assert set(step.after) <= set(names[:i]), step.name
        assert step.run.__doc__, f"{step.name}: a step says why it goes where it goes"
    assert " -> ".join(names) in prepare.__doc__


def test_fast_path_after_expert_parallel_is_refused():
    # Expert parallel's dispatch owns the experts: the fast path enabled after it would send tokens to
    # experts this rank does not hold. Refused, naming the order; disabling leaves the dispatch alone.
    from osstune.fast import disable_fast_path, enable_fast_path, fast_attention
    from osstune.model import GptOss, init_weights
    from osstune.parallel.experts import ExpertDispatch, ExpertShard

    model = init_weights(GptOss(SMALL), seed=0)
    dispatch = ExpertDispatch(ExpertShard(rank=0, size=1, num_experts=SMALL.num_local_experts, group=None))
    enable_fast_path(model)
    model.set_execution(model.execution.replace(experts=dispatch))  # what osstune.parallel.apply_ep does
    disable_fast_path(model)
    assert model.execution.experts is dispatch and model.execution.attention is None
    with pytest.raises(ValueError, match="enable the fast path first, then parallelize"):
        enable_fast_path(model)
    assert model.execution.experts is dispatch
    model.set_execution(None)
    enable_fast_path(model)
    assert model.execution.attention is fast_attention
