"""Parse and validate a rules file into plain objects; no model is needed yet.

A rules file describes one architecture as data:
- ``detect``: which config.json (model_type / architectures) it is for;
- ``let`` and ``checks``: derived values and constraints, as safe expressions over config fields and options;
- ``spaces``: the model's vector spaces (residual, heads, FFN...), their sizes and how much each grows;
- ``config``: how config.json fields change;
- ``tensors``: an ordered list of rules; the first whose full-match regex (and ``when``) fits a tensor
  gives its transformation, either as axis roles (``axes``) or as an explicit op chain (``ops``);
- ``create``: tensors written that the source lacks (an untied lm_head);
- ``depth``: how the layers are counted, numbered in tensor names and listed in config.json, and how an
  inserted identity layer differs from the layer it copies (``up --add-layers`` / ``--duplicate-layers``).
Every problem is reported as one line naming the file and the place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import TensorscaleError
from ..strict_yaml import load_yaml, read_text_file
from ..ops.library import OP_TYPES
from .expr import Expression, ExpressionError
from .extends import resolve_extends
from .patterns import Pattern
from .roles import split_role
from .shipped import shipped_data

KNOWN_TOP_LEVEL = {"name", "description", "detect", "let", "checks", "spaces", "config", "tensors", "create", "unmatched",
                   "depth"}
KNOWN_DEPTH_KEYS = {"count", "group", "lists", "thresholds", "identity", "identity_checks", "note"}
KNOWN_IDENTITY_KEYS = {"match", "fill", "when", "note"}
KNOWN_TENSOR_KEYS = {"match", "when", "axes", "ops", "scale", "replicate", "drop", "copy", "component", "note",
                     "required"}
KNOWN_CREATE_KEYS = {"name", "from", "when", "axes", "ops", "scale", "component", "note"}
KNOWN_SPACE_KEYS = {"size", "grow", "unit", "clone", "per", "scaled", "equal", "within", "clusters_of", "norm", "note"}
# How a space is normalised, where something normalises it as a whole (see SpaceSpec.norm).
NORM_KINDS = ("rms", "rms_one_plus", "layer")
COMPONENTS = {"embeddings", "attention", "mlp", "norms", "head", "other"}


class RulesError(TensorscaleError):
    pass


@dataclass
class SpaceSpec:
    name: str
    size: Expression
    grow: Expression
    unit: Expression
    clone: str  # "tile" ([a, b, a, b]) or "interleave" ([a, a, b, b] at unit granularity)
    # For `down` (folding units into clusters):
    per: str | None = None  # a regex group (e.g. layer): one clustering per value, not one for the model
    scaled: bool = False  # a space that an RMSNorm normalises: merged units carry S = sqrt(N·m/n)
    equal: bool = False  # clusters must have equal sizes (LayerNorm centring, full-projection q/k norms)
    within: str | None = None  # units are grouped under this space's units (q heads under kv heads)
    clusters_of: str | None = None  # clustered exactly like that space (a second view of the same units)
    # For growth that is not a whole multiple (zero-padding, any target width): how the space is normalised.
    # "rms": an RMSNorm x/rms(x)·w, so zero-padding is exact once the gains are rescaled; "rms_one_plus":
    # the same with gains stored as w in (1+w) (Gemma); "layer": a LayerNorm, whose mean changes when zeros
    # are added, so only whole-multiple tiling is exact. None: nothing normalises the space as a whole, so
    # units may be cloned unevenly (Net2Net).
    norm: str | None = None


@dataclass
class OpSpec:
    """An op from an explicit chain: its type and its parameters, still as expressions."""

    type: str
    params: dict[str, Any]  # values are Expression, or for fused: list of (size Expression, [OpSpec])


@dataclass
class Transform:
    """How a tensor is rewritten: axis roles or an explicit op chain, plus an optional scale."""

    axes: list | None = None
    ops: list[OpSpec] | None = None
    scale: Expression | None = None  # y = x · scale + scale_offset, before the axis ops
    scale_offset: Expression | None = None  # e.g. (1+w) norms: scaling the gain by c is w' = w·c + (c − 1)

    def is_copy(self) -> bool:
        return self.axes is None and not self.ops and self.scale is None and self.scale_offset is None


@dataclass
class TensorRule:
    index: int
    pattern: str
    regex: Pattern
    transform: Transform
    when: Expression | None = None
    replicate_count: Expression | None = None
    replicate_name: str | None = None
    drop: bool = False
    component: str | None = None
    # When this holds (over config and let values), some tensor must fully match `regex`: a checkpoint
    # without its embedding, final norm or (untied) head is incomplete, not a smaller model.
    required: Expression | None = None
    # The space whose units the regex group `h` counts, for a tensor written once per unit (StableLM's
    # per-head norms, `replicate.unit_of`): `down` writes, for each output unit, the tensor of its source.
    replicate_unit_of: str | None = None

    @property
    def label(self) -> str:
        return f"rule {self.index + 1} ({self.pattern})"


@dataclass
class CreateRule:
    name: str
    source: str
    transform: Transform
    when: Expression | None = None
    component: str | None = None


@dataclass
class IdentityRule:
    """How one tensor of an inserted identity layer differs from the layer it copies: filled with `fill`
    (a residual writer zeroed, or a (1+w) post-norm gain set to -1 so that the norm outputs zero)."""

    pattern: str
    regex: Pattern
    fill: Expression
    when: Expression | None = None


@dataclass
class DepthSpec:
    """Depth growth: `count` is the config key holding the layer count, `group` the regex group of the
    tensor rules that captures a tensor's layer index, `lists` the per-layer config lists (one entry per
    layer, inserted with the layers), `thresholds` config ints that count layers (shifted by the layers
    inserted below them), `identity` the fills that make an inserted layer an identity, and
    `identity_checks` the conditions under which such a layer is exact."""

    count: str = "num_hidden_layers"
    group: str = "layer"
    lists: list[str] = field(default_factory=list)
    thresholds: list[str] = field(default_factory=list)
    identity: list[IdentityRule] = field(default_factory=list)
    identity_checks: list[tuple[Expression, str]] = field(default_factory=list)


@dataclass
class RuleSet:
    name: str
    description: str
    path: str
    detect_model_types: list[str]
    detect_architectures: list[str]
    let: list[tuple[str, Expression]]
    checks: list[tuple[Expression, str]]
    spaces: dict[str, SpaceSpec]
    config: list[tuple[str, Expression]]
    tensors: list[TensorRule]
    create: list[CreateRule] = field(default_factory=list)
    unmatched: str = "error"
    depth: DepthSpec | None = None  # None: the architecture cannot grow in depth


MAX_RULES_BYTES = 2**20  # shipped rules files are 3-8 KB
MAX_OP_NODES = 10_000  # ops, fused parts and axis roles in one file, counted as parsed


def load_rules_text(text: str, path: str = "<rules>") -> RuleSet:
    """Rules from YAML text. Aliases, duplicate keys and deep nesting are refused (strict_yaml); an
    `extends:` base is merged in first (rulebook.extends says how), so what is validated is the result."""
    return _build(resolved_data(text, path), path)


def resolved_data(text: str, path: str = "<rules>"):
    """The plain data of a rules file with its `extends:` base merged in, not yet validated."""
    try:
        data = load_yaml(text, path, aliases=False)
        _count_nodes(data, path)
        data = resolve_extends(data, path, shipped_data)
    except RulesError:
        raise
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None
    _count_nodes(data, path)
    return data


def _count_nodes(data, path: str) -> None:
    """A bound on the file's size as a tree (without aliases it is the size of the text, but stay sure)."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > 50 * MAX_OP_NODES:
            raise RulesError(f"{path}: more than {50 * MAX_OP_NODES:,} values; a rules file is a few hundred")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def load_rules_file(path: str) -> RuleSet:
    try:
        text = read_text_file(path, "rules file", MAX_RULES_BYTES)
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None
    return load_rules_text(text, path)


