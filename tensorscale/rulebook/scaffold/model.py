"""What the checkpoint is, before any role is guessed: its tensor names grouped into patterns (the first
numeric index generalised to the layer), its sizes (hidden, heads, kv heads, FFN, vocabulary) from config.json
or, where a field is missing or null, from the tensor shapes, and its norm kind (RMSNorm or LayerNorm).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

from .vocabulary import (
    DECIDE,
    EMBED_WORDS,
    FFN_KEYS,
    HEADS_KEYS,
    HIDDEN_KEYS,
    KV_KEYS,
    LAYER_KEYS,
    VOCAB_KEYS,
    _is_norm_component,
)


@dataclass
class _Pattern:
    """One group of tensor names that differ only in their numeric indices."""

    regex: str
    names: list[str]
    shape: tuple[int, ...]
    dtype: str
    layered: bool
    extra_indices: int  # numeric parts after the layer index (experts, per-head modules)
    shapes_differ: bool = False

    @property
    def example(self) -> str:
        return self.names[0]

    @property
    def parts(self) -> list[str]:
        return self.example.lower().split(".")

    @property
    def module(self) -> str:
        """The module's own name: the component before .weight / .bias (or the last one)."""
        parts = self.parts
        if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
            return parts[-2]
        return parts[-1]

    @property
    def is_bias(self) -> bool:
        return self.parts[-1] == "bias"


@dataclass
class _Model:
    config: dict
    keys: dict  # hidden / heads / kv / ffn / layers / vocab -> config field (or None)
    sizes: dict  # space name -> size in this checkpoint
    size_exprs: dict  # space name -> size expression in the rules
    head_dim: int | None
    layers: int | None
    lets: list = field(default_factory=list)  # (name, expression, [comments])
    config_decide: list = field(default_factory=list)
    space_comments: dict = field(default_factory=dict)  # space -> [comment lines]
    space_extra: dict = field(default_factory=dict)  # space -> {key: value}
    header_decide: list = field(default_factory=list)
    norm: str | None = None
    norm_comment: list = field(default_factory=list)
    layout: str = "linear"  # "linear" ([out, in]) or "conv1d" ([in, out])
    layout_certain: bool = False


def _first_key(config: dict, keys, allow_null: bool = False):
    for key in keys:
        if key in config:
            value = config[key]
            if isinstance(value, bool):
                continue
            if isinstance(value, int) or (allow_null and value is None):
                return key
    return None


def _shape_of(info) -> tuple[int, ...]:
    shape = info.shape if hasattr(info, "shape") else info[0]
    return tuple(int(dim) for dim in shape)


def _dtype_of(info) -> str:
    return info.dtype if hasattr(info, "dtype") else info[1]


def _group(tensors: dict) -> list[_Pattern]:
    """Tensor names grouped by their shape with numbers taken out; the first number is the layer index."""
    groups: dict[tuple, list[str]] = {}
    for name in tensors:
        key = tuple("#" if part.isdigit() else part for part in name.split("."))
        groups.setdefault(key, []).append(name)
    patterns = []
    for key, names in groups.items():
        pieces, seen = [], 0
        for part in key:
            if part == "#":
                pieces.append(r"(?P<layer>\d+)" if seen == 0 else r"\d+")
                seen += 1
            else:
                pieces.append(re.escape(part))
        names.sort(key=_natural)
        shapes = {_shape_of(tensors[name]) for name in names}
        first = tensors[names[0]]
        patterns.append(
            _Pattern(
                r"\.".join(pieces),
                names,
                _shape_of(first),
                _dtype_of(first),
                seen > 0,
                max(0, seen - 1),
                len(shapes) > 1,
            )
        )
    return patterns


def _natural(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(dim) for dim in shape) + "]"


# --- the model's sizes --------------------------------------------------------------------------------------


