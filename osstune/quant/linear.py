"""Frozen linear layers stored as MXFP4, and `quantize_attention`: QLoRA's 4-bit base for attention too.

gpt-oss ships its experts in MXFP4 and everything else in bf16. Classic QLoRA (arXiv:2305.14314)
stores every frozen linear in 4 bits; `quantize_attention` does that for the attention projections
q/k/v/o (1.19 GiB in bf16 for gpt-oss-20b, 0.32 GiB packed), opt-in, to fit GPUs of ~12 GB. Unlike
the experts this is lossy: the checkpoint's bf16 weights are rounded to the MXFP4 grid, so the
relative error of every projection is measured and returned, and the model is marked
(`model.quantized_attention = True`) so that `osstune.checkpoint.save_model` refuses to write it as
if it were the original. Adapters trained on it are saved as usual and merged onto the original
checkpoint with `osstune export`.

`MXFP4Linear` holds W (out, in) as the experts do with E = 1: blocks (1, out, in/32, 16) uint8,
32 e2m1 values per 16 bytes along `in`, and scales (1, out, in/32) uint8 (osstune.quant.mxfp4).
Its forward is the experts' grouped GEMM over one group (osstune.kernels.mxfp4_gemm): decoded in
registers on CUDA, one decoded copy at a time on CPU; W gets no gradient, x does. From
DENSE_DECODE_MIN_ROWS rows of bf16 on a GPU (training batches) W is instead decoded whole into a
temporary bf16 copy in one launch and multiplied by cuBLAS (osstune.kernels.mxfp4_dequant): at
those row counts that is the faster of the two, for 2 bytes a weight of one projection while it runs.

q, k and v read the same input, so the fast path computes them as one GEMM over their weights side
by side (out = 4096 + 512 + 512 for gpt-oss-20b; k and v alone, N = 512, fill few of the GEMM's
tiles). `fuse_mxfp4_storage` moves the packed weights of such layers into one buffer and makes each
layer's `weight_blocks` / `weight_scales` a slice of it: the same bytes, names, shapes and values, so
the state dict does not change; `fused_mxfp4_linear` then runs the layers as one GEMM. `.to()` onto
another device copies each slice on its own and ends the sharing (the layers stay correct, and are
computed one by one again): fuse once the model has its device, as `osstune.fast.enable_fast_path`
does.

Shape legend: M rows (all leading dimensions flattened), in / out the projection's sizes,
G = in / 32 scale groups, N the summed out of layers sharing a buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from osstune.kernels.mxfp4_dequant import MXFP4DenseLinear
from osstune.kernels.mxfp4_gemm import MXFP4GroupedLinear, check_scales
from osstune.quant.mxfp4 import BLOCK, dequantize_mxfp4, quantize_mxfp4

if TYPE_CHECKING:
    from osstune.model import GptOss

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
QKV_PROJECTIONS = ATTENTION_PROJECTIONS[:3]
# The grouped GEMM's input dtypes; others (float64 references, float16) decode W and use F.linear.
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)
# Rows from which decoding W whole, then a cuBLAS product, beats the GEMM that decodes W in registers
# once per tile of rows (osstune.kernels.mxfp4_dequant): measured on an H100 at gpt-oss-20b's
# attention shapes (`python bench/kernels.py --only mxfp4-attention`, docs/QLORA.md).
DENSE_DECODE_MIN_ROWS = 512


class QuantizationError(ValueError):
    """A module that cannot be stored as MXFP4 (or already is); the message names it."""


class MXFP4Linear(nn.Module):
    """y = x @ W^T + b with W frozen in MXFP4 (see the module docstring); the bias stays a parameter
    in its floating dtype. The constructor allocates zero blocks (a state dict fills them);
    `from_linear` quantizes an `nn.Linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        name: str = "MXFP4Linear",
    ) -> None:
        super().__init__()
        _check_in_features(in_features, name)
        self.in_features, self.out_features = in_features, out_features
        g = in_features // BLOCK
        self.register_buffer("weight_blocks", torch.zeros(1, out_features, g, BLOCK // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales", torch.zeros(1, out_features, g, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype W decodes to: the bias's, which `.to(dtype)` keeps current (without a bias,
        the dtype of the weight this layer was made from)."""
        return self.bias.dtype if self.bias is not None else self._dtype

    @property
    def device(self) -> torch.device:
        return self.weight_blocks.device

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> MXFP4Linear:
        """Quantize `linear.weight` (on its device) and take over `linear.bias` (the same parameter).
        `name` is the module's path, for the error."""
        w = linear.weight  # (out, in)
        layer = cls(linear.in_features, linear.out_features, bias=False, dtype=w.dtype, device="meta", name=name)
        blocks, scales = quantize_mxfp4(w.detach())  # (out, G, 16), (out, G)
        layer.weight_blocks = blocks.unsqueeze(0)
        layer.weight_scales = scales.unsqueeze(0)
        layer.bias = linear.bias
        return layer

    def decoded_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) decoded (default: to `self.dtype`): a dense copy, for merging and references.
        (There is deliberately no `.weight`: code that reads one gets an AttributeError, not a copy.)"""
        return dequantize_mxfp4(self.weight_blocks[0], self.weight_scales[0], dtype or self.dtype)

    @torch.no_grad()
    def dequantized(self) -> nn.Linear:
        """An `nn.Linear` with the decoded W (frozen, in `self.dtype`) and this layer's bias parameter."""
        with torch.device("meta"):  # the real constructor, without allocating what is replaced below
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self.decoded_weight(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        x_mk = x.reshape(-1, self.in_features)  # (M, in)
        if x.dtype in _KERNEL_DTYPES:
            y = _mxfp4_product(x_mk, self.weight_blocks, self.weight_scales)  # (M, out)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            y = F.linear(x_mk, self.decoded_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, mxfp4"


def _mxfp4_product(x_mk: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x_mk (M, in) @ W^T, W = blocks (1, out, G, 16) / scales (1, out, G), with autograd for x:
    from DENSE_DECODE_MIN_ROWS rows of bf16 on a GPU, W decoded whole for a cuBLAS product
    (MXFP4DenseLinear, a temporary of 2 bytes a weight); else the GEMM that decodes in registers."""
    if x_mk.is_cuda and x_mk.dtype == torch.bfloat16 and x_mk.shape[0] >= DENSE_DECODE_MIN_ROWS:
        return MXFP4DenseLinear.apply(x_mk, blocks[0], scales[0])
    # One group holding every row. Built on the device from the shape: no host sync, so a CUDA graph
    # can record it (osstune.fast.graphs).
    offs = torch.full((1,), x_mk.shape[0], dtype=torch.int32, device=x_mk.device)
    return MXFP4GroupedLinear.apply(x_mk, blocks, scales, offs)


def _check_in_features(in_features: int, name: str) -> None:
    if in_features % BLOCK:
        raise QuantizationError(
            f"{name}: in_features={in_features} is not a multiple of {BLOCK}, the MXFP4 block along the "
            "input dimension; keep this layer in floating point"
        )


@dataclass(frozen=True)
class AttentionQuantReport:
    """What `quantize_attention` did. Errors are relative Frobenius norms ||W - deq(q(W))|| / ||W||
    per projection; the mean is over projections, unweighted."""

    projections: int
    max_error: float
    mean_error: float
    worst: str  # path of the projection with max_error
    dense_bytes: int  # the weights as they were
    packed_bytes: int  # blocks + scales

    def summary(self) -> str:
        return (
            f"attention projections stored as MXFP4 (lossy): {self.projections} weights, "
            f"{self.dense_bytes / 2**20:.1f} MiB -> {self.packed_bytes / 2**20:.1f} MiB; relative error "
            f"max {self.max_error:.4f} ({self.worst}), mean {self.mean_error:.4f}"
        )


@torch.no_grad()
def quantize_attention(model: GptOss) -> AttentionQuantReport:
    """Replace every layer's self_attn q/k/v/o_proj `nn.Linear` by an `MXFP4Linear`, in place.

    Call it once the model has its device and dtype, before `enable_fast_path` (a recorded CUDA graph
    would keep reading the old weights). Quantizing happens on the weights' device one projection at
    a time, and each dense weight is released as its packed copy replaces it (unless something else
    still holds it), so memory never holds two copies of the attention weights. Where LoRA already
    wraps a projection (`apply_lora` ran first), its frozen `base_layer` is quantized and the adapter
    stays as it is. Everything is checked before the model changes.
    Sets `model.quantized_attention = True`: `save_model` refuses such a model (see the module docstring).
    """
    if getattr(model, "quantized_attention", False):
        raise QuantizationError("quantize_attention: this model's attention projections are MXFP4 already")
    targets = []  # (path, module holding it, attribute name)
    for i, layer in enumerate(model.model.layers):
        for kind in ATTENTION_PROJECTIONS:
            path, holder, attr = f"model.layers.{i}.self_attn.{kind}", layer.self_attn, kind
            module = getattr(holder, attr)
            # A LoRA wrapper (osstune.lora.LoRALinear, a layer above this one: recognised by its
            # `base_layer`): the frozen linear beneath it is what gets packed.
            if isinstance(getattr(module, "base_layer", None), nn.Module):
                path, holder, attr, module = f"{path}.base_layer", module, "base_layer", module.base_layer
            if isinstance(module, MXFP4Linear):
                raise QuantizationError(f"quantize_attention: {path} is MXFP4 already")
            if type(module) is not nn.Linear:
                raise QuantizationError(
                    f"quantize_attention: {path} is a {type(module).__name__}, not an nn.Linear; "
                    "quantize the model as loaded, before anything replaces its projections"
                )
            _check_in_features(module.in_features, path)
            top = float(module.weight.detach().abs().amax()) if module.weight.numel() else 0.0
            if not top < 2.0**65:  # also NaN/inf
                raise QuantizationError(
                    f"quantize_attention: {path}.weight has an entry of magnitude {top:g}; the MXFP4 GEMMs "
                    "take weights below 2**65. Check the checkpoint, or keep attention_weights: bf16"
                )
            targets.append((path, holder, attr))  # no reference to the linear: it is freed once replaced
    errors = {}
    dense_bytes = packed_bytes = 0
    for path, holder, attr in targets:
        linear = getattr(holder, attr)
        packed = MXFP4Linear.from_linear(linear, name=path)
        check_scales(packed.weight_scales, f"{path}.weight")
        w = linear.weight.float()
        errors[path] = ((packed.decoded_weight(torch.float32) - w).norm() / w.norm().clamp_min(1e-30)).item()
        dense_bytes += linear.weight.numel() * linear.weight.element_size()
        packed_bytes += packed.weight_blocks.numel() + packed.weight_scales.numel()
        setattr(holder, attr, packed)
        del linear, w
    model.quantized_attention = True
    worst = max(errors, key=errors.get)
    return AttentionQuantReport(
        projections=len(errors),
        max_error=errors[worst],
        mean_error=sum(errors.values()) / len(errors),
        worst=worst,
        dense_bytes=dense_bytes,
        packed_bytes=packed_bytes,
    )


def packed_qkv(attention: nn.Module) -> list[MXFP4Linear] | None:
    """The `MXFP4Linear` of `attention`'s q/k/v_proj (each the projection itself or a LoRA wrapper's
    `base_layer`), or None unless all three are one and can share a buffer: the same in_features,
    dtype and device, all with a bias or none."""
    layers = []
    for kind in QKV_PROJECTIONS:
        module = getattr(attention, kind)
        module = getattr(module, "base_layer", module)  # a LoRA wrapper: see quantize_attention
        if type(module) is not MXFP4Linear:
            return None
        layers.append(module)
    kinds = {(m.in_features, m.dtype, m.device, m.bias is None) for m in layers}
    return layers if len(kinds) == 1 else None


@torch.no_grad()
def fuse_mxfp4_storage(layers: list[MXFP4Linear]) -> None:
    """Move the packed weights of `layers` (same in_features and device) into one blocks buffer
    (1, N, G, 16) and one scales buffer (1, N, G), rows in the order given, and make each layer's
    `weight_blocks` / `weight_scales` its slice of them (module docstring). Memory holds the layers'
    weights once more while copying, then once. Nothing happens when they share buffers already."""
    first = layers[0]
    for m in layers:
        if (m.in_features, m.device) != (first.in_features, first.device):
            raise QuantizationError(
                f"fuse_mxfp4_storage: layers of in_features {first.in_features} on {first.device} and "
                f"{m.in_features} on {m.device} cannot share one buffer; pass layers that read the same input"
            )
    if shared_mxfp4_weight(layers) is not None:
        return
    blocks = torch.cat([m.weight_blocks for m in layers], dim=1)  # (1, N, G, 16)
    scales = torch.cat([m.weight_scales for m in layers], dim=1)  # (1, N, G)
    start = 0
    for m in layers:
        stop = start + m.out_features
        m.weight_blocks, m.weight_scales = blocks[:, start:stop], scales[:, start:stop]
        start = stop


def shared_mxfp4_weight(layers: list[MXFP4Linear]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """blocks (1, N, G, 16) and scales (1, N, G) spanning `layers`' weights, views without a copy,
    when each layer's buffers are the next rows of one buffer (as `fuse_mxfp4_storage` leaves them);
    else None. Reads no device value."""
    first = layers[0]
    views = []
    for name in ("weight_blocks", "weight_scales"):
        head = getattr(first, name)
        row = head.stride(1)
        offset = head.storage_offset()
        for m in layers:
            t = getattr(m, name)
            # Rows contiguous and one after another: slicing dim 1 of a contiguous buffer gives that.
            if (
                t.untyped_storage().data_ptr() != head.untyped_storage().data_ptr()
                or t.storage_offset() != offset
                or t.stride() != head.stride()
                or not t.is_contiguous()
            ):
                return None
            offset += m.out_features * row
        size = (1, sum(m.out_features for m in layers), *head.shape[2:])
        views.append(head.as_strided(size, head.stride(), head.storage_offset()))
    return views[0], views[1]


def fused_mxfp4_linear(x: torch.Tensor, layers: list[MXFP4Linear]) -> list[torch.Tensor] | None:
    """Each layer's output for the same x (..., in), from one GEMM over their shared weights (see
    `fuse_mxfp4_storage`) and one bias add: [(..., out) per layer], equal to `[m(x) for m in layers]`.
    None when the layers do not share their buffers or x's dtype has no kernel; then call them one by one.
    The input gradient is one GEMM too; each bias gets its gradient when it requires one."""
    if x.dtype not in _KERNEL_DTYPES or len({m.bias is None for m in layers}) > 1:
        return None
    weight = shared_mxfp4_weight(layers)
    if weight is None:
        return None
    blocks, scales = weight
    x_mk = x.reshape(-1, layers[0].in_features)  # (M, in)
    y = _mxfp4_product(x_mk, blocks, scales)  # (M, N)
    if layers[0].bias is not None:
        y = y + torch.cat([m.bias for m in layers]).to(x.dtype)
    # split, not slicing: its backward concatenates the three gradients into one (M, N) tensor.
    parts = y.split([m.out_features for m in layers], dim=-1)
    return [p.view(*x.shape[:-1], p.shape[-1]) for p in parts]
