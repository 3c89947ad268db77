"""Turn a rule's transform (axis roles or an explicit chain) into concrete ops for one tensor.

Axis roles are the heart of the rules language. A rules file names the model's spaces (``hidden``,
``heads``, ``ffn``...) with their size and growth factor, then labels each tensor axis:
- ``space``: the tensor produces (or is elementwise on) that space, so the axis is cloned
  (tile, or interleave for spaces declared ``clone: interleave``);
- ``space.in``: the tensor reads that space, so the axis is tiled into blocks that sum to the original
  (each ÷grow), with optional symmetry-breaking noise;
- ``-``: the axis is left alone;
- ``[a, b, c]``: a fused axis whose consecutive parts belong to different spaces.
Because roles say what an axis *is*, not what to do to it, the same file can also drive the inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import TensorscaleError
from ..ops.library import OP_TYPES, Fused, Interleave, Op, Pad, Scale, Tile, TileDivide
from .expr import ExpressionError
from .roles import ROLE_OPS
from .schema import OpSpec, RuleSet, Transform, split_role


@dataclass(frozen=True)
class Space:
    """A resolved space: its size now, its size after the rewrite, and how its units fold for `down`."""

    name: str
    size: int
    target: int
    unit: int
    clone: str
    per: str | None = None
    scaled: bool = False
    equal: bool = False
    within: str | None = None
    clusters_of: str | None = None
    norm: str | None = None  # how the space is normalised as a whole (rms, rms_one_plus, layer), if it is

    @property
    def units(self) -> int:
        return self.size // self.unit

    @property
    def target_units(self) -> int:
        return self.target // self.unit


# The largest space (in dimensions) a plan accepts: 2**21 is 8x the widest real model's largest space (a
# 256k vocabulary), and small enough that per-unit layouts and row maps plan in seconds. Checked
# before anything is allocated per unit: `intermediate_size: 2**62` used to grow a list until memory ran out.
MAX_SPACE_SIZE = 2**21


def _whole(value, what: str) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise TensorscaleError(f"{what} must be a whole number, got {value!r} (check config.json)")
    if isinstance(value, float) and abs(value - round(value)) < 1e-6:
        value = round(value)  # ratios such as 48/64 make sizes like 47.99999999
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
        raise TensorscaleError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def resolve_spaces(rule_set: RuleSet, env) -> dict[str, Space]:
    spaces = {}
    for name, spec in rule_set.spaces.items():
        where = f"{rule_set.path}: spaces.{name}"
        try:
            size = _whole(spec.size.evaluate(env), f"{where}.size")
            target = _whole(spec.size.evaluate(env) * spec.grow.evaluate(env), f"{where}: size × grow")
            unit = _whole(spec.unit.evaluate(env), f"{where}.unit")
        except ExpressionError as exc:
            raise TensorscaleError(f"{where}: {exc}") from None
        if unit < 1 or size < 0 or target < 0:
            raise TensorscaleError(
                f"{where}: size and target must be >= 0 and unit >= 1 (got {size}, {target}, {unit})"
            )
        if max(size, target) > MAX_SPACE_SIZE:
            raise TensorscaleError(
                f"space {name} would be {max(size, target):,} dimensions ({size:,} -> {target:,}), beyond the "
                f"{MAX_SPACE_SIZE:,} this tool writes; check config.json and the size options"
            )
        if size % unit or target % unit:
            raise TensorscaleError(f"{where}: sizes {size} -> {target} are not multiples of its unit {unit}")
        spaces[name] = Space(
            name,
            size,
            target,
            unit,
            spec.clone,
            spec.per,
            spec.scaled,
            spec.equal,
            spec.within,
            spec.clusters_of,
            spec.norm,
        )
    return spaces


@dataclass(frozen=True)
class Grow:
    """`up`: every role becomes its expand op, the copies laid out by `layouts` (rulebook.layout)."""

    layouts: dict
    explicit_ops = True  # a rule's explicit op chain is an `up` chain

    def leaf(self, env, where):
        return _grow_leaf(env, where, self.layouts)


@dataclass(frozen=True)
class Reduce:
    """`down`: every role becomes its reduce op, a merge with the clusterings of `folds` (folding.fold)."""

    folds: object
    explicit_ops = False

    def leaf(self, env, where):
        return _merge_leaf(env, where, self.folds)


def compile_transform(
    transform: Transform, shape: tuple[int, ...], spaces: dict[str, Space], env, where: str, direction: Grow | Reduce
) -> list[Op]:
    """The ops for one tensor: the same walk over its axis roles for both directions, each role turned into
    the direction's op for it (rulebook.roles: ROLE_OPS)."""
    ops: list[Op] = []
    if transform.scale is not None or transform.scale_offset is not None:
        factor = _number(transform.scale, 1, env, f"{where}: scale")
        offset = _number(transform.scale_offset, 0, env, f"{where}: scale offset")
        if factor != 1 or offset != 0:
            # Elementwise, so under `down` it commutes with the merges: their weights sum to 1 per cluster,
            # so merge(x·c + o) = merge(x)·c + o for norm gains.
            ops.append(Scale(float(factor), float(offset)))
    if transform.axes is not None:
        if len(transform.axes) != len(shape):
            raise TensorscaleError(
                f"{where}: the rule gives {len(transform.axes)} axis roles but the tensor has shape {list(shape)}; "
                "the checkpoint does not match its config or the rules"
            )
        leaf = direction.leaf(env, where)
        for axis, label in enumerate(transform.axes):
            ops.extend(_axis_ops(axis, label, shape[axis], spaces, env, where, leaf))
    if transform.ops is not None:
        if not direction.explicit_ops:
            raise TensorscaleError(f"{where}: down derives its ops from axis roles; this rule has an explicit op chain")
        ops.extend(build_chain(transform.ops, env, where))
    return ops


