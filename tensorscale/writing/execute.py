"""Produce output shards from a plan, one tensor at a time and, for large tensors, one row chunk at a time.

Memory stays bounded by the chunk size, not the model size: rows are read with pread into a buffer each
worker thread reuses, transformed straight into the output's aligned staging buffer (the last op writes
its result there; a pure copy is read there directly), and written to the disk with O_DIRECT (direct.py).
Rows that a tile repeats along axis 0 are read and computed once and written at each of their places.
Each shard depends only on the plan and the inputs, so shards can be produced independently.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from .. import interrupts
from ..ops.library import OpContext
from ..planning.plan import Plan, ShardPlan, TensorPlan
from ..reading.safetensors_header import DTYPE_SIZES
from ..reading.tensor_reader import ShardReader, torch_dtype
from .direct import POOL
from .merged_rows import row_merge, write_merged_rows
from .safetensors_writer import ShardFile, as_bytes, header_bytes, typed_view

# Target size of one chunk's float32 working set. Fixed (not tuned per machine) because noise is keyed by
# chunk: the same plan and seed must give the same bytes everywhere.
CHUNK_BYTES = 32 * 2**20

Progress = Callable[[int, int], None]  # (bytes written, tensors finished)


def shard_header(shard: ShardPlan, metadata: dict[str, str] | None = None) -> bytes:
    return header_bytes(
        [(t.name, t.out_dtype, t.out_shape, t.offset, t.offset + t.nbytes) for t in shard.tensors], metadata
    )


def write_shard(
    plan: Plan,
    shard: ShardPlan,
    path: str,
    reader: ShardReader,
    progress: Progress | None = None,
    hashes: dict[str, str] | None = None,
    workers: int | None = None,
) -> None:
    """Write one shard. With `hashes`, record each tensor's sha256 as streamed (for --verify-files).

    Tensors are produced by `workers` threads at once (default: one per core, at most WORKERS): torch ops,
    pread and pwrite all release the GIL, so one thread computes while another waits on the disk, and each
    writes its tensor at its own offset. The bytes do not depend on the number of workers."""
    workers = workers or default_workers(shard)
    out = ShardFile(path, shard_header(shard, plan.metadata), shard.nbytes)
    lock = threading.Lock()

    def one(tensor: TensorPlan) -> None:
        interrupts.check()  # a safe point: a signal whose KeyboardInterrupt was swallowed stops the run here
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
        POOL.clear()  # the calling thread's buffers (worker threads take theirs with them)


WORKERS = 2  # more threads than this only add memory: two keep a 2-core machine's CPU and disk busy


def default_workers(shard: ShardPlan | None = None) -> int:
    """One thread per core, at most WORKERS; one where the shard holds a tensor larger in float32 than a
    chunk whose rows mix (down's merges). A merged matrix is written a slice at a time (merged_rows.py), so
    it no longer costs its size, but each thread still holds its slices and their float32 copies: on 2B,
    two threads wrote 15% faster (7.0-8.4 s against 8.3-9.5) and raised the peak by 135 MiB, and memory
    that stays flat is what `down` is held to (benchmarks/README.md)."""
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


def _run_ops(ops, x, ctx):
    # Each arithmetic op converts to float32 itself, as late as it can: copies and tiles stay in the
    # stored dtype, and tile_divide by 2 works on bf16 directly (see TileDivide).
    for index, op in enumerate(ops):
        x = op.apply(x, ctx, index)
    return x


def _whole_tensor(tensor: TensorPlan, reader: ShardReader, ctx: OpContext):
    """A tensor whose axis-0 ops compute across rows and are not merges that merged_rows.py writes a slice
    at a time: `up`'s tile_divide of a consumer axis stored first (GPT-2's Conv1D), noisy ops.

    Ops on different axes commute, so the others run first on streamed row chunks, and only their
    (usually smaller) result is held whole for the axis-0 ops, instead of several float32 copies of the
    original."""
    rows = tensor.source.shape[0] if tensor.source.shape else 0
    row_local = [op for op in tensor.ops if op.axis != 0]
    mixing = [op for op in tensor.ops if op.axis == 0]
    if len(tensor.source.shape) < 2 or not row_local or not mixing:
        return _run_ops(tensor.ops, reader.read(tensor.source), ctx)
    shape = tensor.source.shape
    for op in row_local:
        shape = op.out_shape(shape)
    middle = None
    step = max(1, CHUNK_BYTES // (4 * max(1, math.prod(shape[1:]), math.prod(tensor.source.shape[1:]))))
    for begin in range(0, rows, step):
        end = min(rows, begin + step)
        ctx.chunk_key = begin
        part = _run_ops(row_local, reader.read_rows(tensor.source, begin, end), ctx)
        if middle is None:
            middle = torch.empty(shape, dtype=part.dtype)
        middle[begin:end] = part
    ctx.chunk_key = -1  # the axis-0 phase has its own noise stream
    return _run_ops(mixing, middle, ctx)


class _TrackingContext(OpContext):
    """Notes whether an op asked for its noise generator: chunks computed without one are the same
    whatever output rows they go to, so a tile's copies can share them."""

    used_generator = False

    def generator(self, op_index: int):
        self.used_generator = True
        return super().generator(op_index)


