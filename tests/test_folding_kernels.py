"""The fast forms of down's two inner loops agree with their plain definitions.

`Merge` sums clusters by gathering whole rows per cluster size (not `index_add_`), and the analysis folds
the residual unmerge into the sketch projection (the lifted rows are never formed). Both are rewrites for
speed, so they are checked here against the definitions they replace, on uneven clusters, empty clusters,
multi-entry units, every axis, and bf16 input."""

from __future__ import annotations

import pytest
import torch

from tensorscale.folding import analysis, clustering
from tensorscale.folding.fold import Fold, Folds
from tensorscale.ops.library import Fused, Merge, OpContext


def reference_merge(x: torch.Tensor, op: Merge) -> torch.Tensor:
    """out[c] = scale[c] · Σ weight[i] · in[i] over the units i of cluster c, one unit at a time."""
    x = x.float()
    moved = x.movedim(op.axis, 0)
    out = torch.zeros((len(op.scale) * op.unit, *moved.shape[1:]))
    for i, c in enumerate(op.cluster):
        out[c * op.unit : (c + 1) * op.unit] += op.weight[i] * moved[i * op.unit : (i + 1) * op.unit]
    for c, s in enumerate(op.scale):
        out[c * op.unit : (c + 1) * op.unit] *= s
    return out.movedim(0, op.axis)


def random_merge(axis: int, units: int, clusters: int, unit: int, generator, empty: bool = False) -> Merge:
    labels = torch.cat([torch.arange(clusters), torch.randint(0, clusters, (units - clusters,), generator=generator)])
    labels = labels[torch.randperm(units, generator=generator)]
    if empty:  # the last cluster gets no unit: it must come out as zeros
        labels[labels == clusters - 1] = 0
    weight = (torch.rand(units, generator=generator) + 0.5).tolist()
    scale = (torch.rand(clusters, generator=generator) + 0.5).tolist()
    return Merge(axis, labels.tolist(), weight, scale, unit)


