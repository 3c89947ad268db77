"""Where `up` takes each new unit of a space from: the unit layout, planned from sizes alone.

A layout lists, for every unit of the grown space, the source unit it copies, or None for a unit that is
zero. Everything `up` can do to a space is one of these lists:
- tile ×k (HyperCloning): unit j copies j mod s; interleave: j // k;
- pad (the "top-left" strategy): units 0..s-1 copy themselves, the rest are zero;
- any larger size of a space that is normalised as a whole (the hidden state under RMSNorm): tile to the
  largest multiple, then pad; every kept unit has the same number of copies, so one gain rescale,
  sqrt(copies·s/t), keeps the norm's output;
- any larger size of a space nothing normalises as a whole (FFN units, heads): clone a subset of units
  (Net2Net); readers of the space divide each copy by its own unit's copy count, so they still sum back.
Query heads nested in kv heads (`within`) are laid out group by group, so every query head stays with a
copy of its own kv head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import TensorscaleError
from ..ops.unit_map import UnitMap


@dataclass(frozen=True)
class Layout:
    space: str
    map: UnitMap  # for each new unit: the source unit it copies, or None (zeros); `down`'s folds are the same type
    unit: int
    norm: str | None
    clone: str = "tile"

    @property
    def size(self) -> int:
        """Source units."""
        return self.map.narrow

    @property
    def sources(self) -> tuple:
        return self.map.of

    @property
    def target(self) -> int:
        return self.map.wide

    @property
    def counts(self) -> list[int]:
        """How many copies each source unit has."""
        return self.map.counts()

    @property
    def kept(self) -> int:
        """New units that copy a source unit (the rest are zero)."""
        return sum(source is not None for source in self.sources)

    @property
    def tiles(self) -> int | None:
        """k when the layout is plain tiling ×k (or interleaving, for `clone: interleave` spaces)."""
        s, t = self.size, self.target
        if s == 0 or t % s:
            return None
        k = t // s
        pattern = [j // k for j in range(t)] if self.clone == "interleave" else [j % s for j in range(t)]
        return k if list(self.sources) == pattern else None

    @property
    def padded_tiles(self) -> int | None:
        """k when the layout is tile ×k followed by zero units (k = 1: the source, then zeros)."""
        s = self.size
        kept = self.kept
        if s == 0 or kept % s or any(src is not None for src in self.sources[kept:]):
            return None
        k = kept // s
        return k if list(self.sources[:kept]) == [j % s for j in range(kept)] else None

    @property
    def uniform_copies(self) -> int | None:
        counts = set(self.counts)
        return counts.pop() if len(counts) == 1 else None

    @property
    def norm_gain(self) -> float:
        """The factor on the space's norm gains that keeps x/rms(x)·w for the grown vector: its sum of
        squares is copies × the source's over t units instead of s, so rms grows by sqrt(copies·s/t)."""
        copies = self.uniform_copies
        if copies is None:
            raise TensorscaleError(f"space {self.space}: units have unequal copy counts, so its norm cannot be kept")
        return math.sqrt(copies * self.size / self.target)

    def describe(self) -> str:
        s, t = self.size, self.target
        if s == t:
            return "kept"
        what = "units" if self.unit == 1 else f"units of {self.unit}"
        k = self.tiles
        if k is not None:
            return f"{s} -> {t} {what}: {'interleave' if self.clone == 'interleave' else 'tile'} x{k}"
        k = self.padded_tiles
        if k is not None:
            head = "top-left copy" if k == 1 else f"tile x{k}"
            gain = f", norm gains x{self.norm_gain:.4g}" if self.norm in ("rms", "rms_one_plus") else ""
            return f"{s} -> {t} {what}: {head}, {t - self.kept} zero units{gain}"
        counts = self.counts
        extra = sum(1 for c in counts if c > min(counts))
        zeros = t - self.kept
        tail = f", {zeros} zero units" if zeros else ""
        return f"{s} -> {t} {what}: clone {extra} of {s} units once more (Net2Net; readers split by copy count){tail}"


