"""Every op carries its inverse, or says why it has none; growth ops are Gathers, and Merge is their adjoint.

Property tests on random shapes, axes and factors: inverse(op(x)) == x, op(adjoint(y)) == y for a merge,
the fast kernels of tile / interleave / tile_divide give their Gather's bytes, out_shape agrees with apply,
and an axis-0 op's row map says where apply() put each row."""

from __future__ import annotations

import inspect
import random

import pytest
import torch

from tensorscale.ops import library
from tensorscale.ops.library import (
    Fill,
    Fused,
    Gather,
    Interleave,
    Merge,
    NoInverse,
    Noise,
    Op,
    OpContext,
    Pad,
    Scale,
    Slice,
    Tile,
    TileDivide,
)
from tensorscale.ops.rowmap import RowMap

CASES = 40


def context(dtype=torch.float32):
    return OpContext(store_dtype=dtype, seed=3, tensor_name="t")


def random_shape(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 3)))


def random_op(rng: random.Random, shape: tuple[int, ...]) -> Op:
    """An invertible op for `shape`: any kind the library has an inverse for."""
    axis = rng.randrange(len(shape))
    size = shape[axis]
    kind = rng.choice(
        ["tile", "interleave", "tile_divide", "noisy_tile_divide", "gather", "divide_gather", "pad", "scale", "fused"]
    )
    times = rng.randint(1, 3)
    if kind == "tile":
        return Tile(axis, times)
    if kind == "interleave":
        unit = rng.choice([u for u in range(1, size + 1) if size % u == 0])
        return Interleave(axis, times, unit)
    if kind == "tile_divide":
        return TileDivide(axis, times)
    if kind == "noisy_tile_divide":
        return TileDivide(axis, 2, snr_db=20.0)
    if kind in ("gather", "divide_gather"):
        sources = (
            list(range(size)) + [rng.randrange(size) for _ in range(rng.randint(0, 3))] + [None] * rng.randint(0, 2)
        )
        rng.shuffle(sources)
        return Gather(axis, 1, tuple(sources), divide=kind == "divide_gather")
    if kind == "pad":
        return Pad(axis, rng.randint(0, 2), rng.randint(0, 2), value=rng.choice([0.0, 1.5]))
    if kind == "scale":
        return Scale(rng.choice([0.5, 2.0, -3.0, 0.1]), rng.choice([0.0, 1.0]))
    split = rng.randint(0, size)
    return Fused(axis, [split, size - split], [[Tile(axis, 2)], [Pad(axis, 1, 0)]])


@pytest.mark.parametrize("case", range(CASES))
def test_inverse_undoes_the_op(case):
    rng = random.Random(case)
    shape = random_shape(rng)
    op = random_op(rng, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case))
    y = op.apply(x, context(), 0)
    assert tuple(y.shape) == op.out_shape(shape), op.describe()
    undo = op.inverse(shape)
    torch.testing.assert_close(undo.apply(y, context(), 0).float(), x, rtol=1e-5, atol=1e-6, msg=op.describe())


@pytest.mark.parametrize("case", range(CASES))
def test_a_merge_undoes_the_gather_it_is_adjoint_to(case):
    """Gather.inverse is a Merge (means or sums of the copies); that merge's adjoint is a Gather again, and
    merging what it gathers gives back the merge's input."""
    rng = random.Random(1000 + case)
    shape = random_shape(rng)
    gather = random_op(random.Random(case), shape)
    if not isinstance(gather, Gather):
        axis = rng.randrange(len(shape))
        gather = Gather(axis, 1, tuple(range(shape[axis])) * 2, divide=bool(case % 2))
    merge = gather.inverse(shape)
    assert isinstance(merge, Merge)
    adjoint = merge.adjoint()
    assert isinstance(adjoint, Gather) and adjoint.sources == gather.sources
    y = torch.randn(shape, generator=torch.Generator().manual_seed(case))
    # the same gather (single copies divide by 1, so either form of it will do)
    torch.testing.assert_close(adjoint.apply(y, context(), 0), gather.apply(y, context(), 0))
    torch.testing.assert_close(merge.apply(adjoint.apply(y, context(), 0), context(), 0), y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(12))
def test_growth_kernels_are_gathers(case, dtype):
    """tile, interleave and tile_divide are special cases of gather: their own kernels give its bytes."""
    rng = random.Random(case)
    shape = random_shape(rng)
    axis = rng.randrange(len(shape))
    times = rng.randint(1, 4)
    unit = rng.choice([u for u in range(1, shape[axis] + 1) if shape[axis] % u == 0])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case)).to(dtype)
    for op in (Tile(axis, times), Interleave(axis, times, unit), TileDivide(axis, times)):
        fast = op.apply(x, context(dtype), 0).to(dtype)
        general = op.as_gather(shape).apply(x, context(dtype), 0).to(dtype)
        assert torch.equal(fast, general), op.describe()


