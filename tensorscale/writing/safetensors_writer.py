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
from .direct import ALIGN, POOL, BlockAssembler, align_down, align_up, is_refusal, open_direct

STAGING_BYTES = 16 * 2**20  # copies of unaligned tensors pass through this much aligned memory at a time


def header_bytes(
    entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str] | None = None
) -> bytes:
    """entries: (name, dtype, shape, begin, end) with offsets relative to the data section."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def typed_view(raw: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor | None:
    """A uint8 staging slice seen as `dtype` of `shape`, or None where its alignment does not allow it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if raw.storage_offset() % itemsize or raw.numel() % itemsize:
        return None
    return raw.view(dtype).view(shape)


def as_bytes(y: torch.Tensor) -> torch.Tensor:
    y = y.contiguous()
    return (y.view(torch.uint8) if y.dtype != torch.bool else y.to(torch.uint8)).reshape(-1)


class ShardFile:
    """An output shard being written: header at creation, then data at absolute offsets, in any order and
    from several threads. Writes go to the disk with O_DIRECT where the file system allows it (see
    direct.py); otherwise through the page cache."""

    def __init__(self, path: str, header: bytes, data_size: int):
        self.path = path
        self.data_start = len(header)
        self.size = len(header) + data_size
        try:
            # 0o666 & ~umask: output files get the user's usual mode (safetensors' save_file forces 0600).
            # Read access too: blocks nobody wrote are completed from the file at the end (direct.py).
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        except OSError as exc:
            raise TensorscaleError(f"cannot create {path}: {exc.strerror}") from None
        self.direct_fd = None
        self.blocks = BlockAssembler(self.size)
        self._past_end = False  # a direct write of the last, partial block went past the size
        try:
            self._reserve()
            self.direct_fd = open_direct(path)
            self.write_bytes(header, 0)
        except BaseException:
            self.close()
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
                    f"cannot reserve {self.size} bytes for {os.path.basename(self.path)}: {exc.strerror} (is the "
                    "disk full?)"
                ) from None
        try:
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            raise TensorscaleError(f"cannot size {self.path}: {exc.strerror} (is the disk full?)") from None

    @property
    def direct(self) -> bool:
        return self.direct_fd is not None

    def _write_at(self, data, offset: int, fd: int | None = None) -> None:
        view = memoryview(data).cast("B")
        fd = self.fd if fd is None else fd
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:], offset + done)
            except OSError as exc:
                raise TensorscaleError(f"cannot write {self.path}: {exc.strerror} (is the disk full?)") from None

    def write_aligned(self, view: memoryview, offset: int) -> None:
        """Write whole blocks at an aligned offset from aligned memory (a staging buffer)."""
        fd = self.direct_fd
        if fd is not None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + done)
                    if done % ALIGN:  # a short direct write (the disk filled up): finish it buffered
                        break
                else:
                    return
                view, offset = view[done:], offset + done
            except OSError as exc:
                if not is_refusal(exc):
                    raise TensorscaleError(f"cannot write {self.path}: {exc.strerror} (is the disk full?)") from None
                self._give_up_direct()
        self._write_at(view, offset)

    def write_partial(self, data, offset: int) -> None:
        """Bytes that do not cover whole blocks: collected until their blocks are complete."""
        if self.direct_fd is None:
            self._write_at(data, offset)
            return
        for start, block in self.blocks.add(data, offset):
            self._write_block(start, block)

    def _write_block(self, start: int, block: bytearray) -> None:
        staging = POOL.acquire(ALIGN)
        try:
            staging.view[:ALIGN] = block
            if start + ALIGN > self.size:
                self._past_end = True  # a direct write covers the whole block; the size is restored at the end
            self.write_aligned(staging.view[:ALIGN], start)
        finally:
            POOL.release(staging)

    def _give_up_direct(self) -> None:
        """O_DIRECT was refused after all: write everything through the page cache from now on, including
        the partial blocks collected so far (only their filled bytes)."""
        with self.blocks.lock:
            fd, self.direct_fd = self.direct_fd, None
            pending = list(self.blocks.pending.items())
            self.blocks.pending.clear()
        if fd is not None:
            os.close(fd)
        for start, (block, mask) in pending:
            index = 0
            while index < len(mask):
                if not mask[index]:
                    index += 1
                    continue
                end = mask.find(b"\x00", index)
                end = len(mask) if end < 0 else end
                self._write_at(memoryview(block)[index:end], start + index)
                index = end

    def write_bytes(self, data, offset: int) -> None:
        """Write raw bytes at an absolute file offset."""
        view = memoryview(data).cast("B")
        if self.direct_fd is None:
            self._write_at(view, offset)
            return
        end = offset + len(view)
        head = min(end, align_up(offset))
        if head > offset:
            self.write_partial(view[: head - offset], offset)
        body = align_down(end)
        if body > head:
            staging = POOL.acquire(min(body - head, STAGING_BYTES))
            try:
                at = head
                while at < body:
                    step = min(body - at, align_down(staging.capacity))
                    staging.view[:step] = view[at - offset : at - offset + step]
                    self.write_aligned(staging.view[:step], at)
                    at += step
            finally:
                POOL.release(staging)
        tail = max(head, body)
        if end > tail:
            self.write_partial(view[tail - offset :], tail)

    def write_tensor_bytes(self, tensor: torch.Tensor, data_offset: int, digest=None) -> None:
        """Write a tensor's raw bytes at `data_offset` within the data section (and feed `digest`)."""
        tensor = tensor.contiguous()
        if tensor.numel() == 0:
            return
        raw = tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor.to(torch.uint8)
        data = raw.numpy().reshape(-1)
        if digest is not None:
            digest.update(data)
        self.write_bytes(data, self.data_start + data_offset)

    def stream(self, data_offsets: list[int], nbytes: int, chunk_bytes: int) -> "Stream":
        """A front-to-back writer of `nbytes` at each of `data_offsets` (same bytes everywhere), taking
        chunks of up to `chunk_bytes`."""
        return Stream(self, [self.data_start + offset for offset in data_offsets], nbytes, chunk_bytes)

    def finish(self) -> None:
        try:
            if self.direct_fd is not None:
                for start, block in self.blocks.drain(lambda at, length: os.pread(self.fd, length, at)):
                    self._write_block(start, block)
            if self._past_end:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        except OSError as exc:
            raise TensorscaleError(f"cannot flush {self.path}: {exc.strerror} (is the disk full?)") from None
        finally:
            self.close()

    def close(self) -> None:
        for name in ("direct_fd", "fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


class Stream:
    """Writes one byte range of a shard front to back, through a page-aligned staging buffer.

    Staging byte 0 stands for an aligned file offset, so a chunk reserved here lands at its own alignment:
    rows can be read or computed straight into it (no copy), whole blocks go to the disk with one direct
    write, and the unaligned end is carried to the front for the next chunk. The first and last partial
    blocks, shared with neighbouring tensors, go to the shard's block assembler.

    With several offsets of the same alignment (a tensor tiled along its rows), every write goes to each
    of them: the bytes are computed once and written `len(offsets)` times."""

    def __init__(self, shard: ShardFile, offsets: list[int], nbytes: int, chunk_bytes: int):
        self.shard = shard
        self.offsets = list(offsets)
        self.nbytes = nbytes
        self.phase = offsets[0] % ALIGN
        self.buffer = POOL.acquire(chunk_bytes + 2 * ALIGN)
        self.origin = -self.phase  # range position of staging byte 0
        self.fill = self.phase  # staging bytes in use
        self.emitted = self.phase  # staging bytes already handed to the shard
        self.accepted = 0  # range bytes received
        self.reserved = 0

    def same_alignment(self, offset: int) -> bool:
        return (self.shard.data_start + offset) % ALIGN == self.phase

    def add_offset(self, data_offset: int) -> None:
        """Also write this range at `data_offset` (same alignment), from the first byte on."""
        offset = self.shard.data_start + data_offset
        if offset % ALIGN != self.phase or self.origin != -self.phase or self.emitted != self.phase:
            raise ValueError("add_offset: only before anything was written, at the same alignment")
        self.offsets.append(offset)

    def reserve(self, nbytes: int):
        """The next `nbytes` of the range, as (uint8 tensor, memoryview) over the staging buffer."""
        if self.fill + nbytes > self.buffer.capacity:
            bigger = POOL.acquire(self.fill + nbytes)
            bigger.view[: self.fill] = self.buffer.view[: self.fill]
            POOL.release(self.buffer)
            self.buffer = bigger
        self.reserved = nbytes
        return self.buffer.tensor[self.fill : self.fill + nbytes], self.buffer.view[self.fill : self.fill + nbytes]

    def commit(self) -> None:
        """The reserved bytes are filled: write what forms whole blocks, carry the rest."""
        self.fill += self.reserved
        self.accepted += self.reserved
        self.reserved = 0
        final = self.accepted >= self.nbytes
        begin, end = self.emitted, self.fill
        full = align_down(end)
        if not final and full <= begin:
            return
        if begin % ALIGN:  # the range's first block, shared with whatever precedes it
            stop = min(end, align_up(begin))
            self._partial(begin, stop)
            begin = stop
        last = end if final else full
        if align_down(last) > begin:
            body = align_down(last)
            for offset in self.offsets:
                self.shard.write_aligned(self.buffer.view[begin:body], offset + self.origin + begin)
            begin = body
        if final:
            if end > begin:
                self._partial(begin, end)
            self.emitted = self.fill = end
            return
        carry = end - full
        if full > 0:
            self.buffer.view[:carry] = self.buffer.view[full:end]
            self.origin += full
        self.fill = carry
        self.emitted = 0 if full > 0 else begin

    def _partial(self, begin: int, end: int) -> None:
        for offset in self.offsets:
            self.shard.write_partial(self.buffer.view[begin:end], offset + self.origin + begin)

    def write(self, data) -> None:
        """Copy bytes in (when they could not be produced in place)."""
        view = memoryview(data).cast("B")
        _, target = self.reserve(len(view))
        target[:] = view
        self.commit()

    def close(self) -> None:
        if self.buffer is not None:
            POOL.release(self.buffer)
            self.buffer = None
