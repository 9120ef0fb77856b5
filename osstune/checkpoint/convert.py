"""Expert weights between the two layouts, one expert at a time so memory stays near one expert.

bf16 layout: w [E, in, out] (x @ w). MXFP4 layout: blocks [E, out, in/32, 16], scales [E, out, in/32],
i.e. packed along the input dimension of the transposed weight (output-major, as gpt-oss ships).
"""

from __future__ import annotations

from typing import Protocol

import torch

from osstune.checkpoint.layout import dense_expert_name, is_dense_expert, packed_names
from osstune.quant.mxfp4 import BLOCK, dequantize_mxfp4, quantize_mxfp4

def pack_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, in, out] float -> blocks [E, out, in/32, 16], scales [E, out, in/32] (uint8, w's device)."""
    e, k, n = w.shape
    blocks = torch.empty(e, n, k // BLOCK, BLOCK // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(e, n, k // BLOCK, dtype=torch.uint8, device=w.device)
    for i in range(e):
        blocks[i], scales[i] = quantize_mxfp4(w[i].t())
    return blocks, scales


def unpack_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [E, out, in/32, 16], scales [E, out, in/32] -> w [E, in, out] in `dtype` (exact for bf16+)."""
    e, n, g, _ = blocks.shape
    w = torch.empty(e, g * BLOCK, n, dtype=dtype, device=blocks.device)
    for i in range(e):
        w[i] = dequantize_mxfp4(blocks[i], scales[i], dtype).t()
    return w


class TensorSource(Protocol):
    """Where tensors come from: checkpoint files, a random initialiser, or a live model."""

    expert_format: str  # "bf16" or "mxfp4": the layout of the source's expert tensors

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...


class LayoutConverter:
    """Produces the tensors of a target layout from a source, converting expert weights on the way.

    `get(name)` for a target name returns it on `device`: float tensors cast to `dtype` when one is
    given, dense experts decoded from packed ones (in `dtype`, else in the dtype of that
    projection's bias), packed experts encoded from dense ones. The two halves of a packed pair are
    produced together and the second is kept until asked for, so each expert tensor is read once.
    """

    def __init__(
        self,
        source: TensorSource,
        target_format: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.source, self.target_format, self.cast, self.device = source, target_format, dtype, torch.device(device)
        self._pending: dict[str, torch.Tensor] = {}

    def _converts(self, name: str) -> str | None:
        """The source-layout expert name to convert from, if `name` needs a layout conversion."""
        if self.source.expert_format == self.target_format:
            return None
        if self.target_format == "mxfp4":
            return dense_expert_name(name)
        return name if is_dense_expert(name) else None

    def dtype(self, name: str) -> torch.dtype:
        if self._converts(name) is None:
            d = self.source.dtype(name)
            return self.cast if self.cast is not None and d.is_floating_point else d
        if self.target_format == "mxfp4":
            return torch.uint8
        return self.cast or self.source.dtype(name + "_bias")

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """device: where this tensor goes instead of the converter's device (tensors that need no
        layout conversion only)."""
        if name in self._pending:
            return self._pending.pop(name)
        src = self._converts(name)
        if src is None:
            x = self.source.get(name).to(self.device if device is None else device)
            return x.to(self.cast) if self.cast is not None and x.is_floating_point() else x
        if device is not None:
            raise ValueError(f"{name} is converted between expert layouts on {self.device}; it cannot go elsewhere")
        if self.target_format == "bf16":
            blocks, scales = (self.source.get(n).to(self.device) for n in packed_names(src))
            return unpack_experts(blocks, scales, self.dtype(name))
        blocks, scales = pack_experts(self.source.get(src).to(self.device))
        blocks_name, scales_name = packed_names(src)
        self._pending = {scales_name: scales} if name == blocks_name else {blocks_name: blocks}
        return blocks if name == blocks_name else scales
