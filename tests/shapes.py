"""Small model shapes shared by the checkpoint tests.

Milliseconds per model, with every feature: both layer kinds, GQA, 4 experts top-2. Written out
rather than derived from the `tiny` preset, which may change.
"""

from osstune.config import ModelConfig

CFG = ModelConfig(
    num_hidden_layers=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=64,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=16,
    pad_token_id=1000,
    eos_token_id=1001,
)
