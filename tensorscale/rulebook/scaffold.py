"""`rules new`: a starting rules file for a new architecture, from config.json and safetensors headers.

Pure functions, headers and config in, YAML text out: no tensor data is read and nothing imports torch or
transformers. The scaffold is written in the rules language of `schema.py`:
- sizes come from config.json (hidden, heads, kv heads, FFN, vocab under their usual names), or, where a
  field is missing or null, from the tensor shapes;
- tensor names are grouped into patterns, the first index generalised to ``(?P<layer>\\d+)``;
- each axis gets a role from its size compared with the spaces' sizes, and from the module's name where
  sizes alone cannot tell (a square q_proj is [heads, hidden.in]; an o_proj is [hidden, heads.in]);
- the storage layout, [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D), is voted on by the tensors whose
  names say whether they read or write the residual stream and whose shapes say on which axis it lies;
- the tied-embedding pattern of rules/llama.yaml (final norm ÷n_tiles while tied, lm_head rules, `create`
  for --untie-embeddings) and a drop rule for rotary inv_freq buffers are added.
Every guess that the names and shapes cannot settle gets a ``# DECIDE:`` comment above it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

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
FFN_IN_NAMES = {"gate_proj", "up_proj", "fc1", "c_fc", "w1", "w3", "dense_h_to_4h", "wi", "wi_0", "wi_1", "fc_in",
                "gate", "up", "ff_in"}
FFN_FUSED_IN_NAMES = {"gate_up_proj", "gate_up", "w13", "w1w3", "ff_proj"}
FFN_OUT_NAMES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "wo", "fc_out", "c_proj", "proj", "down", "ff_out"}
HEAD_NAMES = {"lm_head", "embed_out", "output", "head"}
POSITION_WORDS = ("wpe", "position", "pos_emb", "embed_positions")
EMBED_WORDS = ("embed", "wte", "tok_embeddings", "word_embeddings")


def _is_norm_component(part: str) -> bool:
    part = part.lower()
    return "norm" in part or bool(re.fullmatch(r"ln(_?[0-9a-z]*)?", part))


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
class _Rule:
    pattern: _Pattern
    axes: list | None = None
    drop: bool = False
    when: str | None = None
    scale: str | None = None
    notes: list[str] = field(default_factory=list)
    decide: list[str] = field(default_factory=list)
    match: str | None = None  # the regex when it is not the pattern's own


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
        patterns.append(_Pattern(r"\.".join(pieces), names, _shape_of(first), _dtype_of(first), seen > 0,
                                 max(0, seen - 1), len(shapes) > 1))
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
            derived = (f"{found // hidden} * {model.size_exprs['hidden']}" if hidden and found % hidden == 0
                       else str(found))
            model.sizes["ffn"] = found
            if ffn_key:  # present but null: a size derived from the hidden size
                model.lets.append(("ffn_size", f"cfg('{ffn_key}', {derived})", [
                    f"{DECIDE} {ffn_key} is null in config.json; the FFN tensors are {found} wide = {derived}. "
                    f"Null means the model derives it from the hidden size, so the new config writes {ffn_key} "
                    "out (config below) lest it follow the new hidden size"]))
            else:
                model.lets.append(("ffn_size", derived, [
                    f"{DECIDE} no FFN-size field ({', '.join(FFN_KEYS[:3])}...) in config.json; the FFN tensors are "
                    f"{found} wide = {derived}. If the model derives it from the hidden size, -upm must equal -edm "
                    "(the config cannot say otherwise)"]))
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


# --- roles ----------------------------------------------------------------------------------------------------


def _context(pattern: _Pattern) -> str | None:
    """'attention' or 'mlp', from the components before the module's own name."""
    parts = pattern.parts[:-1]
    if any("attn" in part or "attention" in part for part in parts):
        return "attention"
    if any(word in part for part in parts for word in ("mlp", "ffn", "feed_forward", "feedforward")):
        return "mlp"
    module = pattern.module
    if module in Q_NAMES | K_NAMES | V_NAMES | QKV_NAMES:
        return "attention"
    if module in FFN_IN_NAMES | FFN_OUT_NAMES | FFN_FUSED_IN_NAMES:
        return "mlp"
    return None


def _tag(pattern: _Pattern) -> str | None:
    """What a 2-D weight does, from its module name: q, k, v, qkv (read the residual, write heads), o (write the
    residual from heads), ffn_in / ffn_fused (read the residual), ffn_out (write it)."""
    module, context = pattern.module, _context(pattern)
    if module in QKV_NAMES:
        return "qkv"
    if module in Q_NAMES:
        return "q"
    if module in K_NAMES:
        return "k"
    if module in V_NAMES:
        return "v"
    if module in FFN_FUSED_IN_NAMES:
        return "ffn_fused"
    if context == "attention" and module in ATTN_OUT_NAMES:
        return "o"
    if module in FFN_IN_NAMES:
        return "ffn_in"
    if module in FFN_OUT_NAMES and context != "attention":
        return "ffn_out"
    return None


READS = {"q", "k", "v", "qkv", "ffn_in", "ffn_fused"}
WRITES = {"o", "ffn_out"}