def test_noisy_tile_divide_and_its_gather_keep_the_sum():
    """With noise the draws differ in layout, but both keep the copies' sum: the consumer's function."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    op = TileDivide(1, 2, snr_db=10.0)
    for grown in (op.apply(x, context(), 0), op.as_gather(tuple(x.shape)).apply(x, context(), 0)):
        assert not torch.equal(grown[:, :6], grown[:, 6:])
        torch.testing.assert_close(grown[:, :6] + grown[:, 6:], x)


@pytest.mark.parametrize(
    "op, reason",
    [
        (Slice(0, 1, 2), "drops"),
        (Fill(0.0), "nothing of its input"),
        (Noise(0, 2, 20.0), "drawn, not stored"),
        (Merge(0, [0, 0], [0.5, 0.5], [1.0]), "several units into one"),
        (Gather(0, 1, (0, 0)), "unit 1 of 2 is not copied"),
        (Scale(0.0), "factor of 0"),
    ],
)
def test_ops_without_an_inverse_say_why(op, reason):
    with pytest.raises(NoInverse, match=reason):
        op.inverse((2, 3))


def test_a_merge_of_rescaled_clusters_has_no_adjoint():
    with pytest.raises(NoInverse, match="means or of sums"):
        Merge(0, [0, 0], [0.5, 0.5], [2.0]).adjoint()


def test_every_op_has_an_inverse_or_a_reason():
    ops = [cls for _, cls in inspect.getmembers(library, inspect.isclass) if issubclass(cls, Op) and cls is not Op]
    assert len(ops) >= 11
    for cls in ops:
        assert cls.inverse is not Op.inverse or cls.no_inverse != Op.no_inverse, cls.__name__


@pytest.mark.parametrize("case", range(CASES))
def test_row_maps_say_where_apply_puts_each_row(case):
    """For axis-0 ops that move rows, the planned row map and apply() agree row for row."""
    rng = random.Random(2000 + case)
    shape = (rng.randint(1, 6), rng.randint(1, 4))
    rows = shape[0]
    unit = rng.choice([u for u in range(1, rows + 1) if rows % u == 0])
    start = rng.randint(0, rows)
    op = rng.choice(
        [
            Tile(0, rng.randint(1, 3)),
            Interleave(0, rng.randint(1, 3), unit),
            Slice(0, start, rng.randint(start, rows)),
            Pad(0, rng.randint(0, 2), rng.randint(0, 2), 2.5),
            Gather(0, 1, tuple(rng.choice([None, *range(rows)]) for _ in range(rng.randint(1, 8)))),
            Fill(-1.0),
            Scale(3.0),
        ]
    )
    x = torch.randn(shape, generator=torch.Generator().manual_seed(case))
    y = op.apply(x, context(), 0)
    row_map = op.map_rows(RowMap.identity(rows))
    assert row_map is not None and row_map.rows == y.shape[0], op.describe()
    out_row = 0
    for segment in row_map.segments:
        expected = (
            torch.full((segment.count, shape[1]), segment.fill)
            if segment.is_fill
            else x[segment.source_start : segment.source_start + segment.count]
        )
        if isinstance(op, Scale):
            expected = op.apply(expected, context(), 0)
        assert torch.equal(y[out_row : out_row + segment.count].float(), expected.float()), op.describe()
        out_row += segment.count


@pytest.mark.parametrize("grow", [dict(embed_dim_multiplier=2, up_proj_multiplier=3), dict(up_proj_multiplier=2)])
def test_down_of_up_finds_the_unit_map_up_wrote(tmp_path, grow):
    """One UnitMap type for both directions: `up` plans each space's layout (new unit -> the source unit it
    copies), and `down` of the result, clustering the weights it reads, finds that very map (unit -> its
    cluster), so the Merge it applies is the adjoint of the Gather that made the copies."""
    from fixtures import build_checkpoint

    from tensorscale.convert import plan_conversion, plan_down, run_up
    from tensorscale.planning.plan import DownOptions, UpOptions

    source = build_checkpoint(tmp_path / "src", "llama")
    up_plan = plan_conversion(source, UpOptions(**grow))
    run_up(source, str(tmp_path / "up"), UpOptions(**grow), show_progress=False)
    down = plan_down(
        str(tmp_path / "up"),
        DownOptions(embed_dim_divisor=grow.get("embed_dim_multiplier", 1), up_proj_divisor=grow["up_proj_multiplier"]),
    )
    found = 0
    for (space, _), fold in down.down.folds.by_key.items():
        layout = up_plan.layouts[space]
        if layout.target != layout.size:
            assert fold.exact and fold.map == layout.map, space
            found += 1
    assert found >= 1


def test_noise_breaks_the_copies_and_keeps_their_sum():
    """`noise` (a rules file's op): +e on block 2j, -e on 2j+1, seeded by the context, so the blocks' sum,
    which a consumer of tiled copies computes, is unchanged."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)).repeat(1, 2)  # two equal blocks of 8
    op = Noise(1, 2, 20.0)
    y = op.apply(x, context(), 0)
    assert op.draws_noise() and op.out_shape(tuple(x.shape)) == tuple(x.shape)
    assert not torch.equal(y[:, :8], y[:, 8:])
    torch.testing.assert_close(y[:, :8] + y[:, 8:], x[:, :8] + x[:, 8:])
    assert torch.equal(y, op.apply(x, context(), 0))  # the same seed and key: the same noise
