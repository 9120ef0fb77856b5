"""`save_model` and `write_checkpoint`: Hugging Face checkpoints written tensor by tensor.

The directory is written under a temporary name beside the target and renamed into place at the
end (config.json last), so an interrupted save never leaves a directory that looks loadable.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from osstune.atomic import atomic_dir
from osstune.checkpoint.convert import LayoutConverter, TensorSource
from osstune.checkpoint.errors import CheckpointError
from osstune.checkpoint.layout import tensor_specs
from osstune.checkpoint.reader import INDEX, SINGLE
from osstune.checkpoint.safetensors_io import PlannedTensor, write_file
from osstune.config import ModelConfig

# As openai/gpt-oss-20b and -120b ship it: stop on <|return|>, <|endoftext|> and <|call|>.
GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "do_sample": True,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    format: str | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_source: str | Path | None = None,
    write_tokenizer: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write `model` (a GptOss) as a Hugging Face checkpoint that transformers and vLLM load.

    format: "bf16" or "mxfp4" expert layout; None keeps the model's. Packing a bf16 model quantizes
      its experts (lossy); unpacking a packed one is exact. Other tensors keep their dtype.
    tokenizer_source: a directory to copy tokenizer files (and generation_config.json) from; without
      one, `osstune.data.tokenizer.write_tokenizer_files` writes them (if `write_tokenizer`).
    overwrite: replace an existing non-empty `out_dir` (otherwise that is an error).
    """
    cfg: ModelConfig = model.config
    fmt = format or cfg.expert_format
    if fmt not in ("bf16", "mxfp4"):
        raise CheckpointError(f"format={format!r}: expected 'bf16', 'mxfp4' or None (keep the model's layout)")
    if getattr(model, "quantized_attention", False):
        # Set by osstune.quant.linear.quantize_attention, and kept by merge_lora: the attention
        # weights are (or derive from) a lossy MXFP4 copy of the checkpoint's bf16 ones.
        raise CheckpointError(
            f"cannot save to {out_dir}: this model's attention projections were quantized to MXFP4 "
            "(quantize_attention), a lossy copy of the original bf16 weights, so the checkpoint would "
            "silently differ from its base; save the LoRA adapter instead (save_adapter; training writes "
            "it to <output>/adapter) and merge it onto the original checkpoint with "
            "`osstune export --model BASE --adapter ADAPTER_DIR --output OUT`"
        )
    state = model.state_dict()
    extra = sorted(set(state) - set(tensor_specs(cfg)))
    if extra:
        raise CheckpointError(
            f"cannot save to {out_dir}: the model has tensors a gpt-oss checkpoint has no name for "
            f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); merge or remove adapters first"
        )
    return write_checkpoint(
        out_dir,
        cfg.replace(expert_format=fmt),
        _StateDictSource(state, cfg.expert_format),
        max_shard_size=max_shard_size,
        tokenizer_source=tokenizer_source,
        write_tokenizer=write_tokenizer,
        overwrite=overwrite,
    )


class _StateDictSource:
    def __init__(self, state: dict[str, torch.Tensor], expert_format: str) -> None:
        self.state, self.expert_format = state, expert_format

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def write_checkpoint(
    out_dir: str | Path,
    cfg: ModelConfig,
    source: TensorSource,
    *,
    max_shard_size: int | str = "5GB",
    tokenizer_source: str | Path | None = None,
    write_tokenizer: bool = True,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the tensors of `cfg`'s layout, produced from `source`, as a checkpoint in `out_dir`."""
    limit = parse_size(max_shard_size)
    copied = _tokenizer_files(tokenizer_source)  # checked before anything is written
    convert = LayoutConverter(source, cfg.expert_format)
    planned = [PlannedTensor(name, convert.dtype(name), spec.shape) for name, spec in tensor_specs(cfg).items()]
    shards = plan_shards(planned, limit)
    out_dir = Path(out_dir)
    with _atomic_dir(out_dir, overwrite) as tmp:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            write_file(tmp / file, shard, convert.get)
            weight_map.update({t.name: file for t in shard})
            if progress:
                progress(f"wrote {file} ({sum(t.nbytes for t in shard) / 1e9:.2f} GB)")
        if len(shards) > 1:
            total = sum(t.nbytes for t in planned)
            _write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        for p in copied:
            shutil.copyfile(p, tmp / p.name)
        if tokenizer_source is None and write_tokenizer:
            _write_tokenizer(tmp)
        elif copied:
            _add_chat_template(tmp)
        if not (tmp / "generation_config.json").exists():
            _write_json(tmp / "generation_config.json", GENERATION_CONFIG)
        hf = cfg.to_hf_dict()
        dtype = str(convert.dtype("model.embed_tokens.weight")).removeprefix("torch.")
        hf["torch_dtype"] = hf["dtype"] = dtype  # transformers 4 reads torch_dtype, 5 reads dtype
        # As in every config transformers writes, gpt-oss's own included. Without it, transformers 5
        # takes a local config for one written before 5.0 and runs its old-tokenizer checks on it.
        hf["transformers_version"] = _transformers_version()
        _write_json(tmp / "config.json", hf)  # last: a directory without it is not a checkpoint
    return out_dir


def plan_shards(tensors: list[PlannedTensor], limit: int) -> list[list[PlannedTensor]]:
    """Greedy, in order, as transformers does; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def parse_size(size: int | str) -> int:
    """5000000, "5GB" (10**9 bytes, as transformers counts) or "4GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
    if not m or int(float(m.group(1)) * _UNITS[m.group(2) or ""]) <= 0:
        raise CheckpointError(f"max_shard_size={size!r}: expected a positive size such as '5GB', '500MB' or '4GiB'")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def _tokenizer_files(source: str | Path | None) -> list[Path]:
    if source is None:
        return []
    source = Path(source)
    found = [source / f for f in (*TOKENIZER_FILES, "generation_config.json") if (source / f).is_file()]
    if not any(p.name in TOKENIZER_FILES for p in found):
        raise CheckpointError(f"tokenizer_source {source}: has none of {', '.join(TOKENIZER_FILES)}")
    return found


def _write_tokenizer(out: Path) -> None:
    try:
        from osstune.data.tokenizer import write_tokenizer_files
    except ModuleNotFoundError as e:
        if e.name not in ("osstune.data", "osstune.data.tokenizer"):
            raise
        warnings.warn(
            "osstune.data.tokenizer is not available: the checkpoint is written without tokenizer files", stacklevel=3
        )
        return
    write_tokenizer_files(out)


def _add_chat_template(out: Path) -> None:
    try:
        from osstune.data.tokenizer import ensure_chat_template
    except ModuleNotFoundError as e:
        if e.name not in ("osstune.data", "osstune.data.tokenizer"):
            raise
        return
    ensure_chat_template(out)


def _transformers_version() -> str:
    """The installed transformers' version (what its save_pretrained writes), else the version
    openai/gpt-oss's config.json names."""
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "4.55.0"


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


@contextmanager
def _atomic_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    if target.is_file() or target.is_symlink():
        raise CheckpointError(f"{target}: is a file, not a directory; choose a directory for the checkpoint")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target}: already exists and is not empty; choose another directory or pass --overwrite")
    with atomic_dir(target, replace=True) as tmp:
        yield tmp