def _vote(pattern: _Pattern, hidden: int) -> str | None:
    """'linear' or 'conv1d' where the name says which side is the residual and the shape says which axis."""
    tag = _tag(pattern)
    if tag is None or len(pattern.shape) != 2 or pattern.is_bias:
        return None
    first, second = (dim == hidden for dim in pattern.shape)
    if first == second:
        return None
    if tag in READS:
        return "linear" if second else "conv1d"
    if tag in WRITES:
        return "linear" if first else "conv1d"
    return None


def _preferences(tag: str | None, context: str | None, model: _Model) -> list[str]:
    kv = "kv_heads" if "kv_heads" in model.sizes else "heads"
    if tag in ("q", "o"):
        return ["heads"]
    if tag in ("k", "v"):
        return [kv, "heads"]
    if tag in ("ffn_in", "ffn_out", "ffn_fused"):
        return ["ffn"]
    if context == "attention":
        return ["heads", kv]
    if context == "mlp":
        return ["ffn"]
    return []


def _fused(size: int, tag, context, model: _Model):
    """A fused axis whose parts add up to `size`, preferring what the name suggests."""
    sizes = model.sizes
    tries = []
    if tag == "qkv" or (context == "attention" and tag is None):
        if "kv_heads" in sizes:
            tries.append(["heads", "kv_heads", "kv_heads"])
        tries.append(["heads", "heads", "heads"])
    if tag == "ffn_fused" or context == "mlp":
        tries.append(["ffn", "ffn"])
    for parts in tries:
        if all(p in sizes for p in parts) and sum(sizes[p] for p in parts) == size:
            return parts, True
    names = [name for name in ("heads", "kv_heads", "ffn", "hidden") if name in sizes]
    for count in (2, 3):
        for parts in product(names, repeat=count):
            if sum(sizes[p] for p in parts) == size:
                return list(parts), False
    return None, False


def _pick(size: int, prefs: list[str], tag, context, model: _Model, rule: _Rule, where: str):
    """The space of one non-residual axis, or a fused list, or '-'. Adds notes and DECIDE comments to `rule`."""
    sizes = model.sizes
    order = ["heads", "kv_heads", "ffn", "hidden"]
    candidates = [name for name in order if sizes.get(name) == size]
    chosen = next((name for name in prefs if name in candidates), None)
    if chosen is not None:
        if len(candidates) > 1:
            rule.notes.append(f"{where}: {size} matches {' and '.join(candidates)}; {chosen} by the name")
        return chosen
    if candidates:
        chosen = candidates[0]
        if prefs:
            rule.decide.append(f"{where}: the name suggests {prefs[0]}, but {size} matches {' and '.join(candidates)}; "
                               f"guessed {chosen}")
        elif len(candidates) > 1:
            rule.decide.append(f"{where}: {size} matches {' and '.join(candidates)} and the name does not say which; "
                               f"guessed {chosen}")
        return chosen
    parts, by_name = _fused(size, tag, context, model)
    if parts is not None:
        sums = " + ".join(str(sizes[p]) for p in parts)
        text = (f"{where}: {size} = {sums}, read as a fused axis [{', '.join(parts)}] of consecutive blocks "
                f"({'parts from the name' if by_name else 'parts guessed from the sizes'}); check the part order in "
                "the model's code")
        if len(parts) == 3 and "heads" in parts:
            text += ("; if each head's q, k, v lie together (GPT-NeoX query_key_value), use one space of size "
                     f"{size} with unit 3 * head_dim instead (see rules/gpt_neox.yaml)")
        rule.decide.append(text)
        return parts
    fields = [key for key, value in model.config.items()
              if value == size and isinstance(value, int) and not isinstance(value, bool)]
    hint = f"; it equals {', '.join(fields)} in config.json, a size that does not grow?" if fields else ""
    rule.decide.append(f"{where}: {size} matches no space (hidden {sizes.get('hidden')}, heads {sizes.get('heads')}, "
                       f"ffn {sizes.get('ffn')}): left unchanged ('-'){hint}")
    return "-"


