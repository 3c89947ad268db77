"""Hugging Face hub access: fetch only what a conversion needs, and headers alone for `desc`/`plan`.

huggingface_hub is imported here only, lazily, so local work never touches it. A snapshot that is already
in the local cache is used as-is when HF_HUB_OFFLINE=1; anything else offline gets a one-line error.
"""

from __future__ import annotations

import json
import os

from ..errors import TensorscaleError
from .safetensors_header import TensorInfo, DTYPE_SIZES
from .source import HUB_PATTERNS, ModelSource, open_local


def _explain(hub_id: str, exc: Exception) -> TensorscaleError:
    from huggingface_hub import errors

    if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return TensorscaleError(f"{hub_id}: no such model on the hub (or it is private: run `hf auth login`)")
    if isinstance(exc, errors.GatedRepoError):
        return TensorscaleError(f"{hub_id}: gated model; accept its licence on the hub and run `hf auth login`")
    if isinstance(exc, errors.LocalEntryNotFoundError) or os.environ.get("HF_HUB_OFFLINE") == "1":
        return TensorscaleError(
            f"{hub_id}: not in the local cache and the hub cannot be reached (offline); "
            "pass a local model folder instead, or go online"
        )
    return TensorscaleError(f"{hub_id}: cannot fetch from the hub ({type(exc).__name__}: {exc}); check the network or pass a local folder")


def open_hub(hub_id: str, *, headers_only: bool = False) -> ModelSource:
    """Fetch a hub model: the whole snapshot (weights, json, tokenizer), or config plus remote headers."""
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a core dependency
        raise TensorscaleError("huggingface_hub is not installed; pip install huggingface_hub") from None
    if headers_only:
        cached = _cached_snapshot(hub_id)
        return open_local(cached, label=hub_id, hub_id=hub_id) if cached else _open_remote_headers(hub_id)
    try:
        folder = huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # the hub client raises many types; each becomes one line
        raise _explain(hub_id, exc) from None
    return open_local(folder, label=hub_id, hub_id=hub_id)


def _cached_snapshot(hub_id: str) -> str | None:
    """A snapshot already in the local cache with its weights: headers can be read from disk, no network."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(hub_id, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:
        return None
    has_weights = any(name.endswith(".safetensors") for name in os.listdir(folder))
    return folder if has_weights and os.path.isfile(os.path.join(folder, "config.json")) else None


def _open_remote_headers(hub_id: str) -> ModelSource:
    import huggingface_hub

    try:
        config_path = huggingface_hub.hf_hub_download(hub_id, "config.json")
        metadata = huggingface_hub.get_safetensors_metadata(hub_id)
    except Exception as exc:
        raise _explain(hub_id, exc) from None
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    tensors: dict[str, TensorInfo] = {}
    shards = sorted(metadata.files_metadata)
    for shard in shards:
        file_meta = metadata.files_metadata[shard]
        for name, info in sorted(file_meta.tensors.items(), key=lambda item: item[1].data_offsets[0]):
            if info.dtype not in DTYPE_SIZES:
                raise TensorscaleError(f"{hub_id}/{shard}: tensor {name!r} has unknown dtype {info.dtype!r}")
            begin, end = info.data_offsets
            # Remote tensors have no local file: the path names the shard, offsets stay relative.
            tensors[name] = TensorInfo(name, info.dtype, tuple(info.shape), f"hub://{hub_id}/{shard}", begin, end)
    return ModelSource(hub_id, os.path.dirname(config_path), config, tensors, [f"hub://{hub_id}/{s}" for s in shards], {}, hub_id)
