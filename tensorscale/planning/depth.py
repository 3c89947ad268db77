"""Depth for `up` and `down`: which layers the output has, where each one's tensors come from, and its config.

Two ways to add layers, both described by the rules file's ``depth`` section (no architecture is special-
cased here):

- ``--add-layers K [--at P,...]`` inserts identity layers (LLaMA Pro's block expansion). An inserted layer
  holds a copy of the source layer before it (so its norms and input projections are sensible starting
  points for training) with the fills of ``depth.identity`` applied: every residual writer zeroed (o_proj
  and down_proj, their biases, GPT-2's c_proj...), or a post-norm gain set so that the norm outputs zero
  (OLMo-2: w = 0; Gemma 2/3, whose norms compute x̂·(1+w): w = -1). The layer then adds nothing to the
  residual stream and the model computes the same function. Positions are source layer indices: the new
  layer goes before that layer (L, the layer count, appends after the last one).
- ``down --remove-layers K`` leaves source layers out (ShortGPT); the rest are renumbered. Not function-
  preserving; `down --method refit` chooses the layers by block influence and re-solves the next layers'
  readers on what the shorter model computes.
- ``--duplicate-layers START:END`` copies source layers START..END-1 and inserts the copy after END-1
  (SOLAR's depth up-scaling). Not function-preserving: the logits change, and the tool says so.

Tensors keep their rule: matching and every rule expression see the source name and the source layer index;
only the output name changes (the span of the layer group is replaced by the new index, and replicate
templates see the new index). Per-layer config lists (``depth.lists``: layer_types, no_rope_layers) are
inserted with the layers, each new entry copied from the layer the new one copies; regenerating them would
shift the sliding-window and NoPE patterns. Thresholds that count layers (``depth.thresholds``: Qwen2's
max_window_layers) are shifted by the layers inserted below them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import TensorscaleError
from ..ops.library import Fill, Op
from ..rulebook.evaluate import first_failed_check
from ..rulebook.expr import ExpressionError

SOURCE, IDENTITY, DUPLICATE = "source", "identity", "duplicate"


@dataclass(frozen=True)
class Layer:
    source: int  # the source layer whose tensors it holds
    kind: str  # SOURCE, IDENTITY or DUPLICATE


@dataclass
class Layers:
    """The output's layers in order, each naming the source layer it comes from."""

    source_count: int
    layers: list[Layer]
    count_key: str

    @property
    def removed(self) -> list[int]:
        """Source layers the output does not hold (down --remove-layers)."""
        kept = {layer.source for layer in self.layers}
        return [index for index in range(self.source_count) if index not in kept]

    @property
    def function_preserving(self) -> bool:
        return all(layer.kind != DUPLICATE for layer in self.layers) and not self.removed

    def inserted(self) -> list[tuple[int, Layer]]:
        return [(index, layer) for index, layer in enumerate(self.layers) if layer.kind != SOURCE]

    def describe(self) -> dict:
        inserted = self.inserted()
        identity = [i for i, layer in inserted if layer.kind == IDENTITY]
        duplicate = [i for i, layer in inserted if layer.kind == DUPLICATE]
        parts = [f"{self.source_count} -> {len(self.layers)} layers"]
        if identity:
            sources = ", ".join(str(self.layers[i].source) for i in identity)
            parts.append(
                f"identity layers at {', '.join(map(str, identity))} (copies of source layers {sources}, "
                "each adding nothing to the residual stream)"
            )
        if duplicate:
            sources = [self.layers[i].source for i in duplicate]
            if len(duplicate) == 1:
                parts.append(f"layer {duplicate[0]} repeats source layer {sources[0]} (SOLAR-style duplicate)")
            else:
                parts.append(
                    f"layers {duplicate[0]}-{duplicate[-1]} repeat source layers {sources[0]}-{sources[-1]} "
                    "(SOLAR-style duplicate)"
                )
        removed = self.removed
        if removed:
            parts.append(f"source layer{'s' if len(removed) > 1 else ''} {', '.join(map(str, removed))} removed")
        text = "; ".join(parts)
        if not self.function_preserving:
            text += ": NOT function-preserving, the logits change (measure it with --verify)"
        return {
            "source_layers": self.source_count,
            "layers": len(self.layers),
            "inserted": [{"index": i, "source_layer": layer.source, "kind": layer.kind} for i, layer in inserted],
            "removed": removed,
            "function_preserving": self.function_preserving,
            "text": text,
        }


