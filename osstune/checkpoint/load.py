"""`load_model`: a GptOss from a preset, a local checkpoint or a Hugging Face repo id.

The model is built on the meta device and every tensor is read (or generated) one at a time,
converted, and assigned straight into it, so host memory stays at the model's own size plus one
tensor; with a CUDA device the weights go to the GPU one tensor at a time.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import torch
from torch import nn

from osstune.checkpoint.convert import LayoutConverter, TensorSource
from osstune.checkpoint.errors import CheckpointError
from osstune.checkpoint.hub import resolve_checkpoint
from osstune.checkpoint.layout import tensor_specs
from osstune.checkpoint.random_init import RandomSource
from osstune.checkpoint.reader import CheckpointReader, open_checkpoint
from osstune.config import PRESETS, ModelConfig


def load_model(
    path_or_preset: str | Path | ModelConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    packed_experts: bool | None = None,
    seed: int = 0,
    host: Collection[str] = (),
):
    """Load a GptOss model.

    path_or_preset: a preset name string (`tiny`, `gpt-oss-20b`, `gpt-oss-120b`) or a ModelConfig, which
      builds a random model (see `random_init`: seeded per tensor name with `seed`, identical to
      what `osstune create --preset NAME --seed SEED` writes); a local checkpoint directory; or a
      Hugging Face repo id `owner/name` (downloaded, see `resolve_checkpoint`). A bare name that is
      neither a preset nor a directory is an error that lists the presets.
    dtype: None keeps the checkpoint's storage (bf16 weights, MXFP4 experts packed); a dtype casts
      every float weight to it and decodes MXFP4 experts into the bf16 layout in that dtype.
    packed_experts: None packs experts iff the checkpoint does and dtype is None. False decodes
      packed experts; True keeps them packed, or packs bf16 ones with MXFP4 (lossy).
    device: where the weights go (default CPU); they are converted there, tensor by tensor.
    host: names of tensors that go to host memory whatever `device` says (the embedding table that
      `osstune.offload` keeps there): they never take GPU memory, not even during the load.
      Expert tensors cannot be among them.
    """
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        path_or_preset = PRESETS[path_or_preset]
    if isinstance(path_or_preset, ModelConfig):
        return _build(RandomSource(path_or_preset, seed), path_or_preset, dtype, device, packed_experts, host)
    name = str(path_or_preset)
    if isinstance(path_or_preset, str) and "/" not in name and "\\" not in name and not Path(name).expanduser().exists():
        # gpt-oss repo ids have an owner (openai/gpt-oss-20b): a bare name is most likely a mistyped preset.
        raise CheckpointError(
            f"{name!r} is not a preset ({', '.join(PRESETS)}), a local directory, or a Hugging Face repo id "
            "of the form owner/name"
        )
    ckpt = open_checkpoint(resolve_checkpoint(path_or_preset))
    with CheckpointReader(ckpt) as source:
        return _build(source, ckpt.config, dtype, device, packed_experts, host)


@torch.no_grad()
def _build(source: TensorSource, cfg: ModelConfig, dtype, device, packed_experts: bool | None, host: Collection[str]):
    from osstune.model import GptOss, Rotary

    device = torch.device(device or "cpu")
    if packed_experts is None:
        packed_experts = source.expert_format == "mxfp4" and dtype is None
    cfg = cfg.replace(expert_format="mxfp4" if packed_experts else "bf16")
    with torch.device("meta"):
        model = GptOss(cfg)
    names = list(tensor_specs(cfg))
    assert set(names) == set(model.state_dict()), "checkpoint layout and GptOss state dict disagree"
    unknown = sorted(set(host) - set(names))
    if unknown:
        raise CheckpointError(f"load_model(host=...): {unknown[0]!r} is not a tensor of this model; names look like "
                              f"{names[0]!r}")
    convert = LayoutConverter(source, cfg.expert_format, dtype, device)
    try:
        for name in names:
            _assign(model, name, convert.get(name, "cpu" if name in host else None))
    except (torch.OutOfMemoryError, RuntimeError) as e:
        # The host allocator's failure is a plain RuntimeError ("DefaultCPUAllocator: not enough memory").
        if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
            raise
        raise CheckpointError(_out_of_memory(e, cfg, convert, device)) from None
    # Non-persistent buffers are not in checkpoints: recompute them on the target device.
    model.model.rotary = Rotary(cfg).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"tensors left on the meta device after loading: {leftover[:5]}"
    return model.eval()


def _out_of_memory(error: Exception, cfg: ModelConfig, convert: LayoutConverter, device: torch.device) -> str:
    """What the model needs, where, and how to need less; then the allocator's own account."""
    need = sum(math.prod(spec.shape) * convert.dtype(name).itemsize for name, spec in tensor_specs(cfg).items())
    where = "GPU" if device.type == "cuda" else "host"
    layout = "MXFP4 experts packed" if cfg.expert_format == "mxfp4" else "experts dense"
    hint = (
        "load with dtype=None to keep an MXFP4 checkpoint's experts packed (a quarter of the memory; "
        "`--method qlora` trains that way), " if cfg.expert_format != "mxfp4" else ""
    )
    return (
        f"out of {where} memory while loading the model: its weights take {need / 2**30:.1f} GiB as loaded "
        f"({cfg.num_hidden_layers} layers, {layout}). To need less, {hint}use a smaller model, or a machine "
        f"with more {where} memory.\nThe allocator said: {error}"
    )


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, leaf = name.rsplit(".", 1)
    module = model.get_submodule(owner)
    old = getattr(module, leaf)
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
    setattr(module, leaf, value)
