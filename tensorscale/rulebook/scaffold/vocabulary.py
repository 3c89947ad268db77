"""The names `rules new` reads a checkpoint by: the config.json fields that hold each size, the module names
that say what a tensor does to the residual stream, the words that mark embeddings, positions and norms, and
the DECIDE marker of every guess. Tables only; the guessing that uses them is in model.py and roles.py.
"""

from __future__ import annotations

import re

DECIDE = "DECIDE:"

HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "model_dim", "n_embed", "embed_dim")
HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff", "inner_dim", "ffn_size")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
VOCAB_KEYS = ("vocab_size", "n_vocab", "padded_vocab_size")

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# Module names (the component before .weight / .bias) and what they do to the residual stream.
Q_NAMES = {"q_proj", "q", "query", "wq", "q_lin"}
K_NAMES = {"k_proj", "k", "key", "wk", "k_lin"}
V_NAMES = {"v_proj", "v", "value", "wv", "v_lin"}
QKV_NAMES = {"qkv_proj", "qkv", "c_attn", "query_key_value", "wqkv", "w_pack", "in_proj", "att_proj", "qkv_lin"}
ATTN_OUT_NAMES = {"o_proj", "out_proj", "o", "wo", "out_lin", "dense", "c_proj", "proj", "attn_out"}
FFN_IN_NAMES = {
    "gate_proj",
    "up_proj",
    "fc1",
    "c_fc",
    "w1",
    "w3",
    "dense_h_to_4h",
    "wi",
    "wi_0",
    "wi_1",
    "fc_in",
    "gate",
    "up",
    "ff_in",
}
FFN_FUSED_IN_NAMES = {"gate_up_proj", "gate_up", "w13", "w1w3", "ff_proj"}
FFN_OUT_NAMES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "c_proj", "proj", "down", "ff_out"}
HEAD_NAMES = {"lm_head", "embed_out", "output", "head"}
POSITION_WORDS = ("wpe", "position", "pos_emb", "embed_positions")
EMBED_WORDS = ("embed", "wte", "tok_embeddings", "word_embeddings")


def _is_norm_component(part: str) -> bool:
    part = part.lower()
    return "norm" in part or bool(re.fullmatch(r"ln(_?[0-9a-z]*)?", part))