def _matrix_roles(pattern: _Pattern, model: _Model, rule: _Rule) -> list:
    hidden = model.sizes["hidden"]
    tag, context = _tag(pattern), _context(pattern)
    own = _vote(pattern, hidden)
    layout = own or model.layout
    out_axis, in_axis = (0, 1) if layout == "linear" else (1, 0)
    shape = pattern.shape
    if layout == "conv1d":
        rule.decide.append(
            f"stored [in, out] (Conv1D, y = x·W): {'from this shape and the name' if own else 'as the model is'}; "
            "roles follow [input axis, output axis]. Swap them if this is an nn.Linear [out, in]"
        )
    elif own is None and shape[0] == shape[1] and (not model.layout_certain or tag is None):
        rule.decide.append(
            f"square {_shape_text(shape)}: axis 0 taken as the output (nn.Linear [out, in]); a square shape cannot "
            "tell, so confirm it in the model's code"
        )
    prefs = _preferences(tag, context, model)
    axes = [None, None]
    if tag in READS or (tag is None and shape[in_axis] == hidden and shape[out_axis] != hidden):
        if shape[in_axis] != hidden:
            rule.decide.append(f"the name says it reads the residual stream, but its input axis is {shape[in_axis]}, "
                               f"not the hidden size {hidden}")
            axes[in_axis] = _in(_pick(shape[in_axis], [], tag, context, model, rule, "input axis"))
        else:
            axes[in_axis] = "hidden.in"
        if tag is None:
            rule.decide.append("the name says nothing of what it computes: taken as a reader of the residual stream "
                               "because its input axis is the hidden size")
        axes[out_axis] = _pick(shape[out_axis], prefs, tag, context, model, rule, "output axis")
    elif tag in WRITES or (tag is None and shape[out_axis] == hidden and shape[in_axis] != hidden):
        if shape[out_axis] != hidden:
            rule.decide.append(f"the name says it writes the residual stream, but its output axis is "
                               f"{shape[out_axis]}, not the hidden size {hidden}")
            axes[out_axis] = _pick(shape[out_axis], [], tag, context, model, rule, "output axis")
        else:
            axes[out_axis] = "hidden"
        if tag is None:
            rule.decide.append("the name says nothing of what it computes: taken as a writer of the residual stream "
                               "because its output axis is the hidden size")
        axes[in_axis] = _in(_pick(shape[in_axis], prefs, tag, context, model, rule, "input axis"))
    elif shape[0] == hidden and shape[1] == hidden:
        axes = ["hidden", "hidden.in"] if layout == "linear" else ["hidden.in", "hidden"]
        rule.decide.append("hidden × hidden and the name does not say what it is: taken as a map of the residual "
                           "stream to itself; if one side is the heads space, say so")
    else:
        axes[out_axis] = _pick(shape[out_axis], prefs, tag, context, model, rule, "output axis")
        axes[in_axis] = _in(_pick(shape[in_axis], prefs, tag, context, model, rule, "input axis"))
        rule.decide.append("neither axis is the hidden size: roles guessed from the sizes alone")
    return axes


def _in(label):
    if label == "-":
        return "-"
    if isinstance(label, list):
        return [part + ".in" for part in label]
    return label + ".in"


def _norm_roles(pattern: _Pattern, model: _Model, rule: _Rule) -> list:
    size = pattern.shape[0]
    sizes, module = model.sizes, pattern.module
    query_key = re.match(r"(q|k|query|key)(_|$)", module)
    if query_key:
        kind = "heads" if query_key.group(1) in ("q", "query") else ("kv_heads" if "kv_heads" in sizes else "heads")
        if size == sizes.get(kind):
            model.space_extra.setdefault(kind, {}).update({"equal": "true", "norm": model.norm or "rms"})
            if size == sizes["hidden"] or size == model.head_dim:
                rule.decide.append(
                    f"a norm over the whole {kind} projection ({size}), tiled with it (OLMo-2); if it is one norm "
                    f"of head_dim ({model.head_dim}) shared by every head, use ['-']"
                )
            else:
                rule.notes.append(f"a norm over the whole {kind} projection ({size}): tiled with it")
            return [kind + ".norm"]
        if size == model.head_dim:
            rule.notes.append(f"one norm of head_dim ({size}) shared by every head: unchanged (head_dim is kept)")
            if pattern.extra_indices:
                rule.decide.append("one module per head index: new heads need their own copies (see the "
                                   "`replicate:` rules of rules/stablelm.yaml)")
            return ["-"]
    if size == sizes["hidden"]:
        return ["hidden.norm"]
    rule.decide.append(f"a norm of size {size}, which is not the hidden size {sizes['hidden']}: which space does it "
                       "normalise? Left unchanged")
    return ["-"]


def _roles(pattern: _Pattern, model: _Model, by_regex: dict, rule: _Rule):
    shape, sizes = pattern.shape, model.sizes
    if pattern.dtype not in FLOAT_DTYPES:
        rule.decide.append(f"a {pattern.dtype} tensor (a buffer?): copied unchanged; drop it if the model does not "
                           "load it")
        return ["-"] * len(shape)
    if len(shape) == 0:
        return []
    if len(shape) == 1:
        if _is_norm(pattern):
            return _norm_roles(pattern, model, rule)
        if pattern.is_bias:
            sibling = by_regex.get(pattern.regex[: -len("bias")] + "weight")
            if sibling is not None and sibling.axes:
                out_axis = 1 if _layout_of(sibling.pattern, model) == "conv1d" else 0
                return [sibling.axes[min(out_axis, len(sibling.axes) - 1)]]
        candidates = [name for name in ("hidden", "heads", "kv_heads", "ffn", "vocab") if sizes.get(name) == shape[0]]
        if candidates:
            rule.decide.append(f"a vector of size {shape[0]} ({', '.join(candidates)}) whose name does not say what "
                               f"it is: taken as elementwise on {candidates[0]}")
            return [candidates[0]]
        rule.decide.append(f"a vector of size {shape[0]} that matches no space: left unchanged")
        return ["-"]
    if len(shape) == 2:
        return _matrix_roles(pattern, model, rule)
    rule.decide.append(f"a {len(shape)}-D tensor {_shape_text(shape)}: give each axis its role")
    return ["-"] * len(shape)