@pytest.mark.parametrize(
    "shape,axis,unit",
    [
        ((24, 7), 0, 1),
        ((7, 24), 1, 1),
        ((5, 24, 3), 1, 1),
        ((24,), 0, 1),
        ((48, 5), 0, 4),
        ((5, 48), 1, 4),
        ((3, 5, 48), 2, 4),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("empty", [False, True])
def test_merge_matches_its_definition(shape, axis, unit, dtype, empty):
    generator = torch.Generator().manual_seed(hash((shape, axis, unit, empty)) & 0xFFFF)
    units = shape[axis] // unit
    op = random_merge(axis, units, units // 2, unit, generator, empty)
    x = torch.randn(shape, generator=generator).to(dtype)
    got = op.apply(x, OpContext(torch.float32), 0)
    assert got.shape == op.out_shape(shape)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference_merge(x, op))  # same products, summed in the same order: to the bit
    if empty:
        assert got.movedim(axis, 0)[-unit:].abs().max() == 0


def test_merge_of_equal_pairs_is_exact_and_leaves_its_input_alone():
    x = torch.randn(6, 8)
    before = x.clone()
    op = Merge(1, [0, 0, 1, 1, 2, 2, 3, 3], [1.0] * 8, [1.0] * 4)
    got = op.apply(x, OpContext(torch.float32), 0)
    assert torch.equal(got, x[:, 0::2] + x[:, 1::2])
    assert torch.equal(x, before)


class _Space:
    def __init__(self, name, size, unit=1, per=None, scaled=True):
        self.name, self.size, self.unit, self.per, self.scaled = name, size, unit, per, scaled


class _Rule:
    def __init__(self, axes):
        self.transform = type("T", (), {"axes": axes})()


def explicit_sketch(rows: torch.Tensor, match, spaces, folds) -> torch.Tensor:
    """The definition: lift the rows, sample the lifted columns, project, divide by the sampled norm."""
    lifted = analysis._lift(rows.float(), match, spaces, folds)
    columns = analysis._sample(lifted.shape[1])
    sampled = lifted[:, columns]
    sketch = sampled @ analysis._projection(len(columns), analysis._key(match.name, 0, 0, None))
    return sketch / sampled.norm()


@pytest.mark.parametrize("max_samples", [4096, 24])  # 24: fewer samples than lifted columns
@pytest.mark.parametrize("lifted", [True, False])
def test_lifted_projection_equals_lift_then_project(monkeypatch, max_samples, lifted):
    monkeypatch.setattr(analysis, "MAX_SAMPLES", max_samples)
    generator = torch.Generator().manual_seed(1)
    hidden, ffn = 64, 40
    spaces = {"hidden": _Space("hidden", hidden), "ffn": _Space("ffn", ffn, per="layer")}
    folds = Folds()
    labels = torch.cat([torch.arange(40), torch.randint(0, 40, (24,), generator=generator)])
    folds.by_key[("hidden", None)] = Fold(labels[torch.randperm(hidden, generator=generator)].tolist(), 40)
    match = analysis.Match(
        "model.layers.0.mlp.gate_proj.weight", None, _Rule(["ffn", "hidden.in" if lifted else "-"]), {"layer": 0}
    )
    match.info = type("Info", (), {"shape": (ffn, hidden), "dtype": "F32"})()
    rows = torch.randn(ffn, hidden, generator=generator)
    projection = analysis._lifted_projection(match, spaces, folds)
    got = analysis._project(rows, projection)
    got = got / got.norm()
    want = explicit_sketch(rows, match, spaces, folds) if lifted else None
    if want is None:  # nothing to lift: the plain sketch of the rows
        columns = analysis._sample(hidden)
        want = rows[:, columns] @ analysis._projection(len(columns), analysis._key(match.name, 0, 0, None))
    # The sketch's own norm stands in for the lifted rows' norm: the two agree up to that scale.
    want = want / want.norm()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bf16_projection_stays_close_to_float32():
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(300, 512, generator=generator).to(torch.bfloat16)
    projection = analysis._projection(512, "k")
    fast = analysis._project(rows, projection)
    exact = rows.float() @ projection
    assert fast.dtype == torch.float32
    assert float((fast - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_samples", [4096, 40])  # 40: fewer samples than rows / features
def test_streamed_global_sketches_equal_the_whole_tensor_sketch(tmp_path, monkeypatch, dtype, max_samples):
    """The residual stream's sketches read a span of rows at a time; they must equal _sketch of the tensor."""
    from safetensors.torch import save_file

    from tensorscale.reading.safetensors_header import read_header
    from tensorscale.reading.tensor_reader import ShardReader

    monkeypatch.setattr(analysis, "MAX_SAMPLES", max_samples)
    monkeypatch.setattr(analysis, "SAMPLE_READ_BYTES", 300)  # many spans of sampled rows on a small tensor
    monkeypatch.setattr(analysis, "STREAM_ELEMENTS", 100)  # and many row chunks
    generator = torch.Generator().manual_seed(3)
    weights = {
        "reader": torch.randn(96, 24, generator=generator).to(dtype),
        "writer": torch.randn(48, 20, generator=generator).to(dtype),
    }
    path = str(tmp_path / "w.safetensors")
    save_file(weights, path)
    infos = read_header(path).tensors
    tolerance = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    with ShardReader() as reader:
        columns = analysis._sketch_sampled_rows(reader, infos["reader"], "r")
        rows = weights["reader"][analysis._sample(96)].T
        torch.testing.assert_close(columns, analysis._sketch(rows, "r"), **tolerance)
        for unit in (1, 4):
            chunked = analysis._sketch_row_chunks(reader, infos["writer"], unit, "w")
            whole = analysis._sketch(analysis._unit_rows(weights["writer"], 0, unit), "w")
            torch.testing.assert_close(chunked, whole, **tolerance)


# ---- slices of a merge, the balanced assignment, byte-sized blocks ------------------------------------


@pytest.mark.parametrize("unit", [1, 3])
@pytest.mark.parametrize("empty", [False, True])
def test_a_merge_part_gives_its_slice_of_the_output_bit_for_bit(unit, empty):
    generator = torch.Generator().manual_seed(7 + unit + empty)
    units, clusters = 40, 13
    op = random_merge(0, units, clusters, unit, generator, empty)
    x = torch.randn(units * unit, 5, generator=generator).to(torch.bfloat16)
    whole = op.apply(x, OpContext(torch.float32), 0)
    covered = []
    for first, stop in [(0, 1), (1, 6), (6, 12), (12, 13)]:
        members, part = op.part(first, stop)
        assert members.tolist() == [u for u, c in enumerate(op.cluster) if first <= c < stop]
        covered += members.tolist()
        rows = (members[:, None] * unit + torch.arange(unit)).reshape(-1)
        got = part.apply(x[rows], OpContext(torch.float32), 0)
        assert torch.equal(got, whole[first * unit : stop * unit])
    assert sorted(covered) == list(range(units))


def reference_balanced_assign(x, squared, centres, k):
    """The definition: rank every centre for every unit, most decided unit first, nearest centre with room."""
    distances = clustering._distances(x, squared, centres)
    ranked = distances.sort(dim=1).values
    margin = ranked[:, 1] - ranked[:, 0]
    capacity = [x.shape[0] // k] * k
    labels = torch.full((x.shape[0],), -1, dtype=torch.long)
    for unit in margin.argsort(descending=True).tolist():
        for c in distances[unit].argsort().tolist():
            if capacity[c]:
                capacity[c] -= 1
                labels[unit] = c
                break
    return labels


@pytest.mark.parametrize("candidates", [1, 2, 3, 16])
@pytest.mark.parametrize("n,k", [(60, 6), (64, 32), (90, 45)])
def test_balanced_assignment_matches_ranking_every_centre(monkeypatch, candidates, n, k):
    """With few candidates most units run out of them and take the fallback row: same labels either way."""
    monkeypatch.setattr(clustering, "BALANCED_CANDIDATES", candidates)
    monkeypatch.setattr(clustering, "BLOCK_BYTES", 4 * k * 7)  # blocks of 7 units
    generator = torch.Generator().manual_seed(n + k + candidates)
    x = torch.randn(n, 8, generator=generator)
    centres = x[torch.randperm(n, generator=generator)[:k]] + 0.1 * torch.randn(k, 8, generator=generator)
    squared = x.pow(2).sum(dim=1)
    got = clustering._balanced_assign(x, squared, centres, k)
    assert torch.equal(got, reference_balanced_assign(x, squared, centres, k))
    assert torch.bincount(got, minlength=k).tolist() == [n // k] * k


def _cost(features, labels):
    labels = torch.tensor(labels)
    centres = torch.zeros(int(labels.max()) + 1, features.shape[1]).index_add_(0, labels, features)
    centres /= torch.bincount(labels).clamp_min(1)[:, None].float()
    return float((features - centres[labels]).pow(2).sum())


def test_small_blocks_find_the_same_copies_and_as_good_clusters(monkeypatch):
    """Blocks are sized in bytes. A block of one unit finds the same copies; k-means may round distances
    differently (a one-row product is not summed like a block), so its clusters are compared by cost."""
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(48, 16, generator=generator)
    features = torch.cat(
        [base, base + 1e-7 * torch.randn(48, 16, generator=generator), torch.randn(30, 16, generator=generator)]
    )
    results = []
    for block_bytes in (clustering.BLOCK_BYTES, 1):
        monkeypatch.setattr(clustering, "BLOCK_BYTES", block_bytes)
        results.append(
            (
                clustering.duplicate_groups(features),
                clustering.kmeans(features, 40, equal=False),
                clustering.kmeans(features[:120], 40, equal=True),
            )
        )
    (groups, loose, balanced), (groups_small, loose_small, balanced_small) = results
    assert groups == groups_small
    assert all(groups[i] == groups[48 + i] for i in range(48)) and len(set(groups)) == 48 + 30
    assert _cost(features, loose_small) <= 1.05 * _cost(features, loose)
    assert _cost(features[:120], balanced_small) <= 1.05 * _cost(features[:120], balanced)
    assert torch.bincount(torch.tensor(balanced_small)).tolist() == [3] * 40


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_axis_of_merges_is_one_merge(dtype):
    """[q; k; v] rows with q and k merged by head and v kept: as_merge() gives apply()'s values, to the bit."""
    generator = torch.Generator().manual_seed(11)
    q, k = random_merge(0, 6, 3, 4, generator), random_merge(0, 2, 1, 4, generator)
    fused = Fused(0, [24, 8, 8], [[q], [k], []])
    x = torch.randn(40, 5, generator=generator).to(dtype)
    merged = fused.as_merge()
    assert merged.out_shape(x.shape) == fused.out_shape(x.shape) == (12 + 4 + 8, 5)
    assert torch.equal(
        merged.apply(x, OpContext(torch.float32), 0), fused.apply(x, OpContext(torch.float32), 0).float()
    )
    assert Fused(0, [24, 16], [[q], [Merge(1, [0], [1.0], [1.0])]]).as_merge() is None  # a part on another axis
