"""The `down` analysis pass: read the weights once, describe every unit by a sketch of its weights, and
cluster each space's units. Only the sketches (a few hundred numbers per unit) stay in memory.

Order matters, and follows the cluster-fold recipe:
1. global spaces (the residual stream): every tensor with an axis in that space adds to the units'
   sketches. Noise-free tensors (no axis that reads a tiled space: embeddings, norms, biases) are also
   sketched on their own: on a HyperCloned model they show the copies exactly.
2. per-layer spaces, one instance (layer) at a time: the producers of the space (rows that write it, plus
   biases and norm gains) are first lifted by the residual unmerge U, which cancels HyperCloning's noise
   exactly, then sketched. Spaces named by another's `within` (kv heads) go first; q heads are then
   clustered inside each kv cluster, so a small q head never spans two kv heads (GQA stays valid).
Sketches are random projections with fixed seeds (Johnson-Lindenstrauss): distances between units are
kept, so copies stay copies and k-means sees the real geometry.
Fused axes ([q, k, v], [gate, up]) are read part by part: each part is a block of the axis in its own
space, sketched (or lifted) like a plain axis of that space. Parts in the same space (k and v, gate and up)
are two views of the same units, so their sketches add up and both fold with the one clustering.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .. import interrupts
from ..errors import TensorscaleError
from ..ops.library import Fused, OpContext
from ..ops.seeding import seeded_generator
from ..reading.safetensors_header import DTYPE_SIZES
from ..reading.source import ModelSource
from ..reading.tensor_reader import ShardReader
from ..rulebook.compile import Space
from ..rulebook.evaluate import match_rule
from ..rulebook.roles import Role, split_role
from ..rulebook.schema import RuleSet
from .clustering import cluster_units
from .fold import Fold, Folds
from .head_groups import check_head_targets, needs_equal_groups

SKETCH = 256  # dimensions of a unit's sketch
MAX_SAMPLES = 4096  # rows (or columns) of one tensor that a sketch looks at


@dataclass
class Match:
    name: str
    info: object
    rule: object
    env: dict

    def roles(self):
        """(axis, space name, role) for every plain (not fused, not '-') axis label."""
        axes = self.rule.transform.axes or []
        return [
            (axis, *split_role(label)) for axis, label in enumerate(axes) if isinstance(label, str) and label != "-"
        ]

    def blocks(self, spaces: dict[str, Space]):
        """(axis, start, length, space name, role) for every labelled block: a plain axis is one block, a
        fused axis one block per part (its parts lie one after another, each its space's size long)."""
        found = []
        for axis, label in enumerate(self.rule.transform.axes or []):
            if isinstance(label, list):
                start = 0
                for part in label:
                    name, role = split_role(part)
                    found.append((axis, start, spaces[name].size, name, role))
                    start += spaces[name].size
            elif label != "-":
                name, role = split_role(label)
                found.append((axis, 0, None, name, role))
        return found


def _projection(features: int, key) -> torch.Tensor:
    return torch.randn(features, SKETCH, generator=seeded_generator("sketch", key)) / math.sqrt(SKETCH)


def _sample(count: int) -> torch.Tensor:
    """A fixed, evenly spread subset of at most MAX_SAMPLES indices."""
    if count <= MAX_SAMPLES:
        return torch.arange(count)
    return torch.linspace(0, count - 1, MAX_SAMPLES).round().long()


def _unit_rows(tensor: torch.Tensor, axis: int, unit: int, start: int = 0, length: int | None = None) -> torch.Tensor:
    """[units, features]: the axis's units as rows, everything else (unit entries included) as columns.
    `start`/`length` pick one part of a fused axis."""
    if length is not None:
        tensor = tensor.narrow(axis, start, length)
    moved = tensor.movedim(axis, 0)
    units = moved.shape[0] // unit
    return moved.reshape(units, -1)


def _key(name: str, axis: int, start: int, length: int | None):
    """A projection's seed key: plain axes keep the historical (name, axis); fused parts add their start."""
    return (name, axis) if length is None else (name, axis, start)


def _project(rows: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """rows @ projection, in float32 out. bf16 rows are projected by a bf16 copy of the projection: the
    product accumulates in float32 and runs about 3x faster than a float32 product here, and the sketch's
    rounding to bf16 (~2e-3 relative) is far inside what clustering and the bf16 copy tolerance notice.
    Other dtypes keep float32 throughout, where copies must agree to 1e-4."""
    if rows.dtype == torch.bfloat16:
        return (rows @ projection.to(torch.bfloat16)).float()
    return rows.float() @ projection


def _sketch(rows: torch.Tensor, key) -> torch.Tensor:
    """Normalise a tensor's unit rows to unit Frobenius norm and project them to SKETCH dimensions."""
    if rows.shape[1] > MAX_SAMPLES:
        rows = rows[:, _sample(rows.shape[1])]
    norm = float(torch.linalg.vector_norm(rows, dtype=torch.float32))
    if norm == 0:
        return torch.zeros(rows.shape[0], SKETCH)
    return _project(rows, _projection(rows.shape[1], key)) / norm  # dividing the sketch, not the rows


def match_all(source: ModelSource, rule_set: RuleSet, env: dict) -> list[Match]:
    matches = []
    for name, info in source.tensors.items():
        rule, rule_env = match_rule(rule_set, name, env)
        if rule is None or rule.drop or rule.transform.axes is None:
            continue
        if rule.replicate_count is not None:
            raise TensorscaleError(
                f"down cannot fold tensors written per head index ({rule.label}, e.g. StableLM qk_layernorm) yet"
            )
        matches.append(Match(name, info, rule, rule_env))
    return matches


def analyse(
    source: ModelSource, rule_set: RuleSet, env: dict, spaces: dict[str, Space], seed: int = 0, progress=None
) -> Folds:
    """Cluster every folded space (data-free: from the weights alone).

    `progress`: True for a bar on stderr ("analysing", bytes of weights read, layers done; the same Progress
    as writing's, so the environment can silence it), or a callable (nbytes, layers) to report to."""
    check_head_targets(spaces)  # before any weight is read
    matches = match_all(source, rule_set, env)
    # The coarsest float dtype of the checkpoint sets how far apart copies may be after rounding.
    coarse = [m.info.dtype for m in matches if m.info.dtype in ("BF16", "F16")]
    dtype = "BF16" if "BF16" in coarse else (coarse[0] if coarse else "F32")
    folded = {name for name, space in spaces.items() if space.target != space.size}
    folds = Folds()
    bar = _analysis_progress(progress, matches, spaces, folded)
    tick = bar.update if bar is not None else (progress if callable(progress) else None)
    completed = False
    try:
        _analyse_spaces(matches, spaces, folded, folds, seed, dtype, tick)
        completed = True
    finally:
        if bar is not None:
            bar.close(completed)
    return folds


def _global_spaces(spaces: dict[str, Space], folded: set[str]) -> list[Space]:
    return [s for s in spaces.values() if s.name in folded and s.per is None and s.clusters_of is None]


def _global_matches(space: Space, matches: list[Match], spaces: dict[str, Space]) -> list[tuple[Match, list, bool]]:
    """(match, its blocks in `space`, whether it is noise-free) for every tensor with an axis in `space`."""
    found = []
    for match in matches:
        blocks = match.blocks(spaces)
        mine = [(axis, start, length) for axis, start, length, name, _ in blocks if name == space.name]
        if mine:
            found.append((match, mine, not any(role == Role.IN for *_, role in blocks)))
    return found


def _analysis_progress(progress, matches: list[Match], spaces: dict[str, Space], folded: set[str]):
    """The analysis's bar, when `progress` is True: bytes of the tensors each phase reads, and layers."""
    if progress is not True:
        return None
    from ..progress import progress_for

    total = sum(
        m.info.nbytes for space in _global_spaces(spaces, folded) for m, _, _ in _global_matches(space, matches, spaces)
    )
    pers = {s.per for s in spaces.values() if s.name in folded and s.per is not None and s.clusters_of is None}
    layer_matches = [m for m in matches if any(per in m.env for per in pers)]
    layers = {m.env.get(per) for m in layer_matches for per in pers if per in m.env}
    return progress_for(total + sum(m.info.nbytes for m in layer_matches), "analysing", len(layers), noun="layers")


def _analyse_spaces(
    matches: list[Match], spaces: dict[str, Space], folded: set[str], folds: Folds, seed: int, dtype: str, tick
) -> None:
    """Fold the global spaces, then every layer's (see the module doc); `tick(nbytes, layers)` reports."""
    with ShardReader() as reader, _workers() as pool:
        for space in _global_spaces(spaces, folded):
            folds.by_key[(space.name, None)] = _fold_global(space, matches, reader, spaces, seed, dtype, pool, tick)
        per_layer = [s for s in spaces.values() if s.name in folded and s.per is not None and s.clusters_of is None]
        # kv heads that must serve more q heads than one source kv head has are merged in equal groups.
        balanced = {s.within for s in per_layer if s.within in spaces and needs_equal_groups(s, spaces[s.within])}
        per_layer = [replace(s, equal=True) if s.name in balanced else s for s in per_layer]
        # Spaces others are `within` go first (kv heads before q heads).
        parents = {s.within for s in per_layer}
        per_layer.sort(key=lambda s: 0 if s.name in parents else 1)
        for referenced in (s.clusters_of for s in spaces.values() if s.name in folded and s.clusters_of):
            if referenced not in folded:
                raise TensorscaleError(f"space {referenced} must fold with the spaces clustered like it")
        instances = sorted(
            {m.env.get(s.per) for s in per_layer for m in matches if s.per in m.env}, key=lambda v: (str(type(v)), v)
        )
        shared = dict(folds.by_key)

        def fold_layer(instance) -> dict:
            """One layer's spaces, in order (a space `within` another reads that one's fold of this layer)."""
            local = Folds(dict(shared))
            for space in per_layer:
                key = (space.name, instance)
                local.by_key[key] = _fold_instance(space, instance, matches, reader, spaces, local, seed, dtype)
            return {key: fold for key, fold in local.by_key.items() if key not in shared}

        pers = {s.per for s in per_layer}
        layer_bytes = defaultdict(int)
        for match in matches:
            for per in pers:
                if per in match.env:
                    layer_bytes[match.env[per]] += match.info.nbytes
                    break
        for instance, found in zip(instances, pool.map(fold_layer, instances)):
            folds.by_key.update(found)  # in layer order, whichever thread finished first
            interrupts.check()  # a safe point (tensorscale/interrupts.py)
            if tick:
                tick(layer_bytes[instance], 1)


ANALYSIS_WORKERS = 2  # threads that sketch tensors (and fold layers) at once


@contextmanager
def _workers():
    """A pool of ANALYSIS_WORKERS threads (at most one per core), each running torch on one thread.

    Tensors and layers are independent until their sketches are added up (in a fixed order, so the result
    does not depend on which thread finishes first). Much of the analysis is single-threaded: reads, the
    gathers and small products, Python. Two workers keep both cores busy where one worker with two torch
    threads left one idle; two workers with two torch threads each would make them spin against each other."""
    workers = max(1, min(ANALYSIS_WORKERS, os.cpu_count() or 1))
    threads = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _fold_global(
    space: Space,
    matches: list[Match],
    reader: ShardReader,
    spaces: dict[str, Space],
    seed: int,
    dtype: str,
    pool: ThreadPoolExecutor,
    tick=None,
) -> Fold:
    mine_by_match = _global_matches(space, matches, spaces)

    def sketches(item) -> list[torch.Tensor]:
        match, mine, _ = item
        shape = match.info.shape
        if len(shape) == 2 and space.unit == 1 and all(axis == 1 and length is None for axis, _, length in mine):
            # Units are columns (an embedding, a reader): the sketch samples rows, so read only those.
            return [_sketch_sampled_rows(reader, match.info, _key(match.name, 1, 0, None))]
        if len(shape) == 2 and mine == [(0, 0, None)]:
            # Units are rows (a writer of the space): a few MiB of rows at a time.
            return [_sketch_row_chunks(reader, match.info, space.unit, _key(match.name, 0, 0, None))]
        tensor = reader.read(match.info)
        return [
            _sketch(_unit_rows(tensor, axis, space.unit, start, length), _key(match.name, axis, start, length))
            for axis, start, length in mine
        ]

    everything = torch.zeros(space.units, SKETCH)
    noise_free = torch.zeros(space.units, SKETCH)
    clean_count = 0
    for (match, mine, clean), found in zip(mine_by_match, pool.map(sketches, mine_by_match)):
        for sketch in found:  # added in tensor order, whichever thread finished first
            everything += sketch
            if clean:  # no axis reads a tiled space (embeddings, norms, biases): exact copies on a cloned model
                noise_free += sketch
                clean_count += 1
        if tick:
            tick(match.info.nbytes, 0)
    what = f"space {space.name}"
    labels, exact = cluster_units(
        noise_free if clean_count else everything,
        space.target_units,
        equal=space.equal,
        what=what,
        seed=seed,
        dtype=dtype,
    )
    if not exact and clean_count:
        labels, exact = cluster_units(
            everything, space.target_units, equal=space.equal, what=what, seed=seed, dtype=dtype
        )
    return Fold(labels, space.target_units, exact)


SAMPLE_READ_BYTES = 2**23  # sampled rows read at once


def _sampled_row_pieces(reader: ShardReader, info, rows: list[int]):
    """The given rows (ascending), a few MiB of them at a time, each piece in one pass of preads
    (ShardReader.read_row_list: nearby rows in one call, which a tensor not much larger than its sample
    needs; one call per row took a quarter of `down`'s time). A large embedding, whose sampled rows lie
    far apart, only ever has one piece in memory."""
    row_bytes = max(1, math.prod(info.shape[1:]) * DTYPE_SIZES[info.dtype])
    count = max(1, SAMPLE_READ_BYTES // row_bytes)
    for begin in range(0, len(rows), count):
        yield reader.read_row_list(info, rows[begin : begin + count])


def _sketch_sampled_rows(reader: ShardReader, info, key) -> torch.Tensor:
    """_sketch of a matrix's columns over its sampled rows, one piece of rows at a time.

    The projection sums over the sampled rows, so each piece adds its rows' share (its slice of the
    projection) and the squares add up to the norm: memory stays at one piece (8 MiB), not the whole sample
    (84 MB for a 12B model's FFN reader, and twice that while it was concatenated)."""
    rows = _sample(info.shape[0]).tolist()
    projection = _projection(len(rows), key)
    out = torch.zeros(info.shape[1], SKETCH)
    squares, done = 0.0, 0
    for piece in _sampled_row_pieces(reader, info, rows):
        out += _project(piece.T, projection[done : done + piece.shape[0]])
        squares += float(torch.linalg.vector_norm(piece, dtype=torch.float32)) ** 2
        done += piece.shape[0]
    return out / squares**0.5 if squares > 0 else out


STREAM_ELEMENTS = 2**20  # elements of one row chunk a streamed sketch holds (4 MiB in float32)


def _row_step(columns: int, unit: int) -> int:
    """Rows per chunk of a streamed sketch: whole units, about STREAM_ELEMENTS elements."""
    return max(unit, (STREAM_ELEMENTS // max(1, columns)) // unit * unit)


def _sketch_row_chunks(reader: ShardReader, info, unit: int, key, lift=None) -> torch.Tensor:
    """_sketch(_unit_rows(lift(W), 0, unit)) read a few MiB of rows at a time: a unit's sketch only needs its
    own rows, so a 12B model's FFN writer (147 MB in bf16) is never whole in memory. `lift` (rows -> rows) is
    applied to each chunk first; the features sampled are those of its output."""
    rows_total, columns = info.shape
    step = _row_step(columns, unit)
    out, sampled, projection, squares = torch.zeros(rows_total // unit, SKETCH), None, None, 0.0
    for begin in range(0, rows_total, step):
        end = min(rows_total, begin + step)
        rows = reader.read_rows(info, begin, end)
        units = _unit_rows(lift(rows) if lift is not None else rows, 0, unit)
        if projection is None:
            features = units.shape[1]
            sampled = _sample(features) if features > MAX_SAMPLES else None
            projection = _projection(features if sampled is None else len(sampled), key)
        picked = units if sampled is None else units[:, sampled]
        out[begin // unit : end // unit] = _project(picked, projection)
        squares += float(torch.linalg.vector_norm(picked, dtype=torch.float32)) ** 2
    return out / squares**0.5 if squares > 0 else out


def _residual_unmerge(axis: int, label: str, spaces: dict[str, Space], folds: Folds):
    """The consumer merge U of a global (residual-stream) space on an axis that reads it, or None where the
    label is not such a reader or that space is not folded (yet)."""
    name, role = split_role(label)
    space = spaces[name]
    if role == Role.IN and space.per is None and (name, None) in folds.by_key:
        return folds.by_key[(name, None)].merge_op(axis, Role.IN, space)
    return None


def _lift(tensor: torch.Tensor, match: Match, spaces: dict[str, Space], folds: Folds) -> torch.Tensor:
    """Apply the global spaces' consumer merges (U) to the axes that read them: noise cancels here. A
    fused axis is lifted part by part (parts in other spaces are kept), which changes only that axis."""

    def unmerge(axis, label):
        op = _residual_unmerge(axis, label, spaces, folds)
        return [op] if op is not None else []

    for axis, label in enumerate(match.rule.transform.axes or []):
        if label == "-":
            continue
        if isinstance(label, list):
            parts = [unmerge(axis, part) for part in label]
            ops = [Fused(axis, [spaces[split_role(part)[0]].size for part in label], parts)] if any(parts) else []
        else:
            ops = unmerge(axis, label)
        for op in ops:
            tensor = op.apply(tensor, OpContext(torch.float32), 0).float()
    return tensor


def _fold_instance(space: Space, instance, matches, reader, spaces, folds: Folds, seed: int, dtype: str) -> Fold:
    features = torch.zeros(space.units, SKETCH)
    found = False
    for match in matches:
        if match.env.get(space.per) != instance:
            continue
        mine = [
            (axis, start, length, name)
            for axis, start, length, name, role in match.blocks(spaces)
            if role != Role.IN and (name == space.name or spaces[name].clusters_of == space.name)
        ]
        if not mine:
            continue
        if len(match.info.shape) == 2 and len(mine) == 1 and mine[0][0] == 0 and mine[0][2] is None:
            # The usual producer, units along rows: stream it in row chunks so a large FFN matrix is
            # never whole in float32 (its lifted copy and sketch inputs came to ~0.5 GiB at 1B).
            features += _sketch_streamed(reader, match, spaces[mine[0][3]].unit, spaces, folds)
            found = True
            continue
        tensor = _lift(reader.read(match.info).float(), match, spaces, folds)
        for axis, start, length, name in mine:
            features += _sketch(
                _unit_rows(tensor, axis, spaces[name].unit, start, length), _key(match.name, axis, start, length)
            )
            found = True
    what = f"space {space.name} ({space.per} {instance})"
    if not found:
        raise TensorscaleError(f"{what}: no tensor writes this space, so its units cannot be compared")
    if space.within is None:
        labels, exact = cluster_units(
            features, space.target_units, equal=space.equal, what=what, seed=seed, dtype=dtype
        )
        return Fold(labels, space.target_units, exact)
    return _fold_within(space, instance, features, spaces[space.within], folds, what, seed, dtype)


def _sketch_streamed(reader, match: Match, unit: int, spaces, folds: Folds) -> torch.Tensor:
    """_sketch(_unit_rows(_lift(W), 0, unit)) computed a few MiB of rows at a time: the projection is
    linear, so chunk sketches are stacked and the whole is divided by the norm summed over chunks."""
    lifted_projection = _lifted_projection(match, spaces, folds) if unit == 1 else None
    if lifted_projection is None:
        return _sketch_row_chunks(
            reader,
            match.info,
            unit,
            _key(match.name, 0, 0, None),
            lift=lambda rows: _lift(rows.float(), match, spaces, folds),
        )
    rows_total, columns_in = match.info.shape
    step = _row_step(columns_in, unit)
    out = torch.zeros(rows_total, SKETCH)
    for begin in range(0, rows_total, step):
        end = min(rows_total, begin + step)
        out[begin:end] = _project(reader.read_rows(match.info, begin, end), lifted_projection)
    norm = float(out.norm())  # of the sketch: the lifted rows are never formed (see _lifted_projection)
    return out / norm if norm > 0 else out


def _lifted_projection(match: Match, spaces, folds: Folds) -> torch.Tensor | None:
    """For a matrix whose rows are single units and whose columns read one space: the projection Q with
    rows @ Q == sampled(_lift(rows)) @ P, or None where the columns are not that simple (fused parts).

    The lift merges columns: lifted column c = scale[c] · Σ weight[i] · column i over the columns i in
    cluster c. It is linear, so it folds into the projection: Q[i] = weight[i] · scale[c] · P[c] (zero
    where c is not among the sampled lifted columns). One product of the stored rows with Q then replaces
    a float32 copy, a column merge and a second product; the lifted rows' norm, which normalises the
    sketch, is estimated by the sketch's own norm (a random projection keeps norms: E|xP|² = |x|²)."""
    label = (match.rule.transform.axes or [None, None])[1]
    if not isinstance(label, str):
        return None
    columns_in = match.info.shape[1]
    merge = _residual_unmerge(1, label, spaces, folds) if label != "-" else None
    if merge is None:
        merged_to, coefficient = torch.arange(columns_in), torch.ones(columns_in)  # nothing to lift
        lifted = columns_in
    else:
        entry = torch.arange(columns_in)
        unit_of = entry // merge.unit
        cluster = torch.tensor(merge.cluster)[unit_of]
        merged_to = cluster * merge.unit + entry % merge.unit
        coefficient = torch.tensor(merge.weight)[unit_of] * torch.tensor(merge.scale)[cluster]
        lifted = len(merge.scale) * merge.unit
    sampled = _sample(lifted)
    position = torch.full((lifted,), -1, dtype=torch.long)
    position[sampled] = torch.arange(len(sampled))
    projection = _projection(len(sampled), _key(match.name, 0, 0, None))
    where = position[merged_to]
    lifted_projection = torch.zeros(columns_in, SKETCH)
    kept = where >= 0
    lifted_projection[kept] = projection[where[kept]] * coefficient[kept, None]
    return lifted_projection


def _fold_within(
    space: Space, instance, features, parent: Space, folds: Folds, what: str, seed: int, dtype: str
) -> Fold:
    """Cluster q heads inside each kv cluster: small q head j = c·G' + t uses small kv head c."""
    parent_fold = folds.by_key.get((parent.name, instance))
    if parent.target == parent.size or parent_fold is None:
        parent_fold = Fold(list(range(parent.units)), parent.units, True)
    if space.units % parent.units or space.target_units % parent_fold.clusters:
        raise TensorscaleError(
            f"{what}: {space.target_units} heads cannot be shared evenly by {parent_fold.clusters} kv heads; "
            "choose a head count that is a multiple of the kv head count"
        )
    group = space.units // parent.units
    per_cluster = space.target_units // parent_fold.clusters
    members = defaultdict(list)
    for unit in range(space.units):
        members[parent_fold.cluster[unit // group]].append(unit)
    labels = [0] * space.units
    exact = parent_fold.exact
    for cluster, units in sorted(members.items()):
        local, local_exact = cluster_units(
            features[units],
            per_cluster,
            equal=space.equal,
            what=f"{what}, kv cluster {cluster}",
            seed=seed,
            dtype=dtype,
        )
        exact = exact and local_exact
        for unit, label in zip(units, local):
            labels[unit] = cluster * per_cluster + label
    return Fold(labels, space.target_units, exact)