def _layout_of(pattern: _Pattern, model: _Model) -> str:
    return _vote(pattern, model.sizes["hidden"]) or model.layout


def _is_norm(pattern: _Pattern) -> bool:
    return any(_is_norm_component(part) for part in pattern.parts[:-1]) and len(pattern.shape) == 1


def _kind(pattern: _Pattern) -> str:
    """embedding, position, head, or block (everything else)."""
    if pattern.layered:
        return "block"
    lowered = pattern.example.lower()
    if pattern.module in HEAD_NAMES and len(pattern.shape) in (1, 2):
        return "head"
    if any(word in lowered for word in POSITION_WORDS):
        return "position"
    if any(word in lowered for word in EMBED_WORDS) and len(pattern.shape) == 2:
        return "embedding"
    return "block"


# --- the file -------------------------------------------------------------------------------------------------


def scaffold_rules(config: dict, tensors: dict, *, source: str = "SRC", name: str | None = None) -> str:
    """A starting rules file (YAML text) for the checkpoint with this config.json and these tensors (name ->
    an object with .shape and .dtype, such as a safetensors TensorInfo, or a (shape, dtype) pair)."""
    patterns = _group(tensors)
    model = _model(config, patterns)
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
            f"{DECIDE} no rms_norm_eps in config.json: if the model computes x̂·(1+w), use norm: rms_one_plus")
    if not norm_patterns:
        model.header_decide.append("no norm tensor of the hidden size was found: the hidden space has no norm: key, "
                                   "so `up` can only tile by whole factors")

    votes = Counter(v for v in (_vote(p, hidden) for p in patterns) if v)
    if votes:
        model.layout = "conv1d" if votes["conv1d"] > votes["linear"] else "linear"
        model.layout_certain = len(votes) == 1
    if model.layout == "conv1d":
        model.header_decide.append(
            f"the weights look stored [in, out] (Conv1D, y = x·W: {votes['conv1d']} tensors say so"
            + (f", {votes['linear']} say [out, in]" if votes["linear"] else "") + "); their roles read "
            "[input axis, output axis]"
        )
    elif not votes:
        model.header_decide.append("no tensor name says whether weights are stored [out, in] (nn.Linear) or [in, out] "
                                   "(Conv1D): [out, in] assumed everywhere")
    elif not model.layout_certain:
        model.header_decide.append(f"storage layouts disagree ({votes['linear']} tensors [out, in], {votes['conv1d']} "
                                   "[in, out]): each tensor follows its own shape where it can")

    kinds = {p.regex: _kind(p) for p in patterns}
    # Rules for weights before biases, so a bias can take its weight's output role.
    by_regex: dict[str, _Rule] = {}
    for p in sorted(patterns, key=lambda p: p.is_bias):
        rule = _Rule(p)
        by_regex[p.regex] = rule
        lowered = p.example.lower()
        if lowered.endswith("inv_freq") or lowered.endswith("masked_bias") or (
                p.module in ("attn", "attention") and p.is_bias and len(p.shape) == 4):
            rule.drop = True
            rule.notes.append("a buffer, not a parameter: dropped")
            continue
        kind = kinds[p.regex]
        if kind == "embedding":
            rule.axes = _embedding_roles(p, model, rule, "hidden")
        elif kind == "position":
            rule.axes = ["-", "hidden"] if len(p.shape) == 2 and p.shape[1] == hidden else None
            if rule.axes is None:
                rule.axes = ["-"] * len(p.shape)
                rule.decide.append(f"position table {_shape_text(p.shape)} whose columns are not the hidden size")
            else:
                rule.notes.append("learned positions: written into the residual stream like the embedding")
        elif kind == "head":
            if p.is_bias:
                rule.axes = ["vocab"] if p.shape[0] == model.sizes.get("vocab") else ["-"]
            else:
                rule.axes = _embedding_roles(p, model, rule, "hidden.in")
        else:
            rule.axes = _roles(p, model, by_regex, rule)
        if p.shapes_differ:
            rule.decide.append("the tensors of this pattern differ in shape from layer to layer: one rule cannot fit "
                               "them all unless the sizes come from per-layer config values")
        if p.extra_indices and not any("one module per head index" in text for text in rule.decide):
            rule.decide.append("a second index in the name (experts? per-head modules?): every value shares this rule")
    return _render(config, model, patterns, by_regex, kinds, source, name)


def _embedding_roles(pattern: _Pattern, model: _Model, rule: _Rule, hidden_role: str) -> list:
    shape, sizes = pattern.shape, model.sizes
    if len(shape) == 2 and shape[1] == sizes["hidden"] and shape[0] == sizes.get("vocab", shape[0]):
        return ["vocab", hidden_role]
    if len(shape) == 2 and shape[0] == sizes["hidden"] and shape[1] == sizes.get("vocab", shape[1]):
        rule.decide.append(f"stored {_shape_text(shape)} = [hidden, vocab], transposed from the usual [vocab, hidden]")
        return [hidden_role, "vocab"]
    rule.decide.append(f"{_shape_text(shape)} is not [vocab {sizes.get('vocab')}, hidden {sizes['hidden']}]: does "
                       "it have its own space (OPT's word_embed_proj_dim)? Left unchanged")
    return ["-"] * len(shape)


