"""Read and validate a GGUF file's header (metadata and tensor table) without touching tensor data.

The format (llama.cpp's docs/gguf.md): magic ``GGUF``, version, tensor and key counts, typed key/value
metadata, then one record per tensor (name, dims innermost first, ggml type, offset into the aligned data
section). gguf-py's GGUFReader parses the same, but builds a numpy view per metadata item: on the real
SmolLM2 file (49 152 tokens, 48 900 merges) it takes 6 s of CPU, which would make `desc` slow. This reader
takes a fraction of a second and checks every count, length and offset against the file's size, so a
truncated file or a header that lies is a one-line error instead of a numpy exception. The sizes of the
ggml types come from gguf-py (`GGML_QUANT_SIZES`), the one table llama.cpp keeps.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass

from ..errors import TensorscaleError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# A GGUF split by llama.cpp's gguf-split: <name>-00001-of-00003.gguf
SPLIT_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
# No real header has strings or arrays this long; a larger count is a corrupt or hostile file.
MAX_STRING = 1 << 26
MAX_ARRAY = 1 << 28
MAX_DIMS = 8

# GGUF metadata value types: id -> (struct format, size); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]  # ggml order: innermost (contiguous) first
    ggml_type: int
    type_name: str
    start: int  # absolute offset in the file
    nbytes: int


@dataclass
class GgufHeader:
    path: str
    version: int
    metadata: dict  # key -> value (str, int, float, bool, or a list of them)
    value_types: dict  # key -> (type id, element type id or None): to write the metadata back unchanged
    tensors: list[GgufTensor]
    data_start: int
    alignment: int
    file_size: int
    mtime_ns: int = 0
    data_end: int = 0


class _Cursor:
    """Reads from the file with every length checked against what is left."""

    def __init__(self, handle, size: int, name: str):
        self.handle, self.size, self.name, self.pos = handle, size, name, 0
        self.last_element = None  # element type of the last array read (to write the metadata back alike)

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > self.size:
            raise TensorscaleError(
                f"{self.name}: the GGUF header ends early (reading {what} at byte {self.pos} of "
                f"{self.size}); the file is truncated or corrupt, re-download it"
            )
        data = self.handle.read(count)
        if len(data) != count:
            raise TensorscaleError(f"{self.name}: the file ended early while reading {what}; it is truncated")
        self.pos += count
        return data

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        if length > MAX_STRING:
            raise TensorscaleError(f"{self.name}: {what} claims {length} bytes; the GGUF header is corrupt")
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, what: str):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what)
        if kind == STRING:
            return self.string(what)
        self.last_element = None
        if kind == ARRAY:
            element = self.unpack("<I", what)
            count = self.unpack("<Q", what)
            if count > MAX_ARRAY:
                raise TensorscaleError(f"{self.name}: {what} claims {count} elements; the GGUF header is corrupt")
            self.last_element = element
            if element in _NUMPY:
                import numpy as np

                size = np.dtype(_NUMPY[element]).itemsize
                return np.frombuffer(self.take(count * size, what), dtype=_NUMPY[element]).tolist()
            if element == STRING:
                return [self.string(what) for _ in range(count)]
            raise TensorscaleError(
                f"{self.name}: {what} is an array of unknown type {element}; the GGUF header is corrupt"
            )
        raise TensorscaleError(f"{self.name}: {what} has unknown value type {kind}; the GGUF header is corrupt")


def ggml_type_table() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size in elements, bytes per block), from gguf-py."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {
        int(kind): (kind.name, *GGML_QUANT_SIZES[kind]) for kind in GGMLQuantizationType if kind in GGML_QUANT_SIZES
    }


def check_not_split(path: str, metadata: dict | None = None) -> None:
    """A split GGUF is refused whole: its parts are separate files with their own headers, and merging
    them is one llama.cpp command."""
    match = SPLIT_NAME.search(os.path.basename(path))
    count = (metadata or {}).get("split.count")
    if match or (isinstance(count, int) and count > 1):
        parts = int(match.group(2)) if match else count
        raise TensorscaleError(
            f"{os.path.basename(path)} is one part of a GGUF split into {parts} files; tensorscale reads single-file "
            f"GGUFs: merge the parts first (llama-gguf-split --merge {os.path.basename(path)} merged.gguf)"
        )


def read_gguf_header(path: str) -> GgufHeader:
    name = os.path.basename(path)
    check_not_split(path)
    try:
        with open(path, "rb") as handle:
            status = os.fstat(handle.fileno())
            cursor = _Cursor(handle, status.st_size, name)
            if cursor.take(4, "the magic number") != MAGIC:
                raise TensorscaleError(f"{name} is not a GGUF file (no GGUF magic number at its start)")
            version = cursor.unpack("<I", "the version")
            if version not in (2, 3):
                raise TensorscaleError(
                    f"{name}: GGUF version {version} is not supported (2 and 3 are; a huge number "
                    "means a big-endian file, which llama.cpp does not load either)"
                )
            tensor_count = cursor.unpack("<Q", "the tensor count")
            kv_count = cursor.unpack("<Q", "the metadata count")
            if tensor_count > 1 << 20 or kv_count > 1 << 20:
                raise TensorscaleError(
                    f"{name}: the header claims {tensor_count} tensors and {kv_count} metadata keys; it is corrupt"
                )
            metadata, value_types = {}, {}
            for _ in range(kv_count):
                key = cursor.string("a metadata key")
                kind = cursor.unpack("<I", f"the type of {key}")
                metadata[key] = cursor.value(kind, f"metadata {key!r}")
                value_types[key] = (kind, cursor.last_element)
            check_not_split(path, metadata)
            records = []
            for index in range(tensor_count):
                tensor_name = cursor.string(f"the name of tensor {index}")
                n_dims = cursor.unpack("<I", f"the rank of {tensor_name}")
                if n_dims > MAX_DIMS:
                    raise TensorscaleError(
                        f"{name}: tensor {tensor_name!r} claims {n_dims} dimensions; the header is corrupt"
                    )
                dims = tuple(cursor.unpack("<Q", f"the shape of {tensor_name}") for _ in range(n_dims))
                ggml_type = cursor.unpack("<I", f"the type of {tensor_name}")
                offset = cursor.unpack("<Q", f"the offset of {tensor_name}")
                records.append((tensor_name, dims, ggml_type, offset))
            header_end = cursor.pos
    except OSError as exc:
        raise TensorscaleError(f"cannot read {path}: {exc.strerror or exc}") from None
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise TensorscaleError(f"{name}: general.alignment {alignment!r} is not a power of two; the header is corrupt")
    data_start = -(-header_end // alignment) * alignment
    types = ggml_type_table()
    tensors, seen = [], set()
    for tensor_name, dims, ggml_type, offset in records:
        if tensor_name in seen:
            raise TensorscaleError(f"{name}: tensor {tensor_name!r} appears twice; the header is corrupt")
        seen.add(tensor_name)
        if ggml_type not in types:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} has unknown ggml type {ggml_type}; the file is "
                "corrupt or newer than the installed gguf package (pip install -U gguf)"
            )
        type_name, block, block_bytes = types[ggml_type]
        if dims and dims[0] % block:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} has rows of {dims[0]} values, not a whole number of "
                f"{type_name} blocks of {block}; the header is corrupt"
            )
        nbytes = math.prod(dims[1:]) * (dims[0] // block) * block_bytes if dims else block_bytes
        start = data_start + offset
        if offset % alignment:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} starts at offset {offset}, not aligned to {alignment}; "
                "the header is corrupt"
            )
        if start + nbytes > status.st_size:
            raise TensorscaleError(
                f"{name}: tensor {tensor_name!r} runs past the end of the {status.st_size}-byte file; "
                "the file is truncated, re-download it"
            )
        tensors.append(GgufTensor(tensor_name, dims, ggml_type, type_name, start, nbytes))
    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors)
    for (_, end, before), (begin, _, after) in zip(spans, spans[1:]):
        if begin < end:
            raise TensorscaleError(f"{name}: tensors {before!r} and {after!r} overlap; the header is corrupt")
    data_end = spans[-1][1] if spans else data_start
    return GgufHeader(
        path,
        version,
        metadata,
        value_types,
        tensors,
        data_start,
        alignment,
        status.st_size,
        status.st_mtime_ns,
        data_end,
    )


def is_gguf_path(text: str) -> bool:
    return text.lower().endswith(".gguf")