class _Rows:
    """How one row-mapped tensor's chunks are produced into a stream's staging buffer."""

    def __init__(self, plan: Plan, tensor: TensorPlan, reader: ShardReader):
        self.tensor = tensor
        self.reader = reader
        self.store = torch_dtype(tensor.out_dtype)
        self.row_shape = tuple(tensor.out_shape[1:])
        self.out_row_bytes = tensor.nbytes // max(1, tensor.out_shape[0]) if tensor.out_shape[0] else 0
        out_row_numel = math.prod(tensor.out_shape[1:])
        in_row_numel = math.prod(tensor.source.shape[1:])
        self.rows_per_chunk = max(1, CHUNK_BYTES // (4 * max(1, out_row_numel, in_row_numel)))
        self.in_row_bytes = in_row_numel * DTYPE_SIZES[tensor.source.dtype]
        self.copy = not tensor.row_ops and torch_dtype(tensor.source.dtype) == self.store
        self.ctx = _TrackingContext(store_dtype=self.store, seed=plan.options.seed, tensor_name=tensor.name)
        self.input = None

    def produce(self, stream, source_row: int | None, fill: float, rows: int, chunk_key: int) -> torch.Tensor:
        """Rows [source_row, +rows) through the row ops (or `fill`), into the stream's next bytes;
        returns those bytes (uint8) for the caller to copy or hash before commit()."""
        raw, view = stream.reserve(rows * self.out_row_bytes)
        target = typed_view(raw, self.store, (rows, *self.row_shape))
        if source_row is None:
            if target is not None:
                target.fill_(fill)
            else:
                raw.copy_(as_bytes(torch.full((rows, *self.row_shape), fill, dtype=self.store)))
            return raw
        if self.copy and target is not None:
            self.reader.read_rows(self.tensor.source, source_row, source_row + rows, into=view)
            return raw
        if self.input is None:
            self.input = POOL.acquire(self.rows_per_chunk * self.in_row_bytes)
        x = self.reader.read_rows(
            self.tensor.source, source_row, source_row + rows, into=self.input.view[: rows * self.in_row_bytes]
        )
        ctx = self.ctx
        ctx.chunk_key = chunk_key
        ops = self.tensor.row_ops
        for index, op in enumerate(ops[:-1]):
            x = op.apply(x, ctx, index)
        last = len(ops) - 1
        if not (ops and target is not None and ops[-1].apply_into(x, target, ctx, last)):
            y = _finish(ops[-1].apply(x, ctx, last) if ops else x, self.store)
            if target is not None:
                target.copy_(y.reshape(target.shape))
            else:
                raw.copy_(as_bytes(y))
        return raw

    def close(self) -> None:
        if self.input is not None:
            POOL.release(self.input)
            self.input = None


def write_tensor(
    plan: Plan, tensor: TensorPlan, out: ShardFile, reader: ShardReader, progress: Progress | None, digest=None
) -> None:
    """Write one tensor by the one of three paths its plan allows, chosen here and only here:

    1. row-mapped (planning found a row map: copies, tiles, slices and fills along axis 0): streamed in row
       chunks, each chunk through the remaining ops straight into the output's staging buffer;
    2. a merge along axis 0 (down's folds of rows): a slice of clusters at a time (merged_rows.py);
    3. anything else that mixes rows (a tile_divide of a consumer axis stored first, noisy axis-0 ops):
       held whole for its axis-0 ops, after the other ops ran on streamed chunks (_whole_tensor)."""
    if tensor.row_map is not None:
        if tensor.nbytes:
            _write_row_mapped(plan, tensor, out, reader, progress, digest)
        return
    row_mixing = row_merge(tensor) if tensor.nbytes else None
    if row_mixing is not None:
        write_merged_rows(tensor, row_mixing, plan.options.seed, out, reader, progress, digest)
        return
    store = torch_dtype(tensor.out_dtype)
    ctx = OpContext(store_dtype=store, seed=plan.options.seed, tensor_name=tensor.name)
    out.write_tensor_bytes(_finish(_whole_tensor(tensor, reader, ctx), store), tensor.offset, digest)
    if progress:
        progress(tensor.nbytes, 0)


def _write_row_mapped(
    plan: Plan, tensor: TensorPlan, out: ShardFile, reader: ShardReader, progress: Progress | None, digest
) -> None:
    rows = _Rows(plan, tensor, reader)
    try:
        # Segments that repeat the same source rows (a tile along axis 0) form one group, produced once.
        # With a digest the bytes must be hashed in file order, so every segment stays its own group.
        groups: list[tuple[object, list[int]]] = []
        index: dict[tuple[int, int], int] = {}
        out_row = 0
        for segment in tensor.row_map.segments:
            key = (segment.source_start, segment.count)
            if segment.is_fill or digest is not None or key not in index:
                index.setdefault(key, len(groups))
                groups.append((segment, [out_row]))
            else:
                groups[index[key]][1].append(out_row)
            out_row += segment.count
        for segment, starts in groups:
            _write_group(rows, segment, starts, out, progress, digest)
    finally:
        rows.close()


def _write_group(rows: _Rows, segment, starts: list[int], out: ShardFile, progress, digest) -> None:
    """One run of source rows, written at every output row in `starts`, chunk by chunk.

    Chunk boundaries and noise keys are those of each copy on its own (chunks of rows_per_chunk from the
    segment's start, keyed by their first output row), so the bytes do not depend on the grouping: if the
    first chunk's ops used no generator, the copies are the same bytes and are computed once (written
    from the same staging buffer where their alignment agrees, copied where it does not); otherwise each
    copy is computed with its own key."""
    tensor = rows.tensor
    row_bytes = rows.out_row_bytes
    nbytes = segment.count * row_bytes
    chunk_bytes = min(nbytes, rows.rows_per_chunk * row_bytes)
    offset = lambda start: tensor.offset + start * row_bytes  # noqa: E731
    first = out.stream([offset(starts[0])], nbytes, chunk_bytes)
    copies: list[tuple[object, int]] = []  # (stream, output row) of copies that are not served by `first`
    shared = None
    try:
        done = 0
        while done < segment.count:
            interrupts.check()
            count = min(rows.rows_per_chunk, segment.count - done)
            source = None if segment.is_fill else segment.source_start + done
            rows.ctx.used_generator = False
            raw = rows.produce(first, source, segment.fill, count, starts[0] + done)
            if shared is None:
                shared = not rows.ctx.used_generator
                for start in starts[1:]:
                    if shared and first.same_alignment(offset(start)):
                        first.add_offset(offset(start))
                    else:
                        copies.append((out.stream([offset(start)], nbytes, chunk_bytes), start))
            for stream, start in copies:
                if shared:
                    stream.write(raw.numpy())
                else:
                    rows.ctx.used_generator = False
                    rows.produce(stream, source, segment.fill, count, start + done)
                    stream.commit()
            if digest is not None:
                digest.update(raw.numpy())
            first.commit()
            if progress:
                progress(count * row_bytes * len(starts), 0)
            done += count
    finally:
        first.close()
        for stream, _ in copies:
            stream.close()
