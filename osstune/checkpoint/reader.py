"""Opening a local Hugging Face checkpoint directory and checking it against its config.json.

Everything that can be wrong with the files (missing or extra tensors, shapes, dtypes, truncated
shards, a broken index, a config that contradicts the weights) is found here, from the headers
alone, before a single weight is read: a load either succeeds completely or does not start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from osstune.checkpoint.errors import CheckpointError
from osstune.checkpoint.layout import TensorSpec, tensor_specs
from osstune.checkpoint.safetensors_io import TensorInfo, read_header, read_tensor
from osstune.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
_SHOWN = 5  # problems listed per kind in one error message


def load_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (or of a config.json file)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file; a checkpoint directory needs the config.json it was saved with")
    try:
        return ModelConfig.from_json(file)
    except ValueError as e:  # from_json names the file and the bad field
        raise CheckpointError(str(e)) from None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    tensors: dict[str, TensorInfo]


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read config.json and every safetensors header of a local checkpoint and check they agree."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: not a directory; pass a checkpoint directory, a preset name or a Hugging Face repo id"
        )
    cfg = load_config(path)
    tensors, listing = _read_headers(path)
    _check_against_config(path, cfg, tensors, listing)
    return Checkpoint(path, cfg, tensors)


def _read_headers(path: Path) -> tuple[dict[str, TensorInfo], Path]:
    """All tensors of the checkpoint -> their file locations; and the file that lists them."""
    index = path / INDEX
    if index.is_file():
        return _read_sharded(index), index
    if (path / SINGLE).is_file():
        return read_header(path / SINGLE), path / SINGLE
    others = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if others:
        raise CheckpointError(
            f"{path}: found {', '.join(others)} but neither {SINGLE} nor {INDEX}; osstune reads the Hugging "
            f"Face layout: rename a single file to {SINGLE}, or add the index that lists the shards"
        )
    if pickles:
        raise CheckpointError(
            f"{path}: holds only pickled weights ({', '.join(pickles)}); osstune reads safetensors only and "
            "never unpickles. Convert them in an environment you trust, e.g. "
            "`GptOssForCausalLM.from_pretrained(dir).save_pretrained(out)` with transformers"
        )
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}; this is not a Hugging Face checkpoint directory")


def _read_sharded(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{index}: not a valid index ({e!r}); it needs a \"weight_map\" of tensor -> shard file"
        ) from None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    for file, names in sorted(by_file.items()):
        shard = index.parent / file
        if not shard.is_file():
            raise CheckpointError(
                f"{index}: names shard {file} (for tensor {names[0]} and {len(names) - 1} more) but {shard} "
                "does not exist; download the missing shard or write the checkpoint again"
            )
        infos = read_header(shard)
        for name in names:
            if name not in infos:
                raise CheckpointError(
                    f"{index}: says tensor {name} is in {file}, but {shard} does not hold it; "
                    "the index and shards disagree"
                )
        for name, info in infos.items():
            if weight_map.get(name) != file:
                raise CheckpointError(
                    f"{shard}: holds tensor {name}, which {index} does not list in this file; "
                    "the index and shards disagree"
                )
            tensors[name] = info
    return tensors


def _check_against_config(path: Path, cfg: ModelConfig, tensors: dict[str, TensorInfo], listing: Path) -> None:
    specs = tensor_specs(cfg)
    config = path / "config.json"
    problems = []
    missing = [n for n in specs if n not in tensors]
    unexpected = [n for n in tensors if n not in specs]
    for name in missing[:_SHOWN]:
        problems.append(f"missing tensor {name} (not in {listing.name})")
    for name in unexpected[:_SHOWN]:
        problems.append(f"unexpected tensor {name} in {tensors[name].file.name}")
    for name, spec in specs.items():
        info = tensors.get(name)
        if info is not None and len(problems) < 2 * _SHOWN:
            problems += _check_tensor(name, spec, info, config)
    if not problems:
        return
    more = len(missing) + len(unexpected) - min(len(missing), _SHOWN) - min(len(unexpected), _SHOWN)
    lines = "\n  - ".join(problems) + (f"\n  - ... and {more} more missing or unexpected tensors" if more > 0 else "")
    hint = _hint(cfg, missing, unexpected)
    raise CheckpointError(
        f"{path}: the weights do not match {config}:\n  - {lines}\n{hint}"
        "Fix config.json or the weight files; nothing was loaded."
    )


def _check_tensor(name: str, spec: TensorSpec, info: TensorInfo, config: Path) -> list[str]:
    where = f"tensor {name} in {info.file.name}"
    if info.shape != spec.shape:
        if len(info.shape) != len(spec.shape):
            return [f"{where} has shape {list(info.shape)}, config.json implies {list(spec.shape)}"]
        dims = [
            f"dim {d} is {got} but {config.name} gives {field}={want}"
            for d, (got, want, field) in enumerate(zip(info.shape, spec.shape, spec.dims))
            if got != want
        ]
        return [f"{where} has shape {list(info.shape)}, config.json implies {list(spec.shape)}: {'; '.join(dims)}"]
    if spec.packed and info.dtype_name != "U8":
        return [f"{where} has dtype {info.dtype_name}; packed MXFP4 blocks and scales must be U8"]
    if not spec.packed and info.dtype_name not in FLOAT_DTYPES:
        return [f"{where} has dtype {info.dtype_name}; expected a floating-point dtype ({', '.join(FLOAT_DTYPES)})"]
    return []


def _hint(cfg: ModelConfig, missing: list[str], unexpected: list[str]) -> str:
    if any(n.endswith("_blocks") for n in unexpected) and cfg.expert_format == "bf16":
        return 'The weights hold MXFP4 experts but config.json has no quantization_config {"quant_method": "mxfp4"}.\n'
    if any(n.endswith("_blocks") for n in missing) and cfg.expert_format == "mxfp4":
        return "config.json declares MXFP4 experts (quantization_config) but the weights hold bf16 experts.\n"
    layers = {int(n.split(".")[2]) for n in unexpected if n.startswith("model.layers.")}
    if layers and max(layers) >= cfg.num_hidden_layers:
        return f"The weights have layer {max(layers)}, config.json has num_hidden_layers={cfg.num_hidden_layers}.\n"
    if missing and all(n.startswith("model.layers.") for n in missing):
        have = {int(n.split(".")[2]) for n in missing}
        return f"config.json has num_hidden_layers={cfg.num_hidden_layers}; the weights lack layers {sorted(have)[:8]}.\n"
    return ""


class CheckpointReader:
    """A `TensorSource` over a checked checkpoint; keeps one handle per shard open while in use."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.expert_format = ckpt.config.expert_format
        self._files: dict[Path, BinaryIO] = {}

    def dtype(self, name: str) -> torch.dtype:
        return self.ckpt.tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        info = self.ckpt.tensors[name]
        f = self._files.get(info.file)
        if f is None:
            f = self._files[info.file] = open(info.file, "rb")
        return read_tensor(f, info)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