def _pattern(source: str, where: str) -> Pattern:
    try:
        return Pattern(source, where)
    except RulesError:
        raise
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None


def _expr(value, where: str) -> Expression:
    try:
        return Expression(value)
    except ExpressionError as exc:
        raise RulesError(f"{where}: {exc}") from None


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RulesError(f"{where} must be a mapping")
    return value


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{where} must be a string or a list of strings")
    return value


def _unknown(keys, known, where):
    extra = sorted(set(keys) - known)
    if extra:
        raise RulesError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def _mapping_list(value, label: str, known: set, kind: str = "") -> list[tuple[str, dict]]:
    """(label[i], item) for each item of an optional list of mappings (`checks`, `create`, `identity`...),
    every item a mapping with no key outside `known`."""
    value = value or []
    if not isinstance(value, list):
        raise RulesError(f"{label} must be a list{kind}")
    items = []
    for i, item in enumerate(value):
        here = f"{label}[{i}]"
        item = _mapping(item, here)
        _unknown(item, known, here)
        items.append((here, item))
    return items


def _checks(value, label: str) -> list[tuple]:
    """A list of {assert, message} into (expression, message) pairs, the message defaulting to the assertion."""
    checks = []
    for here, item in _mapping_list(value, label, {"assert", "message"}):
        if "assert" not in item:
            raise RulesError(f"{here} needs 'assert'")
        checks.append((_expr(item["assert"], here), str(item.get("message") or item["assert"])))
    return checks


