"""LoRA wrappers: the base module stays as it is (frozen), the low-rank pair sits beside it.

    y = base(x) + scale * (dropout(x) @ A) @ B

W + scale * A @ B is never formed during training: for the experts that would be a second
(E, H, 2I) tensor per layer, and over MXFP4 experts or MXFP4 attention projections
(`osstune.quant.linear.MXFP4Linear`) it would undo the packing. Merging
(`merge()`) folds the pair into the base weight once, for export.

Shape legend: N tokens, E experts, H hidden, I expert intermediate, r rank, in/out the
projection's input/output size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from osstune.config import ModelConfig
from osstune.lora.config import EXPERT_KINDS
from osstune.model import Experts, MXFP4Experts
from osstune.quant.linear import MXFP4Linear


def _init_pair(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...], fan_in: int, device: torch.device, dtype, gen
) -> tuple[nn.Parameter, nn.Parameter]:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and B = 0, as PEFT initialises lora_A/lora_B
    (kaiming_uniform_ with a=sqrt(5), i.e. nn.Linear's default): an untrained adapter is a no-op."""
    bound = fan_in**-0.5
    a = torch.empty(shape_a, dtype=torch.float32).uniform_(-bound, bound, generator=gen)
    return (
        nn.Parameter(a.to(device=device, dtype=dtype)),
        nn.Parameter(torch.zeros(shape_b, device=device, dtype=dtype)),
    )


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRALinear(nn.Module):
    """LoRA over an `nn.Linear`, or over an `MXFP4Linear` (attention stored as MXFP4 by
    `osstune.quant.linear.quantize_attention`; it stays packed). lora_A (r, in) and lora_B (out, r)
    use nn.Linear's orientation, the same as PEFT's `lora_A.weight` / `lora_B.weight`, whatever the
    base's storage."""

    def __init__(
        self,
        base: nn.Linear | MXFP4Linear,
        r: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.r, self.scale = r, scale
        self.dropout = _dropout(dropout)
        # An MXFP4Linear has no dense weight; its `dtype` is its bias's.
        packed = isinstance(base, MXFP4Linear)
        device = base.device if packed else base.weight.device
        dtype = dtype or (base.dtype if packed else base.weight.dtype)
        self.lora_A, self.lora_B = _init_pair(
            (r, base.in_features), (base.out_features, r), base.in_features, device, dtype, generator
        )

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term, x (..., in) -> scale * (dropout(x) @ A^T) @ B^T (..., out): what a fused
        base projection (osstune.fast, q/k/v in one GEMM) adds per wrapper."""
        return self.scale * F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the pair into the base weight (in float32) and return it as an `nn.Linear`.

        A dense base is updated in place and returned. An `MXFP4Linear` base is decoded first (to
        its dtype) and a new dense `nn.Linear` holding decoded W + scale * B @ A is returned (sharing
        the bias): the sum is off the MXFP4 grid, and it is built on the lossy decoded weights, not
        the checkpoint's; see `merge_lora`.
        """
        base = self.base_layer
        dense = base.dequantized() if isinstance(base, MXFP4Linear) else base
        w = dense.weight
        delta = self.scale * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
        w.copy_((w.float() + delta).to(w.dtype))
        return dense


def _expert_dims(base: Experts) -> dict[str, tuple[int, int]]:
    """(in, out) of each expert projection, read from the biases (present in both layouts)."""
    two_i, h = base.gate_up_proj_bias.shape[1], base.down_proj_bias.shape[1]
    return {"gate_up_proj": (h, two_i), "down_proj": (two_i // 2, h)}


class LoRAExperts(nn.Module):
    """Per-expert LoRA over `Experts` or `MXFP4Experts` (then the packed base stays packed).

    For each targeted projection `p` in ("gate_up_proj", "down_proj"): `{p}_lora_A` (E, in, r) and
    `{p}_lora_B` (E, r, out), so expert e computes x @ W[e] + scale * (dropout(x) @ A[e]) @ B[e],
    with W[e] in the bf16 checkpoint's (in, out) orientation.

    Deliberately not a subclass of `Experts`: code that reads `gate_up_proj` directly (a fused
    kernel, a checkpoint writer) fails loudly here instead of silently dropping the adapter.
    """

    def __init__(
        self,
        base: Experts,
        kinds: tuple[str, ...],
        r: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.num_experts, self.alpha, self.limit = base.num_experts, base.alpha, base.limit
        self.kinds = tuple(k for k in EXPERT_KINDS if k in kinds)  # model order, whatever the caller's
        self.r, self.scale = r, scale
        self.dropout = _dropout(dropout)
        like = base.gate_up_proj_bias
        dtype = dtype or like.dtype
        e = base.num_experts
        for kind, (n_in, n_out) in _expert_dims(base).items():
            if kind in self.kinds:
                a, b = _init_pair((e, n_in, r), (e, r, n_out), n_in, like.device, dtype, generator)
                self.register_parameter(f"{kind}_lora_A", a)
                self.register_parameter(f"{kind}_lora_B", b)

    def pair(self, kind: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A (E, in, r), B (E, r, out)) of `kind`, or None where it is not targeted."""
        if kind not in self.kinds:
            return None
        return getattr(self, f"{kind}_lora_A"), getattr(self, f"{kind}_lora_B")

    def _delta(self, kind: str, e: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(kind)
        return self.scale * ((self.dropout(x) @ a[e].to(x.dtype)) @ b[e].to(x.dtype))

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x (N, H) -> (N, 2I)."""
        y = self.base_layer.gate_up(e, x)
        return y + self._delta("gate_up_proj", e, x) if "gate_up_proj" in self.kinds else y

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """h (N, I) -> (N, H)."""
        y = self.base_layer.down(e, h)
        return y + self._delta("down_proj", e, h) if "down_proj" in self.kinds else y

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # The routing loop is the base class's, unchanged; it calls our gate_up/down.
        return Experts.forward(self, x, idx, weights)

    @torch.no_grad()
    def merge(self) -> Experts:
        """Return dense `Experts` with W[e] += scale * A[e] @ B[e], summed in float32.

        A packed MXFP4 base is decoded first (to its bias dtype): the merged weights no longer lie
        on the MXFP4 grid, and requantizing them is the exporter's decision, not a silent step here.
        """
        base = self.base_layer
        dense = dequantized(base) if isinstance(base, MXFP4Experts) else base
        for kind in self.kinds:
            a, b = self.pair(kind)
            w = getattr(dense, kind)
            w.copy_((w.float() + self.scale * torch.bmm(a.float(), b.float())).to(w.dtype))
        return dense


def dequantized(base: MXFP4Experts) -> Experts:
    """Dense `Experts` with `base`'s decoded weights (in the biases' dtype) and its bias parameters."""
    e = base.num_experts
    gate_up = torch.stack([base.gate_up_weight(i) for i in range(e)])  # (E, H, 2I)
    down = torch.stack([base.down_weight(i) for i in range(e)])  # (E, I, H)
    with torch.device("meta"):  # the real constructor, without allocating what is replaced below
        dense = Experts(experts_shape(base))
    dense.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
    dense.down_proj = nn.Parameter(down, requires_grad=False)
    dense.gate_up_proj_bias = base.gate_up_proj_bias
    dense.down_proj_bias = base.down_proj_bias
    return dense


def experts_shape(base: Experts) -> ModelConfig:
    """A config with `base`'s expert sizes, enough to construct another experts module like it."""
    two_i, h = base.gate_up_proj_bias.shape[1], base.down_proj_bias.shape[1]
    return ModelConfig(
        num_local_experts=base.num_experts,
        hidden_size=h,
        intermediate_size=two_i // 2,
        swiglu_alpha=base.alpha,
        swiglu_limit=base.limit,
    )
