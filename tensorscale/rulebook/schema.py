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
Every problem is reported as one line naming the file and the place. The dataclasses below are both the
types the engine reads and the check (rulebook.validate): each field is a key, its type how it is checked.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import TensorscaleError
from ..ops.library import OP_TYPES
from ..strict_yaml import load_yaml, load_yaml_file
from .expr import Expression, ExpressionError
from .extends import resolve_extends
from .patterns import Pattern
from .roles import split_role
from .shipped import shipped_data
from .targets import DEFAULT_TARGETS, DEFAULT_TIE_KEY, TARGET_KEYS
from .validate import Identifier, Name, Strings, check_keys, key, mapping, read

# How a space is normalised, where something normalises it as a whole (see SpaceSpec.norm).
NormKind = Literal["rms", "rms_one_plus", "layer"]
NORM_KINDS = typing.get_args(NormKind)
Component = Literal["attention", "embeddings", "head", "mlp", "norms", "other"]
COMPONENTS = set(typing.get_args(Component))


class RulesError(TensorscaleError):
    pass


# Readers for what a type alone does not say: (raw value, where, fields read so far) -> the field's value.


def _expression(value, where, context) -> Expression:
    return _expr(value, where)


def _keyed_expression(value, where, context) -> Expression:
    """An expression whose errors name its key (`required`)."""
    return _expr(value, f"{where}: {context['key']}")


def _regex(value, where, context) -> Pattern:
    if not isinstance(value, str) or not value:
        raise RulesError(f"{where} {context['missing']}")
    return _pattern(value, where)


def _needs(message: str):
    """A reader for a required string key, with the error to give when it is not a string."""

    def parse(value, where, context):
        if not isinstance(value, str):
            raise RulesError(f"{where} {message}")
        return value

    return parse


def _name_template(value, where, context) -> str:
    if not isinstance(value, str):
        raise RulesError(f"{where} needs 'count' and a 'name' template")
    validate_template(value, where)
    return value


def _mapping_of_expressions(value, where, context) -> list[tuple[str, Expression]]:
    """`let` and `config`: name -> expression, in order."""
    label = f"{where}: {context['key']}"
    return [(str(k), _expr(v, f"{label}.{k}")) for k, v in _mapping(value, label).items()]


def _rules_list(cls, kind: str = "", separator: str = ": "):
    """A reader for an optional list of mappings (`checks`, `create`, `identity`), each read as `cls`."""

    def parse(value, where, context):
        label = f"{where}{separator}{context['key']}"
        value = value or []
        if not isinstance(value, list):
            raise RulesError(f"{label} must be a list{kind}")
        return [read(cls, item, f"{label}[{i}]", context) for i, item in enumerate(value)]

    return parse


@dataclass
class Check:
    """An assertion over config and let values, with the message shown when it does not hold (by default
    the assertion itself). Unpacks as (assertion, message)."""

    assertion: Expression = key("assert", parse=_expression)
    message: str | None = key(default=None, parse=lambda value, where, context: value)

    def __post_init__(self):
        self.message = str(self.message or self.assertion.source)

    def __iter__(self):
        return iter((self.assertion, self.message))


@dataclass
class Detect:
    model_type: Strings = key(default_factory=list)
    architectures: Strings = key(default_factory=list)


@dataclass
class SpaceSpec:
    name: str = key(yaml=False)
    size: Expression = key(parse=_expression)
    grow: Expression = key(parse=_expression, default_factory=lambda: Expression(1))
    unit: Expression = key(parse=_expression, default_factory=lambda: Expression(1))
    clone: Literal["tile", "interleave"] = "tile"  # [a, b, a, b], or [a, a, b, b] at unit granularity
    # For `down` (folding units into clusters):
    per: Name | None = None  # a regex group (e.g. layer): one clustering per value, not one for the model
    scaled: bool = False  # a space that an RMSNorm normalises: merged units carry S = sqrt(N·m/n)
    equal: bool = False  # clusters must have equal sizes (LayerNorm centring, full-projection q/k norms)
    within: Name | None = None  # units are grouped under this space's units (q heads under kv heads)
    clusters_of: Name | None = None  # clustered exactly like that space (a second view of the same units)
    # For growth that is not a whole multiple (zero-padding, any target width): how the space is normalised.
    # "rms": an RMSNorm x/rms(x)·w, so zero-padding is exact once the gains are rescaled; "rms_one_plus":
    # the same with gains stored as w in (1+w) (Gemma); "layer": a LayerNorm, whose mean changes when zeros
    # are added, so only whole-multiple tiling is exact. None: nothing normalises the space as a whole, so
    # units may be cloned unevenly (Net2Net).
    norm: NormKind | None = None


