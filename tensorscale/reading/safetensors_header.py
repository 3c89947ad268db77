"""Read and validate safetensors headers without touching tensor data.

Planning needs every tensor's name, dtype, shape and byte range, and nothing else, so `desc` and `plan` are
instant at any model size. We parse the header ourselves (8-byte little-endian length, then JSON) and check
it strictly, because a corrupt or hostile file must give a clear error, never garbage output.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import TensorscaleError

# Bytes per element for every dtype the safetensors format defines.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# A header larger than this is not a model header (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape, and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str
    start: int  # absolute offset of the first byte in the file
    end: int
    # None: the bytes are `dtype` values, row-major. Otherwise how stored bytes become rows (a GGUF
    # tensor: block-quantized or row-permuted; see gguf_source.GgufEncoding).
    encoding: object = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    file_size: int
    mtime_ns: int = 0  # to notice a shard that changes while we read it


def read_header(path: str) -> SafetensorsHeader:
    """Parse and validate one safetensors file's header; raises TensorscaleError on any inconsistency."""
    name = os.path.basename(path)
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            file_size = status.st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise TensorscaleError(
                    f"{name}: file is too short to be safetensors ({file_size} bytes); re-download or re-convert it"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise TensorscaleError(
                    f"{name}: header length {header_len} runs past the end of the {file_size}-byte file; "
                    "the file is truncated or not safetensors"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise TensorscaleError(f"cannot read {path}: {exc.strerror or exc}") from None
    header = parse_header_bytes(raw, path=path, file_size=file_size)
    header.mtime_ns = status.st_mtime_ns
    return header


def parse_header_bytes(raw: bytes, path: str, file_size: int) -> SafetensorsHeader:
    """Validate the JSON header of a safetensors file whose total size is ``file_size``."""
    name = os.path.basename(path)
    data_start = 8 + len(raw)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorscaleError(f"{name}: header is not valid JSON ({exc}); the file is corrupt") from None
    except RecursionError:
        raise TensorscaleError(
            f"{name}: header is nested too deeply to be a safetensors header; the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise TensorscaleError(f"{name}: header is not a JSON object; the file is corrupt")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # [] or "" are no mapping: refused below, not taken as empty
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TensorscaleError(f"{name}: __metadata__ must map names to strings")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for tensor_name, entry in header.items():
        if not isinstance(entry, dict):
            raise TensorscaleError(f"{name}: entry for {tensor_name!r} is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise TensorscaleError(f"{name}: tensor {tensor_name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise TensorscaleError(f"{name}: tensor {tensor_name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise TensorscaleError(f"{name}: tensor {tensor_name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} has shape {shape} ({expected} bytes of {dtype}) "
                f"but its offsets span {offsets[1] - offsets[0]} bytes; the file is corrupt"
            )
        if data_start + offsets[1] > file_size:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} runs past the end of the file; the file is truncated"
            )
        spans.append((offsets[0], offsets[1], tensor_name))
        tensors[tensor_name] = TensorInfo(
            tensor_name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1]
        )
    spans.sort()
    cursor = 0
    for begin, end, tensor_name in spans:
        if begin < cursor:
            raise TensorscaleError(f"{name}: tensor {tensor_name!r} overlaps the tensor before it; the file is corrupt")
        if begin > cursor:
            raise TensorscaleError(
                f"{name}: gap of {begin - cursor} bytes before tensor {tensor_name!r}; the file is corrupt"
            )
        cursor = end
    if data_start + cursor != file_size:
        raise TensorscaleError(
            f"{name}: {file_size - data_start - cursor} bytes after the last tensor; the file is corrupt or truncated"
        )
    return SafetensorsHeader(path, tensors, metadata, data_start, file_size)
