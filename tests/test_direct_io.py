"""Direct-I/O output: every byte lands where it belongs whatever the alignment, order or thread, with
O_DIRECT, without it, and when the file system refuses it halfway; and `up` writes the same bytes
either way."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import threading

import pytest
import torch
from fixtures import build_checkpoint

from tensorscale.convert import run_up
from tensorscale.planning.plan import UpOptions
from tensorscale.writing import direct, execute, safetensors_writer
from tensorscale.writing.direct import ALIGN
from tensorscale.writing.safetensors_writer import ShardFile


def random_layout(rng, count, max_size):
    sizes = [
        rng.choice([1, 2, 3, 7, 8, 100, ALIGN - 1, ALIGN, ALIGN + 1, rng.randrange(1, max_size)]) for _ in range(count)
    ]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += size
    return list(zip(offsets, sizes)), at


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    if request.param == "buffered":
        monkeypatch.setattr(direct, "ENABLED", False)
    return request.param


@pytest.mark.parametrize("seed", range(4))
def test_random_pieces_any_order_any_thread(tmp_path, mode, seed):
    rng = random.Random(seed)
    header = b"H" * rng.randrange(8, 3 * ALIGN, 8)
    layout, data_size = random_layout(rng, 60, 5 * ALIGN)
    payload = rng.randbytes(data_size)
    path = str(tmp_path / "x.bin")
    out = ShardFile(path, header, data_size)
    assert out.direct == (mode == "direct")
    order = list(layout)
    rng.shuffle(order)

    def work(part):
        for offset, size in part:
            if rng.random() < 0.5:
                out.write_tensor_bytes(
                    torch.frombuffer(bytearray(payload[offset : offset + size]), dtype=torch.uint8), offset
                )
            else:  # through a stream, in uneven chunks
                stream = out.stream([offset], size, 3 * ALIGN)
                done = 0
                while done < size:
                    step = min(size - done, 1 + rng.randrange(3 * ALIGN))
                    stream.write(payload[offset + done : offset + done + step])
                    done += step
                stream.close()

    threads = [threading.Thread(target=work, args=(order[k::3],)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.finish()
    assert open(path, "rb").read() == header + payload


def test_stream_with_copies_and_gaps(tmp_path, mode):
    """One stream written at two offsets of the same alignment; bytes nobody wrote stay zero."""
    rng = random.Random(7)
    header = b"h" * 24
    size = 3 * ALIGN + 123
    gap = 5 * ALIGN  # a whole multiple: the copy has the same alignment
    data_size = gap + size + 50
    payload = rng.randbytes(size)
    path = str(tmp_path / "y.bin")
    out = ShardFile(path, header, data_size)
    stream = out.stream([0], size, ALIGN)
    raw, view = stream.reserve(1000)
    view[:] = payload[:1000]
    assert stream.same_alignment(gap)
    stream.add_offset(gap)
    stream.commit()
    stream.write(payload[1000:])
    stream.close()
    out.finish()
    expected = bytearray(len(header) + data_size)
    expected[: len(header)] = header
    expected[len(header) : len(header) + size] = payload
    expected[len(header) + gap : len(header) + gap + size] = payload
    assert open(path, "rb").read() == bytes(expected)


def test_refused_direct_io_falls_back_to_buffered(tmp_path, monkeypatch):
    """A file system that opens O_DIRECT but refuses the writes (EINVAL) gets the same bytes, buffered."""
    direct_fds = set()
    real_open, real_pwrite = direct.open_direct, os.pwrite

    def fake_open(path):
        fd = real_open(path)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    def refusing_pwrite(fd, data, offset):
        if fd in direct_fds and offset > 2 * ALIGN:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(safetensors_writer, "open_direct", fake_open)
    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    rng = random.Random(3)
    layout, data_size = random_layout(rng, 40, 4 * ALIGN)
    payload = rng.randbytes(data_size)
    path = str(tmp_path / "z.bin")
    out = ShardFile(path, b"x" * 16, data_size)
    for offset, size in layout:
        out.write_tensor_bytes(torch.frombuffer(bytearray(payload[offset : offset + size]), dtype=torch.uint8), offset)
    if direct_fds:  # O_DIRECT was offered here: it was given up once refused
        assert not out.direct
    out.finish()
    assert open(path, "rb").read() == b"x" * 16 + payload


def digest_folder(folder):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
    }


@pytest.mark.parametrize(
    "options", [UpOptions(2, 2), UpOptions(3, 2, snr_db=20.0, seed=1), UpOptions(2, 3, max_shard_size=30_000)]
)
def test_up_same_bytes_direct_or_buffered(tmp_path, monkeypatch, options):
    source = build_checkpoint(tmp_path / "src", "llama", tie_word_embeddings=False)
    monkeypatch.setattr(execute, "CHUNK_BYTES", 4096)  # many chunks, carried block ends, shared tiles
    run_up(source, str(tmp_path / "direct"), options, show_progress=False)
    run_up(source, str(tmp_path / "hashed"), options, show_progress=False, verify_files=True)  # no sharing
    monkeypatch.setattr(direct, "ENABLED", False)
    run_up(source, str(tmp_path / "buffered"), options, show_progress=False)
    assert (
        digest_folder(tmp_path / "direct") == digest_folder(tmp_path / "buffered") == digest_folder(tmp_path / "hashed")
    )


def test_typed_view_refuses_misaligned_bytes():
    raw = torch.zeros(64, dtype=torch.uint8)
    assert safetensors_writer.typed_view(raw[2:34], torch.float32, (8,)) is None
    assert safetensors_writer.typed_view(raw[4:36], torch.float32, (8,)).shape == (8,)
