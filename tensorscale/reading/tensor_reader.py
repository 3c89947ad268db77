"""Read tensor rows from safetensors shards with pread, into fresh buffers or the caller's.

We read with pread rather than mmap: mapped pages count in the process's RSS until released, so a
memory-mapped read of a 12B checkpoint looks (and, under pressure, behaves) like holding it all. pread puts
exactly the rows we asked for in an anonymous buffer: a fresh one, or (`into`) one the caller reuses for
every chunk, which saves the zero-fill and page faults of a new buffer each time; a pure copy can even be
read straight into the output's staging buffer.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import threading

# The engine's first torch import happens here. Importing torch creates some 10^5 objects, and the
# cyclic garbage collector, triggered by the allocations, walks them again and again (0.2-0.5 s of the
# 1.2-1.8 s import on our machine). So it is off during the import, and what the import created is
# frozen (moved out of the collected generations, as gc.freeze is meant for): nothing of it is garbage.
_collecting = gc.isenabled() and "torch" not in sys.modules
if _collecting:
    gc.disable()
try:
    import torch
finally:
    if _collecting:
        gc.freeze()
        gc.enable()

from ..errors import TensorscaleError  # noqa: E402  (after the guarded torch import)
from .safetensors_header import DTYPE_SIZES, TensorInfo  # noqa: E402

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPES = {value: key for key, value in TORCH_DTYPES.items()}


def torch_dtype(dtype: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise TensorscaleError(
            f"dtype {dtype} is not supported for rewriting (supported: {', '.join(TORCH_DTYPES)})"
        ) from None


def _all_finite(tensor: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum proves every element finite; one
    vectorised reduction is several times cheaper than isfinite's elementwise mask. A sum that overflows
    (finite but huge weights) falls back to the exact test."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


SKIP_BYTES = 2**16  # unwanted bytes between wanted rows that read_row_list reads past rather than seek over
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


class ShardReader:
    """Keeps one file descriptor per shard open for the duration of a run."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # shards are written by several threads sharing one reader
        # When a set: names of float tensors whose bytes, as read, hold NaN or Inf (every read is checked;
        # one pass over memory that is already hot). None: no check.
        self.nonfinite: set[str] | None = None

    def _note_nonfinite(self, info: TensorInfo, tensor: torch.Tensor) -> torch.Tensor:
        if (
            self.nonfinite is not None
            and tensor.is_floating_point()
            and info.name not in self.nonfinite
            and tensor.numel()
            and not _all_finite(tensor)
        ):
            self.nonfinite.add(info.name)
        return tensor

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise TensorscaleError(f"cannot open {path}: {exc.strerror}") from None
                self._fds[path] = fd
            return fd

    def read_rows(self, info: TensorInfo, row_start: int, row_stop: int, into=None) -> torch.Tensor:
        """Rows [row_start, row_stop) along axis 0, as a tensor of the stored dtype.

        `into`: a writable buffer (memoryview, uint8 tensor's numpy view...) of at least the rows' size to read
        into instead of a fresh one; the tensor returned then shares its memory."""
        if info.encoding is not None:
            return self._read_encoded(info, row_start, row_stop, into)
        shape = info.shape if info.shape else (1,)
        row_numel = math.prod(shape[1:])
        itemsize = DTYPE_SIZES[info.dtype]
        row_bytes = row_numel * itemsize
        begin = info.start + row_start * row_bytes
        length = (row_stop - row_start) * row_bytes
        dtype = torch_dtype(info.dtype)
        shape_out = (row_stop - row_start, *shape[1:])
        if length == 0:
            return torch.empty(shape_out, dtype=dtype)
        if into is None:
            # torch.empty, not bytearray: pread overwrites every byte, so zero-filling first is a wasted pass
            buffer = torch.empty(length, dtype=torch.uint8)
            view = memoryview(buffer.numpy())
        else:
            view = memoryview(into).cast("B")[:length]
            buffer = None
            if len(view) < length:
                raise ValueError(f"read_rows: buffer of {len(view)} bytes for {length}")
        self._pread_into(view, info.path, begin, info.name)
        if buffer is None:
            buffer = torch.frombuffer(view, dtype=torch.uint8)
        return self._note_nonfinite(info, buffer.view(dtype).reshape(shape_out))

    def _pread_into(self, view: memoryview, path: str, offset: int, name: str) -> None:
        """Fill `view` from `offset`, or a one-line error if the file ends first."""
        fd = self._fd(path)
        done, length = 0, len(view)
        while done < length:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise TensorscaleError(
                    f"{os.path.basename(path)} ended early while reading {name}; the file changed or is truncated"
                )
            done += got

    def pread(self, path: str, offset: int, length: int, name: str = "") -> bytearray:
        """Exactly `length` bytes at `offset` in a fresh buffer (GGUF blocks, decoded by the caller)."""
        buffer = bytearray(length)
        self._pread_into(memoryview(buffer), path, offset, name)
        return buffer

    def _read_encoded(self, info: TensorInfo, row_start: int, row_stop: int, into=None) -> torch.Tensor:
        """Rows of a tensor stored other than as plain rows (GGUF: quantized blocks, permuted heads)."""
        from .gguf_source import read_rows

        rows = read_rows(
            lambda offset, length: self.pread(info.path, offset, length, info.name), info, row_start, row_stop
        )
        if into is None:
            return rows
        length = rows.numel() * rows.element_size()
        view = memoryview(into).cast("B")[:length]
        if len(view) < length:
            raise ValueError(f"read_rows: buffer of {len(view)} bytes for {length}")
        out = torch.frombuffer(view, dtype=torch.uint8).view(rows.dtype).reshape(rows.shape) if length else rows
        if length:
            out.copy_(rows)
        return out

    def prefetch(self, info: TensorInfo) -> None:
        """Ask the kernel to read a tensor's bytes ahead, in file order, before it is read out of order (a
        merged tensor's rows, a slice of clusters at a time). Without it, rows that fell out of the page
        cache (a 7B checkpoint is most of a 24 GB machine's memory) are fetched one random read at a time."""
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self._fd(info.path), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # only a hint

    def read_row_list(self, info: TensorInfo, rows: list[int]) -> torch.Tensor:
        """The given rows (ascending, no repeats), stacked in that order.

        A merged tensor's output rows need input rows scattered over the whole tensor. One preadv reads a
        span of them: each run of wanted rows lands in its place, and a short gap of unwanted rows (up to
        SKIP_BYTES) goes to a scratch buffer, where a new system call would cost more than copying it. A
        pread per run of rows took a third of `down`'s write time (200 000 calls at 2B)."""
        if info.encoding is not None:
            return self._read_encoded_list(info, rows)
        shape = info.shape if info.shape else (1,)
        out = torch.empty((len(rows), *shape[1:]), dtype=torch_dtype(info.dtype))
        row_bytes = math.prod(shape[1:]) * DTYPE_SIZES[info.dtype]
        if not len(rows) or not row_bytes:
            return out
        target = memoryview(out.view(torch.uint8).numpy()).cast("B")
        scratch = memoryview(bytearray(SKIP_BYTES))
        fd = self._fd(info.path)
        begin = 0
        while begin < len(rows):
            buffers, end = [], begin
            while True:
                run = end + 1
                while run < len(rows) and rows[run] == rows[run - 1] + 1:
                    run += 1
                buffers.append(target[end * row_bytes : run * row_bytes])
                end = run
                if end == len(rows) or len(buffers) + 2 > IOV_MAX:
                    break
                gap = (rows[end] - rows[end - 1] - 1) * row_bytes
                if gap > SKIP_BYTES:
                    break
                buffers.append(scratch[:gap])
            wanted = sum(len(buffer) for buffer in buffers)
            if os.preadv(fd, buffers, info.start + rows[begin] * row_bytes) != wanted:
                # A short read (the end of the file, or the kernel's per-call limit): read run by run.
                for first in range(begin, end):
                    self.read_rows(
                        info, rows[first], rows[first] + 1, into=target[first * row_bytes : (first + 1) * row_bytes]
                    )
            begin = end
        return self._note_nonfinite(info, out)

    def _read_encoded_list(self, info: TensorInfo, rows: list[int]) -> torch.Tensor:
        """Listed rows of an encoded tensor: decoded a window of nearby rows at a time (a few MiB of float32)."""
        shape = info.shape if info.shape else (1,)
        out = torch.empty((len(rows), *shape[1:]), dtype=torch_dtype(info.dtype))
        window = max(1, (8 << 20) // max(1, 4 * math.prod(shape[1:])))
        begin = 0
        while begin < len(rows):
            first = rows[begin]
            end = begin
            while end < len(rows) and rows[end] < first + window:
                end += 1
            block = self.read_rows(info, first, rows[end - 1] + 1)
            out[begin:end] = block[torch.tensor(rows[begin:end]) - first]
            begin = end
        return out

    def read(self, info: TensorInfo) -> torch.Tensor:
        rows = info.shape[0] if info.shape else 1
        tensor = self.read_rows(info, 0, rows)
        return tensor.reshape(info.shape)

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
