"""Write a tensor whose rows are merged (by `down`: producers, norm gains, consumers stored first) one slice of
output rows at a time, so that its memory does not grow with the tensor.

A merge along axis 0 makes each output row from input rows scattered over the whole tensor, so the tensor
cannot stream in row chunks like a tile. Holding it whole (the earlier form) took a float32 copy of the
column-merged input plus the merged output: 135 MB for one FFN matrix of a 7B model, 235 MB at 12B, and
the glibc heap kept that high-water mark for the rest of the run. Here a slice of output clusters is made
at a time: its member rows are read (ShardReader.read_row_list: one preadv per span of nearby rows, after
asking the kernel to read the tensor ahead in file order), the row-local ops (merges of the other axis) run
on just those rows, the rows merge into the slice, and the slice goes to the disk. Memory is the slice
budget, whatever the model's size.

The bytes are those of the whole-tensor form: every op here draws no noise (checked), row-local ops give a
row the same values whatever rows it is processed with, and each cluster sums the same units in the same
order (Merge.part).
"""

from __future__ import annotations

import math

import torch

from .. import interrupts
from ..ops.library import Merge, OpContext
from ..planning.plan import TensorPlan
from ..reading.safetensors_header import DTYPE_SIZES
from ..reading.tensor_reader import ShardReader, torch_dtype
from .safetensors_writer import ShardFile, as_bytes, typed_view

SLICE_BYTES = 2**23  # the largest float32 working set of one slice: its member rows, after the row-local ops


def row_merge(tensor: TensorPlan) -> tuple[int, Merge] | None:
    """(index, Merge) of the tensor's one row-mixing op, where it is a merge (or a fused axis of merges)
    that this module can write a slice at a time, else None."""
    shape = tensor.source.shape
    mixing = [(index, op) for index, op in enumerate(tensor.ops) if op.axis == 0]
    if len(shape) < 2 or len(mixing) != 1:
        return None
    if any(op.draws_noise() for op in tensor.ops):
        return None
    index, op = mixing[0]
    merge = op.as_merge()
    return (index, merge) if merge is not None else None


def _slices(merge: Merge, row_bytes: int) -> list[tuple[int, int]]:
    """Consecutive cluster ranges whose member rows take at most SLICE_BYTES (or one cluster each)."""
    counts = torch.bincount(torch.tensor(merge.cluster, dtype=torch.long), minlength=len(merge.scale)).tolist()
    slices, first, held = [], 0, 0
    for cluster, count in enumerate(counts):
        need = count * merge.unit * row_bytes
        if held and held + need > SLICE_BYTES:
            slices.append((first, cluster))
            first, held = cluster, 0
        held += need
    slices.append((first, len(counts)))
    return slices


def write_merged_rows(
    tensor: TensorPlan, row_mixing: tuple[int, Merge], seed: int, out: ShardFile, reader: ShardReader, progress, digest
) -> None:
    merge_index, merge = row_mixing
    store = torch_dtype(tensor.out_dtype)
    row_local = [(index, op) for index, op in enumerate(tensor.ops) if op.axis != 0]
    middle = tuple(tensor.source.shape)
    for _, op in row_local:
        middle = op.out_shape(middle)
    in_row_bytes = math.prod(tensor.source.shape[1:]) * DTYPE_SIZES[tensor.source.dtype]
    row_bytes = max(in_row_bytes, 4 * math.prod(middle[1:]), 1)
    out_row_bytes = tensor.nbytes // tensor.out_shape[0]
    slices = _slices(merge, row_bytes)
    longest = max(stop - first for first, stop in slices) * merge.unit * out_row_bytes
    ctx = OpContext(store_dtype=store, seed=seed, tensor_name=tensor.name)
    stream = out.stream([tensor.offset], tensor.nbytes, longest)
    if len(slices) > 1:
        reader.prefetch(tensor.source)
    try:
        for first, stop in slices:
            interrupts.check()  # a safe point (interrupts.py)
            units, part = merge.part(first, stop)
            rows = (units[:, None] * merge.unit + torch.arange(merge.unit)).reshape(-1).tolist()
            x = reader.read_row_list(tensor.source, rows)
            for index, op in row_local:
                x = op.apply(x, ctx, index)
            y = part.apply(x, ctx, merge_index)
            del x
            out_rows = (stop - first) * merge.unit
            raw, _ = stream.reserve(out_rows * out_row_bytes)
            target = typed_view(raw, store, y.shape)
            if target is not None:
                target.copy_(y)  # rounded to the stored dtype straight into the staging buffer
            else:
                raw.copy_(as_bytes(y.to(store)))
            if digest is not None:
                digest.update(raw.numpy())
            stream.commit()
            if progress:
                progress(out_rows * out_row_bytes, 0)
    finally:
        stream.close()
