"""Read tensor rows from safetensors shards with pread, into fresh buffers.

We read with pread rather than mmap: mapped pages count in the process's RSS until released, so a
memory-mapped read of a 12B checkpoint looks (and, under pressure, behaves) like holding it all. pread puts
exactly the rows we asked for in an anonymous buffer that is freed as soon as the chunk is written.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from ..errors import TensorscaleError
from .safetensors_header import DTYPE_SIZES, TensorInfo

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPES = {value: key for key, value in TORCH_DTYPES.items()}


def torch_dtype(dtype: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise TensorscaleError(f"dtype {dtype} is not supported for rewriting (supported: {', '.join(TORCH_DTYPES)})") from None


class ShardReader:
    """Keeps one file descriptor per shard open for the duration of a run."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # shards are written by several threads sharing one reader

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

    def read_rows(self, info: TensorInfo, row_start: int, row_stop: int) -> torch.Tensor:
        """Rows [row_start, row_stop) along axis 0, as a tensor of the stored dtype."""
        shape = info.shape if info.shape else (1,)
        row_numel = math.prod(shape[1:])
        itemsize = DTYPE_SIZES[info.dtype]
        row_bytes = row_numel * itemsize
        begin = info.start + row_start * row_bytes
        length = (row_stop - row_start) * row_bytes
        buffer = bytearray(length)
        view = memoryview(buffer)
        fd = self._fd(info.path)
        done = 0
        while done < length:
            got = os.preadv(fd, [view[done:]], begin + done)
            if got == 0:
                raise TensorscaleError(f"{os.path.basename(info.path)} ended early while reading {info.name}; the file changed or is truncated")
            done += got
        dtype = torch_dtype(info.dtype)
        if length == 0:
            return torch.empty((row_stop - row_start, *shape[1:]), dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(row_stop - row_start, *shape[1:])

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
