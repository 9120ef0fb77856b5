"""Reading and writing safetensors files one tensor at a time.

Format (huggingface/safetensors README): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data
buffer; offsets are relative to the buffer, which the tensors cover without gaps or overlap.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page it touches stays in
the process's resident set until the file is closed, so loading a 5 GB shard shows up as 5 GB more
RSS. Here a tensor is read with `readinto` straight into the destination tensor's memory, and the
writer streams tensors as they are produced (the library can only save a complete dict).
The `safetensors` package remains the reference in the tests: files we write load with it, files it
writes load with us.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import torch

from osstune.checkpoint.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_READ_CHUNK = 256 << 20  # bytes per readinto call; bounds the syscall size, not memory


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype_name: str  # as written in the header, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header; catches truncated and corrupt files before any tensor is read."""
    size = path.stat().st_size

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: not a valid safetensors file ({why}). The file is truncated or corrupt: "
            "download or write it again."
        )

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise corrupt(f"header length {n} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor {name!r} has a malformed header entry {entry!r}") from None
        if not all(isinstance(v, int) and v >= 0 for v in (begin, end, *shape)):
            raise corrupt(f"tensor {name!r} has a malformed header entry {entry!r}")
        if dtype_name not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, which osstune does not read "
                f"(supported: {', '.join(DTYPES)}); convert the checkpoint to bf16 or MXFP4"
            )
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPES[dtype_name].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise corrupt(
                f"tensor {name!r} {dtype_name}{list(shape)} needs {expected} bytes, offsets say [{begin}, {end})"
            )
        if end > data_size:
            raise corrupt(
                f"tensor {name!r} ends at byte {data_start + end} but the file has only {size} bytes"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(path, dtype_name, shape, data_start + begin, expected)
    spans.sort()
    covered = 0
    for begin, end, name in spans:
        if begin != covered:
            raise corrupt(f"tensor {name!r} starts at data offset {begin}, expected {covered} (gap or overlap)")
        covered = end
    if covered != data_size:
        raise corrupt(f"{data_size - covered} bytes after the last tensor")
    return infos


def read_into(f: BinaryIO, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Fill the contiguous CPU tensor `out` (shape and dtype of `info`) from the open file `f`."""
    buf = out.view(-1).view(torch.uint8).numpy()  # a writable view of out's memory
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(buf[done : done + _READ_CHUNK])
        if not n:
            raise CheckpointError(f"{info.file}: file ended while reading a tensor; it is truncated, download it again")
        done += n
    return out


def read_tensor(f: BinaryIO, info: TensorInfo) -> torch.Tensor:
    return read_into(f, info, torch.empty(info.shape, dtype=info.dtype))


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def write_file(path: Path, tensors: Iterable[PlannedTensor], produce: Callable[[str], torch.Tensor]) -> None:
    """Write one safetensors file whose header is known up front, producing tensors one at a time.

    `produce(name)` must return a tensor of the planned dtype and shape (any device); only that one
    tensor is held at a time. The file is fsynced so that the rename that publishes it is durable.
    """
    planned = list(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in planned:
        span = [offset, offset + t.nbytes]
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": span}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in planned:
            value = produce(t.name)
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise AssertionError(
                    f"internal: {t.name} produced {value.dtype}{list(value.shape)}, planned {t.dtype}{list(t.shape)}"
                )
            f.write(value.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
            del value
        f.flush()
        os.fsync(f.fileno())
