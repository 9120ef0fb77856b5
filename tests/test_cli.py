"""The top-level command line: what it sets up before any command runs."""

from __future__ import annotations

import os

from osstune.cli import CUDA_ALLOC_CONF, main


def test_main_sets_the_cuda_allocator_unless_the_user_did(monkeypatch):
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert main([]) == 2  # no command: help
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == CUDA_ALLOC_CONF == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:256")
    main([])
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:256"
