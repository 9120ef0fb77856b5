"""Training options: every config dataclass refuses a value outside its choices or range at
construction, whichever way it is built (Python, YAML recipe, flags, --set); YAML duplicates are
refused; shipped recipes resolve by name; precedence is defaults < recipe < flags < --set."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from osstune.cli import main
from osstune.lora.config import LoraConfig
from osstune.train.config import DataConfig, MemoryConfig, OptimConfig, TrainConfig
from osstune.train.recipe import RECIPES, RecipeError, from_dict, load_yaml, to_dict

CONFIGS = (TrainConfig, DataConfig, OptimConfig, MemoryConfig, LoraConfig)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: TrainConfig(method="qlra"), r"method='qlra'.*did you mean 'qlora'"),
        (lambda: TrainConfig(fast="on"), r"fast='on': must be one of 'auto', 'always', 'never'"),
        (lambda: TrainConfig(fast=False), r"fast=False.*YAML reads on/off"),
        (lambda: TrainConfig(dtype="fp16"), r"dtype='fp16'"),
        (lambda: OptimConfig(schedule="cosin"), r"schedule='cosin'.*did you mean 'cosine'"),
        (lambda: OptimConfig(lr=0.0), r"lr=0.0: must be greater than 0"),
        (lambda: OptimConfig(lr=-1e-4), r"lr=-0.0001"),
        (lambda: OptimConfig(lr=float("nan")), r"NaN"),
        (lambda: OptimConfig(betas=(0.9, 1.0)), r"betas"),
        (lambda: TrainConfig(steps=10, optim=OptimConfig(warmup_steps=10)), r"warmup_steps=10 must be fewer than steps=10"),
        (lambda: TrainConfig(steps=0), r"steps=0: must be at least 1"),
        (lambda: TrainConfig(save_minutes=-1.0), r"save_minutes"),
        (lambda: TrainConfig(gradient_checkpointing="yes"), r"gradient_checkpointing='yes': must be a boolean"),
        (lambda: TrainConfig(steps=10.5), r"steps=10.5: must be an integer"),
        (lambda: DataConfig(eval_fraction=1.0), r"eval_fraction=1.0"),
        (lambda: DataConfig(overlong="cut"), r"overlong='cut'"),
        (lambda: MemoryConfig(optimizer="host"), r"optimizer='host'"),
        (lambda: LoraConfig(r=0), r"r=0: must be at least 1"),
        (lambda: LoraConfig(dropout=1.0), r"dropout=1.0: must be less than 1"),
    ],
)
def test_python_api_refuses_typos_and_out_of_range_values(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_choice_field_of_every_config_is_checked(cls):
    # Generic: a config class that stops checking its Literal fields fails here, whatever the field.
    hints = typing.get_type_hints(cls)
    literal = [f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is typing.Literal]
    for name in literal:
        with pytest.raises(ValueError, match=name):
            cls(**{name: "not-a-choice"})


def test_defaults_round_trip_through_a_recipe():
    for cls in CONFIGS:
        assert from_dict(cls, to_dict(cls())) == cls()


def test_yaml_refuses_duplicate_keys_and_unquoted_on(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("steps: 10\noptim:\n  lr: 1e-4\n  warmup_steps: 2\n  lr: 2e-4\n")
    with pytest.raises(RecipeError, match=rf"{path}:5: key 'lr' is given twice \(first on line 3\)"):
        load_yaml(path)
    path.write_text("fast: on\n")
    with pytest.raises(RecipeError, match=r"fast=True: must be one of .*quote the word"):
        from_dict(TrainConfig, load_yaml(path), where=str(path))


def test_a_bom_in_a_recipe_is_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("\ufeffsteps: 7\n".encode())
    assert load_yaml(path) == {"steps": 7}


def test_shipped_recipes_resolve_by_name_and_build():
    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert len(names) >= 5
    for name in names:
        cfg = from_dict(TrainConfig, load_yaml(name), where=name)
        assert name.split("-")[3] == cfg.method  # gpt-oss-20b-qlora(-multi-2x24gb) trains qlora, ...
        assert cfg.model.startswith("openai/gpt-oss-") and cfg.eval_every > 0


def test_a_directory_as_recipe_is_not_called_missing(tmp_path):
    with pytest.raises(RecipeError, match=r"is a directory"):
        load_yaml(tmp_path)
    with pytest.raises(RecipeError, match=r"does not exist.*gpt-oss-20b-qlora"):
        load_yaml(tmp_path / "nope.yaml")


def test_precedence_defaults_recipe_flags_set(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 50\noptim:\n  lr: 1.0e-3\ndata:\n  seq_len: 512\n  train_on: all\n")
    argv = ["train", "--config", str(recipe), "--steps", "7", "--seq-len", "256", "--set", "steps=9", "--print-config"]
    assert main(argv) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["steps"] == 9  # --set over the flag over the recipe
    assert got["data"]["seq_len"] == 256  # the flag over the recipe
    assert got["optim"]["lr"] == 1e-3 and got["data"]["train_on"] == "all"  # the recipe over the defaults
    assert got["optim"]["schedule"] == OptimConfig().schedule  # the default where nobody said otherwise


def test_set_with_a_bad_value_fails_before_anything_loads(tmp_path, capsys, monkeypatch):
    import osstune.train.trainer as trainer_mod

    monkeypatch.setattr(trainer_mod, "train", lambda *a, **k: pytest.fail("training started"))
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert main(["train", "--model", "tiny", "--data", str(data), "--set", "optim.lr=-1"]) == 1
    assert "command line: optim.lr=-1.0: must be greater than 0" in capsys.readouterr().err


def test_flags_follow_the_dataclass():
    import argparse

    from osstune.train.cli import add_commands

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    train = parser._subparsers._group_actions[0].choices["train"]
    method = next(a for a in train._actions if a.dest == "method")
    assert tuple(method.choices) == typing.get_args(typing.get_type_hints(TrainConfig)["method"])


def test_a_bad_value_in_a_recipe_is_reported_at_its_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 50\noptim:\n  schedule: cosin\n  lr: 1.0e-3\nlora:\n  r: 0\n")
    assert main(["train", "--config", str(recipe), "--print-config"]) == 1
    assert f"{recipe}:3: optim.schedule='cosin': must be one of" in capsys.readouterr().err
    # Overridden on the command line, the recipe's line is no longer the culprit: the next one is.
    assert main(["train", "--config", str(recipe), "--set", "optim.schedule=linear", "--print-config"]) == 1
    assert f"{recipe}:6: lora.r=0: must be at least 1" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "--set", "optim.schedule=cosinus", "--print-config"]) == 1
    assert f"{recipe} + command line: optim.schedule='cosinus'" in capsys.readouterr().err