def _build(data, path: str) -> RuleSet:
    if not isinstance(data, dict):
        raise RulesError(f"{path}: a rules file must be a YAML mapping with at least 'name' and 'tensors'")
    _unknown(data, KNOWN_TOP_LEVEL, path)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RulesError(f"{path}: missing 'name'")
    detect = _mapping(data.get("detect"), f"{path}: detect")
    _unknown(detect, {"model_type", "architectures"}, f"{path}: detect")

    let = []
    for key, value in _mapping(data.get("let"), f"{path}: let").items():
        let.append((str(key), _expr(value, f"{path}: let.{key}")))

    checks = _checks(data.get("checks"), f"{path}: checks")

    spaces = {}
    for key, value in _mapping(data.get("spaces"), f"{path}: spaces").items():
        where = f"{path}: spaces.{key}"
        if isinstance(value, (str, int)):
            value = {"size": value}
        value = _mapping(value, where)
        _unknown(value, KNOWN_SPACE_KEYS, where)
        if "size" not in value:
            raise RulesError(f"{where} needs 'size'")
        clone = value.get("clone", "tile")
        if clone not in ("tile", "interleave"):
            raise RulesError(f"{where}: clone must be 'tile' or 'interleave'")
        if "." in str(key) or str(key) == "-":
            raise RulesError(f"{where}: space names may not contain '.' or be '-'")
        for flag in ("scaled", "equal"):
            if not isinstance(value.get(flag, False), bool):
                raise RulesError(f"{where}: {flag} must be true or false")
        for ref in ("per", "within", "clusters_of"):
            if value.get(ref) is not None and not isinstance(value.get(ref), str):
                raise RulesError(f"{where}: {ref} must be a name")
        if value.get("norm") is not None and value.get("norm") not in NORM_KINDS:
            raise RulesError(f"{where}: norm must be one of {', '.join(NORM_KINDS)}")
        spaces[str(key)] = SpaceSpec(
            str(key), _expr(value["size"], where), _expr(value.get("grow", 1), where), _expr(value.get("unit", 1), where),
            clone, value.get("per"), value.get("scaled", False), value.get("equal", False), value.get("within"),
            value.get("clusters_of"), value.get("norm"),
        )
    for key, spec in spaces.items():
        for ref in (spec.within, spec.clusters_of):
            if ref is not None and ref not in spaces:
                raise RulesError(f"{path}: spaces.{key} refers to space {ref!r}, which is not declared")

    config = [(str(k), _expr(v, f"{path}: config.{k}")) for k, v in _mapping(data.get("config"), f"{path}: config").items()]

    raw_tensors = data.get("tensors")
    if not isinstance(raw_tensors, list) or not raw_tensors:
        raise RulesError(f"{path}: 'tensors' must be a non-empty list of rules")
    tensors = [_tensor_rule(i, item, path, spaces) for i, item in enumerate(raw_tensors)]

    creates = []
    for where, item in _mapping_list(data.get("create"), f"{path}: create", KNOWN_CREATE_KEYS):
        if not isinstance(item.get("name"), str) or not isinstance(item.get("from"), str):
            raise RulesError(f"{where} needs 'name' and 'from' tensor names")
        creates.append(
            CreateRule(
                item["name"], item["from"], _transform(item, where, spaces),
                _expr(item["when"], where) if "when" in item else None, _component(item, where),
            )
        )
    unmatched = data.get("unmatched", "error")
    if unmatched not in ("error", "copy"):
        raise RulesError(f"{path}: unmatched must be 'error' or 'copy'")
    return RuleSet(
        name=name,
        description=str(data.get("description") or ""),
        path=path,
        detect_model_types=_strings(detect.get("model_type"), f"{path}: detect.model_type"),
        detect_architectures=_strings(detect.get("architectures"), f"{path}: detect.architectures"),
        let=let, checks=checks, spaces=spaces, config=config, tensors=tensors, create=creates, unmatched=unmatched,
        depth=_depth(data.get("depth"), path, tensors),
    )


