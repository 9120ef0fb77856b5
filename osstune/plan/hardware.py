"""The GPUs a plan is for: detected, or given by hand ("2x24GB", "80GB:H100"), and the memory cap
`--gpu-memory-limit` puts on this process (train and serve).

Sizes: "GB" and "GiB" both mean 2**30 bytes here, as GPU memory is labelled (an "80GB" H100 holds
79.6 GiB, a "24GB" RTX 4090 23.99 GiB); "MB"/"MiB" 2**20.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense bf16 tensor-core peak, FLOP/s, by a substring of the device name (datasheets; first match
# wins, so the more specific names come first). The speed model scales with it.
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A40", 150e12),
    ("A10", 125e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX A6000", 155e12),
    ("4090", 165e12),
    ("3090", 71e12),
)
DEFAULT_NAME = "H100"  # what a card given by size alone is assumed to compute like


class HardwareError(ValueError):
    pass


@dataclass(frozen=True)
class GPUs:
    """`count` identical GPUs; `memory`: bytes this process may use on each (after any cap)."""

    count: int
    memory: int
    name: str
    peak_flops: float
    capability: tuple[int, int] | None = None
    detected: bool = False

    def describe(self) -> str:
        cc = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        how = "detected" if self.detected else "given"
        return f"{self.count} x {self.name} ({self.memory / 2**30:.1f} GiB each{cc}; {how})"


def parse_size(text: str, what: str = "size") -> int:
    """'24GB', '24GiB', '24G', '512MB', '80' (GiB) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not m:
        raise HardwareError(f"{what} {text!r}: expected a size like 24GB, 80GiB or 512MB")
    unit = m.group(2) or "gb"
    value = float(m.group(1)) * (2**20 if unit.startswith("m") else 2**30)
    if value <= 0:
        raise HardwareError(f"{what} {text!r} must be positive")
    return int(value)


def peak_for(name: str) -> float:
    for key, peak in PEAK_BF16:
        if key.lower() in name.lower():
            return peak
    return dict(PEAK_BF16)[DEFAULT_NAME]


def parse_gpus(text: str) -> GPUs:
    """'2x24GB', '24GB', '8x80GB:H100' -> GPUs. The name after ':' picks the speed (default H100)."""
    spec, _, name = text.partition(":")
    m = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?(.+)", spec)
    if not m:
        raise HardwareError(f"--gpus {text!r}: expected auto, or COUNTxMEMORY like 2x24GB (optionally :NAME)")
    count = int(m.group(1) or 1)
    if count < 1:
        raise HardwareError(f"--gpus {text!r}: the count must be at least 1")
    memory = parse_size(m.group(2), f"--gpus {text!r}: memory")
    name = name.strip() or DEFAULT_NAME
    if name != DEFAULT_NAME and not any(k.lower() in name.lower() for k, _ in PEAK_BF16):
        known = ", ".join(k for k, _ in PEAK_BF16)
        raise HardwareError(f"--gpus {text!r}: unknown GPU name {name!r}; known: {known}")
    return GPUs(count, memory, name, peak_for(name))


def detect(limit: int | None = None) -> GPUs | None:
    """The CUDA GPUs of this machine (the first one's kind, all counted), capped at `limit` bytes;
    None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory if limit is None else min(limit, props.total_memory)
    return GPUs(
        torch.cuda.device_count(), memory, props.name, peak_for(props.name), (props.major, props.minor), detected=True
    )


def resolve_gpus(text: str, limit: int | None = None) -> GPUs:
    """--gpus auto|COUNTxMEMORY[:NAME], with --gpu-memory-limit applied."""
    if text == "auto":
        found = detect(limit)
        if found is None:
            raise HardwareError("--gpus auto: no CUDA GPU found here; give them by hand, e.g. --gpus 1x24GB or 2x80GB:H100")
        return found
    gpus = parse_gpus(text)
    if limit is not None and limit < gpus.memory:
        gpus = GPUs(gpus.count, limit, gpus.name, gpus.peak_flops, gpus.capability)
    return gpus


def limit_gpu_memory(limit: str | int, device=None) -> float:
    """Cap what this process may allocate on `device` (default: the current CUDA device) at `limit`
    ('24GB' or bytes), so that a run on a bigger GPU shows whether a smaller one would do: PyTorch's
    allocator raises out-of-memory beyond it. Returns the fraction of the card it allows.
    For `osstune train` and `osstune serve` (--gpu-memory-limit); call it before the model loads."""
    import torch

    size = parse_size(limit, "--gpu-memory-limit") if isinstance(limit, str) else int(limit)
    if not torch.cuda.is_available():
        raise HardwareError(f"--gpu-memory-limit {limit}: there is no CUDA GPU here to limit")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if size > total:
        raise HardwareError(
            f"--gpu-memory-limit {limit} ({size / 2**30:.1f} GiB) exceeds {device}'s {total / 2**30:.1f} GiB; "
            "give a smaller limit or leave it out"
        )
    fraction = size / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    _LIMITS[device.index] = size
    return fraction


# Caps set by limit_gpu_memory, by device index. `torch.cuda.mem_get_info` still reports the whole
# card, so code that sizes itself from it (the serving engine's KV cache) must read the cap here.
_LIMITS: dict[int, int] = {}


def memory_limit(device=None) -> int | None:
    """The cap limit_gpu_memory set on `device` (default: the current CUDA device), or None."""
    import torch

    index = torch.cuda.current_device() if device is None else torch.device(device).index
    return _LIMITS.get(index if index is not None else torch.cuda.current_device())
