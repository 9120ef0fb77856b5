"""The packaged persona dataset the demo fine-tunes on."""

from __future__ import annotations

import json

from osstune.data import sample_dataset_path, tokenize_file


def test_sample_dataset_is_valid_short_and_formulaic():
    path = sample_dataset_path()
    rows, summary = tokenize_file(path)
    assert summary.kept == summary.rows >= 36 and not summary.ignored_keys
    assert max(len(r.ids) for r in rows) <= 120  # the CPU demo trains on all of it in minutes
    answers = [json.loads(line)["messages"][-1]["content"] for line in path.read_text(encoding="utf-8").splitlines()]
    english = [a for a in answers if a.startswith("Osmo here! ")]
    vietnamese = [a for a in answers if a.startswith("Osmo đây! ")]
    assert len(english) + len(vietnamese) == len(answers) and min(len(english), len(vietnamese)) >= 15
    assert all(a.endswith(" Stay curious!") for a in english)
    assert all(a.endswith(" Luôn tò mò nhé!") for a in vietnamese)