def _depth(value, path: str, tensors: list[TensorRule]) -> DepthSpec | None:
    if value is None:
        return None
    where = f"{path}: depth"
    value = _mapping(value, where)
    _unknown(value, KNOWN_DEPTH_KEYS, where)
    spec = DepthSpec()
    for key in ("count", "group"):
        if key in value:
            if not isinstance(value[key], str) or not value[key].isidentifier():
                raise RulesError(f"{where}.{key} must be a name, got {value[key]!r}")
            setattr(spec, key, value[key])
    if not any(spec.group in rule.regex.groupindex for rule in tensors):
        raise RulesError(f"{where}.group {spec.group!r} is captured by no tensor rule; per-layer rules need "
                         f"(?P<{spec.group}>\\d+) in their regex")
    spec.lists = _strings(value.get("lists"), f"{where}.lists")
    spec.thresholds = _strings(value.get("thresholds"), f"{where}.thresholds")
    for here, item in _mapping_list(value.get("identity"), f"{where}.identity", KNOWN_IDENTITY_KEYS,
                                    " of {match, fill} rules"):
        if not isinstance(item.get("match"), str) or "fill" not in item:
            raise RulesError(f"{here} needs 'match' (a regular expression) and 'fill' (a value)")
        regex = _pattern(item["match"], here)
        spec.identity.append(IdentityRule(item["match"], regex, _expr(item["fill"], here),
                                          _expr(item["when"], here) if "when" in item else None))
    spec.identity_checks = _checks(value.get("identity_checks"), f"{where}.identity_checks")
    return spec


def _component(item, where):
    component = item.get("component")
    if component is not None and component not in COMPONENTS:
        raise RulesError(f"{where}: component must be one of {', '.join(sorted(COMPONENTS))}")
    return component


def _tensor_rule(index: int, item, path: str, spaces) -> TensorRule:
    where = f"{path}: tensors[{index}]"
    item = _mapping(item, where)
    _unknown(item, KNOWN_TENSOR_KEYS, where)
    pattern = item.get("match")
    if not isinstance(pattern, str) or not pattern:
        raise RulesError(f"{where} needs 'match', a regular expression for tensor names")
    regex = _pattern(pattern, where)
    where = f"{path}: tensors[{index}] ({pattern})"
    replicate = item.get("replicate")
    count = template = unit_of = None
    if replicate is not None:
        replicate = _mapping(replicate, f"{where}: replicate")
        _unknown(replicate, {"count", "name", "unit_of"}, f"{where}: replicate")
        if "count" not in replicate or not isinstance(replicate.get("name"), str):
            raise RulesError(f"{where}: replicate needs 'count' and a 'name' template")
        count = _expr(replicate["count"], where)
        template = replicate["name"]
        validate_template(template, where)
        unit_of = replicate.get("unit_of")
        if unit_of is not None and (not isinstance(unit_of, str) or unit_of not in spaces):
            raise RulesError(f"{where}: replicate.unit_of must name a space of the rules file, got {unit_of!r}")
        if unit_of is not None and "(?P<h>" not in pattern:
            raise RulesError(f"{where}: replicate.unit_of needs the unit index as the regex group (?P<h>...)")
    drop = bool(item.get("drop", False))
    transform = _transform(item, where, spaces)
    if drop and not transform.is_copy():
        raise RulesError(f"{where}: a dropped tensor cannot also have axes, ops or scale")
    required = item.get("required")
    return TensorRule(
        index, pattern, regex, transform, _expr(item["when"], where) if "when" in item else None,
        count, template, drop, _component(item, where),
        _expr(required, f"{where}: required") if required not in (None, False) else None, unit_of,
    )