def _label(label) -> str:
    if isinstance(label, list):
        return "[" + ", ".join(_label(part) for part in label) + "]"
    return "'-'" if label == "-" else label


def _axes_text(axes) -> str:
    return "[" + ", ".join(_label(label) for label in axes) + "]"


def _quote(pattern: str) -> str:
    return "'" + pattern.replace("'", "''") + "'"


def _comment(lines, indent: str, width: int = 110) -> list[str]:
    """Comment lines, wrapped."""
    out = []
    for text in lines:
        words, line = text.split(), ""
        first = True
        for word in words:
            candidate = f"{line} {word}" if line else word
            if len(indent) + 2 + len(candidate) > width and line:
                out.append(f"{indent}# {line}" if first else f"{indent}#   {line}")
                first, line = False, word
            else:
                line = candidate
        if line:
            out.append(f"{indent}# {line}" if first else f"{indent}#   {line}")
    return out


def _module_path(pattern: _Pattern) -> str:
    return pattern.example.rsplit(".", 1)[0] if pattern.parts[-1] in ("weight", "bias") else pattern.example


def _final_norms(patterns, by_regex, kinds) -> tuple[list[_Pattern], str | None]:
    """The norm just before the head (its weight and bias patterns): the one top-level hidden norm, or among
    several the one named final / ln_f / norm_f; and a DECIDE text when that is a guess."""
    top = [p for p in patterns if kinds[p.regex] == "block" and not p.layered and by_regex[p.regex].axes == ["hidden.norm"]]
    modules = list(dict.fromkeys(_module_path(p) for p in top))
    if len(modules) <= 1:
        return top, None
    named = [m for m in modules if any(word in m.lower().rsplit(".", 1)[-1] for word in ("final", "ln_f", "norm_f"))]
    chosen = named[0] if len(named) == 1 else modules[-1]
    how = "by its name" if len(named) == 1 else "as the last one stored"
    others = ", ".join(m for m in modules if m != chosen)
    return ([p for p in top if _module_path(p) == chosen],
            f"several top-level norms: {chosen} taken as the one the head reads ({how}), not {others}")


NO_FINAL_NORM = ("tied embeddings but no top-level norm before the head: the head would read the residual stream ×n. "
                 "Divide the last thing that writes what it reads by n_tiles (a post-LN model's last layer norm, with "
                 "a `when: layer == ...` rule), or use --untie-embeddings")


@dataclass
class _File:
    """What the sections of the file share: the model, its tensor rules, and the tie."""

    config: dict
    model: _Model
    patterns: list
    by_regex: dict
    kinds: dict
    embeds: list
    head_weight: _Pattern | None
    finals: list
    finals_guess: str | None
    tied_default: bool
    tied_now: bool
    per_layer_lists: list
    emit_depth: bool


def _render(config, model: _Model, patterns, by_regex, kinds, source, name) -> str:
    embeds = [p for p in patterns if kinds[p.regex] == "embedding"]
    # The token embedding is the one with a row per vocabulary entry (not token types, not positions).
    embeds.sort(key=lambda p: p.shape[0] != model.sizes.get("vocab"))
    head_weight = next((p for p in patterns if kinds[p.regex] == "head" and not p.is_bias), None)
    finals, finals_guess = _final_norms(patterns, by_regex, kinds)
    tied_default = head_weight is None and bool(embeds)
    tied_now = config.get("tie_word_embeddings", tied_default)
    per_layer_lists = [key for key, value in config.items()
                       if isinstance(value, list) and model.layers and len(value) == model.layers]
    emit_depth = _depth_supported() and bool(model.keys["layers"]) and any(p.layered for p in patterns)
    file = _File(config, model, patterns, by_regex, kinds, embeds, head_weight, finals, finals_guess, tied_default,
                 tied_default if tied_now is None else bool(tied_now), per_layer_lists, emit_depth)
    sections = [_header_section(file, source, name), _let_section(file), _checks_section(file), _spaces_section(file),
                _config_section(file), _tensors_section(file), _create_section(file)]
    if emit_depth:
        sections.append(_depth(config, model, patterns, by_regex, per_layer_lists))
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def _header_section(file: _File, source: str, name: str | None) -> list[str]:
    config, model = file.config, file.model
    model_type = str(config.get("model_type") or "mymodel")
    architectures = [str(a) for a in config.get("architectures") or []]
    tensors = sum(len(p.names) for p in file.patterns)
    out = [
        f"# Rules scaffold for {model_type} ({', '.join(architectures) or 'no architectures in config.json'}), "
        "written by",
        f"# `tensorscale rules new` from {source}: config.json and the safetensors headers ({tensors} tensors, "
        f"{len(file.patterns)} patterns).",
        "# Roles are guessed from sizes and names. Lines marked DECIDE are guesses to confirm against the model's code;",
        "# fix each, then:",
        "#   tensorscale rules check -i SRC --rules THIS.yaml                  # every tensor matches a rule",
        "#   tensorscale plan -i SRC --rules THIS.yaml -edm 2 -upm 2           # shapes and ops of every tensor",
        "#   tensorscale up -i SRC -o OUT --rules THIS.yaml -edm 2 -upm 2 --verify  # same logits, or exit status 1",
        "# Test it on a tiny checkpoint re-randomised at large scale first (see tests/fixtures.py): default",
        "# initialisation hides head-ordering mistakes.",
    ]
    out.extend(_comment([f"{DECIDE} {text}" for text in model.header_decide], ""))
    out.append(f"name: {json.dumps(name or re.sub(r'[^A-Za-z0-9_.-]+', '_', model_type))}")
    keys, sizes = model.keys, model.sizes
    summary = [f"{model.layers} layers" if model.layers else None, f"hidden {sizes['hidden']}",
               f"{config.get(keys['heads'])} heads" if "heads" in sizes else None,
               f"{config.get(keys['kv'])} kv heads" if "kv_heads" in sizes else None,
               f"FFN {sizes['ffn']}" if "ffn" in sizes else None,
               {"rms": "RMSNorm", "layer": "LayerNorm", None: "no norms"}[model.norm],
               "Conv1D [in, out] weights" if model.layout == "conv1d" else None,
               "tied embeddings" if file.tied_now else "untied"]
    out.append(f"description: {json.dumps('scaffold: ' + ', '.join(s for s in summary if s))}")
    out.append("detect:")
    out.append(f"  model_type: [{json.dumps(model_type)}]" if config.get("model_type") else "  model_type: []")
    out.append(f"  architectures: [{', '.join(json.dumps(a) for a in architectures)}]")
    return out


