"""The gpt-oss tokenizer (o200k_harmony), without network access.

`load_tokenizer(checkpoint_dir)` reads the checkpoint's `tokenizer.json` when it has one; otherwise (or
with no path) it uses the tokenizer.json we generate from the o200k_base ranks that `bpe-openai`
ships (see `tokenizer_json.py`). Both run on Hugging Face `tokenizers`. Rendering chats does not go
through this class: openai-harmony tokenizes those itself (see `render.py`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from osstune.data.paths import write_atomic
from osstune.data.tokenizer_json import tokenizer_json_path
from osstune.data.vocab import NAMED_SPECIAL_TOKENS, VOCAB_SIZE, special_tokens

# gpt-oss's published tokenizer_config.json: BOS/EOS/PAD as its generation config uses them.
_BOS, _EOS, _PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
_MAX_CONTEXT = 131072


class Tokenizer:
    """o200k_harmony text <-> ids. Special-token ids are attributes (`tok.start_id`, `tok.return_id`...)."""

    vocab_size = VOCAB_SIZE

    def __init__(self, backend, source: str):
        self._backend = backend  # a tokenizers.Tokenizer
        self.source = source
        # `encode_special_tokens` is a property of the backend; flipping it for one call must not race.
        self._lock = threading.Lock()
        self._check_special_tokens()
        self.startoftext_id = NAMED_SPECIAL_TOKENS["<|startoftext|>"]
        self.endoftext_id = NAMED_SPECIAL_TOKENS["<|endoftext|>"]
        self.return_id = NAMED_SPECIAL_TOKENS["<|return|>"]
        self.constrain_id = NAMED_SPECIAL_TOKENS["<|constrain|>"]
        self.channel_id = NAMED_SPECIAL_TOKENS["<|channel|>"]
        self.start_id = NAMED_SPECIAL_TOKENS["<|start|>"]
        self.end_id = NAMED_SPECIAL_TOKENS["<|end|>"]
        self.message_id = NAMED_SPECIAL_TOKENS["<|message|>"]
        self.call_id = NAMED_SPECIAL_TOKENS["<|call|>"]
        self.pad_id = self.endoftext_id
        # An assistant turn ends at a final answer or a tool call; after <|end|> the model goes on with
        # its next message (openai-harmony's `stop_tokens_for_assistant_actions`).
        self.stop_ids = (self.return_id, self.call_id)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. With `allow_special=False` a string such as "<|start|>" is plain text
        (as harmony encodes message contents); with True it becomes the special token."""
        if allow_special or "<|" not in text:
            return self._backend.encode(text, add_special_tokens=False).ids
        with self._lock:
            self._backend.encode_special_tokens = True
            try:
                return self._backend.encode(text, add_special_tokens=False).ids
            finally:
                self._backend.encode_special_tokens = False

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens written out; invalid UTF-8 becomes U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _check_special_tokens(self) -> None:
        # Our rendering and loss masks assume harmony's ids; a checkpoint with other ids would train
        # on the wrong tokens without any error, so refuse it here.
        wrong = {
            name: self._backend.token_to_id(name)
            for name, i in NAMED_SPECIAL_TOKENS.items()
            if self._backend.token_to_id(name) != i
        }
        if wrong:
            expected = {name: NAMED_SPECIAL_TOKENS[name] for name in wrong}
            raise ValueError(
                f"{self.source}: special tokens {wrong} do not have the o200k_harmony ids {expected}; "
                "osstune needs the gpt-oss tokenizer (remove this tokenizer.json to use the built-in one)"
            )
        if self._backend.get_vocab_size(with_added_tokens=True) > VOCAB_SIZE:
            raise ValueError(
                f"{self.source}: {self._backend.get_vocab_size(with_added_tokens=True)} tokens, more than "
                f"gpt-oss's {VOCAB_SIZE}; osstune needs the gpt-oss tokenizer"
            )


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (or a tokenizer.json file); o200k_harmony when None or
    when the directory has no tokenizer.json."""
    from tokenizers import Tokenizer as Backend

    if path is None:
        file = tokenizer_json_path()
        return Tokenizer(Backend.from_file(str(file)), source=f"built-in o200k_harmony ({file})")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or tokenizer.json")
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return load_tokenizer(None)
    try:
        backend = Backend.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
    return Tokenizer(backend, source=str(file))


def chat_template() -> str:
    """osstune's Jinja chat template for gpt-oss (chat_template.jinja beside this file): the harmony
    format as `render_prompt` (add_generation_prompt) and `render_for_training` write it."""
    return (Path(__file__).resolve().parent / "chat_template.jinja").read_text(encoding="utf-8")


def ensure_chat_template(out_dir: str | Path) -> Path | None:
    """Write chat_template.jinja into a directory whose tokenizer files (copied from a base checkpoint)
    carry no chat template, neither as that file nor in tokenizer_config.json; returns the file
    written, or None when the directory already has a template (the base's own is kept)."""
    out = Path(out_dir)
    config = out / "tokenizer_config.json"
    if (out / "chat_template.jinja").is_file():
        return None
    if config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")):
        return None
    write_atomic(out / "chat_template.jinja", chat_template().encode("utf-8"))
    return out / "chat_template.jinja"


def write_tokenizer_files(out_dir: str | Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja
    into `out_dir`, loadable by `transformers.AutoTokenizer` (whose `apply_chat_template` then renders
    harmony as osstune does) and `tokenizers`. Returns the written paths."""
    out = Path(out_dir)
    tokenizer_json = out / "tokenizer.json"
    write_atomic(tokenizer_json, tokenizer_json_path().read_bytes())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _BOS,
        "eos_token": _EOS,
        "pad_token": _PAD,
        "model_max_length": _MAX_CONTEXT,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True}
            for t, i in special_tokens().items()
        },
    }
    special_map = {"bos_token": _BOS, "eos_token": _EOS, "pad_token": _PAD}
    written = [tokenizer_json]
    for name, payload in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        write_atomic(out / name, (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        written.append(out / name)
    # Its own file, as transformers 5 saves it (older releases and other tools read the same file).
    write_atomic(out / "chat_template.jinja", chat_template().encode("utf-8"))
    written.append(out / "chat_template.jinja")
    return written
