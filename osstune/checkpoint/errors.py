"""The one exception type for checkpoints a user hands us that we cannot load or write."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (or a save target) is unusable. The message names the file, the tensor and what to do."""
