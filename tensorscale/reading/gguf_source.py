"""Open a GGUF file as a model the engine reads exactly like a safetensors checkpoint.

The engine sees Hugging Face names, shapes and dtypes: each GGUF tensor becomes a TensorInfo whose
`encoding` says how its stored bytes turn into rows (ShardReader dequantizes a row span at a time with
gguf-py's `gguf.quants.dequantize`, so memory stays flat). What is needed besides gguf-py's own tables
(the name map, the type sizes) is data in gguf_architectures.yaml: which GGUF architecture is which
Hugging Face model type, which metadata key is which config key, and which tensors llama.cpp's converter
permuted. Names are mapped back by reversing gguf-py's name map and keeping, of the Hugging Face names it
lists for a GGUF name, the one that the architecture's shipped rules know.

Dtypes: F32, F16 and BF16 tensors keep their type; block-quantized tensors are dequantized to float32,
the only type that holds them exactly (a Q8_0 value is an f16 scale times an int8: 18 significant bits,
more than bf16's 8 or f16's 11). `up --dtype bfloat16` narrows the output if wanted.

Config and tokenizer live in a side folder in the cache (config.json, generation_config.json, and with
transformers installed, the tokenizer converted by transformers' own GGUF tokenizer code), so that the
rest of tensorscale (side files, verify, gen) finds them where it finds a checkpoint's.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

from ..errors import TensorscaleError
from .gguf_header import GgufHeader, GgufTensor, is_gguf_path, read_gguf_header
from .safetensors_header import SafetensorsHeader, TensorInfo

RAW_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
# The block types that are read; others (IQ*, TQ*, Q2_K, ...) are refused by name. gguf-py dequantizes more,
# but these are the ones the exactness tests cover.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
MARKER = ".tensorscale-gguf.json"  # in the side folder: which GGUF it describes (a dot name: never copied)


@dataclass(frozen=True)
class GgufEncoding:
    """How a GGUF tensor's stored bytes become the engine's rows (axis 0 of the Hugging Face shape)."""

    type_name: str
    ggml_type: int
    row_bytes: int  # stored bytes per row; 0 for a 1-D tensor (decoded whole)
    head_rows: int = 0  # rows per head of a q/k tensor whose halves llama.cpp interleaved; 0: not permuted


@functools.lru_cache(maxsize=1)
def architecture_table() -> dict:
    import yaml

    path = os.path.join(os.path.dirname(__file__), "gguf_architectures.yaml")
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def architecture_entry(arch) -> dict:
    table = architecture_table()
    if arch not in table:
        raise TensorscaleError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(table)}); "
            "convert the Hugging Face checkpoint instead"
        )
    return table[arch]


def _float32(value):
    """A float32 metadata value as the decimal it was written from (9.999999747e-06 -> 1e-05)."""
    import numpy as np

    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def build_config(header: GgufHeader) -> dict:
    """config.json for the model the GGUF holds, from its metadata, checked against its tensor shapes."""
    name = os.path.basename(header.path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    entry = architecture_entry(arch)
    config = {"architectures": list(entry["architectures"]), "model_type": entry["model_type"]}
    config.update(entry.get("defaults") or {})
    for key, gguf_key in (entry.get("config") or {}).items():
        value = meta.get(f"{arch}.{gguf_key}")
        if value is not None:
            config[key] = _float32(value)
    if "head_dim" not in config and entry.get("rope_dimension_is_head_dim") and f"{arch}.rope.dimension_count" in meta:
        config["head_dim"] = meta[f"{arch}.rope.dimension_count"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise TensorscaleError(
                f"{name}: metadata {arch}.{entry['config'][key]} is missing or not a positive "
                "integer; the GGUF header is incomplete"
            )
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise TensorscaleError(f"{name}: rope scaling {scaling!r} is not supported for GGUF input yet")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    tensors = {t.name: t for t in header.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None or len(embedding.dims) != 2:
        raise TensorscaleError(f"{name} has no 2-D token_embd.weight; it is not a complete {arch} model")
    if embedding.dims[0] != config["hidden_size"]:
        raise TensorscaleError(
            f"{name}: metadata {arch}.embedding_length is {config['hidden_size']} but "
            f"token_embd.weight has rows of {embedding.dims[0]}; the header disagrees with the tensors"
        )
    config["vocab_size"] = embedding.dims[1]
    stated = meta.get(f"{arch}.vocab_size")
    if stated is not None and stated != embedding.dims[1]:
        raise TensorscaleError(
            f"{name}: metadata {arch}.vocab_size is {stated} but token_embd.weight has "
            f"{embedding.dims[1]} rows; the header disagrees with the tensors"
        )
    blocks = {int(parts[1]) for parts in (t.split(".") for t in tensors) if parts[0] == "blk" and parts[1].isdigit()}
    # blocks are distinct integers, so they are 0..n-1 exactly when there are n of them from 0 to n-1 (no
    # set(range(n)): a corrupt block_count of 2**40 would allocate it)
    count = config["num_hidden_layers"]
    if len(blocks) != count or (blocks and (min(blocks) != 0 or max(blocks) != count - 1)):
        held = f"blocks {min(blocks)}-{max(blocks)}" if blocks else "no blocks"
        raise TensorscaleError(
            f"{name}: metadata {arch}.block_count is {config['num_hidden_layers']} but the file holds "
            f"{held} ({len(blocks)}); the header disagrees with the tensors"
        )
    config["tie_word_embeddings"] = "output.weight" not in tensors
    for flag, tensor in (entry.get("from_tensors") or {}).items():
        config[flag] = f"blk.0.{tensor}" in tensors
    for key, gguf_key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if isinstance(value, int):
            config[key] = value
    config["dtype"] = (
        "float32"
        if any(t.type_name not in RAW_TYPES for t in header.tensors)
        else {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[embedding.type_name]
    )
    return config


def gguf_arch_enum(arch: str):
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise TensorscaleError(f"GGUF architecture {arch!r} is unknown to the installed gguf package (pip install -U gguf)")


def name_candidates(arch: str, blocks: int) -> dict[str, list[str]]:
    """GGUF base name (blk.3.attn_q) -> every Hugging Face base name gguf-py's name map sends there."""
    import gguf

    reverse: dict[str, list[str]] = {}
    for key, (_, gguf_name) in gguf.get_tensor_name_map(gguf_arch_enum(arch), blocks).mapping.items():
        if key != gguf_name:
            reverse.setdefault(gguf_name, []).append(key)
    return reverse


