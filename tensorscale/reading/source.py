"""Open a model: a local folder, a GGUF file or a Hugging Face hub id, as config plus the tensor table.

This module only chooses: a folder is read by model_source.py, a GGUF file by gguf_source.py, a hub id by
hub.py, and each of those builds on model_source.py alone (so none of them imports this one back). The
names callers use from model_source.py are available here too, so that `reading.source` stays the one
place to open a model from.
"""

from __future__ import annotations

import os

from ..errors import TensorscaleError
from .gguf_source import open_gguf
from .hub import open_hub
from .model_source import (
    HUB_PATTERNS,
    INDEX_NAME,
    PACKAGE_PREFIX,
    PICKLE_SUFFIXES,
    ModelSource,
    local_path,
    looks_like_hub_id,
    open_local,
    read_config,
    read_index,
    shard_paths,
    split_revision,
    with_revision,
)

__all__ = [
    "HUB_PATTERNS",
    "INDEX_NAME",
    "PACKAGE_PREFIX",
    "PICKLE_SUFFIXES",
    "ModelSource",
    "local_path",
    "looks_like_hub_id",
    "open_local",
    "open_source",
    "read_config",
    "read_index",
    "shard_paths",
    "split_revision",
    "with_revision",
]


def open_source(source: str, *, headers_only: bool = False) -> ModelSource:
    """Open a local folder or GGUF file, or fetch a hub repo (only config/headers when ``headers_only``)."""
    label = source
    source = local_path(source)
    if os.path.isdir(source):
        return open_local(source)
    if os.path.isfile(source) and source.lower().endswith(".gguf"):
        return open_gguf(source, headers_only=headers_only, label=label)
    if os.path.exists(source):
        raise TensorscaleError(f"{source} is a file; pass the model folder that holds config.json, or a .gguf file")
    if looks_like_hub_id(source):
        return open_hub(source, headers_only=headers_only)
    raise TensorscaleError(f"no model folder at {source}; pass a local folder or a hub id like org/name")
