"""Each tensor's axis roles: which space every axis writes (copied) or reads (.in), or a norm gain (.norm).

A pattern's kind (embedding, position, head, block) and its module name say what it computes; the storage
layout, [out, in] (nn.Linear) or [in, out] (GPT-2's Conv1D), is voted on by the tensors whose names say
whether they read or write the residual stream and whose shapes say on which axis it lies; an axis that
matches no single space may be a fused one. Every guess the names and shapes cannot settle goes into the
rule's DECIDE texts; writing them out is render.py's job.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import product

from .model import _is_norm, _Model, _Pattern, _shape_text
from .vocabulary import (
    ATTN_OUT_NAMES,
    EMBED_WORDS,
    FFN_FUSED_IN_NAMES,
    FFN_IN_NAMES,
    FFN_OUT_NAMES,
    FLOAT_DTYPES,
    HEAD_NAMES,
    K_NAMES,
    POSITION_WORDS,
    Q_NAMES,
    QKV_NAMES,
    V_NAMES,
)


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
            rule.decide.append(
                f"{where}: the name suggests {prefs[0]}, but {size} matches {' and '.join(candidates)}; "
                f"guessed {chosen}"
            )
        elif len(candidates) > 1:
            rule.decide.append(
                f"{where}: {size} matches {' and '.join(candidates)} and the name does not say which; guessed {chosen}"
            )
        return chosen
    parts, by_name = _fused(size, tag, context, model)
    if parts is not None:
        sums = " + ".join(str(sizes[p]) for p in parts)
        text = (
            f"{where}: {size} = {sums}, read as a fused axis [{', '.join(parts)}] of consecutive blocks "
            f"({'parts from the name' if by_name else 'parts guessed from the sizes'}); check the part order in "
            "the model's code"
        )
        if len(parts) == 3 and "heads" in parts:
            text += (
                "; if each head's q, k, v lie together (GPT-NeoX query_key_value), use one space of size "
                f"{size} with unit 3 * head_dim instead (see rules/gpt_neox.yaml)"
            )
        rule.decide.append(text)
        return parts
    fields = [
        key
        for key, value in model.config.items()
        if value == size and isinstance(value, int) and not isinstance(value, bool)
    ]
    hint = f"; it equals {', '.join(fields)} in config.json, a size that does not grow?" if fields else ""
    rule.decide.append(
        f"{where}: {size} matches no space (hidden {sizes.get('hidden')}, heads {sizes.get('heads')}, "
        f"ffn {sizes.get('ffn')}): left unchanged ('-'){hint}"
    )
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
            rule.decide.append(
                f"the name says it reads the residual stream, but its input axis is {shape[in_axis]}, "
                f"not the hidden size {hidden}"
            )
            axes[in_axis] = _in(_pick(shape[in_axis], [], tag, context, model, rule, "input axis"))
        else:
            axes[in_axis] = "hidden.in"
        if tag is None:
            rule.decide.append(
                "the name says nothing of what it computes: taken as a reader of the residual stream "
                "because its input axis is the hidden size"
            )
        axes[out_axis] = _pick(shape[out_axis], prefs, tag, context, model, rule, "output axis")
    elif tag in WRITES or (tag is None and shape[out_axis] == hidden and shape[in_axis] != hidden):
        if shape[out_axis] != hidden:
            rule.decide.append(
                f"the name says it writes the residual stream, but its output axis is "
                f"{shape[out_axis]}, not the hidden size {hidden}"
            )
            axes[out_axis] = _pick(shape[out_axis], [], tag, context, model, rule, "output axis")
        else:
            axes[out_axis] = "hidden"
        if tag is None:
            rule.decide.append(
                "the name says nothing of what it computes: taken as a writer of the residual stream "
                "because its output axis is the hidden size"
            )
        axes[in_axis] = _in(_pick(shape[in_axis], prefs, tag, context, model, rule, "input axis"))
    elif shape[0] == hidden and shape[1] == hidden:
        axes = ["hidden", "hidden.in"] if layout == "linear" else ["hidden.in", "hidden"]
        rule.decide.append(
            "hidden × hidden and the name does not say what it is: taken as a map of the residual "
            "stream to itself; if one side is the heads space, say so"
        )
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
                rule.decide.append(
                    "one module per head index: new heads need their own copies (see the "
                    "`replicate:` rules of rules/stablelm.yaml)"
                )
            return ["-"]
    if size == sizes["hidden"]:
        return ["hidden.norm"]
    rule.decide.append(
        f"a norm of size {size}, which is not the hidden size {sizes['hidden']}: which space does it "
        "normalise? Left unchanged"
    )
    return ["-"]


def _roles(pattern: _Pattern, model: _Model, by_regex: dict, rule: _Rule):
    shape, sizes = pattern.shape, model.sizes
    if pattern.dtype not in FLOAT_DTYPES:
        rule.decide.append(
            f"a {pattern.dtype} tensor (a buffer?): copied unchanged; drop it if the model does not load it"
        )
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
            rule.decide.append(
                f"a vector of size {shape[0]} ({', '.join(candidates)}) whose name does not say what "
                f"it is: taken as elementwise on {candidates[0]}"
            )
            return [candidates[0]]
        rule.decide.append(f"a vector of size {shape[0]} that matches no space: left unchanged")
        return ["-"]
    if len(shape) == 2:
        return _matrix_roles(pattern, model, rule)
    rule.decide.append(f"a {len(shape)}-D tensor {_shape_text(shape)}: give each axis its role")
    return ["-"] * len(shape)


def _layout_of(pattern: _Pattern, model: _Model) -> str:
    return _vote(pattern, model.sizes["hidden"]) or model.layout


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


def _embedding_roles(pattern: _Pattern, model: _Model, rule: _Rule, hidden_role: str) -> list:
    shape, sizes = pattern.shape, model.sizes
    if len(shape) == 2 and shape[1] == sizes["hidden"] and shape[0] == sizes.get("vocab", shape[0]):
        return ["vocab", hidden_role]
    if len(shape) == 2 and shape[0] == sizes["hidden"] and shape[1] == sizes.get("vocab", shape[1]):
        rule.decide.append(f"stored {_shape_text(shape)} = [hidden, vocab], transposed from the usual [vocab, hidden]")
        return [hidden_role, "vocab"]
    rule.decide.append(
        f"{_shape_text(shape)} is not [vocab {sizes.get('vocab')}, hidden {sizes['hidden']}]: does "
        "it have its own space (OPT's word_embed_proj_dim)? Left unchanged"
    )
    return ["-"] * len(shape)


def _settle_layout(model: _Model, patterns: list[_Pattern]) -> None:
    """The model's storage layout (model.layout) by the tensors' votes, and the header's word on it."""
    hidden = model.sizes["hidden"]

    votes = Counter(v for v in (_vote(p, hidden) for p in patterns) if v)
    if votes:
        model.layout = "conv1d" if votes["conv1d"] > votes["linear"] else "linear"
        model.layout_certain = len(votes) == 1
    if model.layout == "conv1d":
        model.header_decide.append(
            f"the weights look stored [in, out] (Conv1D, y = x·W: {votes['conv1d']} tensors say so"
            + (f", {votes['linear']} say [out, in]" if votes["linear"] else "")
            + "); their roles read "
            "[input axis, output axis]"
        )
    elif not votes:
        model.header_decide.append(
            "no tensor name says whether weights are stored [out, in] (nn.Linear) or [in, out] "
            "(Conv1D): [out, in] assumed everywhere"
        )
    elif not model.layout_certain:
        model.header_decide.append(
            f"storage layouts disagree ({votes['linear']} tensors [out, in], {votes['conv1d']} "
            "[in, out]): each tensor follows its own shape where it can"
        )


def _tensor_rules(model: _Model, patterns: list[_Pattern], kinds: dict) -> dict[str, _Rule]:
    """One rule per pattern, by regex: its axis roles with notes and DECIDE texts, or a drop for a buffer."""
    hidden = model.sizes["hidden"]

    # Rules for weights before biases, so a bias can take its weight's output role.
    by_regex: dict[str, _Rule] = {}
    for p in sorted(patterns, key=lambda p: p.is_bias):
        rule = _Rule(p)
        by_regex[p.regex] = rule
        lowered = p.example.lower()
        if (
            lowered.endswith("inv_freq")
            or lowered.endswith("masked_bias")
            or (p.module in ("attn", "attention") and p.is_bias and len(p.shape) == 4)
        ):
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
            rule.decide.append(
                "the tensors of this pattern differ in shape from layer to layer: one rule cannot fit "
                "them all unless the sizes come from per-layer config values"
            )
        if p.extra_indices and not any("one module per head index" in text for text in rule.decide):
            rule.decide.append("a second index in the name (experts? per-head modules?): every value shares this rule")
    return by_regex
