"""The planner's choice (monotone in memory, never a configuration predicted not to fit), its recipe
(loads with `osstune train --config` and trains the tiny model), serving figures, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from osstune.cli import main
from osstune.lora import LoraConfig
from osstune.plan.hardware import GPUs, HardwareError, parse_gpus, parse_size
from osstune.plan.memory import PlanError, model_config
from osstune.plan.search import make_plan, predict
from osstune.train.config import DataConfig, TrainConfig

GIB = 2**30


def _gpus(gib: float, count: int = 1) -> GPUs:
    return GPUs(count, int(gib * GIB), "H100", 989e12)


@pytest.fixture(scope="module")
def plans_20b():
    base = TrainConfig(model="openai/gpt-oss-20b", lora=LoraConfig(targets="all"), data=DataConfig(seq_len=4096),
                       grad_accum=4)  # fmt: skip
    model = model_config(base.model)
    return {gib: make_plan(base, _gpus(gib), ("lora", "qlora"), lossy=True, model=model) for gib in range(8, 100, 8)}


def test_more_memory_never_picks_a_slower_configuration(plans_20b):
    speeds = []
    for gib, plan in sorted(plans_20b.items()):
        c = plan.chosen
        if c is None:
            speeds.append(0.0)
            continue
        assert c.fits and c.memory.needed <= plan.budget
        faster_fitting = [o for o in plan.candidates
                          if o.fits and not o.usable and o.speed.tokens_per_s > c.speed.tokens_per_s]  # fmt: skip
        assert not faster_fitting
        speeds.append(c.speed.tokens_per_s)
    assert speeds == sorted(speeds)
    assert speeds[0] == 0.0 and speeds[-1] > 0  # 8 GiB fits nothing, 96 GiB fits bf16 LoRA
    assert plans_20b[96].chosen.config.method == "lora"
    assert plans_20b[16].chosen.config.method == "qlora"


def test_lossy_options_only_when_allowed():
    base = TrainConfig(model="openai/gpt-oss-20b", lora=LoraConfig(targets="attention"))
    plan = make_plan(base, _gpus(13), ("qlora",), lossy=False)
    assert all(c.config.optim.moments == "float32" and c.config.attention_weights == "bf16" for c in plan.candidates)


def test_several_gpus_are_planned_but_marked_until_multi_gpu_training_exists():
    base = TrainConfig(model="openai/gpt-oss-120b", method="lora", lora=LoraConfig(targets="all"))
    plan = make_plan(base, _gpus(80, count=4), ("lora",))
    sharded = [c for c in plan.candidates if not c.degrees.single]
    assert {c.degrees.label() for c in sharded} == {"dp_shard=4", "tp=4", "ep=4"}
    one = next(c for c in plan.candidates if c.degrees.single and c.config == sharded[0].config)
    assert sharded[0].memory.weights == pytest.approx(one.memory.weights / 4, rel=0.01)  # dp_shard=4 first
    assert all("multi-GPU" in c.usable for c in sharded)
    assert plan.chosen is None or plan.chosen.degrees.single


def test_written_recipe_loads_and_trains_the_tiny_model(tmp_path, capsys):
    recipe = tmp_path / "planned.yaml"
    rc = main(["plan", "--model", "tiny", "--gpus", "1x2GB", "--seq", "64", "--batch", "2", "--rank", "4",
               "--write-recipe", str(recipe)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "Recommended:" in out and recipe.is_file()
    text = recipe.read_text()
    assert text.startswith("# Planned by `osstune plan`")
    planned = yaml.safe_load(text)
    assert planned["model"] == "tiny" and planned["data"]["seq_len"] == 64 and planned["lora"]["r"] == 4
    assert planned["micro_batch"] * planned["grad_accum"] == 2
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(4)))  # fmt: skip
    rc = main(["train", "--config", str(recipe), "--data", str(data), "--steps", "1", "--device", "cpu",
               "--output", str(tmp_path / "run"), "--quiet", "--set", "fast=never"])  # fmt: skip
    assert rc == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_20b_recipe_resolves_as_written(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    shipped = Path(__file__).resolve().parents[1] / "osstune" / "recipes" / "gpt-oss-20b-qlora.yaml"
    assert main(["plan", "--config", str(shipped), "--gpus", "1x16GB", "--set", "lora.r=8",
                 "--write-recipe", str(recipe)]) == 0  # fmt: skip
    written = yaml.safe_load(recipe.read_text())
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == written
    assert written["method"] == "qlora" and written["optim"]["moments"] == "int8"  # the recipe's, kept


def test_plan_prints_a_table_and_refuses_when_nothing_fits(capsys):
    rc = main(["plan", "--model", "openai/gpt-oss-120b", "--method", "lora", "--gpus", "1x24GB", "--targets", "attention"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "does not fit" in captured.out
    assert "nothing fits" in captured.err and "method qlora" in captured.err


def test_train_plan_check_refuses_before_loading(monkeypatch):
    from osstune.plan.auto import plan_training

    cfg = TrainConfig(model="openai/gpt-oss-20b", method="lora", lora=LoraConfig(targets="all"))
    with pytest.raises(PlanError, match="would run out of memory") as e:
        plan_training(cfg, _gpus(24), "check")
    assert "nothing fits" in str(e.value)  # lossless LoRA of bf16 experts never fits 24 GB
    qlora = TrainConfig(model="openai/gpt-oss-20b", method="qlora", lora=LoraConfig(targets="all"),
                        gradient_checkpointing=False, checkpoint_policy="layer")  # fmt: skip
    with pytest.raises(PlanError, match="Set gradient_checkpointing: False -> True"):
        plan_training(qlora, _gpus(24), "check")
    chosen, line = plan_training(qlora, _gpus(24), "auto")
    assert chosen.method == "qlora" and chosen.gradient_checkpointing and "predicted peak" in line
    assert predict(chosen, model_config(chosen.model), _gpus(24)).fits


def test_train_plan_without_a_gpu_is_refused_with_what_to_do(capsys):
    assert main(["train", "--model", "tiny", "--data", "unused.jsonl", "--device", "cpu", "--plan", "auto"]) == 1
    assert "osstune plan --gpus" in capsys.readouterr().err


def test_serving_plan_follows_the_engines_block_manager(capsys):
    from osstune.plan.serving import plan_serving

    model = model_config("openai/gpt-oss-20b")
    s = plan_serving(model, _gpus(80))
    # 12 full layers x (key + value) x 8 heads x 64 x 2 bytes a token; a block is a slice of the 12
    # cache tensor pairs that one full and one sliding layer share.
    assert s.kv.full_bytes_per_token == 12 * 2 * 8 * 64 * 2
    assert s.block_bytes == 16 * s.kv.full_bytes_per_token
    # One request's blocks while decoding, by hand: 8,192 / 16 full-layer blocks, and for the sliding
    # layers the 128-token window over blocks of 16 (8), plus one it may straddle.
    assert s.blocks_for(8192) == 512 + 9
    n = s.sequences_at(8192)
    assert n * s.blocks_for(8192) <= s.blocks - 1 < (n + 1) * s.blocks_for(8192)
    assert s.longest_context(1) == model.max_position_embeddings
    assert main(["plan", "--serve", "--model", "openai/gpt-oss-20b", "--gpus", "1x24GB", "--context", "4096",
                 "--concurrency", "4"]) == 0  # fmt: skip
    assert "sequences of 4,096 tokens at once" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["2xlots", "0x24GB", "24TB", "1x24GB:Z80"])
def test_bad_gpu_specs_name_the_value(text):
    with pytest.raises(HardwareError, match=text.split(":")[0][:4]):
        parse_gpus(text)


def test_sizes():
    assert parse_size("24GB") == 24 * GIB == parse_size("24GiB") == parse_size("24")
    assert parse_size("512MB") == 512 * 2**20
    assert parse_gpus("2x80GB:H100 PCIe").peak_flops == 756e12