def _let_section(file: _File) -> list[str]:
    out = ["# Derived values: expressions over config.json fields and the options n, m, nh, nkv, n_tiles,",
           "# snr_db, untie_embeddings; cfg(field, default) for a field that may be missing or null.",
           "let:"]
    for key, expression, comments in file.model.lets:
        out.extend(_comment(comments, "  "))
        out.append(f"  {key}: {json.dumps(expression)}")
    out.append(f"  tied: \"cfg('tie_word_embeddings', {str(file.tied_default).lower()})\"")
    out.append('  keep_tie: "tied and not untie_embeddings"')
    return out


def _checks_section(file: _File) -> list[str]:
    model, keys = file.model, file.model.keys
    checks = []
    if "kv_heads" in model.sizes:
        checks.append((f"{keys['heads']} % kv_heads == 0", f"{keys['heads']} must be a multiple of {keys['kv']}"))
    if "heads" in model.sizes and not isinstance(file.config.get("head_dim"), int):
        hidden = model.size_exprs["hidden"]
        checks.append((f"{hidden} % {keys['heads']} == 0", f"{hidden} must be a multiple of {keys['heads']}"))
    if not checks:
        return []
    out = ["checks:"]
    for expression, message in checks:
        out.append(f"  - assert: {json.dumps(expression)}")
        out.append(f"    message: {json.dumps(message)}")
    return out


def _spaces_section(file: _File) -> list[str]:
    model, sizes, exprs = file.model, file.model.sizes, file.model.size_exprs
    out = ["# The model's spaces: size, growth (n hidden, nh heads, nkv kv heads, m FFN), unit (a head), and for",
           "# `down` whether clustering is per layer, whether a norm rescales (scaled) or centres (equal) the space.",
           "spaces:"]
    out.extend(_comment(model.norm_comment, "  "))
    norm_keys = {"rms": ", scaled: true, norm: rms", "layer": ", equal: true, norm: layer", None: ""}[model.norm]
    out.append(f"  hidden: {{size: {exprs['hidden']}, grow: n{norm_keys}}}")
    per = ", per: layer" if any(p.layered for p in file.patterns) else ""

    def extra(space):
        return "".join(f", {key}: {value}" for key, value in model.space_extra.get(space, {}).items())

    if "heads" in sizes:
        within = ", within: kv_heads" if "kv_heads" in sizes else ""
        out.append(f"  heads: {{size: {exprs['heads']}, unit: head_dim, grow: nh{per}{within}{extra('heads')}}}")
    if "kv_heads" in sizes:
        out.append(f"  kv_heads: {{size: {exprs['kv_heads']}, unit: head_dim, grow: nkv{per}{extra('kv_heads')}}}")
    if "ffn" in sizes:
        out.append(f"  ffn: {{size: {exprs['ffn']}, grow: m{per}}}")
    if "vocab" in sizes:
        out.append(f"  vocab: {{size: {exprs['vocab']}}}")
    return out


