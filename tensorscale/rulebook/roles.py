"""Axis roles, and the one table that says what `up` and `down` do with each.

A rules file labels every tensor axis with a space and a role (``hidden``, ``hidden.in``, ``hidden.norm``).
The role says what the axis *is* for that space, not what to do to it, so one label drives both
directions: `up` expands the axis with the role's expand op (rulebook.compile), `down` reduces it with the
role's reduce op (folding.fold). Because each reduce op is the left inverse of its expand op on a
HyperCloned model (copies averaged back to the unit, blocks that were each ÷copies summed back), `down`
of `up` is the identity. This table is the only place where a role is mapped to an op.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    """What an axis is for its space. A `str` so that labels compare and hash as the words rules use."""

    OUT = "out"  # the tensor writes the space (a projection's rows, an embedding's columns, a bias)
    IN = "in"  # the tensor reads the space (a projection's columns)
    NORM = "norm"  # an elementwise gain (or bias) on the space, applied where it is normalised

    __hash__ = str.__hash__  # "in" and Role.IN are the same dictionary key

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class RoleOps:
    """The ops of one role. `up` (expand): every unit is copied ("clone": Tile, or Interleave for a space
    declared ``clone: interleave``, or a Gather of the layout's sources); `divides` makes each copy ÷copies
    so that the copies sum back to the source (TileDivide), and `rescales_norm` rescales gains where a space
    gained zero units. `down` (reduce, a Merge with the clustering P = SΩ): a cluster's units are averaged
    ("mean") or summed ("sum"), then multiplied by S, 1/S or 1 (S = sqrt(N_c·m/n) on an RMS-scaled space)."""

    suffix: str  # how the role follows a space name in `axes`
    divides: bool
    rescales_norm: bool
    reduce_weights: str  # "mean" or "sum"
    reduce_scale: str  # "S", "1/S" or "1"

    def expand_op(self, clone: str) -> str:
        """The name of `up`'s op for a whole-multiple growth of a space cloned as `clone`."""
        if self.divides:  # readers follow the writers' copies: blocks for tiles, adjacent copies for interleave
            return "interleave_divide" if clone == "interleave" else "tile_divide"
        return "interleave" if clone == "interleave" else "tile"


ROLE_OPS: dict[Role, RoleOps] = {
    Role.OUT: RoleOps(suffix="", divides=False, rescales_norm=False, reduce_weights="mean", reduce_scale="S"),
    Role.IN: RoleOps(suffix=".in", divides=True, rescales_norm=False, reduce_weights="sum", reduce_scale="1/S"),
    Role.NORM: RoleOps(suffix=".norm", divides=False, rescales_norm=True, reduce_weights="mean", reduce_scale="1"),
}
REDUCE_WEIGHTS = ("mean", "sum")
REDUCE_SCALES = ("S", "1/S", "1")


def split_role(label: str) -> tuple[str, Role]:
    """'hidden.in' -> ('hidden', Role.IN); 'hidden.norm' -> ('hidden', Role.NORM); 'hidden' -> ('hidden', Role.OUT)."""
    for role, ops in ROLE_OPS.items():
        if ops.suffix and label.endswith(ops.suffix):
            return label[: -len(ops.suffix)], role
    return label, Role.OUT


def role_label(space: str, role: Role) -> str:
    """The axis label rules write for `space` in `role` (the inverse of split_role)."""
    return space + ROLE_OPS[Role(role)].suffix