def _number(expression, default, env, where):
    if expression is None:
        return default
    try:
        value = expression.evaluate(env)
    except ExpressionError as exc:
        raise TensorscaleError(f"{where}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TensorscaleError(f"{where} must be a number, got {value!r}")
    return value


def _axis_ops(axis, label, size, spaces, env, where, leaf) -> list[Op]:
    """Ops for one axis label: checks sizes, splits fused axes into parts, and asks `leaf(space, role,
    axis)` for the ops of each plain part (`up` tiles, `down` merges)."""
    if label == "-":
        return []
    if isinstance(label, list):
        parts, sizes = [], []
        for part in label:
            part_size = _label_size(part, spaces)
            sizes.append(part_size)
            parts.append(_axis_ops(axis, part, part_size, spaces, env, where, leaf))
        if sum(sizes) != size:
            raise TensorscaleError(
                f"{where}: fused axis {axis} has size {size} but its parts {label} add up to {sum(sizes)}; "
                "the checkpoint does not match its config"
            )
        return [Fused(axis, sizes, parts)] if any(parts) else []
    expected = _label_size(label, spaces)
    if expected != size:
        raise TensorscaleError(
            f"{where}: axis {axis} ({label}) has size {size} but config.json implies {expected}; "
            "the checkpoint does not match its config"
        )
    name, role = split_role(label)
    return leaf(spaces[name], role, axis)


def _grow_leaf(env, where, layouts):
    """`up`: producers copy their units as the space's layout says (tile, interleave, zero units, or a
    cloned subset), readers get blocks that sum back to the source (÷copies), norm gains are copied and,
    where the space gained zero units, rescaled so the norm's output is kept."""

    def leaf(space, role, axis):
        layout = layouts[space.name]
        if layout.target == layout.size:
            return []
        snr_db = env.get("snr_db")
        role_ops = ROLE_OPS[role]
        tiles = layout.tiles
        if tiles is not None:
            return [_expand(role_ops.expand_op(space.clone), axis, tiles, space.unit, snr_db, layout.size)]
        padded = layout.padded_tiles
        if padded is not None:
            ops: list[Op] = []
            if padded > 1:
                ops.append(_expand(role_ops.expand_op("tile"), axis, padded, space.unit, snr_db, layout.size))
        else:
            ops = [layout.map.gather(axis, layout.unit, divide=role_ops.divides, snr_db=snr_db)]
        if role_ops.rescales_norm:
            ops.extend(_norm_rescale(space, layout, where))
        if padded is not None:
            ops.append(Pad(axis, 0, (layout.target - layout.kept) * layout.unit))
        return ops

    return leaf


def _expand(op: str, axis: int, tiles: int, unit: int, snr_db, units: int) -> Op:
    """A role's expand op (rulebook.roles) for a whole-multiple growth by `tiles` of `units` units."""
    if op == "tile_divide":
        return TileDivide(axis, tiles, snr_db)
    if op == "interleave_divide":  # a reader of interleaved copies: each unit's copies side by side, each ÷tiles
        return Interleave(axis, tiles, unit).as_gather_of(units, divide=True, snr_db=snr_db)
    if op == "interleave":
        return Interleave(axis, tiles, unit)
    return Tile(axis, tiles)


def _norm_rescale(space, layout, where) -> list[Op]:
    """RMSNorm gains of a space that gained zero units: x/rms(x)·w is kept when w is scaled by
    sqrt(copies·s/t) (the grown vector's rms changes by the inverse); (1+w) gains store w' = (1+w)·c − 1."""
    if space.norm not in ("rms", "rms_one_plus"):
        raise TensorscaleError(
            f"{where}: space {space.name} has norm gains but its rules do not say how it is normalised; add "
            f"norm: rms, rms_one_plus or layer to spaces.{space.name}"
        )
    gain = layout.norm_gain
    if gain == 1:
        return []
    return [Scale(gain, gain - 1 if space.norm == "rms_one_plus" else 0.0)]


def _merge_leaf(env, where, folds):
    """`down`: every role becomes a merge with the space's clustering (see folding.fold)."""

    def leaf(space, role, axis):
        if space.target == space.size:
            return []
        return [folds.lookup(space, env, where).merge_op(axis, role, space)]

    return leaf


def _label_size(label, spaces) -> int:
    if label == "-":
        raise TensorscaleError("'-' cannot be part of a fused axis; name the part's space")
    return spaces[split_role(label)[0]].size


def build_chain(specs: list[OpSpec], env, where) -> list[Op]:
    chain = []
    for spec in specs:
        try:
            if spec.type == "fused":
                axis = _whole(spec.params["axis"].evaluate(env), f"{where}: fused.axis")
                sizes = [_whole(size.evaluate(env), f"{where}: fused part size") for size, _ in spec.params["parts"]]
                parts = [build_chain(sub, env, where) for _, sub in spec.params["parts"]]
                chain.append(Fused(axis, sizes, parts))
                continue
            params = {key: expr.evaluate(env) for key, expr in spec.params.items()}
        except ExpressionError as exc:
            raise TensorscaleError(f"{where}: {exc}") from None
        for key in ("axis", "times", "unit", "start", "stop", "before", "after", "blocks"):
            if key in params:
                params[key] = _whole(params[key], f"{where}: {spec.type}.{key}")
        try:
            chain.append(OP_TYPES[spec.type](**params))
        except TypeError as exc:
            raise TensorscaleError(f"{where}: bad parameters for {spec.type}: {exc}") from None
    return chain