def _config_section(file: _File) -> list[str]:
    config, model, keys = file.config, file.model, file.model.keys
    out = ["# New config.json values.", "config:"]
    if keys["hidden"]:
        out.append(f"  {keys['hidden']}: {json.dumps(keys['hidden'] + ' * n')}")
    eps_key = next((key for key in ("rms_norm_eps", "norm_eps", "rms_eps", "layer_norm_eps", "layer_norm_epsilon")
                    if isinstance(config.get(key), float)), None)
    if model.norm == "rms" and eps_key:
        out.append("  # Zero units (--strategy pad, widths that are not multiples) lower the mean square by n_tiles/n:")
        out.append("  # scaling eps alike keeps x/sqrt(ms + eps) exact (unchanged when tiling by a whole factor).")
        out.append(f"  {eps_key}: {json.dumps(f'cfg({eps_key!r}, {config[eps_key]!r}) * (n_tiles / n)')}")
    if "heads" in model.sizes:
        out.append(f"  {keys['heads']}: {json.dumps(keys['heads'] + ' * nh')}")
    if "kv_heads" in model.sizes:
        out.append(f"  {keys['kv']}: \"kv_heads * nkv\"")
    if "ffn" in model.sizes and keys["ffn"]:
        out.append(f"  {keys['ffn']}: {json.dumps(model.size_exprs['ffn'] + ' * m')}")
    if "head_dim" in config and "heads" in model.sizes:
        out.append('  head_dim: "head_dim"  # kept: heads grow by count')
    out.append('  tie_word_embeddings: "keep_tie"')
    used = {key for key in keys.values() if key} | {"head_dim", "tie_word_embeddings"}
    for key, value in config.items():
        if key in used or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value == model.sizes["hidden"] and any(w in key.lower() for w in ("dim", "size", "embd", "embed", "width")):
            out.extend(_comment([f"{DECIDE} {key} = {value} equals the hidden size: taken to grow with it. Remove "
                                 "this line if it is independent of the hidden size"], "  "))
            out.append(f"  {key}: {json.dumps(key + ' * n')}")
    lists = ", ".join(file.per_layer_lists)
    if lists and file.emit_depth:
        out.extend(_comment([f"per-layer lists ({lists}): kept for width; depth.lists below inserts entries with the "
                             "layers"], "  "))
    elif lists:
        out.extend(_comment([f"{DECIDE} per-layer lists in config.json ({lists}) are kept as they are: right for width, "
                             "but a change of depth must change them too; and if one holds sizes, it must grow with "
                             "its space"], "  "))
    flags = [f"{key}={json.dumps(value)}" for key, value in config.items()
             if isinstance(value, bool) and key != "tie_word_embeddings"
             and any(w in key.lower() for w in ("norm", "parallel", "residual", "bias", "qk_"))]
    placement = [f"{key}={json.dumps(value)}" for key, value in config.items()
                 if isinstance(value, bool) and any(w in key.lower() for w in ("norm_before", "pre_norm", "post_norm",
                                                                               "remove_final", "prenorm", "postnorm"))]
    if flags:
        out.extend(_comment([f"config flags that change which tensors exist: {', '.join(flags)}. The rules below fit "
                             "this checkpoint; `rules check` on another one lists the tensors they lack"], "  "))
    if placement and file.tied_now:
        out.extend(_comment([f"{DECIDE} {', '.join(placement)} say where the norms sit. Tied, the norm the head reads "
                             "is divided by n_tiles (tensors below); with the other setting another norm (or none) "
                             "feeds the head: add `when:` rules for it (see rules/opt.yaml)"], "  "))
    return out


def _tensors_section(file: _File) -> list[str]:
    """The rules in order: embeddings, per-layer tensors, other top-level ones, the final norm (÷n_tiles while
    tied), the head (tiled like the embedding while tied), and the buffers to drop."""
    patterns, by_regex, kinds, finals = file.patterns, file.by_regex, file.kinds, file.finals
    order = {"embedding": 0, "position": 1, "block": 2, "head": 4}
    final_regexes = {p.regex for p in finals}

    def rank(p):
        return (3 if p.regex in final_regexes else order[kinds[p.regex]], 0 if p.layered else 1,
                _natural(p.example.rsplit(".", 1)[0]), p.is_bias)

    rules = []
    for p in sorted(patterns, key=rank):
        rule = by_regex[p.regex]
        if rule.drop:
            continue
        if p.regex in final_regexes:
            scaled = _Rule(p, list(rule.axes), when="keep_tie", scale="1 / n_tiles")
            scaled.notes.append("tied: one tensor cannot be both the tiled embedding and the ÷n head, so the tie is "
                                "kept and the norm before the head is divided by n_tiles instead")
            if file.finals_guess and p is finals[0]:
                scaled.decide.append(file.finals_guess)
            rules.append(scaled)
        if kinds[p.regex] == "head" and not p.is_bias:
            tied_axes = ["vocab", "hidden"] if rule.axes == ["vocab", "hidden.in"] else list(rule.axes)
            rules.append(_Rule(p, tied_axes, when="keep_tie", notes=["tied: the head is the embedding, so it is tiled "
                                                                      "like it"]))
        if kinds[p.regex] == "head" and file.tied_now and not finals:
            rule.decide.append(NO_FINAL_NORM)
        rules.append(rule)
    if file.head_weight is None and file.embeds:
        # The checkpoint has no head: keep rules for one, so untied variants of the architecture work.
        head = _Pattern(re.escape("lm_head.weight"), [], (0,), "F32", False, 0)
        tied = _Rule(head, ["vocab", "hidden"], when="keep_tie",
                     notes=["the head, absent here (tied); these rules fit untied checkpoints"])
        if file.tied_now and not finals:
            tied.decide.append(NO_FINAL_NORM)
        rules.extend([tied, _Rule(head, ["vocab", "hidden.in"])])
    drops = [by_regex[p.regex] for p in patterns if by_regex[p.regex].drop]
    rotary = any("rope" in key or "rotary" in key for key in file.config)
    if (rotary or drops) and not any(p.example.lower().endswith("inv_freq") for p in patterns):
        rules.append(_Rule(_Pattern(r".*\.inv_freq", [], (0,), "F32", False, 0), drop=True,
                           notes=["rotary inv_freq buffers (older checkpoints): not parameters"]))
    rules.extend(drops)

    out = ["# Axis roles: 'space' = the tensor writes that space (copied), 'space.in' = it reads it (blocks that sum",
           "# back, each ÷growth), 'space.norm' = a norm gain, '-' = unchanged, [a, b] = a fused axis of consecutive parts.",
           "tensors:"]
    for rule in rules:
        out.extend(_comment([f"{DECIDE} {text}" for text in rule.decide] + rule.notes, "  "))
        names = rule.pattern.names
        shape = f"  # {_shape_text(rule.pattern.shape)}, {len(names)} tensor(s)" if names else ""
        out.append(f"  - match: {_quote(rule.match or rule.pattern.regex)}{shape}")
        if rule.when:
            out.append(f"    when: {rule.when}")
        if rule.drop:
            out.append("    drop: true")
            continue
        out.append(f"    axes: {_axes_text(rule.axes)}")
        if rule.scale:
            out.append(f"    scale: {json.dumps(rule.scale)}")
    return out


