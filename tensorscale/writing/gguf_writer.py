"""Write a Hugging Face safetensors checkpoint as one GGUF file that llama.cpp loads.

Header first, then the tensors a row span at a time, as the safetensors writer streams: every tensor's
name, type and shape is known from the checkpoint's headers, so gguf-py's GGUFWriter writes the metadata
and the tensor table before any data, and each tensor's rows are then read, permuted, converted and
appended (`gguf.quants.quantize` for bf16 and q8_0). The layout is llama.cpp's: names from gguf-py's
tensor name map, q/k rows permuted back as convert_hf_to_gguf.py does (gguf_architectures.yaml says
which), 1-D tensors in F32, metadata rewritten for the new sizes. When the model came from a GGUF, every
other key of its metadata (tokenizer, chat template, general.*) is carried over unchanged.
"""

from __future__ import annotations

import math
import os

from .. import interrupts
from ..errors import TensorscaleError
from ..reading.gguf_source import architecture_table, gguf_arch_enum

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CHUNK_BYTES = 16 << 20  # float32 working set of one span of rows
# Keys that describe the file, not the model: never copied from the source GGUF.
_FILE_KEYS = (
    "GGUF.",
    "split.",
    "general.architecture",
    "general.file_type",
    "general.alignment",
    "general.quantization_version",
)


def _types():
    import gguf

    ggml = gguf.GGMLQuantizationType
    quant = {"f32": ggml.F32, "f16": ggml.F16, "bf16": ggml.BF16, "q8_0": ggml.Q8_0}
    files = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    return quant, files


def gguf_architecture(config: dict) -> tuple[str, dict]:
    """The GGUF architecture name and table entry for a config's model_type."""
    model_type = config.get("model_type")
    for arch, entry in architecture_table().items():
        if entry["model_type"] == model_type:
            return arch, entry
    known = sorted({entry["model_type"] for entry in architecture_table().values()})
    raise TensorscaleError(
        f"--format gguf does not write {model_type!r} models yet (it writes {', '.join(known)}); "
        "write safetensors and convert with llama.cpp's convert_hf_to_gguf.py"
    )


