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


@torch.no_grad()
def random_model_on(cfg: ModelConfig, device: torch.device | str, seed: int = 0):
    """A GptOss of `cfg`'s shape built straight on `device` (the meta device first, no host copy)
    with random weights drawn there: seconds for gpt-oss-20b on a GPU, for benchmarks and GPU tests
    whose results do not depend on the values. bf16 matrices normal(0, initializer_range), zero
    biases except the router's, unit norms, as transformers' GptOss init; packed MXFP4 experts as
    uniformly random codes with scale bytes 118-124 (weights of about the same magnitude). Unlike
    `RandomSource` the values depend on the device's generator, not on the tensor names."""
    from osstune.model import GptOss, Rotary, init_parameters

    device = torch.device(device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = GptOss(cfg)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    init_parameters(model, lambda p: p.normal_(0.0, cfg.initializer_range, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("_blocks"):
            b.copy_(torch.randint(0, 256, b.shape, generator=gen, device=device, dtype=torch.uint8))
        elif name.endswith("_scales"):
            b.copy_(torch.randint(118, 125, b.shape, generator=gen, device=device, dtype=torch.uint8))
    model.model.rotary = Rotary(cfg).to(device)  # a non-persistent buffer: computed, not initialised
    return model