def _create_section(file: _File) -> list[str]:
    if not file.embeds:
        return []
    head = file.head_weight.example if file.head_weight is not None else "lm_head.weight"
    return ["create:",
            "  # --untie-embeddings on a tied model: write the head the file never had.",
            f"  - name: {head}",
            f"    from: {file.embeds[0].example}",
            '    when: "tied and untie_embeddings"',
            "    axes: [vocab, hidden.in]",
            "    component: head"]


def _depth_supported() -> bool:
    """Whether this version's rules language has a `depth:` section."""
    from .schema import KNOWN_TOP_LEVEL

    return "depth" in KNOWN_TOP_LEVEL


def _writes_residual(rule: _Rule) -> bool:
    return bool(rule.axes) and "hidden" in rule.axes


def _depth(config, model: _Model, patterns, by_regex, per_layer_lists) -> list[str]:
    """up --add-layers: an inserted layer copies the one before it with its residual writers zeroed."""
    writers = [p for p in sorted(patterns, key=lambda p: _natural(p.example)) if p.layered and _writes_residual(by_regex[p.regex])]
    out = ["# Depth growth (up --add-layers / --duplicate-layers): an inserted layer copies the layer before it with",
           "# the identity fills below applied."]
    decide = []
    if writers:
        decide.append("every tensor of a layer that writes the residual stream is zeroed, so an inserted layer adds "
                      "nothing: exact for blocks x + f(x) (pre-norm, parallel, or a bias-less norm after f). A post-LN "
                      "block LN(x + f(x)) has no identity layer: add identity_checks (see rules/opt.yaml)")
    else:
        decide.append("no per-layer tensor writes the residual stream by these rules: name the tensors to zero")
    index_flags = [key for key in config if "layer_idx" in key.lower() or "layer_scale" in key.lower()]
    if index_flags:
        decide.append(f"{', '.join(index_flags)} may tie a layer's computation to its index, which inserting layers "
                      "changes (GPT-2's scale_attn_by_inverse_layer_idx): add identity_checks")
    out.extend(_comment([f"{DECIDE} {text}" for text in decide], ""))
    out.append("depth:")
    out.append(f"  count: {model.keys['layers']}")
    out.append("  group: layer")
    if per_layer_lists:
        out.extend(_comment([f"{DECIDE} one entry per layer, inserted with the layers (each copied from the layer "
                             "the new one copies); remove any that is not per layer. If one holds sizes, its entries must "
                             "also grow with their space under width growth: no rule does that here"], "  "))
        out.append(f"  lists: [{', '.join(per_layer_lists)}]")
    counters = [key for key, value in config.items()
                if key != model.keys["layers"] and "layer" in key.lower() and isinstance(value, int)
                and not isinstance(value, bool) and key not in per_layer_lists]
    if counters:
        out.extend(_comment([f"{DECIDE} config values that may count layers: {', '.join(counters)}. If one is a "
                             "threshold (layers from it on behave otherwise: Qwen2's max_window_layers), add "
                             "`thresholds: [KEY]` so it shifts with the layers inserted below it"], "  "))
    if writers:
        out.append("  identity:")
        for p in writers:
            out.append(f"    - match: {_quote(p.regex)}")
            out.append("      fill: 0")
    return out


def count_decisions(text: str) -> int:
    """How many DECIDE comments a scaffold holds."""
    return sum(1 for line in text.splitlines() if line.lstrip().startswith(f"# {DECIDE}"))