@dataclass
class OpSpec:
    """An op from an explicit chain: its type and its parameters, still as expressions."""

    type: str
    params: dict[str, Any]  # values are Expression, or for fused: list of (size Expression, [OpSpec])


def _axes(value, where, context) -> list:
    if not isinstance(value, list):
        raise RulesError(f"{where}: axes must be a list with one role per tensor axis")
    return [_axis_label(label, where, context["spaces"]) for label in value]


def _ops(value, where, context) -> list[OpSpec]:
    if context.get("axes") is not None:
        raise RulesError(f"{where}: give either 'axes' or 'ops', not both")
    return _op_chain(value, where)


def _scale_factor(value, where, context) -> Expression:
    if isinstance(value, dict):
        # {factor: expr, offset: expr}: y = x · factor + offset (a (1+w) norm gain scaled by c is factor c,
        # offset c − 1).
        _unknown(value, {"factor", "offset"}, f"{where}: scale")
        return _expr(value.get("factor", 1), f"{where}: scale.factor")
    return _expr(value, where)


def _scale_offset(value, where, context) -> Expression | None:
    if isinstance(value, dict) and "offset" in value:
        return _expr(value["offset"], f"{where}: scale.offset")
    return None


@dataclass
class Transform:
    """How a tensor is rewritten: axis roles or an explicit op chain, plus an optional scale."""

    axes: list | None = key(default=None, parse=_axes)
    ops: list[OpSpec] | None = key(default=None, parse=_ops)
    # y = x · scale + scale_offset, before the axis ops. `down` evaluates it at 1/n: it must undo itself
    # there (rulebook.evaluate.scale_inverts).
    scale: Expression | None = key(default=None, parse=_scale_factor)
    # e.g. (1+w) norms: scaling the gain by c is w' = w·c + (c − 1); read from the same `scale` key
    scale_offset: Expression | None = key("scale", default=None, parse=_scale_offset)

    def is_copy(self) -> bool:
        return self.axes is None and not self.ops and self.scale is None and self.scale_offset is None


def _unit_of(value, where, context) -> str:
    if not isinstance(value, str) or value not in context["spaces"]:
        raise RulesError(f"{where}.unit_of must name a space of the rules file, got {value!r}")
    return value


@dataclass
class Replicate:
    """A tensor written `count` times under the names `name` gives (with {k}, or {h} for `unit_of`)."""

    count: Expression = key(parse=_expression, missing="needs 'count' and a 'name' template")
    name: str = key(parse=_name_template, missing="needs 'count' and a 'name' template")
    # The space whose units the regex group `h` counts, for a tensor written once per unit (StableLM's
    # per-head norms): `down` writes, for each output unit, the tensor of its source.
    unit_of: str | None = key(default=None, parse=_unit_of)


def _required_expression(value, where, context) -> Expression | None:
    return None if value in (None, False) else _keyed_expression(value, where, context)


