"""`desc`: what a checkpoint is, from config.json and safetensors headers only (no tensor data, no torch)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from .source import ModelSource

KEY_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "n_embd",
    "intermediate_size",
    "n_inner",
    "ffn_dim",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "n_positions",
    "tie_word_embeddings",
    "dtype",
    "torch_dtype",
    "hidden_act",
    "rms_norm_eps",
    "layer_norm_eps",
    "partial_rotary_factor",
    "sliding_window",
)
COMPONENT_ORDER = ("embeddings", "attention", "mlp", "norms", "head", "other")


def guess_component(name: str) -> str:
    """A tensor's component, from the naming conventions the supported families share: the fallback where no
    rule declares it (planning and `desc` ask the rules first)."""
    lowered = name.lower()
    if "lm_head" in lowered or "embed_out" in lowered:
        return "head"
    if "embed" in lowered or lowered.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in lowered or ".ln_" in lowered or "ln_f" in lowered or "layernorm" in lowered:
        return "norms"
    if any(key in lowered for key in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query_key_value")):
        return "attention"
    if any(key in lowered for key in ("mlp", "fc1", "fc2", "ffn", "feed_forward", "dense_h_to_4h", "dense_4h_to_h")):
        return "mlp"
    return "other"


def declared_components(source: ModelSource) -> dict:
    """tensor name -> the component its shipped rule declares (`component:`), for the tensors whose first
    matching rule declares one; empty when no shipped rules file describes the model. Rules are data: a
    family whose names the guess misreads says what its tensors are in its rules file."""
    from ..errors import TensorscaleError
    from ..rulebook.registry import detect_rules

    try:
        rule_set = detect_rules(source.config)
    except TensorscaleError:
        return {}
    if rule_set is None:
        return {}
    declared = {}
    for name in source.tensors:
        rule = next((rule for rule in rule_set.tensors if rule.regex.fullmatch(name)), None)
        if rule is not None and rule.component is not None:
            declared[name] = str(rule.component)
    return declared


def describe(source: ModelSource) -> dict:
    by_component: dict[str, int] = defaultdict(int)
    dtypes: Counter = Counter()
    declared = declared_components(source)
    for name, info in source.tensors.items():
        by_component[declared.get(name) or guess_component(name)] += info.numel
        # as stored: a GGUF's quantized tensors count under their block type (Q4_1...), not the float32 they read as
        dtypes[getattr(info.encoding, "type_name", None) or info.dtype] += info.nbytes
    config = source.config
    return {
        "input": source.label,
        "architecture": (config.get("architectures") or [config.get("model_type", "unknown")])[0],
        "model_type": config.get("model_type"),
        "config": {key: config[key] for key in KEY_FIELDS if key in config},
        "total_parameters": int(sum(info.numel for info in source.tensors.values())),
        "parameters_by_component": {key: int(by_component[key]) for key in COMPONENT_ORDER if by_component.get(key)},
        "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
        "tensors": len(source.tensors),
        "dtypes": {dtype: int(nbytes) for dtype, nbytes in dtypes.most_common()},
        "shards": [os.path.basename(path) for path in source.shards],
        "total_bytes": int(source.total_bytes),
    }