def hf_names(header: GgufHeader, config: dict, rules) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name the rules know."""
    name = os.path.basename(header.path)
    arch = header.metadata["general.architecture"]
    candidates = name_candidates(arch, config["num_hidden_layers"])
    known = [rule.regex for rule in rules.tensors]
    out = {}
    for tensor in header.tensors:
        base, dot, suffix = tensor.name.rpartition(".")
        if not dot or suffix not in ("weight", "bias"):
            base, suffix = tensor.name, ""
        matches = [f"{key}.{suffix}" if suffix else key for key in candidates.get(base, [])]
        fitting = [hf for hf in matches if any(regex.fullmatch(hf) for regex in known)]
        if not fitting:
            raise TensorscaleError(
                f"{name}: tensor {tensor.name!r} has no Hugging Face name that the {rules.name} rules "
                f"know (gguf-py maps it to {matches[:3] or 'nothing'}); this GGUF cannot be read"
            )
        out[tensor.name] = fitting[0]
    return out


def _permuted_heads(header: GgufHeader, config: dict, tensor: GgufTensor) -> int:
    """Rows per head if llama.cpp permuted this tensor's rows (architecture table), else 0."""
    entry = architecture_entry(header.metadata["general.architecture"])
    parts = tensor.name.split(".")
    if len(parts) < 3 or parts[0] != "blk":
        return 0
    count_key = (entry.get("permute") or {}).get(parts[2])
    if count_key is None:
        return 0
    rows = tensor.dims[-1]
    heads = config[count_key]
    if rows % heads or (rows // heads) % 2:
        raise TensorscaleError(
            f"{os.path.basename(header.path)}: {tensor.name} has {rows} rows, which {heads} heads "
            "of even size cannot split; the header disagrees with the tensors"
        )
    return rows // heads


def tensor_info(header: GgufHeader, config: dict, tensor: GgufTensor, hf_name: str) -> TensorInfo:
    from .gguf_header import ggml_type_table

    if tensor.type_name not in SUPPORTED_TYPES:
        raise TensorscaleError(
            f"{os.path.basename(header.path)}: tensor {tensor.name} is {tensor.type_name}, a type "
            f"tensorscale does not read (supported: {', '.join(SUPPORTED_TYPES)}); requantize it"
        )
    shape = tuple(reversed(tensor.dims))
    head_rows = _permuted_heads(header, config, tensor)
    end = tensor.start + tensor.nbytes
    if tensor.type_name in RAW_TYPES and not head_rows:
        return TensorInfo(hf_name, RAW_TYPES[tensor.type_name], shape, header.path, tensor.start, end)
    _, block, block_bytes = ggml_type_table()[tensor.ggml_type]
    row_bytes = math.prod(tensor.dims[:-1]) // block * block_bytes if len(shape) > 1 else 0
    dtype = RAW_TYPES.get(tensor.type_name, "F32")
    encoding = GgufEncoding(tensor.type_name, tensor.ggml_type, row_bytes, head_rows)
    return TensorInfo(hf_name, dtype, shape, header.path, tensor.start, end, encoding)


def cache_root() -> str:
    root = os.environ.get("TENSORSCALE_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "tensorscale")
    return root


def cache_folder(header: GgufHeader) -> str:
    """The side folder of this GGUF (config, tokenizer), named like the file so that messages read well;
    beside it `<name>-imported` once imported. Keyed by the file's path, size and mtime: a changed file
    gets a fresh folder."""
    real = os.path.realpath(header.path)
    key = hashlib.sha256(f"{real}\0{header.file_size}\0{header.mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.basename(real)[: -len(".gguf")]
    return os.path.join(cache_root(), "gguf", key, stem)


def open_gguf(path: str, *, headers_only: bool = False, label: str | None = None):
    """A ModelSource for a GGUF file. Unless `headers_only`, the side folder (config, tokenizer) is written."""
    from ..rulebook.registry import resolve_rules
    from .model_source import ModelSource

    header = read_gguf_header(path)
    config = build_config(header)
    rules = resolve_rules(config, None)
    names = hf_names(header, config, rules)
    tensors = {}
    for tensor in sorted(header.tensors, key=lambda t: t.start):
        info = tensor_info(header, config, tensor, names[tensor.name])
        if info.name in tensors:
            raise TensorscaleError(
                f"{os.path.basename(path)}: two tensors map to {info.name}; this GGUF cannot be read"
            )
        tensors[info.name] = info
    folder = cache_folder(header)
    if not headers_only:
        write_side_folder(header, config, folder)
    stand_in = SafetensorsHeader(path, {}, {}, header.data_start, header.file_size, header.mtime_ns)
    source = ModelSource(label or path, folder, config, tensors, [path], {path: stand_in})
    source.gguf = header
    return source


def generation_config(config: dict) -> dict:
    out = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config}
    return out


def write_side_folder(header: GgufHeader, config: dict, folder: str) -> None:
    """config.json, generation_config.json and the tokenizer files, written once per GGUF file (again if the
    tokenizer could not be converted before for want of transformers, and transformers is there now)."""
    marker = _read_marker(folder)
    if marker is not None and not (
        str(marker.get("tokenizer", "")).startswith(NO_TRANSFORMERS) and _has_transformers()
    ):
        return
    tmp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        for filename, data in (("config.json", config), ("generation_config.json", generation_config(config))):
            with open(os.path.join(tmp, filename), "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True)
                handle.write("\n")
        tokenizer = write_tokenizer(header, tmp)
        if tokenizer.startswith("not converted"):
            sys.stderr.write(
                f"tensorscale: note: {os.path.basename(header.path)}: tokenizer {tokenizer}; "
                "outputs will lack tokenizer files\n"
            )
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "gguf": os.path.realpath(header.path),
                    "size": header.file_size,
                    "mtime_ns": header.mtime_ns,
                    "tokenizer": tokenizer,
                },
                handle,
                indent=2,
            )
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TensorscaleError(
            f"cannot write the GGUF side folder {folder}: {exc.strerror or exc} "
            "(set TENSORSCALE_CACHE to a writable folder)"
        ) from None


def write_tokenizer(header: GgufHeader, folder: str) -> str:
    """The tokenizer and chat template as Hugging Face files, converted by transformers' GGUF tokenizer code.

    Without transformers there is no converter: the folder then has no tokenizer files, which `gen` and
    `verify` report, and `up`/`down` outputs lack them. Returns what happened, for the marker file."""
    if "tokenizer.ggml.tokens" not in header.metadata:
        return "the GGUF has no tokenizer"
    if not _has_transformers():
        return NO_TRANSFORMERS + " (pip install 'tensorscale[transformers]')"
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(header.path)), gguf_file=os.path.basename(header.path)
        )
    except Exception as exc:  # noqa: BLE001  (any failure of the converter: the weights are still usable)
        return f"not converted: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    tokenizer.save_pretrained(folder)
    return "converted by transformers"