@dataclass
class TensorRule:
    index: int = key(yaml=False)
    regex: Pattern = key(
        "match", parse=_regex, labels=True, missing="needs 'match', a regular expression for tensor names"
    )
    transform: Transform = key(inline=Transform)
    when: Expression | None = key(default=None, parse=_expression)
    replicate: Replicate | None = None
    drop: bool = False
    component: Component | None = None
    # When this holds (over config and let values), some tensor must fully match `regex`: a checkpoint
    # without its embedding, final norm or (untied) head is incomplete, not a smaller model.
    required: Expression | None = key(default=None, parse=_required_expression)
    copy: Any = None  # accepted for readers of the file (the tensor is copied as is); never read

    def __post_init__(self):
        if self.drop and not self.transform.is_copy():
            raise RulesError(
                f"{self.regex.where} ({self.pattern}): a dropped tensor cannot also have axes, ops or scale"
            )
        if self.replicate_unit_of is not None and "(?P<h>" not in self.pattern:
            raise RulesError(
                f"{self.regex.where} ({self.pattern}): replicate.unit_of needs the unit index as the "
                "regex group (?P<h>...)"
            )

    @property
    def pattern(self) -> str:
        return self.regex.pattern

    @property
    def replicate_count(self) -> Expression | None:
        return None if self.replicate is None else self.replicate.count

    @property
    def replicate_name(self) -> str | None:
        return None if self.replicate is None else self.replicate.name

    @property
    def replicate_unit_of(self) -> str | None:
        return None if self.replicate is None else self.replicate.unit_of

    @property
    def label(self) -> str:
        return f"rule {self.index + 1} ({self.pattern})"


@dataclass
class CreateRule:
    """A tensor written that the source lacks (an untied lm_head), from the source tensor `from`."""

    name: str = key(
        parse=_needs("needs 'name' and 'from' tensor names"), missing="needs 'name' and 'from' tensor names"
    )
    source: str = key(
        "from", parse=_needs("needs 'name' and 'from' tensor names"), missing="needs 'name' and 'from' tensor names"
    )
    transform: Transform = key(inline=Transform)
    when: Expression | None = key(default=None, parse=_expression)
    component: Component | None = None


@dataclass
class IdentityRule:
    """How one tensor of an inserted identity layer differs from the layer it copies: filled with `fill`
    (a residual writer zeroed, or a (1+w) post-norm gain set to -1 so that the norm outputs zero)."""

    regex: Pattern = key("match", parse=_regex, missing="needs 'match' (a regular expression) and 'fill' (a value)")
    fill: Expression = key(parse=_expression, missing="needs 'match' (a regular expression) and 'fill' (a value)")
    when: Expression | None = key(default=None, parse=_expression)

    @property
    def pattern(self) -> str:
        return self.regex.pattern


@dataclass
class DepthSpec:
    """Depth growth: `count` is the config key holding the layer count, `group` the regex group of the
    tensor rules that captures a tensor's layer index, `lists` the per-layer config lists (one entry per
    layer, inserted with the layers), `thresholds` config ints that count layers (shifted by the layers
    inserted below them), `identity` the fills that make an inserted layer an identity, and
    `identity_checks` the conditions under which such a layer is exact."""

    count: Identifier = "num_hidden_layers"
    group: Identifier = "layer"
    lists: Strings = key(default_factory=list)
    thresholds: Strings = key(default_factory=list)
    identity: list[IdentityRule] = key(
        default_factory=list, parse=_rules_list(IdentityRule, " of {match, fill} rules", ".")
    )
    identity_checks: list[Check] = key(default_factory=list, parse=_rules_list(Check, separator="."))


def _name(value, where, context) -> str:
    if not isinstance(value, str) or not value:
        raise RulesError(f"{where}: missing 'name'")
    return value


def _spaces(value, where, context) -> dict[str, SpaceSpec]:
    spaces = {}
    for name, spec in _mapping(value, f"{where}: spaces").items():
        here = f"{where}: spaces.{name}"
        if isinstance(spec, (str, int)):
            spec = {"size": spec}
        if "." in str(name) or str(name) == "-":
            raise RulesError(f"{here}: space names may not contain '.' or be '-'")
        spaces[str(name)] = read(SpaceSpec, spec, here, name=str(name))
    for name, spec in spaces.items():
        for ref in (spec.within, spec.clusters_of):
            if ref is not None and ref not in spaces:
                raise RulesError(f"{where}: spaces.{name} refers to space {ref!r}, which is not declared")
    return spaces


def _targets(value, where, context) -> dict[str, str]:
    here = f"{where}: targets"
    targets = dict(DEFAULT_TARGETS)
    for option, space in _mapping(value, here).items():
        if option not in DEFAULT_TARGETS:
            raise RulesError(f"{here}: unknown size option {option!r} (known: {', '.join(TARGET_KEYS)})")
        if not isinstance(space, str) or space not in context["spaces"]:
            raise RulesError(f"{here}.{option} must name a space of the rules file, got {space!r}")
        targets[option] = space
    return targets


