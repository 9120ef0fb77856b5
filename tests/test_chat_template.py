"""The chat template osstune writes with every checkpoint and adapter: transformers'
`apply_chat_template` on it gives openai-harmony's tokens (our rendering) for prompts and training
rows, and transformers loads the directories silently."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from osstune.data import parse_row, render_for_training, render_prompt, write_tokenizer_files
from tests.test_data_render import rows as random_rows

transformers = pytest.importorskip("transformers")

WEATHER = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string", "description": "the city"},
    "unit": {"type": "string", "enum": ["c", "f"], "default": "c"},
    "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "noargs", "description": "No arguments."}},
]
# Schemas harmony writes in its less obvious ways: nested objects, oneOf, type lists, nullable,
# arrays of objects, defaults, multi-line descriptions.
ODD = {"type": "object", "required": ["a"], "properties": {
    "a": {"type": "object", "properties": {"b": {"type": "object", "description": "bd", "properties": {
        "c": {"type": "string", "description": "cd", "default": "q"},
        "o": {"oneOf": [{"type": "string"}, {"type": "number", "description": "num"}]}}}}},
    "x": {"type": ["string", "null"]}, "y": {"anyOf": [{"type": "string"}]}, "z": {"type": "array"},
    "w": {"type": "object", "description": "no properties"}, "v": {"type": "string", "default": {"k": 1}},
    "n": {"type": "null"}, "s": {"type": "string", "enum": ["x"], "nullable": True},
    "arr": {"type": "array", "items": {"type": "object", "properties": {"q": {"type": "integer"}}}},
    "e": {"type": "number", "default": 1.5, "description": "two\nlines"}}}  # fmt: skip
ODD_TOOLS = [{"type": "function", "function": {"name": "f", "description": "D.", "parameters": ODD}},
             {"type": "function", "function": {"name": "g", "description": "", "parameters": {"type": "object"}}}]


def call(name, arguments, id=None):
    return {"type": "function", **({"id": id} if id else {}), "function": {"name": name, "arguments": arguments}}


ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "thinking": "Greet.", "content": "Hello"}], "reasoning_effort": "low"},
    {"messages": [{"role": "developer", "content": "Dev."},
                  {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
                  {"role": "assistant", "content": "ok"}],
     "model_identity": "You are Osmo.", "current_date": "2025-06-28"},
    {"messages": [{"role": "system", "content": "Answer in one sentence."},
                  {"role": "user", "content": "What's the weather in Hanoi?"},
                  {"role": "assistant", "thinking": "Look it up.", "tool_calls": [call("get_weather", {"city": "Hanoi"}, "c1")]},
                  {"role": "tool", "tool_call_id": "c1", "content": {"temp_c": 31}},
                  {"role": "assistant", "thinking": "31, sunny.", "content": "It is 31 °C and sunny."}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "thinking": "t1", "content": "f1"},
                  {"role": "user", "content": "b"}, {"role": "assistant", "thinking": "t2", "content": "f2"},
                  {"role": "user", "content": "c"}, {"role": "assistant", "thinking": "t3", "content": "f3"}]},
    {"messages": [{"role": "user", "content": "a"},
                  {"role": "assistant", "thinking": "t1", "tool_calls": [call("get_weather", '{"city":"X"}')]},
                  {"role": "tool", "content": "r"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "a"},
                  {"role": "assistant", "content": "before the calls", "tool_calls": [call("get_weather", {"city": "Y"}), call("noargs", {})]},
                  {"role": "tool", "name": "get_weather", "content": "r1"}, {"role": "tool", "content": "r2"},
                  {"role": "assistant", "content": "done"}, {"role": "user", "content": "again"}], "tools": TOOLS},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "thinking": "t1", "content": "f1"},
                  {"role": "user", "content": "b"}, {"role": "assistant", "thinking": "t2", "tool_calls": [call("f", {})]},
                  {"role": "tool", "content": "r"}, {"role": "assistant", "thinking": "t3", "content": "f3"}], "tools": ODD_TOOLS},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Xin chào 👋\n\n  spaces  "},
                  {"role": "assistant", "content": "Chào!"}], "tools": ODD_TOOLS, "reasoning_effort": "high"},
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(out)
    return transformers.AutoTokenizer.from_pretrained(str(out))


def template_ids(tokenizer, row, add_generation_prompt):
    kwargs = {k: row[k] for k in ("reasoning_effort", "model_identity", "current_date") if k in row}
    text = tokenizer.apply_chat_template(
        row["messages"], tools=row.get("tools"), add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("index", range(len(ROWS)))
def test_template_equals_harmony_rendering(tokenizer, index):
    row = ROWS[index]
    # The prompt for the next turn: the conversation so far, ending with <|start|>assistant.
    prompt = {**row, "messages": row["messages"][:-1]} if row["messages"][-1]["role"] == "assistant" else row
    assert template_ids(tokenizer, prompt, True) == render_prompt(parse_row(prompt, training=False).conversation)
    assert template_ids(tokenizer, row, True) == render_prompt(parse_row(row, training=False).conversation)
    if row["messages"][-1]["role"] == "assistant":  # a training row: the last answer ends with <|return|>
        assert template_ids(tokenizer, row, False) == render_for_training(parse_row(row).conversation)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_checkpoint_and_adapter_load_silently_in_transformers(tmp_path):
    """A checkpoint from a preset, an adapter on it, and an export: tokenizer files, chat template,
    generation config with harmony's stops, and a config.json that transformers reads without a word."""
    from osstune.checkpoint import load_model
    from osstune.create import create_checkpoint
    from osstune.export import export_merged
    from osstune.lora import LoraConfig, apply_lora, save_adapter

    base = create_checkpoint("tiny", tmp_path / "base", seed=0)
    model = apply_lora(load_model(base, dtype=torch.float32), LoraConfig(r=2, targets="attention"), seed=0)
    save_adapter(model, tmp_path / "adapter", base_model=str(base))
    export_merged(str(base), tmp_path / "adapter", tmp_path / "merged", log=None)
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        for d in (base, tmp_path / "adapter", tmp_path / "merged"):
            tok = transformers.AutoTokenizer.from_pretrained(str(d))
            row = ROWS[3]
            assert template_ids(tok, row, True) == render_prompt(parse_row(row, training=False).conversation)
        for d in (base, tmp_path / "merged"):
            config = transformers.AutoConfig.from_pretrained(str(d))
            generation = transformers.GenerationConfig.from_pretrained(str(d))
            assert config.model_type == "gpt_oss" and generation.eos_token_id == [200002, 199999, 200012]
    finally:
        logger.removeHandler(records)
    assert records.messages == []
    # Every key of openai/gpt-oss-20b's published config.json.
    published = {
        "architectures", "attention_bias", "attention_dropout", "eos_token_id", "experts_per_token", "head_dim",
        "hidden_act", "hidden_size", "initial_context_length", "initializer_range", "intermediate_size",
        "layer_types", "max_position_embeddings", "model_type", "num_attention_heads", "num_experts_per_tok",
        "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_router_logits", "pad_token_id",
        "rms_norm_eps", "rope_scaling", "rope_theta", "router_aux_loss_coef", "sliding_window", "swiglu_limit",
        "tie_word_embeddings", "transformers_version", "use_cache", "vocab_size",
    }  # fmt: skip
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert published <= set(written), published - set(written)


def test_a_base_template_is_kept(tmp_path):
    """Tokenizer files copied from a base with its own template keep it; without one, ours is added."""
    from osstune.data.tokenizer import chat_template, ensure_chat_template

    write_tokenizer_files(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{{ 'theirs' }}"}))
    assert ensure_chat_template(tmp_path) is None and not (tmp_path / "chat_template.jinja").exists()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert ensure_chat_template(tmp_path).read_text() == chat_template()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_rows())
def test_template_equals_harmony_on_random_rows(tokenizer, row):
    """Generated rows (tool rounds, analysis, several turns, a row ending with a call): the template
    as a training row and as the prompt before the last turn, against harmony through our renderer."""
    assert template_ids(tokenizer, row, False) == render_for_training(parse_row(row).conversation)
    last_user = max(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
    prompt = {**row, "messages": row["messages"][: last_user + 1]}
    assert template_ids(tokenizer, prompt, True) == render_prompt(parse_row(prompt, training=False).conversation)
