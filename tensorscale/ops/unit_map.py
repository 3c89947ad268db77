"""The one map between the units of a wide space and a narrow one, which both directions read.

`of[j]` is the narrow unit that wide unit j belongs to, or None for a zero unit (one `up` adds and nothing
folds back). `up` reads it as "new unit j copies source unit of[j]" (rulebook/layout.py plans it from
sizes; as an op it is a `Gather`); `down` reads it as "unit j falls into cluster of[j]" (folding plans it
from the weights; as an op it is a `Merge`, Gather's adjoint). On a HyperCloned model the fold finds the
very list `up` wrote, which is why down(up(M)) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .library import Gather, Merge


@dataclass(frozen=True, eq=False)  # compared by content in __eq__: `of` may be an array
class UnitMap:
    of: Sequence  # for each wide unit: its narrow unit, or None (a zero unit)
    narrow: int  # how many narrow units there are

    @property
    def wide(self) -> int:
        return len(self.of)

    def counts(self) -> list[int]:
        """How many wide units each narrow unit has (its copies, or its cluster's size)."""
        counts = [0] * self.narrow
        for unit in self.of:
            if unit is not None:
                counts[unit] += 1
        return counts

    def gather(self, axis: int, unit: int, *, divide: bool = False, snr_db: float | None = None) -> Gather:
        """`up`'s op: wide unit j is a copy of narrow unit of[j] (÷its copies with `divide`, for readers)."""
        return Gather(axis, unit, tuple(self.of), divide=divide, snr_db=snr_db)

    def merge(self, axis: int, weight, scale, unit: int, label: str = "") -> Merge:
        """`down`'s op: narrow unit c = scale[c] · Σ weight[j] · wide unit j over the j with of[j] == c."""
        return Merge(axis, self.of, weight, scale, unit, label)

    def __eq__(self, other) -> bool:
        return isinstance(other, UnitMap) and self.narrow == other.narrow and list(self.of) == list(other.of)

    __hash__ = None