def model_metadata(config: dict, arch: str, entry: dict, source_header=None) -> dict:
    """GGUF key -> (value, value type) for the model's sizes, from the new config. head_dim is written as
    attention.key_length/value_length (where the source had them, or always without a source GGUF, as
    convert_hf_to_gguf.py does), and as rope.dimension_count where the table says rope spans the head."""
    import gguf

    kinds = source_header.value_types if source_header is not None else {}
    values = dict(config)
    values["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    out = {}

    def put(key, value):
        default = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
        out[f"{arch}.{key}"] = (value, kinds.get(f"{arch}.{key}", (default, None))[0])

    for hf_key, gguf_key in (entry.get("config") or {}).items():
        if hf_key != "head_dim" and values.get(hf_key) is not None:
            put(gguf_key, values[hf_key])
    for key in ("attention.key_length", "attention.value_length"):
        if source_header is None or f"{arch}.{key}" in kinds:
            put(key, int(head_dim))
    if entry.get("rope_dimension_is_head_dim"):
        put("rope.dimension_count", int(head_dim))
    put("vocab_size", int(config["vocab_size"]))
    return out


class _TensorOut:
    """One output tensor: its GGUF name and type, and how its rows are produced."""

    def __init__(self, info, gguf_name: str, qtype, head_rows: int):
        self.info, self.name, self.qtype, self.head_rows = info, gguf_name, qtype, head_rows

    def byte_shape(self):
        from gguf.quants import quant_shape_to_byte_shape

        return quant_shape_to_byte_shape(self.info.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.byte_shape())

    def chunks(self, reader):
        """The tensor's stored bytes, a span of rows at a time (whole heads where rows are permuted)."""
        import numpy as np
        from gguf.quants import quantize

        shape = self.info.shape or (1,)
        rows = shape[0]
        row_numel = math.prod(shape[1:]) if len(shape) > 1 else 1
        if len(shape) == 1:
            span = rows
        else:
            span = max(1, CHUNK_BYTES // (4 * max(1, row_numel)))
            if self.head_rows:
                span = max(self.head_rows, span // self.head_rows * self.head_rows)
        for begin in range(0, rows, span):
            end = min(rows, begin + span)
            x = reader.read_rows(self.info, begin, end).float()
            if self.head_rows:
                rest = tuple(x.shape[1:])
                x = x.reshape(-1, 2, self.head_rows // 2, *rest).transpose(1, 2).reshape(end - begin, *rest)
            values = x.numpy()
            name = self.qtype.name
            if name == "F32":
                yield values.astype(np.float32, copy=False).tobytes()
            elif name == "F16":
                yield values.astype(np.float16).tobytes()
            else:
                yield quantize(values, self.qtype).tobytes()


def plan_tensors(source, arch: str, entry: dict, outtype: str) -> list[_TensorOut]:
    import gguf

    quant, _ = _types()
    config = source.config
    name_map = gguf.get_tensor_name_map(gguf_arch_enum(arch), config["num_hidden_layers"])
    permute = entry.get("permute") or {}
    out = []
    for name, info in source.tensors.items():
        base, _, suffix = name.rpartition(".")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise TensorscaleError(f"tensor {name} has no GGUF name in gguf-py's map for {arch}; cannot write GGUF")
        qtype = quant[outtype]
        if len(info.shape) <= 1:
            qtype = quant["f32"]  # llama.cpp keeps 1-D tensors (norms, biases) in F32
        elif qtype.name == "Q8_0" and info.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = quant["f16"]  # rows that are not whole Q8_0 blocks: F16, as llama.cpp falls back
        head_rows = 0
        kind = mapped.split(".")[2] if mapped.startswith("blk.") else None
        if kind in permute:
            heads = config[permute[kind]]
            head_rows = info.shape[0] // heads
        out.append(_TensorOut(info, f"{mapped}.{suffix}", qtype, head_rows))
    return out


def write_gguf(
    folder: str, path: str, outtype: str, source_header=None, progress=None, name: str | None = None
) -> None:
    """Write the safetensors checkpoint in `folder` as the GGUF file `path` (header first, then the data).

    `name` is `general.name` when the source had no GGUF header to copy it from (default: the folder's
    name; pass the final file's stem when `folder` is a temporary one)."""
    import gguf
    import numpy as np

    from ..reading.source import open_local
    from ..reading.tensor_reader import ShardReader

    if outtype not in OUTTYPES:
        raise TensorscaleError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    source = open_local(folder)
    config = source.config
    arch, entry = gguf_architecture(config)
    tensors = plan_tensors(source, arch, entry, outtype)
    _, files = _types()
    writer = gguf.GGUFWriter(path, arch)
    model_keys = model_metadata(config, arch, entry, source_header)
    if source_header is not None:
        for key, value in source_header.metadata.items():
            if key.startswith(_FILE_KEYS) or key in model_keys:
                continue
            kind, element = source_header.value_types[key]
            writer.add_key_value(
                key, value, gguf.GGUFValueType(kind), gguf.GGUFValueType(element) if element is not None else None
            )
    else:
        writer.add_name(name or os.path.basename(os.path.normpath(folder)))
    for key, (value, kind) in model_keys.items():
        writer.add_key_value(key, value, gguf.GGUFValueType(kind))
    writer.add_file_type(int(files[outtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for tensor in tensors:
        # uint8 with the byte shape: GGUFWriter derives the element shape from it, for every type alike
        writer.add_tensor_info(
            tensor.name, tensor.byte_shape(), np.dtype(np.uint8), tensor.nbytes, raw_dtype=tensor.qtype
        )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        handle = writer.fout[0]
        writer.write_padding(handle, handle.tell())
        with ShardReader() as reader:
            for tensor in tensors:
                interrupts.check()  # a safe point (interrupts.py)
                written = 0
                for chunk in tensor.chunks(reader):
                    handle.write(chunk)
                    written += len(chunk)
                if written != tensor.nbytes:
                    raise TensorscaleError(
                        f"internal error: {tensor.name} came to {written} bytes, not {tensor.nbytes}"
                    )
                writer.write_padding(handle, written)
                if progress:
                    progress(written)
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as exc:
        raise TensorscaleError(f"cannot write {path}: {exc.strerror or exc} (is the disk full?)") from None
    finally:
        writer.close()
