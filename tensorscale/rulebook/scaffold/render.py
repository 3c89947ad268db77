"""The YAML text of the rules file, section by section: header, let, checks, spaces, config, tensors, create
and depth, each a list of lines from the model and its tensor rules; DECIDE comments wrapped above what they
question. Here too the tie: the final norm ÷n_tiles while tied, the head's rules, and `create` for
--untie-embeddings (the pattern of rules/llama.yaml).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .model import _Model, _natural, _Pattern, _shape_text
from .roles import _Rule
from .vocabulary import DECIDE


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
    top = [
        p for p in patterns if kinds[p.regex] == "block" and not p.layered and by_regex[p.regex].axes == ["hidden.norm"]
    ]
    modules = list(dict.fromkeys(_module_path(p) for p in top))
    if len(modules) <= 1:
        return top, None
    named = [m for m in modules if any(word in m.lower().rsplit(".", 1)[-1] for word in ("final", "ln_f", "norm_f"))]
    chosen = named[0] if len(named) == 1 else modules[-1]
    how = "by its name" if len(named) == 1 else "as the last one stored"
    others = ", ".join(m for m in modules if m != chosen)
    return (
        [p for p in top if _module_path(p) == chosen],
        f"several top-level norms: {chosen} taken as the one the head reads ({how}), not {others}",
    )


NO_FINAL_NORM = (
    "tied embeddings but no top-level norm before the head: the head would read the residual stream ×n. "
    "Divide the last thing that writes what it reads by n_tiles (a post-LN model's last layer norm, with "
    "a `when: layer == ...` rule), or use --untie-embeddings"
)


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
    per_layer_lists = [
        key for key, value in config.items() if isinstance(value, list) and model.layers and len(value) == model.layers
    ]
    emit_depth = _depth_supported() and bool(model.keys["layers"]) and any(p.layered for p in patterns)
    file = _File(
        config,
        model,
        patterns,
        by_regex,
        kinds,
        embeds,
        head_weight,
        finals,
        finals_guess,
        tied_default,
        tied_default if tied_now is None else bool(tied_now),
        per_layer_lists,
        emit_depth,
    )
    sections = [
        _header_section(file, source, name),
        _let_section(file),
        _checks_section(file),
        _spaces_section(file),
        _config_section(file),
        _tensors_section(file),
        _create_section(file),
    ]
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
        "# Roles are guessed from sizes and names. Lines marked DECIDE are guesses to confirm against the model's "
        "code;",
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
    summary = [
        f"{model.layers} layers" if model.layers else None,
        f"hidden {sizes['hidden']}",
        f"{config.get(keys['heads'])} heads" if "heads" in sizes else None,
        f"{config.get(keys['kv'])} kv heads" if "kv_heads" in sizes else None,
        f"FFN {sizes['ffn']}" if "ffn" in sizes else None,
        {"rms": "RMSNorm", "layer": "LayerNorm", None: "no norms"}[model.norm],
        "Conv1D [in, out] weights" if model.layout == "conv1d" else None,
        "tied embeddings" if file.tied_now else "untied",
    ]
    out.append(f"description: {json.dumps('scaffold: ' + ', '.join(s for s in summary if s))}")
    out.append("detect:")
    out.append(f"  model_type: [{json.dumps(model_type)}]" if config.get("model_type") else "  model_type: []")
    out.append(f"  architectures: [{', '.join(json.dumps(a) for a in architectures)}]")
    return out


def _let_section(file: _File) -> list[str]:
    out = [
        "# Derived values: expressions over config.json fields and the options n, m, nh, nkv, n_tiles,",
        "# snr_db, untie_embeddings; cfg(field, default) for a field that may be missing or null.",
        "let:",
    ]
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
    out = [
        "# The model's spaces: size, growth (n hidden, nh heads, nkv kv heads, m FFN), unit (a head), and for",
        "# `down` whether clustering is per layer, whether a norm rescales (scaled) or centres (equal) the space.",
        "spaces:",
    ]
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
    eps_key = next(
        (
            key
            for key in ("rms_norm_eps", "norm_eps", "rms_eps", "layer_norm_eps", "layer_norm_epsilon")
            if isinstance(config.get(key), float)
        ),
        None,
    )
    if model.norm == "rms" and eps_key:
        out.append("  # Zero units (--strategy pad, widths that are not multiples) lower the mean square by n_tiles/n:")
        out.append("  # scaling eps alike keeps x/sqrt(ms + eps) exact (unchanged when tiling by a whole factor).")
        out.append(f"  {eps_key}: {json.dumps(f'cfg({eps_key!r}, {config[eps_key]!r}) * (n_tiles / n)')}")
    if "heads" in model.sizes:
        out.append(f"  {keys['heads']}: {json.dumps(keys['heads'] + ' * nh')}")
    if "kv_heads" in model.sizes:
        out.append(f'  {keys["kv"]}: "kv_heads * nkv"')
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
            out.extend(
                _comment(
                    [
                        f"{DECIDE} {key} = {value} equals the hidden size: taken to grow with it. Remove "
                        "this line if it is independent of the hidden size"
                    ],
                    "  ",
                )
            )
            out.append(f"  {key}: {json.dumps(key + ' * n')}")
    lists = ", ".join(file.per_layer_lists)
    if lists and file.emit_depth:
        out.extend(
            _comment(
                [f"per-layer lists ({lists}): kept for width; depth.lists below inserts entries with the layers"], "  "
            )
        )
    elif lists:
        out.extend(
            _comment(
                [
                    f"{DECIDE} per-layer lists in config.json ({lists}) are kept as they are: right for width, "
                    "but a change of depth must change them too; and if one holds sizes, it must grow with "
                    "its space"
                ],
                "  ",
            )
        )
    flags = [
        f"{key}={json.dumps(value)}"
        for key, value in config.items()
        if isinstance(value, bool)
        and key != "tie_word_embeddings"
        and any(w in key.lower() for w in ("norm", "parallel", "residual", "bias", "qk_"))
    ]
    placement = [
        f"{key}={json.dumps(value)}"
        for key, value in config.items()
        if isinstance(value, bool)
        and any(
            w in key.lower() for w in ("norm_before", "pre_norm", "post_norm", "remove_final", "prenorm", "postnorm")
        )
    ]
    if flags:
        out.extend(
            _comment(
                [
                    f"config flags that change which tensors exist: {', '.join(flags)}. The rules below fit "
                    "this checkpoint; `rules check` on another one lists the tensors they lack"
                ],
                "  ",
            )
        )
    if placement and file.tied_now:
        out.extend(
            _comment(
                [
                    f"{DECIDE} {', '.join(placement)} say where the norms sit. Tied, the norm the head reads "
                    "is divided by n_tiles (tensors below); with the other setting another norm (or none) "
                    "feeds the head: add `when:` rules for it (see rules/opt.yaml)"
                ],
                "  ",
            )
        )
    return out


def _tensors_section(file: _File) -> list[str]:
    """The rules in order: embeddings, per-layer tensors, other top-level ones, the final norm (÷n_tiles while
    tied), the head (tiled like the embedding while tied), and the buffers to drop."""
    patterns, by_regex, kinds, finals = file.patterns, file.by_regex, file.kinds, file.finals
    order = {"embedding": 0, "position": 1, "block": 2, "head": 4}
    final_regexes = {p.regex for p in finals}

    def rank(p):
        return (
            3 if p.regex in final_regexes else order[kinds[p.regex]],
            0 if p.layered else 1,
            _natural(p.example.rsplit(".", 1)[0]),
            p.is_bias,
        )

    rules = []
    for p in sorted(patterns, key=rank):
        rule = by_regex[p.regex]
        if rule.drop:
            continue
        if p.regex in final_regexes:
            scaled = _Rule(p, list(rule.axes), when="keep_tie", scale="1 / n_tiles")
            scaled.notes.append(
                "tied: one tensor cannot be both the tiled embedding and the ÷n head, so the tie is "
                "kept and the norm before the head is divided by n_tiles instead"
            )
            if file.finals_guess and p is finals[0]:
                scaled.decide.append(file.finals_guess)
            rules.append(scaled)
        if kinds[p.regex] == "head" and not p.is_bias:
            tied_axes = ["vocab", "hidden"] if rule.axes == ["vocab", "hidden.in"] else list(rule.axes)
            rules.append(
                _Rule(p, tied_axes, when="keep_tie", notes=["tied: the head is the embedding, so it is tiled like it"])
            )
        if kinds[p.regex] == "head" and file.tied_now and not finals:
            rule.decide.append(NO_FINAL_NORM)
        rules.append(rule)
    if file.head_weight is None and file.embeds:
        # The checkpoint has no head: keep rules for one, so untied variants of the architecture work.
        head = _Pattern(re.escape("lm_head.weight"), [], (0,), "F32", False, 0)
        tied = _Rule(
            head,
            ["vocab", "hidden"],
            when="keep_tie",
            notes=["the head, absent here (tied); these rules fit untied checkpoints"],
        )
        if file.tied_now and not finals:
            tied.decide.append(NO_FINAL_NORM)
        rules.extend([tied, _Rule(head, ["vocab", "hidden.in"])])
    drops = [by_regex[p.regex] for p in patterns if by_regex[p.regex].drop]
    rotary = any("rope" in key or "rotary" in key for key in file.config)
    if (rotary or drops) and not any(p.example.lower().endswith("inv_freq") for p in patterns):
        rules.append(
            _Rule(
                _Pattern(r".*\.inv_freq", [], (0,), "F32", False, 0),
                drop=True,
                notes=["rotary inv_freq buffers (older checkpoints): not parameters"],
            )
        )
    rules.extend(drops)

    out = [
        "# Axis roles: 'space' = the tensor writes that space (copied), 'space.in' = it reads it (blocks that sum",
        "# back, each ÷growth), 'space.norm' = a norm gain, '-' = unchanged, [a, b] = a fused axis of consecutive "
        "parts.",
        "tensors:",
    ]
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
    return [
        "create:",
        "  # --untie-embeddings on a tied model: write the head the file never had.",
        f"  - name: {head}",
        f"    from: {file.embeds[0].example}",
        '    when: "tied and untie_embeddings"',
        "    axes: [vocab, hidden.in]",
        "    component: head",
    ]


def _depth_supported() -> bool:
    """Whether this version's rules language has a `depth:` section."""
    from ..schema import RuleSet
    from ..validate import yaml_keys

    return "depth" in yaml_keys(RuleSet)


