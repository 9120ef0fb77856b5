"""The eval path every shipped recipe turns on: held-out rows (eval_fraction), eval loss logged at
eval_every and at the end, equal to a plain cross-entropy of the saved adapter on those rows."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from osstune.train.batches import build_data
from osstune.train.config import DataConfig, TrainConfig
from osstune.train.trainer import train

ROWS = [("Hi?", "Osmo here!"), ("Name?", "Osmo."), ("Home?", "A terminal."), ("Food?", "Tokens.")]


def test_eval_loss_is_logged_and_equals_a_plain_cross_entropy(tmp_path):
    from osstune.checkpoint import load_model
    from osstune.lora import load_adapter

    data = tmp_path / "d.jsonl"
    data.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for q, a in ROWS
    ))  # fmt: skip
    cfg = TrainConfig(model="tiny", output=str(tmp_path / "run"), data=DataConfig(path=str(data), seq_len=96, eval_fraction=0.25),
                      steps=3, eval_every=2, device="cpu", gradient_checkpointing=False, seed=1)  # fmt: skip
    result = train(cfg, quiet=True)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "eval_loss" in r] == [2, 3]  # every 2 steps and at the end
    assert logged[-1]["eval_loss"] == result.eval_loss

    split = build_data(cfg)  # the same split: it depends only on the seed
    held_out = split.eval
    assert held_out and "1 rows held out" in split.summary
    model = load_adapter(load_model("tiny", dtype=torch.float32), result.artifact).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in held_out:
            logits = model(b.input_ids, position_ids=b.position_ids, doc_ids=b.doc_ids)  # (B, T, V)
            total += F.cross_entropy(logits.flatten(0, 1).double(), b.labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((b.labels != -100).sum())
    assert abs(result.eval_loss - total / count) <= 1e-4 * abs(total / count)
