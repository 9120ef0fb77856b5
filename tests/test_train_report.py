"""report_to: TensorBoard event files read back with tensorboard's own reader, a W&B run written in
offline mode, and the loss plot drawn with matplotlib (or the built-in rasterizer without it)."""

from __future__ import annotations

import json
import sys

import pytest

from osstune.train.config import DataConfig, TrainConfig
from osstune.train.plot import plot_loss
from osstune.train.report import Reporter, check_reporters

RECORDS = [
    {"step": 1, "loss": 3.25, "lr": 1e-4, "grad_norm": 2.5, "tokens": 512, "tokens_per_s": 1000.0},
    {"step": 2, "loss": 2.75, "lr": 2e-4, "grad_norm": 1.5, "tokens": 1024, "tokens_per_s": 1100.0, "eval_loss": 2.875},
    {"step": 4, "loss": 2.125, "lr": 1.5e-4, "grad_norm": 0.75, "tokens": 2048, "tokens_per_s": 1200.0, "peak_gpu_gb": 1.25},
]


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_wandb(run_file):
    """{step: {key: value}} of an offline run's .wandb file: wandb's records, decoded with its own
    protobuf classes, in the LevelDB log framing wandb writes (7-byte file header, 32 KiB blocks,
    each chunk: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk, out = run_file.read_bytes(), 7, 32768, b"", {}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or kind == 0:
            pos += left
            continue
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                out[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return out


def test_tensorboard_events_hold_the_logged_values(tmp_path):
    pytest.importorskip("tensorboard")
    report = Reporter(("tensorboard",), tmp_path, {})
    for r in RECORDS:
        report.log(r["step"], r)
    report.close()
    got = read_tensorboard(tmp_path / "tensorboard")
    keys = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens": "train/tokens",
            "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss", "peak_gpu_gb": "train/peak_gpu_gb"}
    expected = {tag: [(r["step"], pytest.approx(r[k], rel=1e-6)) for r in RECORDS if k in r] for k, tag in keys.items()}
    assert got == expected


def test_training_run_reports_to_tensorboard_and_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from osstune.create import create_checkpoint
    from osstune.lora import LoraConfig
    from osstune.train import trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = create_checkpoint("tiny", tmp_path / "model", seed=0)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": w}) + "\n" for w in ("one", "two", "three")))
    cfg = TrainConfig(
        model=str(base), output=str(tmp_path / "run"), data=DataConfig(path=str(data), seq_len=64, eval_fraction=0.34),
        lora=LoraConfig(r=2, targets="attention"), steps=2, eval_every=2, gradient_checkpointing=False,
        dtype="float32", device="cpu", report_to=("tensorboard", "wandb"),
    )  # fmt: skip
    trainer.train(cfg, quiet=True)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = read_tensorboard(tmp_path / "run" / "tensorboard")
    assert events["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in history]
    assert events["eval/loss"] == [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in history if "eval_loss" in r]
    # The offline run, in wandb's own directory layout, holding every logged value.
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "run" / "wandb-run-id").read_text().strip() in runs[0].name
    logged = read_wandb(next(runs[0].glob("run-*.wandb")))
    assert sorted(logged) == [r["step"] for r in history]
    for r in history:
        assert logged[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-6)
        assert logged[r["step"]].get("eval/loss") == (pytest.approx(r["eval_loss"]) if "eval_loss" in r else None)


def test_unknown_or_missing_reporter(monkeypatch):
    with pytest.raises(ValueError, match="'mlflow' is not one of tensorboard, wandb"):
        check_reporters(("mlflow",))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'osstune\[logging\]'"):
        check_reporters(("wandb",))


def test_loss_plot_with_matplotlib_and_without(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from PIL import Image

    train, eval_ = [(1, 3.0), (2, 2.5), (3, 2.0)], [(2, 2.7)]
    plot_loss(tmp_path / "mpl.png", train, eval_)
    image = Image.open(tmp_path / "mpl.png")
    assert image.size == (800, 500) and "matplotlib" in image.info.get("Software", "")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plot_loss(tmp_path / "raster.png", train, eval_)
    assert Image.open(tmp_path / "raster.png").size == (640, 400)


def test_report_to_flag_and_recipe_key():
    import argparse

    from osstune.train.cli import add_commands, resolve_config
    from osstune.train.recipe import RecipeError

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "--report-to", "tensorboard,wandb"])
    assert resolve_config(args).report_to == ("tensorboard", "wandb")
    with pytest.raises(RecipeError, match=r"report_to='mlflow': must be one of 'tensorboard', 'wandb'"):
        resolve_config(parser.parse_args(["train", "--set", "report_to=[mlflow]"]))


def test_tensorboard_on_resume_drops_the_lost_tail(tmp_path):
    """A resumed run (from a checkpoint at step 2) replaces what the first one logged after it."""
    pytest.importorskip("tensorboard")
    first = Reporter(("tensorboard",), tmp_path, {})
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = Reporter(("tensorboard",), tmp_path, {}, start_step=2)
    for step in (3, 4):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert read_tensorboard(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def _report_from_rank(rank, world, root):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        report = Reporter(("tensorboard",), root / "run", {})
        report.log(1, {"loss": float(rank + 1)})
        report.close()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_only_rank_zero_reports(tmp_path):
    """Two processes in a real gloo group log different values; the events hold rank 0's alone."""
    pytest.importorskip("tensorboard")
    import torch.multiprocessing as mp

    mp.spawn(_report_from_rank, args=(2, tmp_path), nprocs=2, join=True)
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
    assert read_tensorboard(tmp_path / "run" / "tensorboard")["train/loss"] == [(1, 1.0)]
