"""A clustering of one space's units, and the merge ops it implies for each axis role.

Cluster-fold (see the project's downscaling notes): units of a space are assigned to clusters; merge is
P = SΩ and unmerge U = AS⁻¹, so PU = I. Producers (rows that write the space) are averaged and scaled by
S, norm gains are averaged, consumers (columns that read the space) are summed and divided by S. S is
sqrt(N_c·m/n) for spaces an RMSNorm normalises (it keeps the RMS of a merged vector equal to the original
one's) and 1 elsewhere. On a HyperCloned model, whose clusters hold exact copies, this inverts `up`.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field

from ..errors import TensorscaleError
from ..ops.library import Merge
from ..ops.unit_map import UnitMap
from ..rulebook.roles import ROLE_OPS


class Fold:
    """A clustering: `map` (ops/unit_map.py, the type `up`'s layouts use too) sends unit j of the space to
    cluster map.of[j]; `exact` is True when every cluster held identical units (an exact inverse)."""

    def __init__(self, cluster, clusters: int, exact: bool = False):
        # an array, 8 bytes a unit: a 7B model holds 39 layers of 11008
        self.map = UnitMap(array("q", cluster), clusters)
        self.exact = exact
        self.merges: dict = {}  # merge_op's, by axis and role

    @property
    def cluster(self):
        """unit -> cluster"""
        return self.map.of

    @property
    def clusters(self) -> int:
        return self.map.narrow

    def __eq__(self, other) -> bool:
        return isinstance(other, Fold) and (self.map, self.exact) == (other.map, other.exact)

    def __repr__(self) -> str:
        return f"Fold({self.map.wide} units -> {self.clusters} clusters, exact={self.exact})"

    def sizes(self) -> list[int]:
        return self.map.counts()

    def representatives(self) -> list[int]:
        """Per cluster, the source unit whose per-unit tensors it takes (a per-head norm): its first member."""
        first = [-1] * self.clusters
        for unit in range(len(self.cluster) - 1, -1, -1):
            first[self.cluster[unit]] = unit
        return first

    def merge_op(self, axis: int, role: str, space) -> Merge:
        """The merge of this clustering for one axis role. Made once per axis and role, and shared by
        every tensor that has that role (one merge of the residual stream for all of a model's layers)."""
        key = (axis, role, space.name, space.unit, space.scaled)
        if key not in self.merges:
            self.merges[key] = self._merge_op(axis, role, space)
        return self.merges[key]

    def _merge_op(self, axis: int, role: str, space) -> Merge:
        sizes = self.sizes()
        if any(count == 0 for count in sizes):
            raise TensorscaleError(f"space {space.name}: a cluster is empty; this is a bug in the clustering")
        n, m = len(self.cluster), self.clusters
        scale_s = [math.sqrt(count * m / n) if space.scaled else 1.0 for count in sizes]
        role_ops = ROLE_OPS[role]  # the role's reduce op: summed or averaged, then times S, 1/S or 1
        weight = [1.0] * n if role_ops.reduce_weights == "sum" else self.averaging_weights(sizes)
        scale = {"S": scale_s, "1/S": [1.0 / s for s in scale_s], "1": [1.0] * m}[role_ops.reduce_scale]
        return self.map.merge(axis, weight, scale, space.unit, label=f"{space.name}.{role}")

    def averaging_weights(self, sizes: list[int]) -> list[float]:
        """Ω: the uniform mean within each cluster (exact for copies, which is what folding is for)."""
        return [1.0 / sizes[c] for c in self.cluster]


@dataclass
class Folds:
    """Every clustering of a run, keyed by space and instance (e.g. the layer index for per-layer spaces)."""

    by_key: dict[tuple[str, object], Fold] = field(default_factory=dict)

    @staticmethod
    def key(space, env) -> tuple[str, object]:
        if space.per is None:
            return (space.name, None)
        if space.per not in env:
            raise TensorscaleError(
                f"space {space.name} is clustered per {space.per!r}, but the rule's regex has no group "
                f"(?P<{space.per}>...)"
            )
        return (space.name, env[space.per])

    def lookup(self, space, env, where: str) -> Fold:
        source = space.clusters_of or space.name
        key = (source, self.key(space, env)[1])
        fold = self.by_key.get(key)
        if fold is None:
            raise TensorscaleError(
                f"{where}: no clustering for space {source} {key[1] if key[1] is not None else ''}".rstrip()
            )
        if len(fold.cluster) * space.unit != space.size:
            raise TensorscaleError(
                f"{where}: space {space.name} has {space.units} units but its clustering has {len(fold.cluster)}"
            )
        return fold