def _transform(item, where, spaces) -> Transform:
    axes = item.get("axes")
    ops = item.get("ops")
    if axes is not None and ops is not None:
        raise RulesError(f"{where}: give either 'axes' or 'ops', not both")
    transform = Transform()
    if axes is not None:
        if not isinstance(axes, list):
            raise RulesError(f"{where}: axes must be a list with one role per tensor axis")
        transform.axes = [_axis_label(label, where, spaces) for label in axes]
    if ops is not None:
        transform.ops = _op_chain(ops, where)
    if "scale" in item:
        scale = item["scale"]
        if isinstance(scale, dict):
            # {factor: expr, offset: expr}: y = x · factor + offset (a (1+w) norm gain scaled by c is
            # factor c, offset c − 1).
            _unknown(scale, {"factor", "offset"}, f"{where}: scale")
            transform.scale = _expr(scale.get("factor", 1), f"{where}: scale.factor")
            if "offset" in scale:
                transform.scale_offset = _expr(scale["offset"], f"{where}: scale.offset")
        else:
            transform.scale = _expr(scale, where)
    return transform


def _axis_label(label, where, spaces):
    if isinstance(label, list):
        if not label:
            raise RulesError(f"{where}: a fused axis needs at least one part")
        parts = [_axis_label(part, where, spaces) for part in label]
        if any(isinstance(part, list) for part in parts):
            raise RulesError(f"{where}: fused axes cannot nest")
        return parts
    if label is None or label == "-":
        return "-"
    if not isinstance(label, str):
        raise RulesError(f"{where}: axis role {label!r} must be a space name, 'space.in', 'space.norm', '-' or a list of them")
    space = split_role(label)[0]
    if space not in spaces:
        raise RulesError(f"{where}: axis role {label!r} names no space (spaces: {', '.join(spaces) or 'none'})")
    return label


def _op_chain(ops, where) -> list[OpSpec]:
    if not isinstance(ops, list):
        raise RulesError(f"{where}: ops must be a list like [{{tile: {{axis: 0, times: n}}}}]")
    chain = []
    for i, entry in enumerate(ops):
        here = f"{where}: ops[{i}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RulesError(f"{here}: each op is a one-key mapping, e.g. {{tile: {{axis: 0, times: n}}}}")
        (op_type, params), = entry.items()
        params = _mapping(params, here)
        if op_type == "fused":
            _unknown(params, {"axis", "parts"}, here)
            parts = params.get("parts")
            if not isinstance(parts, list) or not parts:
                raise RulesError(f"{here}: fused needs 'parts', a list of {{size: expr, ops: [...]}}")
            built = []
            for j, part in enumerate(parts):
                part = _mapping(part, f"{here}.parts[{j}]")
                _unknown(part, {"size", "ops"}, f"{here}.parts[{j}]")
                if "size" not in part:
                    raise RulesError(f"{here}.parts[{j}] needs 'size'")
                built.append((_expr(part["size"], here), _op_chain(part.get("ops") or [], f"{here}.parts[{j}]")))
            chain.append(OpSpec("fused", {"axis": _expr(params.get("axis", 0), here), "parts": built}))
            continue
        if op_type not in OP_TYPES:
            known = ", ".join(sorted([*OP_TYPES, "fused"]))
            raise RulesError(f"{here}: unknown op {op_type!r} (known ops: {known})")
        fields = set(OP_TYPES[op_type].__dataclass_fields__)
        _unknown(params, fields, here)
        chain.append(OpSpec(op_type, {key: _expr(value, here) for key, value in params.items()}))
    return chain


_TEMPLATE_PART = re.compile(r"\{([^{}]*)\}")


def validate_template(template: str, where: str) -> None:
    for match in _TEMPLATE_PART.finditer(template):
        _expr(match.group(1), f"{where}: name template")


def render_template(template: str, env) -> str:
    """Fill ``{expression}`` parts of a tensor-name template."""

    def fill(match):
        value = Expression(match.group(1)).evaluate(env)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)

    return _TEMPLATE_PART.sub(fill, template)