def plan_layouts(spaces: dict, strategy: str) -> dict[str, Layout]:
    """The layout of every space for `up` with this strategy ('clone' or 'pad')."""
    layouts: dict[str, Layout] = {}

    def layout_of(name, visiting=()):
        if name in layouts:
            return layouts[name]
        if name in visiting:
            raise TensorscaleError(f"spaces {' -> '.join(visiting)} nest in each other (within)")
        space = spaces[name]
        if space.within is not None and space.target != space.size:
            parent = layout_of(space.within, (*visiting, name))
            sources = _nested_sources(space, parent, strategy)
        else:
            sources = _plain_sources(space, strategy)
        layout = Layout(name, UnitMap(tuple(sources), space.units), space.unit, space.norm, space.clone)
        _check_exact(space, layout, strategy)
        layouts[name] = layout
        return layout

    for name in spaces:
        layout_of(name)
    return layouts


def _plain_sources(space, strategy) -> list:
    s, t = space.units, space.target_units
    if t < s:
        raise TensorscaleError(f"space {space.name}: up cannot shrink {space.size} to {space.target}; use down")
    if s == t or s == 0:
        return list(range(t))
    if strategy == "pad":
        return [*range(s), *[None] * (t - s)]
    if t % s == 0:
        k = t // s
        return [j // k for j in range(t)] if space.clone == "interleave" else [j % s for j in range(t)]
    if space.norm is not None:
        # A normalised space needs equal copy counts: tile to the largest multiple, zero-pad the rest.
        k = t // s
        return [*(j % s for j in range(k * s)), *[None] * (t - k * s)]
    return [j % s for j in range(t)]  # Net2Net: the first t mod s units get one copy more


def _nested_sources(space, parent: Layout, strategy) -> list:
    """Query heads under kv heads: new group g (a copy of kv head h, or zero) holds query heads of h only.
    The copies of h share out h's query heads slot by slot, so each is kept at least once."""
    s, t = space.units, space.target_units
    if parent.size == 0 or s % parent.size or t % parent.target:
        raise TensorscaleError(
            f"space {space.name}: {t} units cannot be split evenly over {parent.target} {parent.space} units"
        )
    per_source, per_group = s // parent.size, t // parent.target
    groups_of: dict[int, list[int]] = {}
    for g, h in enumerate(parent.sources):
        if h is not None:
            groups_of.setdefault(h, []).append(g)
    # g's place among the copies of its kv head, looked up once (not groups_of[h].index(g) per slot, which
    # made a large target quadratic: -edm 100000 on a 4-head model planned for minutes)
    copy_rank = {g: rank for groups in groups_of.values() for rank, g in enumerate(groups)}
    sources: list = []
    for g, h in enumerate(parent.sources):
        if h is None:
            sources.extend([None] * per_group)
            continue
        copies_of_h = len(groups_of[h])
        slots = copies_of_h * per_group
        whole = slots // per_source * per_source  # slots that give every query head the same count
        for r in range(per_group):
            slot = copy_rank[g] * per_group + r
            if strategy == "pad":
                sources.append(h * per_source + slot if slot < per_source else None)
            elif space.norm is not None:
                sources.append(h * per_source + slot % per_source if slot < whole else None)
            else:
                sources.append(h * per_source + slot % per_source)
    missing = set(range(s)) - {src for src in sources if src is not None}
    if missing:
        raise TensorscaleError(
            f"space {space.name}: with {parent.target} {parent.space} units and {per_group} {space.name} units per "
            f"group, source unit {min(missing)} would have no copy next to its own {parent.space} unit; "
            f"choose counts that keep {per_source} or more {space.name} units per {parent.space} unit"
        )
    return sources


def _check_exact(space, layout: Layout, strategy: str) -> None:
    """Refuse layouts that cannot keep the function: zeros or unequal copies in a LayerNorm space, unequal
    copies in any space normalised as a whole."""
    if layout.target == layout.size or layout.tiles is not None:
        return
    if space.norm == "layer":
        raise TensorscaleError(
            f"space {space.name} is LayerNorm-normalised: {space.size} -> {space.target} would change its mean "
            f"(zero units or uneven copies), so only whole multiples of {space.size} are exact there"
            + ("; use --strategy clone" if strategy == "pad" else "")
        )
    if space.norm is not None and layout.uniform_copies is None:
        raise TensorscaleError(
            f"space {space.name} is normalised as a whole, so every unit needs the same number of copies; "
            f"{space.size} -> {space.target} does not allow that here; choose other sizes or --strategy pad"
        )
