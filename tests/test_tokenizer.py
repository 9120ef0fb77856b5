"""The o200k_harmony tokenizer against two independent references: openai-harmony's own tokenizer and
tiktoken's o200k_harmony, both loaded offline from the ranks bpe-openai ships."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from osstune.data.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_files
from osstune.data.tokenizer_json import build_tokenizer
from osstune.data.vocab import NAMED_SPECIAL_TOKENS, VOCAB_SIZE, o200k_base_path, special_tokens

SAMPLES = [
    "Hello, world! I'm here; they'RE done, WE'LL see.",
    "Xin chào, tôi tên là Osmo. Bạn có khỏe không? Tiếng Việt có dấu: ắ ằ ẳ ẵ ặ.",
    "你好，世界。我们今天学习分词和机器学习。",
    "こんにちは、世界！カタカナとひらがな、漢字。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "emoji: 😊👋🏾👨‍👩‍👧‍👦🇺🇸 ✨🔥",
    "def f(x):\n    return {'a': x ** 2}  # square\n\n\nclass A:\n\tpass\n",
    "   leading spaces\t\ttabs  \n\n\r\n  trailing   ",
    "1234567890 3.14159 -42 1e10 2025-06-28 0x1F 1,000,000",
    "naïve naïve Ω≈ç√∫˜µ≤≥÷ Müller Γειά σου नमस्ते 안녕하세요",
    "<|start|>assistant<|channel|>final<|message|>hi<|return|> <|reserved_200100|><|endoftext|>",
    "x" * 500 + " " + "ab" * 300,
    "",
]


@pytest.fixture(scope="module")
def harmony():
    from osstune.data.render import harmony_encoding

    return harmony_encoding()


@pytest.fixture(scope="module")
def tiktoken_harmony(tmp_path_factory):
    """tiktoken's own o200k_harmony definition, its download replaced by our offline file: tiktoken
    looks in TIKTOKEN_CACHE_DIR for sha1(url) and checks the pinned SHA-256 of what it finds."""
    try:
        import tiktoken
        from tiktoken_ext import openai_public
    except ImportError:
        return None  # openai-harmony stays the reference

    cache = tmp_path_factory.mktemp("tiktoken-cache")
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    shutil.copyfile(o200k_base_path(), cache / hashlib.sha1(url.encode()).hexdigest())
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    try:
        return tiktoken.Encoding(**openai_public.o200k_harmony())
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def from_ranks():
    """Path 1: built in memory from bpe-openai's o200k_base ranks."""
    return Tokenizer(build_tokenizer(), source="bpe-openai ranks")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    written = write_tokenizer_files(out)
    assert sorted(p.name for p in written) == [
        "chat_template.jinja", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"
    ]
    return out


@pytest.fixture(scope="module")
def from_file(checkpoint_dir):
    """Path 2: a checkpoint directory's tokenizer.json (the one write_tokenizer_files writes)."""
    return load_tokenizer(checkpoint_dir)


@pytest.fixture(params=["from_ranks", "from_file"])
def tok(request):
    return request.getfixturevalue(request.param)


def test_offline_file_is_openais_o200k_base():
    # The SHA-256 tiktoken pins for o200k_base.tiktoken (tiktoken_ext/openai_public.py).
    data = o200k_base_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_encode_matches_references(tok, harmony, tiktoken_harmony, text):
    plain = tok.encode(text)
    assert plain == harmony.encode(text, disallowed_special=())
    if tiktoken_harmony is not None:
        assert plain == tiktoken_harmony.encode(text, disallowed_special=())
        assert tiktoken_harmony.encode(text, allowed_special="all") == harmony.encode(text, allowed_special="all")
    special = tok.encode(text, allow_special=True)
    assert special == harmony.encode(text, allowed_special="all")
    assert tok.decode(plain) == text
    assert tok.decode(special) == text


def test_decode_matches_harmony_on_split_characters(tok, harmony):
    # Ids that cut a UTF-8 character: both sides write U+FFFD the same way.
    ids = tok.encode("😊👋🏾 Việt")
    for cut in range(1, len(ids)):
        assert tok.decode(ids[:cut]) == harmony.decode(ids[:cut])


def test_special_tokens_match_harmony(tok, harmony):
    table = special_tokens()
    assert len(table) == VOCAB_SIZE - 199998
    for name, token_id in table.items():
        assert tok.token_to_id(name) == token_id
        assert harmony.encode(name, allowed_special="all") == [token_id]
        assert harmony.decode_utf8([token_id]) == name
    assert tok.vocab_size == VOCAB_SIZE == 201088
    assert (tok.start_id, tok.end_id, tok.message_id, tok.channel_id) == (200006, 200007, 200008, 200005)
    assert (tok.return_id, tok.call_id, tok.constrain_id) == (200002, 200012, 200003)
    assert sorted(tok.stop_ids) == sorted(harmony.stop_tokens_for_assistant_actions())


def test_written_files_round_trip(checkpoint_dir, harmony):
    from tokenizers import Tokenizer as Backend

    # Re-serialising the loaded file and loading that again gives the same tokenizer.
    first = Backend.from_file(str(checkpoint_dir / "tokenizer.json"))
    again = Backend.from_str(first.to_str())
    for text in SAMPLES:
        assert again.encode(text, add_special_tokens=False).ids == harmony.encode(text, allowed_special="all")
    config = json.loads((checkpoint_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|return|>" and config["pad_token"] == "<|endoftext|>"


def test_written_files_load_in_transformers(checkpoint_dir, harmony):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(checkpoint_dir))
    assert len(hf) == VOCAB_SIZE
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (199998, 200002, 199999)
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == harmony.encode(text, allowed_special="all")
        assert hf.decode(ids) == text


def test_load_tokenizer_without_tokenizer_json_uses_builtin(tmp_path, harmony):
    tok = load_tokenizer(tmp_path)  # a checkpoint directory with no tokenizer.json
    assert "built-in" in tok.source
    assert tok.encode(SAMPLES[1]) == harmony.encode(SAMPLES[1])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_other_special_ids(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    other = Backend(models.BPE({"a": 0, "b": 1}, []))
    other.add_special_tokens(["<|start|>"])  # gets id 2, not 200006
    other.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"do not have the o200k_harmony ids .*'<\|start\|>': 200006"):
        load_tokenizer(tmp_path)


def test_cache_dir_follows_osstune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OSSTUNE_CACHE", str(tmp_path))
    path = o200k_base_path()
    assert path == tmp_path / "tiktoken" / "o200k_base.tiktoken"
    assert path.stat().st_size > 3_000_000


def test_named_tokens_are_harmony_formatting_tokens(harmony):
    assert NAMED_SPECIAL_TOKENS == {
        name: harmony.encode(name, allowed_special="all")[0]
        for name in harmony.special_tokens_set
        if not name.startswith("<|reserved_")
    }
