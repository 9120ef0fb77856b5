"""Random weights for presets and `osstune create`, generated one tensor at a time.

Every tensor has its own generator, seeded from (seed, tensor name), so a weight's value does not
depend on shard layout, on which other tensors exist, or on the order they are produced.
Initialisation follows transformers' GptOss `_init_weights`:
normal(0, initializer_range) for matrices, the router bias and the sinks; zeros for the other
biases; ones for the norms. MXFP4 experts are drawn exactly like the bf16 ones and then packed, so a
packed random checkpoint is the quantization of the bf16 one with the same seed.
"""

from __future__ import annotations

import hashlib

import torch

from osstune.checkpoint.layout import TensorSpec, tensor_specs
from osstune.config import ModelConfig

DTYPE = torch.bfloat16  # what gpt-oss checkpoints store


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds must fit in a signed int64


class RandomSource:
    """A `TensorSource` of freshly initialised bf16-layout tensors (see the module docstring)."""

    expert_format = "bf16"

    def __init__(self, cfg: ModelConfig, seed: int = 0, device: torch.device | str = "cpu") -> None:
        """device: where tensors are drawn (and, for MXFP4 checkpoints, packed). A CUDA generator
        draws other values than the CPU one for the same seed; creating 20b on a GPU takes seconds."""
        self.std = cfg.initializer_range
        self.seed = seed
        self.device = torch.device(device)
        self.specs: dict[str, TensorSpec] = tensor_specs(cfg.replace(expert_format="bf16"))

    def dtype(self, name: str) -> torch.dtype:
        return DTYPE

    def get(self, name: str) -> torch.Tensor:
        spec = self.specs[name]
        if spec.init == "zeros":
            return torch.zeros(spec.shape, dtype=DTYPE, device=self.device)
        if spec.init == "ones":
            return torch.ones(spec.shape, dtype=DTYPE, device=self.device)
        gen = torch.Generator(self.device).manual_seed(tensor_seed(self.seed, name))
        return torch.empty(spec.shape, dtype=DTYPE, device=self.device).normal_(0.0, self.std, generator=gen)
