"""Write a safetensors file header-first, then stream tensor bytes into place.

The safetensors library has no incremental writer (its maintainers declined one), and ``save_file`` needs
every tensor in memory at once. The format is simple: an 8-byte little-endian header length, a JSON
header (padded with spaces to a multiple of 8, as the official writer does), then the raw bytes. Since a
plan knows every shape and dtype in advance, we write the header first and then ``pwrite`` each chunk at
its offset, in any order.
"""

from __future__ import annotations

import errno
import json
import os
import struct

import torch

from ..errors import TensorscaleError


def header_bytes(entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None = None) -> bytes:
    """entries: (name, dtype, shape, begin, end) with offsets relative to the data section."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardFile:
    """An output shard being written: header at creation, then data chunks at absolute offsets."""

    def __init__(self, path: str, header: bytes, data_size: int):
        self.path = path
        self.data_start = len(header)
        self.size = len(header) + data_size
        try:
            # 0o666 & ~umask: output files get the user's usual mode (safetensors' save_file forces 0600).
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise TensorscaleError(f"cannot create {path}: {exc.strerror}") from None
        try:
            self._write_at(header, 0)
            self._reserve()
        except BaseException:
            os.close(self.fd)
            raise

    def _reserve(self) -> None:
        """Claim the shard's full size now, so a full disk fails before any tensor work, not midway."""
        try:
            os.posix_fallocate(self.fd, 0, self.size)
            return
        except AttributeError:  # not on this platform
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise TensorscaleError(
                    f"cannot reserve {self.size} bytes for {os.path.basename(self.path)}: {exc.strerror} (is the disk full?)"
                ) from None
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise TensorscaleError(f"cannot size {self.path}: {exc.strerror} (is the disk full?)") from None

    def _write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                raise TensorscaleError(f"cannot write {self.path}: {exc.strerror} (is the disk full?)") from None

    def write_tensor_bytes(self, tensor: torch.Tensor, data_offset: int, digest=None) -> None:
        """Write a tensor's raw bytes at `data_offset` within the data section (and feed `digest`)."""
        tensor = tensor.contiguous()
        if tensor.numel() == 0:
            return
        raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
        data = raw.numpy().reshape(-1)
        if digest is not None:
            digest.update(data)
        self._write_at(data, self.data_start + data_offset)

    def finish(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise TensorscaleError(f"cannot flush {self.path}: {exc.strerror} (is the disk full?)") from None
        finally:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
