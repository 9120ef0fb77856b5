"""osstune: fine-tune, test and serve OpenAI's gpt-oss models."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def load_model(path_or_preset, *, dtype=None, device=None, **kwargs):
    """Load a GPT-OSS model from a checkpoint directory, a Hugging Face repo id or a preset name.

    See `osstune.checkpoint.load_model` for the arguments.
    """
    from osstune.checkpoint import load_model as _load

    return _load(path_or_preset, dtype=dtype, device=device, **kwargs)