def _writes_residual(rule: _Rule) -> bool:
    return bool(rule.axes) and "hidden" in rule.axes


def _depth(config, model: _Model, patterns, by_regex, per_layer_lists) -> list[str]:
    """up --add-layers: an inserted layer copies the one before it with its residual writers zeroed."""
    writers = [
        p
        for p in sorted(patterns, key=lambda p: _natural(p.example))
        if p.layered and _writes_residual(by_regex[p.regex])
    ]
    out = [
        "# Depth growth (up --add-layers / --duplicate-layers): an inserted layer copies the layer before it with",
        "# the identity fills below applied.",
    ]
    decide = []
    if writers:
        decide.append(
            "every tensor of a layer that writes the residual stream is zeroed, so an inserted layer adds "
            "nothing: exact for blocks x + f(x) (pre-norm, parallel, or a bias-less norm after f). A post-LN "
            "block LN(x + f(x)) has no identity layer: add identity_checks (see rules/opt.yaml)"
        )
    else:
        decide.append("no per-layer tensor writes the residual stream by these rules: name the tensors to zero")
    index_flags = [key for key in config if "layer_idx" in key.lower() or "layer_scale" in key.lower()]
    if index_flags:
        decide.append(
            f"{', '.join(index_flags)} may tie a layer's computation to its index, which inserting layers "
            "changes (GPT-2's scale_attn_by_inverse_layer_idx): add identity_checks"
        )
    out.extend(_comment([f"{DECIDE} {text}" for text in decide], ""))
    out.append("depth:")
    out.append(f"  count: {model.keys['layers']}")
    out.append("  group: layer")
    if per_layer_lists:
        out.extend(
            _comment(
                [
                    f"{DECIDE} one entry per layer, inserted with the layers (each copied from the layer "
                    "the new one copies); remove any that is not per layer. If one holds sizes, its entries must "
                    "also grow with their space under width growth: no rule does that here"
                ],
                "  ",
            )
        )
        out.append(f"  lists: [{', '.join(per_layer_lists)}]")
    counters = [
        key
        for key, value in config.items()
        if key != model.keys["layers"]
        and "layer" in key.lower()
        and isinstance(value, int)
        and not isinstance(value, bool)
        and key not in per_layer_lists
    ]
    if counters:
        out.extend(
            _comment(
                [
                    f"{DECIDE} config values that may count layers: {', '.join(counters)}. If one is a "
                    "threshold (layers from it on behave otherwise: Qwen2's max_window_layers), add "
                    "`thresholds: [KEY]` so it shifts with the layers inserted below it"
                ],
                "  ",
            )
        )
    if writers:
        out.append("  identity:")
        for p in writers:
            out.append(f"    - match: {_quote(p.regex)}")
            out.append("      fill: 0")
    return out


def count_decisions(text: str) -> int:
    """How many DECIDE comments a scaffold holds."""
    return sum(1 for line in text.splitlines() if line.lstrip().startswith(f"# {DECIDE}"))
