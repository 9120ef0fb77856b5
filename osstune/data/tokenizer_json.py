"""Build a Hugging Face `tokenizers` BPE equivalent to tiktoken's o200k_harmony from the raw ranks.

tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. A
`tokenizers` BPE reproduces that when its merge list holds every split (left, right) of every token
whose two halves are tokens too, ordered by the rank of the merged token, and when `ignore_merges`
makes a pre-token that is itself a token come out whole (tiktoken looks pieces up before merging).
This is how Hugging Face converts tiktoken vocabularies, gpt-oss's tokenizer.json included.
"""

from __future__ import annotations

import functools
from pathlib import Path

from osstune.data.paths import cache_dir, write_atomic
from osstune.data.vocab import o200k_base_ranks, special_tokens

# o200k_base's pre-tokenization regex (tiktoken_ext.openai_public.o200k_base): letters with an
# optional leading non-letter, case runs, 1-3 digit numbers, punctuation runs, newlines, spaces.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Bump when the generated file changes, so stale cached copies are not reused.
_BUILD_VERSION = "1"


def tokenizer_json_path() -> Path:
    """Our generated o200k_harmony `tokenizer.json`, built into the cache on first use (~5 s)."""
    path = cache_dir() / "tokenizer" / f"o200k_harmony-v{_BUILD_VERSION}" / "tokenizer.json"
    if not path.is_file():
        write_atomic(path, build_tokenizer().to_str().encode("utf-8"))
    return path


def build_tokenizer():
    """A fresh `tokenizers.Tokenizer` for o200k_harmony made from the bpe-openai ranks."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = o200k_base_ranks()
    vocab = {_byte_level(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab, _merges(ranks), ignore_merges=True))
    # Split with o200k's regex first; ByteLevel then only maps bytes to printable characters.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Added in id order, they take ids 199998.. exactly (checked by the caller's tests).
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()])
    return tokenizer


def _merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort(key=lambda m: m[:3])
    return [(_byte_level(left), _byte_level(right)) for _, _, _, left, right in merges]


@functools.cache
def _byte_table() -> tuple[str, ...]:
    # GPT-2's reversible byte -> printable character map, which the ByteLevel pre-tokenizer expects:
    # printable Latin-1 bytes map to themselves, the others to code points from 256 upward.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _byte_level(token: bytes) -> str:
    table = _byte_table()
    return "".join(table[b] for b in token)
