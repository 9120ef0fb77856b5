"""Parallel options that cannot work are refused before any process group or model exists."""

import pytest
import torch

from osstune.parallel import ParallelConfig, init_world
from osstune.train.config import TrainConfig
from osstune.train.recipe import RecipeError, apply_override, from_dict, to_dict


def test_mesh_shapes():
    assert ParallelConfig().mesh_shape(4) == (1, 4, 1)
    assert ParallelConfig(data="replicate").mesh_shape(4) == (4, 1, 1)
    assert ParallelConfig(ep=2).mesh_shape(4) == (1, 4, 1)
    assert ParallelConfig(tp=2).mesh_shape(4) == (1, 2, 2)


@pytest.mark.parametrize(
    "kw, world, words",
    [
        (dict(ep=3), 4, "parallel.ep=3 must divide the 4"),
        (dict(ep=2, data="replicate"), 4, "parallel.data='replicate'"),
        (dict(tp=3), 4, "parallel.tp=3 does not divide the 4 processes"),
        (dict(tp=2, ep=2), 4, "tensor and expert parallel do not combine yet"),
        (dict(tp=2, data="replicate"), 4, "composes with sharded data parallel only"),
        (dict(offload=True, data="replicate"), 2, "needs parallel.data='shard'"),
    ],
)
def test_bad_layouts_are_refused(kw, world, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**kw).mesh_shape(world)


@pytest.mark.parametrize("kw", [dict(ep=2), dict(tp=2)])
def test_expert_and_tensor_parallel_need_several_processes(monkeypatch, kw):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="--nproc N"):
        init_world(ParallelConfig(**kw), torch.device("cpu"))
    assert init_world(ParallelConfig(), torch.device("cpu")).size == 1


def test_the_parallel_section_is_part_of_the_recipe():
    data = to_dict(TrainConfig())
    apply_override(data, "parallel.ep=2")
    apply_override(data, "parallel.reshard_after_forward=false")
    cfg = from_dict(TrainConfig, data)
    assert cfg.parallel == ParallelConfig(ep=2, reshard_after_forward=False)
    apply_override(data, "parallel.data=zero3")
    with pytest.raises(RecipeError, match="parallel.data"):
        from_dict(TrainConfig, data)


def test_nproc_checks_the_layout_before_starting_processes(tmp_path, capsys):
    from osstune.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    args = ["train", "--nproc", "3", "--data", str(data), "--output", str(tmp_path / "run"), "--set", "parallel.ep=2"]
    assert main(args) == 1  # the CLI's user-error exit, before torchrun starts anything
    assert "parallel.ep=2 must divide the 3 data-parallel ranks" in capsys.readouterr().err


@pytest.mark.parametrize(
    "changes, tp, words",
    [
        (dict(num_key_value_heads=2), 4, "parallel.tp=4 must divide num_key_value_heads=2"),
        (dict(intermediate_size=130, num_key_value_heads=4, num_attention_heads=8), 4,
         "parallel.tp=4 must divide the experts' intermediate_size=130"),
        (dict(intermediate_size=96), 2, "the 3 MXFP4 blocks"),  # packed: blocks of 32 stay whole
    ],
)
def test_a_tp_the_model_cannot_split_is_refused(changes, tp, words):
    from osstune.config import PRESETS
    from osstune.parallel.tensor import check_tensor_parallel

    cfg = PRESETS["tiny"].replace(**changes)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_tensor_parallel(cfg, tp, packed_experts=True, quantized_attention=False)
    check_tensor_parallel(PRESETS["tiny"], 2, packed_experts=True, quantized_attention=False)  # 2 kv heads, 4 blocks
    with pytest.raises(ValueError, match="attention_weights='mxfp4'"):
        check_tensor_parallel(PRESETS["tiny"], 2, packed_experts=False, quantized_attention=True)


def test_nproc_checks_the_heads_before_starting_processes(tmp_path, capsys):
    from osstune.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    args = ["train", "--nproc", "4", "--model", "tiny", "--data", str(data), "--output", str(tmp_path / "run"),
            "--set", "parallel.tp=4"]  # fmt: skip
    assert main(args) == 1
    assert "parallel.tp=4 must divide num_key_value_heads=2" in capsys.readouterr().err
