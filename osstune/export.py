"""`osstune export`: merge a LoRA adapter into its base model and write a Hugging Face checkpoint.

bf16 (dense expert layout): exact up to the checkpoint dtype; MXFP4 experts of the base are
decoded. mxfp4: merged experts no longer lie on the MXFP4 grid, so they are quantized again; the
relative Frobenius error ||W - Q(W)|| / ||W|| of every requantized tensor against the merged
weights is measured, printed and returned. Experts the adapter did not touch and that were
already packed are written as they were (no error). Tokenizer files come from the base checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from osstune.lora import load_adapter, merge_lora
from osstune.lora.layers import LoRAExperts, experts_shape
from osstune.model import Experts, GptOss, MXFP4Experts
from osstune.quant.mxfp4 import dequantize_mxfp4

FORMATS = ("bf16", "mxfp4")


@dataclass(frozen=True)
class ExportResult:
    output: Path
    format: str
    # Tensor name -> relative Frobenius error of MXFP4 requantization (empty for bf16).
    requant_errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.requant_errors.values(), default=0.0)

    @property
    def mean_error(self) -> float:
        errs = self.requant_errors.values()
        return sum(errs) / len(errs) if errs else 0.0

    def summary(self) -> str:
        if not self.requant_errors:
            return f"wrote {self.output} ({self.format}); no expert tensor was requantized"
        worst = max(self.requant_errors, key=self.requant_errors.get)
        return (
            f"wrote {self.output} (mxfp4); requantization error (relative Frobenius, vs the merged "
            f"weights) over {len(self.requant_errors)} expert tensors: max {self.max_error:.4f} ({worst}), "
            f"mean {self.mean_error:.4f}"
        )


def export_merged(
    model_path: str | Path,
    adapter_dir: str | Path,
    output: str | Path,
    format: str = "bf16",
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> ExportResult:
    """Load `model_path` (directory, repo id or preset), apply and merge `adapter_dir`, write `output`."""
    from osstune.checkpoint import load_model, save_model

    if format not in FORMATS:
        raise ValueError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    model = load_model(model_path)  # the checkpoint's own storage: MXFP4 experts stay packed
    # float32 factors: an adapter trained in float32 is merged without first rounding it to bf16.
    load_adapter(model, adapter_dir, dtype=torch.float32)
    errors = requantize_experts(model) if format == "mxfp4" else {}
    merge_lora(model)
    save_model(model, output, format=format, tokenizer_source=_tokenizer_dir(model_path), overwrite=overwrite)
    result = ExportResult(Path(output), format, errors)
    if log:
        log(result.summary())
    return result


@torch.no_grad()
def requantize_experts(model: GptOss) -> dict[str, float]:
    """Merge expert LoRA and pack every dense expert tensor to MXFP4, one layer at a time (so at
    most one layer's experts are dense at once); returns the relative error of each packed tensor."""
    from osstune.checkpoint.convert import pack_experts  # bit-identical to quant.mxfp4.quantize_mxfp4, faster

    errors = {}
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        adapted = experts.kinds if isinstance(experts, LoRAExperts) else ()
        base = experts.base_layer if adapted else experts
        if isinstance(base, MXFP4Experts) and not adapted:
            continue
        dense = experts.merge() if adapted else experts
        packed = {}
        for kind in ("gate_up_proj", "down_proj"):
            if isinstance(base, MXFP4Experts) and kind not in adapted:
                # Untouched by the adapter: keep the original blocks rather than round-tripping them.
                packed[kind] = (getattr(base, f"{kind}_blocks"), getattr(base, f"{kind}_scales"))
                continue
            w = getattr(dense, kind)  # (E, in, out)
            blocks, scales = pack_experts(w)
            back = dequantize_mxfp4(blocks, scales, torch.float32).transpose(1, 2)
            w32 = w.float()
            errors[f"model.layers.{i}.mlp.experts.{kind}"] = ((back - w32).norm() / w32.norm().clamp_min(1e-30)).item()
            packed[kind] = (blocks, scales)
        layer.mlp.experts = _packed_like(dense, packed)
    model.config = model.config.replace(expert_format="mxfp4")
    return errors


def _packed_like(dense: Experts, packed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> MXFP4Experts:
    with torch.device("meta"):
        out = MXFP4Experts(experts_shape(dense))
    for kind, (blocks, scales) in packed.items():
        setattr(out, f"{kind}_blocks", blocks)
        setattr(out, f"{kind}_scales", scales)
    out.gate_up_proj_bias, out.down_proj_bias = dense.gate_up_proj_bias, dense.down_proj_bias
    return out


def _tokenizer_dir(model_path: str | Path) -> Path | None:
    """The base checkpoint's directory when it has tokenizer files (presets have none)."""
    from osstune.checkpoint import resolve_checkpoint
    from osstune.checkpoint.save import TOKENIZER_FILES
    from osstune.config import PRESETS

    if str(model_path) in PRESETS:
        return None
    source = resolve_checkpoint(model_path)
    return source if any((source / f).is_file() for f in TOKENIZER_FILES) else None
