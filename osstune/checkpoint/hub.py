"""Turning a local path or a Hugging Face repo id into a local checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from osstune.checkpoint.errors import CheckpointError
from osstune.config import PRESETS

# Only what a checkpoint needs at the top level of the repo: openai/gpt-oss-* also ship `original/`
# (the same weights in another layout) and `metal/`, which would double the download.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
IGNORE_PATTERNS = ["*/*"]  # huggingface_hub's fnmatch lets `*` cross `/`; keep subfolders out


def resolve_checkpoint(
    path_or_id: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id, downloaded (or found in the cache).

    Honours HF_HUB_OFFLINE: offline, only an already cached snapshot is used.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the checkpoint directory that holds config.json")
    text = str(path_or_id)
    if text in PRESETS:  # never a Hub lookup: a preset's name is not a repo id
        raise CheckpointError(f"{text} is a preset (built in, with random weights), not a checkpoint directory or repo")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise CheckpointError(f"{text}: no such directory (and not a Hugging Face repo id like 'openai/gpt-oss-20b')")
    return _download(text, revision, cache_dir)


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=ALLOW_PATTERNS,
                ignore_patterns=IGNORE_PATTERNS,
            )
        )
    except HFValidationError as e:
        raise CheckpointError(
            f"{repo_id}: not a local directory, a preset or a valid Hugging Face repo id ({e})"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such Hugging Face repo (or it is private/gated: log in with `hf auth login`), "
            "and no local directory of that name"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"{repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set. Download it first where "
                f"there is network (`hf download {repo_id}`), unset HF_HUB_OFFLINE, or pass a local directory"
            ) from None
        raise CheckpointError(
            f"{repo_id}: could not reach the Hugging Face Hub and the repo is not cached; check the network "
            "or pass a local directory"
        ) from None
