"""The size options (--hidden-size, --intermediate-size, --num-attention-heads, --num-key-value-heads, and
the same keys in batch jobs) and the space each resizes unless a rules file says otherwise (`targets:`).

The one list of them: planning, the CLI and batch import it from here (a module with no imports, so that
reading a jobs file or declaring click options loads nothing else).
"""

DEFAULT_TARGETS = {
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv_heads",
}
TARGET_KEYS = tuple(DEFAULT_TARGETS)
DEFAULT_TIE_KEY = "tie_word_embeddings"  # the config key that says the embeddings are tied, unless `tie:` says
