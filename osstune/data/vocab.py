"""The o200k_harmony vocabulary, available offline.

o200k_harmony = OpenAI's o200k_base byte-pair ranks (ids 0..199997) + harmony's special tokens
(199998..201087). `openai-harmony` and `tiktoken` download `o200k_base.tiktoken` on first use; the
`bpe-openai` wheel ships the same ranks, so we write that file into our cache once, check its
SHA-256 against the one tiktoken pins, and point `TIKTOKEN_ENCODINGS_BASE` at it.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path

from osstune.data.paths import cache_dir, write_atomic

# The hash tiktoken pins for https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken.
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_FILE = "o200k_base.tiktoken"

# gpt-oss's embedding has 201088 rows: ids 0..201087.
VOCAB_SIZE = 201088
NUM_BPE_TOKENS = 199998

# Named harmony tokens; every other id in 200000..201087 is `<|reserved_{id}|>`, as openai-harmony
# decodes them. (tiktoken's o200k_harmony also maps o200k_base's `<|endofprompt|>` to 200018, and
# Hugging Face's gpt-oss tokenizer.json names 200018 that way; harmony never emits it.)
NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}


def special_tokens() -> dict[str, int]:
    """All special tokens of o200k_harmony within the model's vocabulary, by id order."""
    by_id = {i: f"<|reserved_{i}|>" for i in range(200000, VOCAB_SIZE)}
    by_id.update({i: name for name, i in NAMED_SPECIAL_TOKENS.items()})
    return {name: i for i, name in sorted(by_id.items())}


def o200k_base_path() -> Path:
    """The offline copy of `o200k_base.tiktoken` in our cache, written on first use."""
    path = cache_dir() / "tiktoken" / O200K_BASE_FILE
    if path.is_file() and _sha256(path.read_bytes()) == O200K_BASE_SHA256:
        return path
    # Locate the package without importing it: `import bpe_openai` loads all its vocabularies (~2 s).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("bpe-openai is not installed; it ships the o200k_base ranks (pip install bpe-openai)")
    shipped = Path(spec.submodule_search_locations[0]) / "data" / (O200K_BASE_FILE + ".gz")
    data = gzip.decompress(shipped.read_bytes())
    if _sha256(data) != O200K_BASE_SHA256:
        raise RuntimeError(
            f"the o200k_base ranks shipped by bpe-openai do not hash to {O200K_BASE_SHA256}; "
            "this bpe-openai version is not usable offline: install bpe-openai==0.1.4"
        )
    write_atomic(path, data)
    return path


def use_offline_vocab() -> None:
    """Let openai-harmony/tiktoken find o200k_base without network, unless the user chose a source."""
    if "TIKTOKEN_ENCODINGS_BASE" not in os.environ:
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(o200k_base_path().parent)


@functools.cache
def o200k_base_ranks() -> dict[bytes, int]:
    """token bytes -> rank (= token id) for the 199998 byte-pair tokens."""
    ranks: dict[bytes, int] = {}
    for line in o200k_base_path().read_bytes().splitlines():
        token_b64, rank = line.split(b" ")
        ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
