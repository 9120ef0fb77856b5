"""Data for gpt-oss: the o200k_harmony tokenizer, chat files, harmony rendering, loss masks, packing.

This layer imports no model code; everything here runs on CPU. Typical use:

    options = DataOptions(max_length=2048, overflow="drop")
    cache = build_cache("train.jsonl", options)        # validated, tokenized, memory-mapped
    loader = PackedLoader(cache, seq_len=2048, batch_size=4, seed=0, epochs=None)
    for batch in loader: ...                           # PackedBatch; loader.state_dict() to resume
"""

from osstune.data.cache import TokenCache, build_cache
from osstune.data.conversation import ChatMessage, Conversation, FunctionTool, ToolCall, parse_row
from osstune.data.errors import DataError, Problem
from osstune.data.masks import train_mask
from osstune.data.packing import IGNORE, InMemoryRows, PackedBatch, PackedLoader, plan_packs
from osstune.data.paths import cache_dir, sample_dataset_path
from osstune.data.pipeline import DataOptions, DataSummary, TokenizedRow, TokenizedRows, tokenize_file
from osstune.data.render import RenderOptions, harmony_encoding, render_for_training, render_prompt
from osstune.data.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_files

__all__ = [
    "IGNORE",
    "ChatMessage",
    "Conversation",
    "DataError",
    "DataOptions",
    "DataSummary",
    "FunctionTool",
    "InMemoryRows",
    "PackedBatch",
    "PackedLoader",
    "Problem",
    "RenderOptions",
    "TokenCache",
    "TokenizedRow",
    "TokenizedRows",
    "Tokenizer",
    "ToolCall",
    "build_cache",
    "cache_dir",
    "harmony_encoding",
    "load_tokenizer",
    "parse_row",
    "plan_packs",
    "render_for_training",
    "render_prompt",
    "sample_dataset_path",
    "tokenize_file",
    "train_mask",
    "write_tokenizer_files",
]
