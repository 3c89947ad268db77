"""The operator vocabulary of rules files, and the one interface every op implements.

Shapes are planned before data is touched, and every op can say how to undo it:
- ``out_shape``: the output shape from the input shape;
- ``apply``: the transformation of a tensor (or of a chunk of rows, when the op leaves axis 0 alone);
- ``map_rows``: for ops on axis 0 that only copy or reorder rows, how output rows map to input rows, which
  lets the engine stream large tensors in row chunks;
- ``inverse``: the op that undoes this one (``inverse(shape)(op(x)) == x``), or `NoInverse` saying why
  there is none.

Growth is one idea with three fast kernels: `Tile`, `Interleave` and `TileDivide` are each a `Gather` (new
unit j is a copy of old unit sources[j]; ``as_gather`` gives it), and `Merge` is Gather's adjoint, the op
`down` is made of: it folds the copies back (``Gather.inverse`` is a Merge, ``Merge.adjoint`` a Gather).
Arithmetic runs in float32; ops that only move data keep the stored dtype, so copies are exact and cheap.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, ClassVar

from ..errors import TensorscaleError
from .rowmap import RowMap, Segment
from .seeding import seeded_generator


class _LazyTorch:
    """torch, imported on first use: planning (`plan`, `desc`, `rules`) builds ops without computing, and
    importing torch would cost it more than a second."""

    def __getattr__(self, name):
        import torch as real

        return getattr(real, name)


torch = _LazyTorch()


@dataclass
class OpContext:
    """What an op may need beyond its input: the storage dtype and a reproducible noise source."""

    store_dtype: torch.dtype
    seed: int = 0
    tensor_name: str = ""
    chunk_key: int = 0

    def generator(self, op_index: int) -> torch.Generator:
        """A generator keyed by seed, tensor, chunk and op, so noise never depends on execution order."""
        return seeded_generator(self.seed, self.tensor_name, self.chunk_key, op_index)


def part_key(op_index: int, part_index: int, inner_index: int) -> int:
    """The noise key of op `inner_index` of part `part_index` inside the fused op at `op_index`.

    One number, so that `OpContext.generator` keys every op alike. This exact encoding is part of the
    output: changing it would change the noise, and so the bytes, that a given --seed wrote before."""
    return op_index * 1000 + part_index * 100 + inner_index


class NoInverse(TensorscaleError):
    """An op that cannot be undone; the message says why (what it loses)."""


class Op:
    """One step of a tensor's op chain.

    Every op declares:
    - `name` (class): its name in rules files and plans;
    - `arithmetic` (class): True when it computes new values (then it runs in float32); False when it only
      moves or copies data (then it keeps the stored dtype);
    - `axis`: the axis it acts on, or None for an elementwise op. Planning streams row chunks through every
      op whose axis is not 0, and asks the axis-0 ops for their row maps (`map_rows`).
    Every op implements `out_shape`, `apply` and `describe`; the other methods have defaults here:
    - `apply_into`: a fast path that writes the result into the output's own buffer (default: none);
    - `map_rows`: the row map of an axis-0 op that only moves rows (default: None, the op mixes rows);
    - `draws_noise`: whether `apply` draws from the context's generator (default: no);
    - `as_merge`: the op as one Merge along its axis, which the writer can produce a slice at a time
      (default: None);
    - `inverse`: the op that undoes it (default: NoInverse with `no_inverse`, the reason).
    """

    name: ClassVar[str] = "op"
    arithmetic: ClassVar[bool] = False
    no_inverse: ClassVar[str] = "it has no inverse"
    axis: int | None  # each op sets it (a dataclass field, or a class constant); no default, so none forgets

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def apply(self, x: torch.Tensor, ctx: OpContext, op_index: int) -> torch.Tensor:
        raise NotImplementedError

    def apply_into(self, x: torch.Tensor, out: torch.Tensor, ctx: OpContext, op_index: int) -> bool:
        """apply(), written into `out`; False where this op has no such path (the caller copies apply()'s
        result instead)."""
        return False

    def map_rows(self, row_map: RowMap) -> RowMap | None:
        """How output rows of axis 0 come from input rows, or None if this op mixes rows."""
        return None

    def draws_noise(self) -> bool:
        """Whether apply() draws from ctx.generator. Noise is keyed by row chunk, so such an op must see
        the rows in the planned chunks; one that draws none gives the same rows however they are grouped."""
        return False

    def as_merge(self) -> "Merge | None":
        return None

    def inverse(self, shape: tuple[int, ...]) -> "Op":
        """The op g with g(self(x)) == x for every x of `shape` (up to float rounding where the ops compute),
        or NoInverse saying what this op loses."""
        raise NoInverse(f"{self.describe()}: {self.no_inverse}")

    def describe(self) -> str:
        return self.name

    def _check_axis(self, shape):
        if self.axis is not None and not 0 <= self.axis < len(shape):
            raise TensorscaleError(f"{self.name}: axis {self.axis} does not exist for shape {list(shape)}")


def _replace(shape, axis, size):
    return tuple(size if i == axis else d for i, d in enumerate(shape))


@dataclass
class Tile(Op):
    """Repeat the whole axis: [a, b] -> [a, b, a, b]. Producers of a grown space write copies."""

    axis: int
    times: int
    name = "tile"

    def out_shape(self, shape):
        self._check_axis(shape)
        return _replace(shape, self.axis, shape[self.axis] * self.times)

    def apply(self, x, ctx, op_index):
        if self.times == 1:
            return x
        reps = [1] * x.dim()
        reps[self.axis] = self.times
        return x.repeat(*reps)

    def apply_into(self, x, out, ctx, op_index) -> bool:
        """apply(), written into `out` (the output's own buffer): one copy per tile, no temporary."""
        if x.dtype != out.dtype:
            return False
        size = x.shape[self.axis]
        for k in range(self.times):
            out.narrow(self.axis, k * size, size).copy_(x)
        return True

    def map_rows(self, row_map):
        return row_map.repeat(self.times)

    def as_gather(self, shape) -> "Gather":
        """This tile as a Gather (its faster kernel gives the same bytes): entry j copies j mod size."""
        size = shape[self.axis]
        return Gather(self.axis, 1, tuple(range(size)) * self.times)

    def inverse(self, shape):
        return self.as_gather(shape).inverse(shape)

    def describe(self):
        return f"tile(axis={self.axis}, x{self.times})"


@dataclass
class Interleave(Op):
    """Repeat each unit in place: [h0, h1] -> [h0, h0, h1, h1] (head cloning with adjacent copies)."""

    axis: int
    times: int
    unit: int = 1
    name = "interleave"

    def out_shape(self, shape):
        self._check_axis(shape)
        if shape[self.axis] % self.unit:
            raise TensorscaleError(
                f"interleave: axis {self.axis} of size {shape[self.axis]} is not a multiple of unit {self.unit}"
            )
        return _replace(shape, self.axis, shape[self.axis] * self.times)

    def apply(self, x, ctx, op_index):
        if self.times == 1:
            return x
        size = x.shape[self.axis]
        units = x.unflatten(self.axis, (size // self.unit, self.unit))
        repeated = units.repeat_interleave(self.times, dim=self.axis)
        return repeated.flatten(self.axis, self.axis + 1)

    def map_rows(self, row_map):
        return row_map.repeat_units(self.times, self.unit)

    def as_gather(self, shape) -> "Gather":
        """This interleave as a Gather: new unit j copies unit j // times."""
        return self.as_gather_of(shape[self.axis] // self.unit)

    def as_gather_of(self, units: int, divide: bool = False, snr_db: float | None = None) -> "Gather":
        """The Gather of this interleave on `units` units; with `divide`, its reader's (each copy ÷times)."""
        sources = tuple(u for u in range(units) for _ in range(self.times))
        return Gather(self.axis, self.unit, sources, divide=divide, snr_db=snr_db)

    def inverse(self, shape):
        return self.as_gather(shape).inverse(shape)

    def describe(self):
        return f"interleave(axis={self.axis}, x{self.times}, unit={self.unit})"


@dataclass
class TileDivide(Op):
    """Tile an input axis into `times` blocks whose sum is the source: consumers of a tiled space.

    Each block is W/times, optionally with HyperCloning's zero-sum noise (+e on one block, -e on its
    partner). Blocks are rounded to the storage dtype one after another, each carrying the rounding error
    of the ones before, so the stored blocks sum back to W as closely as the dtype allows. A plain
    round(W/3) in bf16 loses 0.4-3% of the logits; powers of two are exact either way.
    """

    axis: int
    times: int
    snr_db: float | None = None
    name = "tile_divide"
    arithmetic = True

    def out_shape(self, shape):
        self._check_axis(shape)
        return _replace(shape, self.axis, shape[self.axis] * self.times)

    def apply(self, x, ctx, op_index):
        if self.times == 1:
            return x
        return self.apply_into(x, None, ctx, op_index)

    def draws_noise(self):
        return self.snr_db is not None and self.times > 1

    def apply_into(self, x, out, ctx, op_index):
        """apply(), with the blocks rounded straight into `out` when given (the output's own buffer in the
        stored dtype); returns False where it cannot (then the caller copies apply()'s result)."""
        store = ctx.store_dtype
        if out is not None and (self.times == 1 or out.dtype != store):
            return False
        if self.times == 2 and self.snr_db is None and x.dtype == store:
            # W/2 is exact in any binary float (a subnormal loses at most its last bit) and W - round(W/2)
            # is exact by Sterbenz's lemma, so the stored dtype gives the float32 path's bytes, faster.
            if out is None:
                half = x / 2
                return torch.cat([half, x - half], dim=self.axis)
            size = x.shape[self.axis]
            half = out.narrow(self.axis, 0, size)
            torch.div(x, 2, out=half)
            torch.sub(x, half, out=out.narrow(self.axis, size, size))
            return True
        x = x.float()
        size = x.shape[self.axis]
        # Blocks are rounded straight into the output: no float32 concatenation, one pass per block.
        given = out is not None
        if not given:
            out = torch.empty(self.out_shape(tuple(x.shape)), dtype=store)
        base = x / self.times
        if self.snr_db is None:
            # Every block but the last is round(W/n); the last takes the remainder. (n-1)·round(W/n) is
            # exact in float32 for bf16/fp16 blocks, so the stored blocks sum back to W up to one rounding.
            rounded = base.to(store)
            for k in range(self.times - 1):
                out.narrow(self.axis, k * size, size).copy_(rounded)
            last = x - rounded.float() * (self.times - 1)
            out.narrow(self.axis, (self.times - 1) * size, size).copy_(last.to(store))
        else:
            std = _noise_std(x, self.axis, self.times, self.snr_db)
            blocks = _pair_noise([base] * self.times, std, ctx.generator(op_index))
            _store_compensated(blocks, x, store, lambda k, block: out.narrow(self.axis, k * size, size).copy_(block))
        return True if given else out

    def as_gather(self, shape) -> "Gather":
        """This op as a dividing Gather. Without noise both give the same bytes; with noise the same
        distribution (Gather draws it in its own layout)."""
        return Gather(self.axis, 1, tuple(range(shape[self.axis])) * self.times, divide=True, snr_db=self.snr_db)

    def inverse(self, shape):
        return self.as_gather(shape).inverse(shape)

    def describe(self):
        noise = f", noise {self.snr_db:g} dB" if self.snr_db is not None else ""
        return f"tile_divide(axis={self.axis}, x{self.times}{noise})"


@dataclass
class Noise(Op):
    """Add zero-sum noise to pairs of equal blocks along an axis that already holds `blocks` blocks.

    Block 2j gets +e and block 2j+1 gets -e: the sum over blocks, and so the layer's function on a tiled
    input, is unchanged, while the copies stop being identical (symmetry breaking).
    """

    axis: int
    blocks: int
    snr_db: float
    name = "noise"
    arithmetic = True

    def out_shape(self, shape):
        self._check_axis(shape)
        if shape[self.axis] % self.blocks:
            raise TensorscaleError(
                f"noise: axis {self.axis} of size {shape[self.axis]} does not split into {self.blocks} blocks"
            )
        return shape

    def draws_noise(self):
        return True

    no_inverse = "the noise is drawn, not stored: only the blocks' sum survives it (a Merge of weight 1 recovers that)"

    def apply(self, x, ctx, op_index):
        x = x.float()
        blocks = list(torch.chunk(x, self.blocks, dim=self.axis))
        total = sum(blocks)
        noisy = _pair_noise(blocks, _noise_std(total, self.axis, self.blocks, self.snr_db), ctx.generator(op_index))
        return torch.cat(noisy, dim=self.axis)

    def describe(self):
        return f"noise(axis={self.axis}, {self.blocks} blocks, {self.snr_db:g} dB)"


@dataclass
class Scale(Op):
    """y = x * factor + offset, elementwise (e.g. the final norm ÷n that keeps embeddings tied)."""

    factor: float
    offset: float = 0.0
    name = "scale"
    arithmetic = True
    axis = None  # elementwise

    def apply(self, x, ctx, op_index):
        y = x.float() * self.factor
        return y + self.offset if self.offset else y

    def map_rows(self, row_map):
        return row_map  # elementwise: rows stay where they are

    def inverse(self, shape):
        if not self.factor:
            raise NoInverse(f"{self.describe()}: a factor of 0 forgets the input")
        return Scale(1.0 / self.factor, -self.offset / self.factor)

    def describe(self):
        return f"scale(x{self.factor:g}" + (f", +{self.offset:g})" if self.offset else ")")


@dataclass
class Slice(Op):
    """Keep [start, stop) of an axis."""

    axis: int
    start: int
    stop: int
    name = "slice"
    no_inverse = "it drops the entries outside [start, stop) (Pad puts zeros back: a right inverse only)"

    def out_shape(self, shape):
        self._check_axis(shape)
        if not 0 <= self.start <= self.stop <= shape[self.axis]:
            raise TensorscaleError(
                f"slice [{self.start}:{self.stop}] is out of range for axis {self.axis} of size {shape[self.axis]}"
            )
        return _replace(shape, self.axis, self.stop - self.start)

    def apply(self, x, ctx, op_index):
        return x.narrow(self.axis, self.start, self.stop - self.start)

    def map_rows(self, row_map):
        return row_map.take(self.start, self.stop)

    def describe(self):
        return f"slice(axis={self.axis}, {self.start}:{self.stop})"


@dataclass
class Pad(Op):
    """Add `before`/`after` entries filled with `value` along an axis (zero-pad growth)."""

    axis: int
    before: int = 0
    after: int = 0
    value: float = 0.0
    name = "pad"

    def out_shape(self, shape):
        self._check_axis(shape)
        if self.before < 0 or self.after < 0:
            raise TensorscaleError("pad: before and after must not be negative")
        return _replace(shape, self.axis, shape[self.axis] + self.before + self.after)

    def apply(self, x, ctx, op_index):
        parts = []
        for count in (self.before, None, self.after):
            if count is None:
                parts.append(x)
            elif count:
                shape = list(x.shape)
                shape[self.axis] = count
                parts.append(torch.full(shape, self.value, dtype=x.dtype))
        return torch.cat(parts, dim=self.axis) if len(parts) > 1 else x

    def map_rows(self, row_map):
        return RowMap(
            [Segment(self.before, None, self.value), *row_map.segments, Segment(self.after, None, self.value)]
        )

    def inverse(self, shape):
        self._check_axis(shape)
        return Slice(self.axis, self.before, self.before + shape[self.axis])

    def describe(self):
        return f"pad(axis={self.axis}, {self.before}+{self.after}, value={self.value:g})"


@dataclass
class Fused(Op):
    """Split an axis into named parts, run each part's own op chain, and concatenate (fused qkv etc.)."""

    axis: int
    sizes: list[int]
    parts: list[list[Op]] = field(default_factory=list)
    name = "fused"

    @property
    def arithmetic(self):  # type: ignore[override]
        return any(op.arithmetic for chain in self.parts for op in chain)

    def draws_noise(self):
        return any(op.draws_noise() for chain in self.parts for op in chain)

    def out_shape(self, shape):
        self._check_axis(shape)
        if sum(self.sizes) != shape[self.axis]:
            raise TensorscaleError(
                f"fused axis {self.axis} has size {shape[self.axis]} but its parts add up to {sum(self.sizes)} "
                f"{self.sizes}"
            )
        total = 0
        other = None
        for size, chain in zip(self.sizes, self.parts):
            part_shape = _replace(shape, self.axis, size)
            for op in chain:
                part_shape = op.out_shape(part_shape)
            rest = tuple(d for i, d in enumerate(part_shape) if i != self.axis)
            if other is not None and rest != other:
                raise TensorscaleError("fused: parts disagree on the shape of the other axes")
            other = rest
            total += part_shape[self.axis]
        return _replace(shape, self.axis, total)

    def apply(self, x, ctx, op_index):
        pieces = torch.split(x, self.sizes, dim=self.axis)
        outputs = []
        for part_index, (piece, chain) in enumerate(zip(pieces, self.parts)):
            for inner_index, op in enumerate(chain):
                piece = op.apply(piece, ctx, part_key(op_index, part_index, inner_index))
            outputs.append(piece)
        dtype = torch.float32 if any(t.dtype != outputs[0].dtype for t in outputs) else outputs[0].dtype
        return torch.cat([t.to(dtype) for t in outputs], dim=self.axis)

    def as_merge(self) -> "Merge | None":
        """This op as one Merge of single entries along its axis, where each part is one Merge along the
        axis or left as is (down's fused [q; k; v] or [gate; up] rows); None where a part does anything else.
        A kept entry becomes a cluster of its own with weight and scale 1, which changes no value (the
        parts are concatenated in float32 here too), so the Merge gives apply()'s bytes and can be written
        a slice at a time like any merge."""
        cluster, weight, scale = [], [], []
        for size, chain in zip(self.sizes, self.parts):
            first = len(scale)
            if not chain:
                cluster += range(first, first + size)
                weight += [1.0] * size
                scale += [1.0] * size
                continue
            if len(chain) != 1 or not isinstance(chain[0], Merge) or chain[0].axis != self.axis:
                return None
            merge = chain[0]
            if len(merge.cluster) * merge.unit != size:
                return None
            for unit, label in enumerate(merge.cluster):
                cluster += range(first + label * merge.unit, first + (label + 1) * merge.unit)
                weight += [merge.weight[unit]] * merge.unit
            for value in merge.scale:
                scale += [value] * merge.unit
        return Merge(self.axis, cluster, weight, scale, 1, "fused")

    def inverse(self, shape):
        """Each part's chain undone in reverse, on the part sizes this op writes."""
        self.out_shape(shape)  # checks the parts
        sizes, chains = [], []
        for size, chain in zip(self.sizes, self.parts):
            part_shape = _replace(shape, self.axis, size)
            undo = []
            for op in chain:
                undo.insert(0, op.inverse(part_shape))
                part_shape = op.out_shape(part_shape)
            sizes.append(part_shape[self.axis])
            chains.append(undo)
        return Fused(self.axis, sizes, chains)

    def map_rows(self, row_map):
        maps, begin = [], 0
        for size, chain in zip(self.sizes, self.parts):
            part = row_map.take(begin, begin + size)
            for op in chain:
                if op.axis not in (0, None) or op.arithmetic:
                    return None  # a part-specific op on another axis: rows cannot be streamed generically
                part = op.map_rows(part)
                if part is None:
                    return None
            maps.append(part)
            begin += size
        return RowMap.concat(maps)

    def describe(self):
        inner = "; ".join(
            f"{size}: " + (" -> ".join(op.describe() for op in chain) or "keep")
            for size, chain in zip(self.sizes, self.parts)
        )
        return f"fused(axis={self.axis}, [{inner}])"


def _noise_std(whole, dims, copies: int, snr_db: float):
    """HyperCloning's noise scale: the RMS of one of `copies` equal shares of `whole` along the grown axis
    (`dims`), 10^(snr/20) below it."""
    return whole.pow(2).mean(dim=dims, keepdim=True).sqrt() / copies * 10.0 ** (-snr_db / 20.0)


def _pair_noise(blocks: list, std, generator) -> list:
    """+e on block 2j, -e on block 2j+1 (e ~ N(0, std^2), drawn in that order): the copies differ, their
    sum does not, so a consumer of all of them computes what it did (symmetry breaking)."""
    out = list(blocks)
    for first in range(0, len(blocks) - 1, 2):
        eps = torch.randn(blocks[first].shape, generator=generator) * std
        out[first] = blocks[first] + eps
        out[first + 1] = blocks[first + 1] - eps
    return out


def _store_compensated(blocks: list, whole, store, put: Callable) -> None:
    """Round the blocks to `store` one after another, the last taking what the rounded others leave of
    `whole`, so the stored blocks sum back to `whole` as closely as the dtype allows (a plain round(W/3) in
    bf16 loses 0.4-3% of the logits). put(k, rounded) stores block k."""
    running = torch.zeros_like(whole)
    for k in range(len(blocks) - 1):
        rounded = blocks[k].to(store)
        put(k, rounded)
        running += rounded.float()
    put(len(blocks) - 1, (whole - running).to(store))


MERGE_SLICE_BYTES = 2**23  # float32 bytes of gathered rows a merge holds at once


@lru_cache(maxsize=32)
def _size_groups(merge: "Merge") -> list:
    """Merge._groups, computed once per merge: the plan shares one Merge per clustering, axis and role
    (Fold.merge_op) among its tensors, and the lifting in the analysis reuses it for every chunk. The cache
    keeps the groups of the last few merges only, so that they do not pile up over a large model."""
    members: dict[int, list[int]] = {}
    for unit, label in enumerate(merge.cluster):
        members.setdefault(label, []).append(unit)
    by_size: dict[int, list[int]] = {}
    for label in range(len(merge.scale)):
        if label in members:  # an empty cluster stays zero
            by_size.setdefault(len(members[label]), []).append(label)
    weights = torch.tensor(merge.weight, dtype=torch.float32)
    groups = []
    for size, labels in sorted(by_size.items()):
        units = torch.tensor([members[c] for c in labels], dtype=torch.long)
        groups.append((torch.tensor(labels, dtype=torch.long), units, weights[units]))
    return groups


def _compact(values, typecode: str) -> array:
    """A list of numbers as an array (8 bytes an entry, against 32-36 for a list of Python numbers): a
    plan holds a merge per clustering and role, and at 7B their lists were 1-3 MB a layer."""
    return values if isinstance(values, array) and values.typecode == typecode else array(typecode, values)


@dataclass(eq=False)  # compared (and cached) by identity: its arrays can be long
class Merge(Op):
    """Fold `unit`-sized blocks of an axis into clusters: out[c] = scale[c] · Σ_i weight[i] · in[i] over the
    blocks i with cluster[i] == c. This is the one op `down` needs, with three settings per role:
    producers P = SΩ (weights: the cluster means, scale S), norm gains Ω (means, scale 1) and consumers
    U = A S⁻¹ (weights 1, scale 1/S). On cloned units it exactly undoes `tile` and `tile_divide`."""

    axis: int
    cluster: list[int]  # for each input unit, its output cluster
    weight: list[float]  # for each input unit
    scale: list[float]  # for each output cluster
    unit: int = 1
    label: str = ""
    name = "merge"
    arithmetic = True
    no_inverse = (
        "it folds several units into one (no left inverse); it is the inverse of the Gather that "
        "made the copies, and `adjoint` gives that Gather"
    )
    grouped = None  # the size groups, where part() computed them already

    def __post_init__(self):
        self.cluster = _compact(self.cluster, "q")
        self.weight = _compact(self.weight, "d")
        self.scale = _compact(self.scale, "d")

    def out_shape(self, shape):
        self._check_axis(shape)
        if shape[self.axis] != len(self.cluster) * self.unit:
            raise TensorscaleError(
                f"merge: axis {self.axis} has size {shape[self.axis]}, expected {len(self.cluster)} units of "
                f"{self.unit}"
            )
        return _replace(shape, self.axis, len(self.scale) * self.unit)

    def _groups(self):
        """The clusters grouped by size: [(cluster ids, member units [clusters, size], their weights)].

        Clusters of one size are summed by one gather and one reduction over a [clusters, size, ...] view:
        a gather of whole rows runs at memory speed, where `index_add_` (the earlier form) scattered one row
        at a time on one core and was most of `down`'s write time."""
        if self.grouped is not None:
            return self.grouped
        return _size_groups(self)

    def as_merge(self) -> "Merge":
        return self

    def adjoint(self) -> "Gather":
        """The Gather g that this merge undoes: self(g(y)) == y. A merge of cluster means (weights 1/size,
        scale 1: producers and norm gains) undoes copies; a merge of sums (weights and scales 1: consumers)
        undoes a dividing gather; a unit of weight 0 is a zero unit of the gather. Other settings (down's
        rescaled clusters) come from no Gather."""
        counts = [0] * len(self.scale)
        for label, weight in zip(self.cluster, self.weight):
            counts[label] += weight != 0.0
        sources = tuple(label if weight != 0.0 else None for label, weight in zip(self.cluster, self.weight))
        if all(abs(scale - 1.0) < 1e-12 for scale in self.scale):
            if all(
                weight == 0.0 or abs(weight * counts[label] - 1.0) < 1e-9
                for label, weight in zip(self.cluster, self.weight)
            ):
                return Gather(self.axis, self.unit, sources)
            if all(weight in (0.0, 1.0) for weight in self.weight):
                return Gather(self.axis, self.unit, sources, divide=True)
        raise NoInverse(f"{self.describe()}: only a merge of means or of sums undoes a gather")

    def part(self, first: int, stop: int) -> tuple[torch.Tensor, "Merge"]:
        """Clusters [first, stop) on their own: the input units they take (ascending) and the Merge of just
        those units, in that order, into just those clusters. Its output is entries [first·unit, stop·unit)
        of apply()'s along the axis, to the bit (each cluster sums the same units in the same order), so a
        large merged tensor can be produced a slice of clusters at a time. Built from this merge's size
        groups, so a part costs no loop over the units and adds nothing to the groups' cache."""
        pieces = []
        for clusters, units, weight in self._groups():
            keep = (clusters >= first) & (clusters < stop)
            if bool(keep.any()):
                pieces.append((clusters[keep] - first, units[keep], weight[keep]))
        if not pieces:
            return torch.empty(0, dtype=torch.long), Merge(
                self.axis, [], [], self.scale[first:stop], self.unit, self.label
            )
        members = torch.cat([units.reshape(-1) for _, units, _ in pieces]).sort().values
        cluster = torch.empty(len(members), dtype=torch.long)
        weights = torch.empty(len(members), dtype=torch.float32)
        grouped = []
        for clusters, units, weight in pieces:
            positions = torch.searchsorted(members, units)
            cluster[positions.reshape(-1)] = clusters.repeat_interleave(units.shape[1])
            weights[positions.reshape(-1)] = weight.reshape(-1)
            grouped.append((clusters, positions, weight))
        merged = Merge(self.axis, cluster.tolist(), weights.tolist(), self.scale[first:stop], self.unit, self.label)
        merged.grouped = grouped
        return members, merged

    def _entries(self, units: torch.Tensor) -> torch.Tensor:
        """Axis positions of the given units, `unit` entries each."""
        return (units.reshape(-1, 1) * self.unit + torch.arange(self.unit)).reshape(-1)

    def apply(self, x, ctx, op_index):
        # The axis goes first, copied in the stored dtype (a bf16 transpose costs less than gathering columns),
        # so that every gather below takes whole contiguous rows.
        moved = x.movedim(self.axis, 0)
        if not moved.is_contiguous():
            moved = moved.contiguous()
        rest = moved.shape[1:]
        ones = [1] * len(rest)
        scale = torch.tensor(self.scale, dtype=torch.float32)
        out = torch.zeros((len(self.scale) * self.unit, *rest), dtype=torch.float32)
        unit_floats = self.unit * max(1, math.prod(rest))
        for clusters, units, weight in self._groups():
            count, size = units.shape
            # A slice of clusters at a time: the gathered float32 rows stay a few MiB, whatever the tensor.
            step = max(1, MERGE_SLICE_BYTES // (4 * size * unit_floats))
            for begin in range(0, count, step):
                end = min(count, begin + step)
                picked = moved.index_select(0, self._entries(units[begin:end]))
                picked = picked.float() if picked.dtype != torch.float32 else picked
                picked = picked.view(end - begin, size, self.unit, *rest)
                picked.mul_(weight[begin:end].view(end - begin, size, 1, *ones))
                # Member after member, in unit order: a reduction kernel's association would depend on
                # the tensor's shape, and the bytes must not depend on how many rows are merged at once.
                summed = picked.select(1, 0)
                for member in range(1, size):
                    summed.add_(picked.select(1, member))
                summed.mul_(scale[clusters[begin:end]].view(end - begin, 1, *ones))
                out.index_copy_(0, self._entries(clusters[begin:end]), summed.reshape(-1, *rest))
        return out.movedim(0, self.axis)

    def describe(self):
        what = f" {self.label}" if self.label else ""
        return f"merge(axis={self.axis},{what} {len(self.cluster)}->{len(self.scale)} units of {self.unit})"


@dataclass
class Gather(Op):
    """Build an axis from `unit`-sized blocks of the source: out block j = in block sources[j], or zeros
    where sources[j] is None. This is any-width growth: a subset of units cloned (Net2Net), zero units, or
    both. With `divide`, the axis is read by its consumer, so each copy of a unit gets W/c where c is the
    number of copies of that unit (rounded one copy after another, as in TileDivide, so that the stored
    copies sum back to W), and the consumer's output is unchanged."""

    axis: int
    unit: int
    sources: tuple
    divide: bool = False
    snr_db: float | None = None
    name = "gather"

    @property
    def arithmetic(self):  # type: ignore[override]
        return self.divide

    def _units_in(self, shape):
        if shape[self.axis] % self.unit:
            raise TensorscaleError(
                f"gather: axis {self.axis} of size {shape[self.axis]} is not a multiple of unit {self.unit}"
            )
        return shape[self.axis] // self.unit

    def out_shape(self, shape):
        self._check_axis(shape)
        units = self._units_in(shape)
        if any(src is not None and not 0 <= src < units for src in self.sources):
            raise TensorscaleError(f"gather: a source unit is out of range for {units} units")
        return _replace(shape, self.axis, len(self.sources) * self.unit)

    def _copies(self) -> dict[int, list[int]]:
        copies: dict[int, list[int]] = {}
        for j, src in enumerate(self.sources):
            if src is not None:
                copies.setdefault(src, []).append(j)
        return copies

    def draws_noise(self):
        return self.snr_db is not None

    def apply(self, x, ctx, op_index):
        moved = x.movedim(self.axis, 0)
        units = moved.unflatten(0, (moved.shape[0] // self.unit, self.unit))
        store = ctx.store_dtype if self.divide else x.dtype
        out = torch.zeros((len(self.sources), *units.shape[1:]), dtype=store)
        if not self.divide:
            kept = [j for j, src in enumerate(self.sources) if src is not None]
            index = torch.tensor([self.sources[j] for j in kept], dtype=torch.long)
            out[torch.tensor(kept, dtype=torch.long)] = units.index_select(0, index)
        else:
            units = units.float()
            copies = self._copies()
            by_count: dict[int, list[int]] = {}
            for src, where in copies.items():
                by_count.setdefault(len(where), []).append(src)
            generator = ctx.generator(op_index) if self.snr_db is not None else None
            for count, group in sorted(by_count.items()):
                whole = units[torch.tensor(group, dtype=torch.long)]
                slots = [torch.tensor([copies[src][k] for src in group], dtype=torch.long) for k in range(count)]
                blocks = [whole / count] * count
                if self.snr_db is not None and count > 1:
                    # the gathered axis is dims (0, 1) here: units, then the entries of each unit
                    blocks = _pair_noise(blocks, _noise_std(whole, (0, 1), count, self.snr_db), generator)
                _store_compensated(blocks, whole, store, lambda k, block: out.__setitem__(slots[k], block))
        return out.flatten(0, 1).movedim(0, self.axis)

    def inverse(self, shape):
        """The Merge that folds the copies back (this gather's adjoint): the mean of a unit's copies for a
        copying gather, their sum for a dividing one. Zero units are left out (weight 0)."""
        units = self._units_in(shape)
        copies = self._copies()
        missing = [unit for unit in range(units) if unit not in copies]
        if missing:
            raise NoInverse(f"{self.describe()}: unit {missing[0]} of {units} is not copied anywhere, so it is lost")
        cluster = [0 if src is None else src for src in self.sources]
        weight = [0.0 if src is None else (1.0 if self.divide else 1.0 / len(copies[src])) for src in self.sources]
        return Merge(self.axis, cluster, weight, [1.0] * units, self.unit, "inverse of gather")

    def map_rows(self, row_map):
        if self.divide:
            return None
        segments = []
        for src in self.sources:
            segments.extend(
                row_map.take(src * self.unit, (src + 1) * self.unit).segments
                if src is not None
                else [Segment(self.unit, None, 0.0)]
            )
        return RowMap(segments)

    def describe(self):
        kept = sum(src is not None for src in self.sources)
        zeros = len(self.sources) - kept
        what = "divide" if self.divide else "copy"
        noise = f", noise {self.snr_db:g} dB" if self.snr_db is not None and self.divide else ""
        return (
            f"gather(axis={self.axis}, {what} {kept} units of {self.unit}"
            + (f" + {zeros} zero" if zeros else "")
            + f"{noise})"
        )


@dataclass
class Fill(Op):
    """Every element set to `value`: a residual writer of an identity layer (0), or a (1+w) post-norm gain
    (-1). Nothing of the source is read: the row map is one run of filled rows."""

    value: float
    name = "fill"
    axis = 0  # it writes whole rows from nothing: an axis-0 op whose row map is one run of filled rows
    no_inverse = "nothing of its input survives"

    def out_shape(self, shape):
        return shape

    def apply(self, x, ctx, op_index):
        return torch.full(x.shape, self.value, dtype=x.dtype)

    def map_rows(self, row_map):
        return RowMap([Segment(row_map.rows, None, float(self.value))])

    def describe(self):
        return f"fill({self.value:g})"


# The ops a rules file may name in an `ops:` chain (a `fused` chain is built by the compiler): rules name
# them by these keys and give their dataclass fields as parameters (checked in rulebook/schema.py).
OP_TYPES: dict[str, Callable[..., Op]] = {
    "tile": Tile,
    "interleave": Interleave,
    "tile_divide": TileDivide,
    "noise": Noise,
    "scale": Scale,
    "slice": Slice,
    "pad": Pad,
}