NO_TRANSFORMERS = "not converted: transformers is not installed"


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def side_folder_gguf(folder: str) -> str | None:
    """The GGUF a side folder describes, or None for any other folder."""
    marker = _read_marker(folder)
    return marker.get("gguf") if marker else None


def read_rows(pread, info: TensorInfo, start: int, stop: int):
    """Rows [start, stop) of a GGUF tensor in the engine's dtype: the stored rows that hold them are read
    (whole heads for a permuted tensor), dequantized by gguf-py, and put back in Hugging Face order."""
    import numpy as np
    import torch

    encoding: GgufEncoding = info.encoding
    shape = info.shape
    rest = tuple(shape[1:])
    if 0 in shape:  # an empty tensor (a dimension of 0): nothing to read, and gguf-py cannot decode nothing
        dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(encoding.type_name, torch.float32)
        return torch.empty((stop - start, *rest), dtype=dtype)
    if encoding.row_bytes == 0:  # 1-D: decoded whole
        first, last = 0, shape[0]
        raw = pread(info.start, info.nbytes)
    else:
        unit = encoding.head_rows or 1
        first, last = start // unit * unit, -(-stop // unit) * unit
        raw = pread(info.start + first * encoding.row_bytes, (last - first) * encoding.row_bytes)
    count = last - first
    if encoding.type_name in RAW_TYPES:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[encoding.type_name]
        x = torch.frombuffer(raw, dtype=dtype).reshape(count, *rest) if count else torch.empty((0, *rest), dtype=dtype)
    else:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        packed = np.frombuffer(raw, dtype=np.uint8)
        values = dequantize(
            packed.reshape(-1, encoding.row_bytes) if encoding.row_bytes else packed,
            GGMLQuantizationType(encoding.ggml_type),
        )
        x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(count, *rest)
    if encoding.head_rows:
        half = encoding.head_rows // 2
        x = x.reshape(-1, half, 2, *rest).transpose(1, 2).reshape(count, *rest)
    return x[start - first : stop - first]


def is_gguf(text: str) -> bool:
    return is_gguf_path(text) and os.path.isfile(text)
