"""Produce output shards from a plan, one tensor at a time and, for large tensors, one row chunk at a time.

Memory stays bounded by the chunk size, not the model size: rows are read with pread into a fresh buffer,
transformed, written at their offset with pwrite, and released. Each shard depends only on the plan and
the inputs, so shards can be produced independently (and later, in parallel).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ..ops.library import OpContext
from ..planning.plan import Plan, ShardPlan, TensorPlan
from ..reading.tensor_reader import ShardReader, torch_dtype
from .safetensors_writer import ShardFile, header_bytes

# Target size of one chunk's float32 working set. Fixed (not tuned per machine) because noise is keyed by
# chunk: the same plan and seed must give the same bytes everywhere.
CHUNK_BYTES = 32 * 2**20

Progress = Callable[[int, int], None]  # (bytes written, tensors finished)


def shard_header(shard: ShardPlan) -> bytes:
    return header_bytes([(t.name, t.out_dtype, t.out_shape, t.offset, t.offset + t.nbytes) for t in shard.tensors])


def write_shard(plan: Plan, shard: ShardPlan, path: str, reader: ShardReader, progress: Progress | None = None,
                hashes: dict[str, str] | None = None, workers: int | None = None) -> None:
    """Write one shard. With `hashes`, record each tensor's sha256 as streamed (for --verify-files).

    Tensors are produced by `workers` threads at once (default: one per core, at most WORKERS): torch ops,
    pread and pwrite all release the GIL, so one thread computes while another waits on the disk, and each
    writes its tensor at its own offset. The bytes do not depend on the number of workers."""
    workers = workers or default_workers(shard)
    out = ShardFile(path, shard_header(shard), shard.nbytes)
    lock = threading.Lock()

    def one(tensor: TensorPlan) -> None:
        with torch.inference_mode():
            digest = hashlib.sha256() if hashes is not None else None
            write_tensor(plan, tensor, out, reader, _locked(progress, lock), digest)
            if digest is not None:
                hashes[tensor.name] = digest.hexdigest()
            if progress:
                with lock:
                    progress(0, 1)

    try:
        if workers == 1 or len(shard.tensors) == 1:
            for tensor in shard.tensors:
                one(tensor)
        else:
            # Largest tensors first, so the last one to finish is a small one and both threads stay busy.
            order = sorted(shard.tensors, key=lambda t: -t.nbytes)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for future in [pool.submit(one, tensor) for tensor in order]:
                    future.result()
        out.finish()
    finally:
        out.close()


WORKERS = 2  # more threads than this only add memory: two keep a 2-core machine's CPU and disk busy


def default_workers(shard: ShardPlan | None = None) -> int:
    """One thread per core, at most WORKERS; one only when the shard holds a tensor that must be processed
    whole and is larger in float32 than a chunk (down's merged matrices): two of those at once would double
    the peak memory, and measured no faster (down on 2B: 1.04 GiB with two threads, 0.67 with one, same time)."""
    if shard is not None and any(t.row_map is None and 4 * t.source.numel > CHUNK_BYTES for t in shard.tensors):
        return 1
    return max(1, min(WORKERS, os.cpu_count() or 1))


def _locked(progress, lock):
    if progress is None:
        return None

    def report(nbytes, tensors):
        with lock:
            progress(nbytes, tensors)

    return report


def _finish(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _run_ops(ops, x, ctx, compute_float):
    # Each arithmetic op converts to float32 itself, as late as it can: copies and tiles stay in the
    # stored dtype, and tile_divide by 2 works on bf16 directly (see TileDivide).
    for index, op in enumerate(ops):
        x = op.apply(x, ctx, index)
    return x


def _whole_tensor(tensor: TensorPlan, reader: ShardReader, ctx: OpContext, compute_float: bool):
    """A tensor whose axis-0 ops mix rows (down's merges, a consumer axis stored first).

    Ops on different axes commute, so the others run first on streamed row chunks, and only their
    (usually smaller) result is held whole for the axis-0 ops: a merged FFN matrix then peaks at its
    folded size instead of several float32 copies of the original."""
    rows = tensor.source.shape[0] if tensor.source.shape else 0
    row_local = [op for op in tensor.ops if op.axis != 0]
    mixing = [op for op in tensor.ops if op.axis == 0]
    if len(tensor.source.shape) < 2 or not row_local or not mixing:
        return _run_ops(tensor.ops, reader.read(tensor.source), ctx, compute_float)
    shape = tensor.source.shape
    for op in row_local:
        shape = op.out_shape(shape)
    middle = None
    step = max(1, CHUNK_BYTES // (4 * max(1, math.prod(shape[1:]), math.prod(tensor.source.shape[1:]))))
    for begin in range(0, rows, step):
        end = min(rows, begin + step)
        ctx.chunk_key = begin
        part = _run_ops(row_local, reader.read_rows(tensor.source, begin, end), ctx, compute_float)
        if middle is None:
            middle = torch.empty(shape, dtype=part.dtype)
        middle[begin:end] = part
    ctx.chunk_key = -1  # the axis-0 phase has its own noise stream
    return _run_ops(mixing, middle, ctx, compute_float)


def write_tensor(plan: Plan, tensor: TensorPlan, out: ShardFile, reader: ShardReader, progress: Progress | None,
                 digest=None) -> None:
    store = torch_dtype(tensor.out_dtype)
    ctx = OpContext(store_dtype=store, seed=plan.options.seed, tensor_name=tensor.name)
    compute_float = tensor.needs_float
    if tensor.row_map is None:
        y = _finish(_whole_tensor(tensor, reader, ctx, compute_float), store)
        out.write_tensor_bytes(y, tensor.offset, digest)
        if progress:
            progress(tensor.nbytes, 0)
        return

    out_row_numel = math.prod(tensor.out_shape[1:])
    out_row_bytes = tensor.nbytes // max(1, tensor.out_shape[0]) if tensor.out_shape[0] else 0
    in_row_numel = math.prod(tensor.source.shape[1:])
    rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(1, out_row_numel, in_row_numel)))
    out_row = 0
    for segment in tensor.row_map.segments:
        done = 0
        while done < segment.count:
            rows = min(rows_per_chunk, segment.count - done)
            if segment.is_fill:
                y = torch.full((rows, *tensor.out_shape[1:]), segment.fill, dtype=store)
            else:
                start = segment.source_start + done
                x = reader.read_rows(tensor.source, start, start + rows)
                ctx.chunk_key = out_row
                y = _finish(_run_ops(tensor.row_ops, x, ctx, compute_float), store)
            out.write_tensor_bytes(y, tensor.offset + out_row * out_row_bytes, digest)
            if progress:
                progress(rows * out_row_bytes, 0)
            out_row += rows
            done += rows