@dataclass
class Entry:
    """One output tensor before its rule is applied: `source` is matched against the rules, `name` is
    written; `extra` ops follow the rule's ops (an identity layer's fills); `rename` overrides regex
    groups when replicate templates are rendered; `original` is False for the extra copies."""

    name: str
    source: str
    info: object
    extra: list[Op] = field(default_factory=list)
    rename: dict = field(default_factory=dict)
    original: bool = True


def _wants_depth(options) -> bool:
    return bool(options.add_layers) or options.duplicate_layers is not None


def _layer_count(rule_set, config: dict, flag: str) -> int:
    """The source's layer count, through the rules' depth section, for a depth option `flag`."""
    spec = rule_set.depth
    if spec is None:
        raise TensorscaleError(
            f"rules {rule_set.name} have no depth section, so {flag} is not possible; "
            "add one (see README, depth growth)"
        )
    count = config.get(spec.count)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise TensorscaleError(f"config.json's {spec.count} must be a whole number >= 1 for {flag}, got {count!r}")
    return count


def plan_layers(rule_set, config: dict, env: dict, options) -> Layers | None:
    """The output layer layout, or None when no depth option was given. Every mistake is one line."""
    if not _wants_depth(options):
        if options.insert_at is not None:
            raise TensorscaleError("--at says where --add-layers inserts; give --add-layers K too")
        return None
    spec = rule_set.depth
    flag = "--add-layers" if options.add_layers else "--duplicate-layers"
    count = _layer_count(rule_set, config, flag)

    before: dict[int, list[int]] = {}  # source position -> the source layers the identity layers there copy
    if options.add_layers:
        k = options.add_layers
        positions = options.insert_at
        if positions is None:
            # LLaMA Pro: one after every count/k source layers, the last after the final layer
            positions = tuple(-(-(i + 1) * count // k) for i in range(k))
        elif len(positions) != k:
            raise TensorscaleError(f"--at gives {len(positions)} position(s) but --add-layers asks for {k}")
        for position in positions:
            if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position <= count:
                raise TensorscaleError(
                    f"--at position {position!r} is out of range: the model has {count} layers, "
                    f"so positions go from 0 (before the first) to {count} (after the last)"
                )
            before.setdefault(position, []).append(max(0, position - 1))
        message = first_failed_check(spec.identity_checks, env, f"{rule_set.path}: depth.identity_checks")
        if message is not None:
            raise TensorscaleError(
                f"--add-layers cannot insert exact identity layers: {message} (rules {rule_set.name})"
            )
    elif options.insert_at is not None:
        raise TensorscaleError("--at says where --add-layers inserts; give --add-layers K too")

    block = None
    if options.duplicate_layers is not None:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(options.duplicate_layers))
        if not match:
            raise TensorscaleError(
                f"--duplicate-layers takes START:END (source layers START..END-1), got {options.duplicate_layers!r}"
            )
        start, end = int(match.group(1)), int(match.group(2))
        if not 0 <= start < end <= count:
            raise TensorscaleError(
                f"--duplicate-layers {start}:{end} is out of range: it needs 0 <= START < END <= "
                f"{count} (the model's layers)"
            )
        block = (start, end)

    layers: list[Layer] = []
    for source in range(count + 1):
        layers.extend(Layer(copied, IDENTITY) for copied in before.get(source, []))
        if source == count:
            break
        layers.append(Layer(source, SOURCE))
        if block and source == block[1] - 1:
            layers.extend(Layer(copied, DUPLICATE) for copied in range(*block))
    return Layers(count, layers, spec.count)


def removal_layers(rule_set, config: dict, removed) -> Layers:
    """The output layers of `down --remove-layers` without the source layers `removed`; the others keep
    their order and are renumbered. Every mistake is one line."""
    spec = rule_set.depth
    count = _layer_count(rule_set, config, "--remove-layers")
    removed = list(removed)
    for index in removed:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise TensorscaleError(
                f"--at layer {index!r} is out of range: the model has {count} layers, numbered 0 to {count - 1}"
            )
    if len(set(removed)) >= count:
        raise TensorscaleError(
            f"--remove-layers {len(set(removed))} would remove all {count} layers; keep at least one"
        )
    gone = set(removed)
    return Layers(count, [Layer(index, SOURCE) for index in range(count) if index not in gone], spec.count)


def rewrite_config(rule_set, source_config: dict, new_config: dict, layers: Layers | None) -> None:
    """In place: the layer count, the per-layer lists inserted, the layer-counting thresholds shifted."""
    if layers is None:
        return
    spec = rule_set.depth
    new_config[layers.count_key] = len(layers.layers)
    for key in spec.lists:
        values = source_config.get(key)
        if values is None:
            continue
        if not isinstance(values, list) or len(values) != layers.source_count:
            raise TensorscaleError(
                f"config.json's {key} should list one entry per layer ({layers.source_count}), got {values!r}"
            )
        new_config[key] = [values[layer.source] for layer in layers.layers]
    for key in spec.thresholds:
        value = source_config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TensorscaleError(f"config.json's {key} should be a whole number of layers, got {value!r}")
        # the output index of the first source layer at or above the threshold; every layer inserted
        # before it is counted below the threshold
        first = next(
            (i for i, layer in enumerate(layers.layers) if layer.kind == SOURCE and layer.source >= value), None
        )
        new_config[key] = value + (len(layers.layers) - layers.source_count if first is None else first - value)


_LAYER_LIKE = re.compile(r"\.\d+\.")


def entries(tensors: dict, rule_set, env: dict, layers: Layers | None) -> list[Entry]:
    """Every output tensor's (output name, source name, ops to add), in source order with each layer
    tensor's copies next to it."""
    if layers is None:
        return [Entry(name, name, info) for name, info in tensors.items()]
    spec = rule_set.depth
    where: dict[int, list[int]] = {}  # source layer -> output indices holding it
    for index, layer in enumerate(layers.layers):
        where.setdefault(layer.source, []).append(index)
    out: list[Entry] = []
    for name, info in tensors.items():
        found = _layer_span(rule_set, name, spec.group)
        if found is None:
            if rule_set.unmatched == "copy" and _LAYER_LIKE.search(name) and not _any_rule(rule_set, name):
                raise TensorscaleError(
                    f"tensor {name!r} matches no rule, so its layer is unknown; depth growth needs "
                    f"a rule capturing (?P<{spec.group}>\\d+) for every per-layer tensor"
                )
            out.append(Entry(name, name, info))
            continue
        source, (begin, end) = found
        if source >= layers.source_count:
            raise TensorscaleError(
                f"tensor {name!r} belongs to layer {source}, but config.json's {layers.count_key} "
                f"is {layers.source_count}"
            )
        for index in where.get(source, []):
            layer = layers.layers[index]
            extra = _identity_fills(rule_set, name, env) if layer.kind == IDENTITY else []
            out.append(
                Entry(
                    f"{name[:begin]}{index}{name[end:]}", name, info, extra, {spec.group: index}, layer.kind == SOURCE
                )
            )
    return out


def _any_rule(rule_set, name) -> bool:
    return any(rule.regex.fullmatch(name) for rule in rule_set.tensors)


def _layer_span(rule_set, name: str, group: str):
    """(layer index, span of its digits) from the first rule whose regex matches `name` and captures the
    layer group; None for tensors outside the layers (embeddings, final norm, head)."""
    for rule in rule_set.tensors:
        if group not in rule.regex.groupindex:
            continue
        match = rule.regex.fullmatch(name)
        if match and match.group(group) is not None:
            return int(match.group(group)), match.span(group)
    return None


def _identity_fills(rule_set, name: str, env: dict) -> list[Op]:
    for rule in rule_set.depth.identity:
        match = rule.regex.fullmatch(name)
        if not match:
            continue
        groups = {
            key: int(value) if value.isdigit() else value
            for key, value in match.groupdict().items()
            if value is not None
        }
        rule_env = {**env, **groups}
        where = f"{rule_set.path}: depth.identity ({rule.pattern})"
        try:
            if rule.when is not None and not rule.when.evaluate(rule_env):
                continue
            value = rule.fill.evaluate(rule_env)
        except ExpressionError as exc:
            raise TensorscaleError(f"{where}: {exc}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TensorscaleError(f"{where}: fill must be a number, got {value!r}")
        return [Fill(float(value))]
    return []
