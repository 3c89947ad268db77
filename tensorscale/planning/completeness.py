"""Is the checkpoint whole? Every tensor the rules expect for this config is present before anything is planned.

A checkpoint missing its final norm, a layer, or its embedding, or whose config counts more layers than
its tensors hold, used to be rewritten with exit 0 into a folder that gen and verify then rejected. The
rules know what a model of this config holds, without naming any architecture here:
- per-layer rules capture the layer index (the `depth.group` regex group), so the layers present must be
  exactly 0..L-1 for the config's layer count L, and every layer must hold the same tensors;
- rules marked `required:` (the embedding, the final norm, an untied head) must match some tensor.
Tensors that no rule matches are refused by the plan itself (unless the rules say `unmatched: copy`).
"""

from __future__ import annotations

from ..errors import TensorscaleError
from ..rulebook.expr import ExpressionError

_SHOWN = 3


def check_complete(rule_set, source, env: dict) -> None:
    if not source.tensors:
        raise TensorscaleError(f"{source.label} holds no tensors; the download is incomplete or the index is empty")
    _check_layers(rule_set, source, env)
    _check_required(rule_set, source, env)


def _layer_of(rule_set, name: str):
    """(layer index, the name with its layer digits replaced by '{}') for a per-layer tensor, else None."""
    group = rule_set.depth.group
    for rule in rule_set.tensors:
        if group not in rule.regex.groupindex:
            continue
        match = rule.regex.fullmatch(name)
        if match and match.group(group) is not None and match.group(group).isdigit():
            begin, end = match.span(group)
            return int(match.group(group)), name[:begin] + "{}" + name[end:]
    return None


def _check_layers(rule_set, source, env: dict) -> None:
    if rule_set.depth is None:
        return
    key = rule_set.depth.count
    count = source.config.get(key)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return  # the rules' own checks and the config reader deal with a missing or odd count
    layers: dict[int, set[str]] = {}
    for name in source.tensors:
        found = _layer_of(rule_set, name)
        if found is not None:
            layers.setdefault(found[0], set()).add(found[1])
    if not layers:
        return
    beyond = sorted(index for index in layers if index >= count)
    if beyond:
        raise TensorscaleError(
            f"config.json says {key} {count}, but the checkpoint holds tensors of layer {beyond[0]}"
            f"{' and more' if len(beyond) > 1 else ''} ({count + len(beyond)} layers in all); "
            f"fix {key} in config.json or use the matching weights"
        )
    # counted and listed without range(count): a config that claims 2**40 layers must not allocate them
    missing_count = count - len(layers)
    if missing_count:
        missing = []
        index = 0
        while len(missing) <= _SHOWN and index < count:
            if index not in layers:
                missing.append(index)
            index += 1
        shown = ", ".join(str(i) for i in missing[:_SHOWN]) + (" ..." if missing_count > _SHOWN else "")
        raise TensorscaleError(
            f"the checkpoint has no tensors for layer {shown} of the {count} that config.json ({key}) counts; "
            "the download is incomplete (or fix the config)"
        )
    union = set().union(*layers.values())
    for index in sorted(layers):
        lacking = sorted(union - layers[index])
        if lacking:
            more = f" and {len(lacking) - 1} more" if len(lacking) > 1 else ""
            raise TensorscaleError(
                f"layer {index} lacks {lacking[0].format(index)}{more}, which other layers have; the checkpoint is "
                "incomplete (re-download it)"
            )


def _check_required(rule_set, source, env: dict) -> None:
    names = list(source.tensors)
    for rule in rule_set.tensors:
        if rule.required is None:
            continue
        try:
            wanted = bool(rule.required.evaluate(env))
        except ExpressionError as exc:
            raise TensorscaleError(f"{rule_set.path}: {rule.label}: required: {exc}") from None
        if wanted and not any(rule.regex.fullmatch(name) for name in names):
            shown = rule.pattern.replace("\\.", ".").replace("(?:", "(")
            why = "" if rule.required.source is True else f" (required when {rule.required.source})"
            raise TensorscaleError(
                f"the checkpoint has no tensor {shown}, which a {rule_set.name} model of this config needs{why}; "
                "the download is incomplete, or config.json does not describe these weights"
            )