def _model(config: dict, patterns: list[_Pattern]) -> _Model:
    keys = {
        "hidden": _first_key(config, HIDDEN_KEYS),
        "heads": _first_key(config, HEADS_KEYS),
        "kv": _first_key(config, KV_KEYS),
        "ffn": _first_key(config, FFN_KEYS, allow_null=True),
        "layers": _first_key(config, LAYER_KEYS),
        "vocab": _first_key(config, VOCAB_KEYS),
    }
    hidden = config.get(keys["hidden"]) if keys["hidden"] else None
    heads = config.get(keys["heads"]) if keys["heads"] else None
    model = _Model(config, keys, {}, {}, None, config.get(keys["layers"]) if keys["layers"] else None)
    if hidden is None:
        hidden = _most_common_dim(patterns)
        model.header_decide.append(
            f"no hidden-size field ({', '.join(HIDDEN_KEYS[:3])}...) in config.json: the hidden size {hidden} is "
            "the most common tensor dimension; name the config field that holds it in spaces.hidden and config"
        )
        model.size_exprs["hidden"] = str(hidden)
    else:
        model.size_exprs["hidden"] = keys["hidden"]
    model.sizes["hidden"] = hidden

    if heads:
        explicit = isinstance(config.get("head_dim"), int) and not isinstance(config.get("head_dim"), bool)
        derived = f"{model.size_exprs['hidden']} // {keys['heads']}"
        if explicit:
            model.head_dim = config["head_dim"]
            model.lets.append(("head_dim", f"cfg('head_dim', {derived})", []))
        else:
            model.head_dim = hidden // heads if hidden and heads else None
            model.lets.append(("head_dim", derived, ["no head_dim field: hidden size // heads (kept: both grow ×n)"]))
        model.sizes["heads"] = heads * model.head_dim
        model.size_exprs["heads"] = f"{keys['heads']} * head_dim"
        if keys["kv"]:
            model.lets.append(("kv_heads", f"cfg('{keys['kv']}', {keys['heads']})", []))
            model.sizes["kv_heads"] = config[keys["kv"]] * model.head_dim
            model.size_exprs["kv_heads"] = "kv_heads * head_dim"
    else:
        model.header_decide.append(
            f"no attention-head count ({', '.join(HEADS_KEYS[:3])}...) in config.json: no heads space was written; "
            "attention tensors get roles by size only"
        )

    ffn_key = keys["ffn"]
    ffn_value = config.get(ffn_key) if ffn_key else None
    if isinstance(ffn_value, int):
        model.sizes["ffn"] = ffn_value
        model.size_exprs["ffn"] = ffn_key
    else:
        found = _ffn_from_shapes(patterns, model.sizes)
        if found is not None:
            derived = (
                f"{found // hidden} * {model.size_exprs['hidden']}" if hidden and found % hidden == 0 else str(found)
            )
            model.sizes["ffn"] = found
            if ffn_key:  # present but null: a size derived from the hidden size
                model.lets.append(
                    (
                        "ffn_size",
                        f"cfg('{ffn_key}', {derived})",
                        [
                            f"{DECIDE} {ffn_key} is null in config.json; the FFN tensors are {found} wide = {derived}. "
                            f"Null means the model derives it from the hidden size, so the new config writes {ffn_key} "
                            "out (config below) lest it follow the new hidden size"
                        ],
                    )
                )
            else:
                model.lets.append(
                    (
                        "ffn_size",
                        derived,
                        [
                            f"{DECIDE} no FFN-size field ({', '.join(FFN_KEYS[:3])}...) in config.json; the FFN "
                            "tensors are "
                            f"{found} wide = {derived}. If the model derives it from the hidden size, -upm must "
                            "equal -edm "
                            "(the config cannot say otherwise)"
                        ],
                    )
                )
            model.size_exprs["ffn"] = "ffn_size"
    vocab_key = keys["vocab"]
    if vocab_key:
        model.sizes["vocab"] = config[vocab_key]
        model.size_exprs["vocab"] = vocab_key
    else:
        embeds = [p for p in patterns if len(p.shape) == 2 and any(w in p.example.lower() for w in EMBED_WORDS)]
        if embeds:
            model.sizes["vocab"] = embeds[0].shape[0]
            model.size_exprs["vocab"] = str(embeds[0].shape[0])
            model.header_decide.append("no vocab_size in config.json: the vocabulary size is the embedding's rows")
    return model


def _most_common_dim(patterns) -> int:
    counts = Counter(dim for p in patterns for dim in p.shape for _ in p.names)
    return counts.most_common(1)[0][0] if counts else 0


def _ffn_from_shapes(patterns, sizes) -> int | None:
    """The FFN width when config.json does not give it: the commonest dimension of per-layer 2-D weights
    that is neither the hidden size nor an attention size."""
    known = {size for size in sizes.values() if size}
    counts = Counter()
    for p in patterns:
        if p.layered and len(p.shape) == 2 and not any(_is_norm_component(part) for part in p.parts):
            for dim in p.shape:
                if dim not in known and not _sum_of(dim, known):
                    counts[dim] += len(p.names)
    return counts.most_common(1)[0][0] if counts else None


def _sum_of(size, known) -> bool:
    return any(sum(parts) == size for count in (2, 3) for parts in product(sorted(known), repeat=count))


def _is_norm(pattern: _Pattern) -> bool:
    return any(_is_norm_component(part) for part in pattern.parts[:-1]) and len(pattern.shape) == 1


def _settle_norm(config: dict, model: _Model, patterns: list[_Pattern]) -> None:
    """The norm kind of the hidden space (model.norm) and its comments, from the norm tensors and config.json."""
    hidden = model.sizes["hidden"]

    # Norm kind: a LayerNorm has a bias; RMSNorm has none. A (1+w) gain cannot be told from headers.
    norm_patterns = [p for p in patterns if _is_norm(p) and p.shape == (hidden,)]
    has_bias = any(p.is_bias for p in norm_patterns)
    if not norm_patterns:
        model.norm = None
    elif has_bias:
        model.norm = "layer"
        model.norm_comment.append("LayerNorm: the norms have a bias")
    elif any(key in config for key in ("layer_norm_eps", "layer_norm_epsilon", "layernorm_epsilon")):
        model.norm = "layer"
        model.norm_comment.append(
            f"{DECIDE} bias-less norms but a layer_norm_eps in config.json: taken as a LayerNorm without bias. "
            "If they are RMSNorms, use scaled: true and norm: rms"
        )
    else:
        model.norm = "rms"
        evidence = "rms_norm_eps in config.json" if "rms_norm_eps" in config else "no norm has a bias"
        model.norm_comment.append(f"RMSNorm: {evidence}")
    arch_words = " ".join([str(config.get("model_type", ""))] + [str(a) for a in config.get("architectures") or []])
    if model.norm == "rms" and "gemma" in arch_words.lower():
        model.norm_comment.append(
            f"{DECIDE} Gemma-like models compute x̂·(1+w): then use norm: rms_one_plus, scale tied final norms "
            "with {factor: c, offset: c - 1}, and store the embedding ÷sqrt(n) (it is multiplied by sqrt(hidden) "
            "at run time); see rules/gemma.yaml"
        )
    elif model.norm == "rms" and "rms_norm_eps" not in config:
        model.norm_comment.append(
            f"{DECIDE} no rms_norm_eps in config.json: if the model computes x̂·(1+w), use norm: rms_one_plus"
        )
    if not norm_patterns:
        model.header_decide.append(
            "no norm tensor of the hidden size was found: the hidden space has no norm: key, "
            "so `up` can only tile by whole factors"
        )
