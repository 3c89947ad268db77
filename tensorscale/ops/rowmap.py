"""Row maps: where each output row along axis 0 comes from, planned before any data is read.

Most op chains only copy, repeat or reorder rows along axis 0 (tiling a linear layer's output rows,
cloning heads, slicing a fused block) and do their arithmetic along the other axes. For those, the output
can be produced in row chunks: read a few input rows, apply the remaining ops, write them at their
offset. The row map is that plan: a list of segments, each either a run of consecutive source rows or a
run of rows filled with a constant.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    count: int
    source_start: int | None = None  # None: the rows are filled with `fill`
    fill: float = 0.0

    @property
    def is_fill(self) -> bool:
        return self.source_start is None


class RowMap:
    """An ordered list of segments covering the output rows of axis 0."""

    def __init__(self, segments: list[Segment]):
        self.segments = _merge([s for s in segments if s.count > 0])

    @classmethod
    def identity(cls, rows: int) -> "RowMap":
        return cls([Segment(rows, 0)])

    @property
    def rows(self) -> int:
        return sum(s.count for s in self.segments)

    def take(self, start: int, stop: int) -> "RowMap":
        """Rows [start, stop) of this map."""
        out, position = [], 0
        for seg in self.segments:
            lo, hi = max(start, position), min(stop, position + seg.count)
            if lo < hi:
                offset = lo - position
                source = None if seg.is_fill else seg.source_start + offset
                out.append(Segment(hi - lo, source, seg.fill))
            position += seg.count
        return RowMap(out)

    def repeat(self, times: int) -> "RowMap":
        return RowMap(self.segments * times)

    def repeat_units(self, times: int, unit: int) -> "RowMap":
        """Each block of `unit` rows repeated `times` times in place: [u0, u0, u1, u1, ...]."""
        out = []
        for begin in range(0, self.rows, unit):
            piece = self.take(begin, begin + unit).segments
            out.extend(piece * times)
        return RowMap(out)

    @staticmethod
    def concat(maps: list["RowMap"]) -> "RowMap":
        return RowMap([seg for row_map in maps for seg in row_map.segments])

    def __eq__(self, other):
        return isinstance(other, RowMap) and self.segments == other.segments

    def __repr__(self):
        return f"RowMap({self.segments})"


def _merge(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if merged:
            last = merged[-1]
            if last.is_fill and seg.is_fill and last.fill == seg.fill:
                merged[-1] = Segment(last.count + seg.count, None, last.fill)
                continue
            if not last.is_fill and not seg.is_fill and last.source_start + last.count == seg.source_start:
                merged[-1] = Segment(last.count + seg.count, last.source_start)
                continue
        merged.append(seg)
    return merged