def _tensors(value, where, context) -> list[TensorRule]:
    if not isinstance(value, list) or not value:
        raise RulesError(f"{where}: 'tensors' must be a non-empty list of rules")
    return [read(TensorRule, item, f"{where}: tensors[{i}]", context, index=i) for i, item in enumerate(value)]


def _depth(value, where, context) -> DepthSpec | None:
    if value is None:
        return None
    here = f"{where}: depth"
    spec = read(DepthSpec, value, here, context)
    if not any(spec.group in rule.regex.groupindex for rule in context["tensors"]):
        raise RulesError(
            f"{here}.group {spec.group!r} is captured by no tensor rule; per-layer rules need "
            f"(?P<{spec.group}>\\d+) in their regex"
        )
    return spec


@dataclass(kw_only=True)
class RuleSet:
    """A whole rules file. Its fields, in this order, are the file's keys (see the module docstring)."""

    name: str = key(parse=_name, missing=": missing 'name'")
    description: str = key(default="", parse=lambda value, where, context: str(value or ""))
    path: str = key(yaml=False, default="<rules>")
    detect: Detect = key(default_factory=Detect)
    let: list[tuple[str, Expression]] = key(default_factory=list, parse=_mapping_of_expressions)
    checks: list[Check] = key(default_factory=list, parse=_rules_list(Check))
    spaces: dict[str, SpaceSpec] = key(default_factory=dict, parse=_spaces)
    config: list[tuple[str, Expression]] = key(default_factory=list, parse=_mapping_of_expressions)
    tensors: list[TensorRule] = key(parse=_tensors, missing=": 'tensors' must be a non-empty list of rules")
    create: list[CreateRule] = key(default_factory=list, parse=_rules_list(CreateRule))
    unmatched: Literal["error", "copy"] = "error"
    depth: DepthSpec | None = key(default=None, parse=_depth)  # None: the architecture cannot grow in depth
    # The space each size option resizes (DEFAULT_TARGETS unless the file names its spaces otherwise), and
    # the config key that says the embeddings are tied (`down` sets it when it ties them again).
    targets: dict[str, str] = key(default_factory=lambda: dict(DEFAULT_TARGETS), parse=_targets)
    tie: Identifier = DEFAULT_TIE_KEY

    @property
    def detect_model_types(self) -> list[str]:
        return self.detect.model_type

    @property
    def detect_architectures(self) -> list[str]:
        return self.detect.architectures


MAX_RULES_BYTES = 2**20  # shipped rules files are 3-8 KB
MAX_OP_NODES = 10_000  # ops, fused parts and axis roles in one file, counted as parsed


def load_rules_text(text: str, path: str = "<rules>") -> RuleSet:
    """Rules from YAML text. Aliases, duplicate keys and deep nesting are refused (strict_yaml); an
    `extends:` base is merged in first (rulebook.extends says how), so what is validated is the result."""
    return _from_data(resolved_data(text, path), path)


def _from_data(data, path: str) -> RuleSet:
    if not isinstance(data, dict):
        raise RulesError(f"{path}: a rules file must be a YAML mapping with at least 'name' and 'tensors'")
    try:
        return read(RuleSet, data, path, path=path)
    except RulesError:
        raise
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None


def resolved_data(text: str, path: str = "<rules>"):
    """The plain data of a rules file with its `extends:` base merged in, not yet validated."""
    try:
        return _resolved(load_yaml(text, path, aliases=False), path)
    except RulesError:
        raise
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None


def _resolved(data, path: str):
    _count_nodes(data, path)
    data = resolve_extends(data, path, shipped_data)
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
        data = _resolved(load_yaml_file(path, "rules file", MAX_RULES_BYTES, aliases=False), path)
    except RulesError:
        raise
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None
    return _from_data(data, path)


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
    try:
        return mapping(value, where)
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None


def _unknown(keys, known, where):
    try:
        check_keys(keys, known, where)
    except TensorscaleError as exc:
        raise RulesError(str(exc)) from None


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
        raise RulesError(
            f"{where}: axis role {label!r} must be a space name, 'space.in', 'space.norm', '-' or a list of them"
        )
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
        ((op_type, params),) = entry.items()
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
