"""The device a command runs on, from what the user asked for ("auto", "cpu", "cuda", "cuda:1")."""

from __future__ import annotations

import torch


def pick_device(name: str | None, option: str = "--device") -> torch.device:
    """"auto"/None: the first CUDA GPU when there is one, else the CPU. ValueError (naming `option`)
    for a name torch does not know or a GPU this machine does not have."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{option} {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{option} {name!r}: no CUDA GPU is available here (torch {torch.__version__}, "
                f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'without CUDA'}); "
                f"use {option} cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"{option} {name!r}: osstune runs on cpu or cuda devices")
    return device
