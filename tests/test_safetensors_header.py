"""The header reader accepts what safetensors writes and rejects corrupt files with one clear line."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tensorscale.errors import TensorscaleError
from tensorscale.reading.safetensors_header import read_header
from tensorscale.reading.tensor_reader import ShardReader
from tensorscale.writing.safetensors_writer import ShardFile, header_bytes


def write_raw(path, header: dict, data: bytes, pad=True):
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def test_reads_official_file(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    header = read_header(str(tmp_path / "x.safetensors"))
    assert header.tensors["a"].shape == (2, 3) and header.tensors["b"].dtype == "BF16"
    with ShardReader() as reader:
        assert torch.equal(reader.read(header.tensors["a"]), tensors["a"])
        assert torch.equal(reader.read_rows(header.tensors["a"], 1, 2), tensors["a"][1:2])
        assert torch.equal(reader.read(header.tensors["b"]), tensors["b"])


def test_our_writer_is_read_by_safetensors(tmp_path):
    from safetensors import safe_open

    a = torch.randn(3, 5)
    b = torch.randn(7).to(torch.bfloat16)
    entries = [("a", "F32", (3, 5), 0, 60), ("b", "BF16", (7,), 60, 74)]
    out = ShardFile(str(tmp_path / "w.safetensors"), header_bytes(entries), 74)
    out.write_tensor_bytes(b, 60)  # any order
    out.write_tensor_bytes(a, 0)
    out.finish()
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("a"), a)
        assert torch.equal(handle.get_tensor("b"), b)
        assert handle.metadata() == {"format": "pt"}


@pytest.mark.parametrize(
    "header,data,message",
    [
        ({"a": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "past the end"),
        (
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]},
            },
            b"\0" * 8,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 12, "after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_rejects_corrupt(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(TensorscaleError, match=message):
        read_header(path)


def test_rejects_bad_json_and_lengths(tmp_path):
    bad_json = tmp_path / "j.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 8) + b"{not js}")
    with pytest.raises(TensorscaleError, match="not valid JSON"):
        read_header(str(bad_json))
    long_header = tmp_path / "l.safetensors"
    long_header.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(TensorscaleError, match="past the end"):
        read_header(str(long_header))
    short = tmp_path / "s.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(TensorscaleError, match="too short"):
        read_header(str(short))
