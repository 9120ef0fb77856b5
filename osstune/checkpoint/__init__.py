"""Hugging Face gpt-oss checkpoints: load (bf16 or MXFP4 experts, streamed tensor by tensor), save,
and write random ones.

Modules: `layout` (names and shapes as data), `safetensors_io` (streaming reader/writer),
`convert` (expert layouts), `reader` (checking a directory), `hub` (repo ids), `random_init`,
`load`, `save`.
"""

from osstune.checkpoint.errors import CheckpointError
from osstune.checkpoint.hub import resolve_checkpoint
from osstune.checkpoint.load import load_model
from osstune.checkpoint.reader import load_config, open_checkpoint
from osstune.checkpoint.save import save_model, write_checkpoint

__all__ = [
    "CheckpointError",
    "load_config",
    "load_model",
    "open_checkpoint",
    "resolve_checkpoint",
    "save_model",
    "write_checkpoint",
]
