"""Hugging Face hub access: fetch only what a conversion needs, and headers alone for `desc`/`plan`.

huggingface_hub is imported here only, lazily, so local work never touches it. A snapshot that is already
in the local cache is used as-is when HF_HUB_OFFLINE=1, or when the hub cannot be reached; anything else
offline gets a one-line error. Whether the hub can be reached is asked once, with one short TCP connect
(`hub_reachable`), because huggingface_hub itself retries a dead network for many seconds before giving up.
"""

from __future__ import annotations

import json
import os
import socket
from urllib.parse import urlsplit

from ..errors import TensorscaleError
from .model_source import HUB_PATTERNS, ModelSource, open_local, split_revision
from .safetensors_header import DTYPE_SIZES, TensorInfo

PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _offline_by_setting() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_reachable() -> bool:
    """One TCP connect to the hub's host (HF_ENDPOINT), at most PROBE_SECONDS: False when no network leads there.

    Behind a proxy the host is reached through it, which a direct connect cannot tell: then the hub client
    is left to find out."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname
    if not host:
        return True
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return True
    except OSError:  # no DNS, refused, unreachable, timed out
        return False


def _explain(hub_id: str, exc: Exception) -> TensorscaleError:
    from huggingface_hub import errors

    if isinstance(exc, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return TensorscaleError(f"{hub_id}: no such model on the hub (or it is private: run `hf auth login`)")
    if isinstance(exc, errors.GatedRepoError):
        return TensorscaleError(f"{hub_id}: gated model; accept its licence on the hub and run `hf auth login`")
    if isinstance(exc, errors.LocalEntryNotFoundError) or _offline_by_setting():
        return _not_cached(hub_id)
    return TensorscaleError(
        f"{hub_id}: cannot fetch from the hub ({type(exc).__name__}: {exc}); check the network or pass a local folder"
    )


def _not_cached(hub_id: str) -> TensorscaleError:
    why = "HF_HUB_OFFLINE is set (offline)" if _offline_by_setting() else "the hub cannot be reached (offline)"
    return TensorscaleError(
        f"{hub_id}: not in the local cache and {why}; pass a local model folder instead, or go online"
    )


def open_hub(label: str, *, headers_only: bool = False) -> ModelSource:
    """Fetch a hub model (`org/name` or `org/name@revision`): the whole snapshot (weights, json, tokenizer,
    chat template, model card), or config plus remote headers. Offline, only the local cache is used."""
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a core dependency
        raise TensorscaleError("huggingface_hub is not installed; pip install huggingface_hub") from None
    hub_id, revision = split_revision(label)
    cached = _cached_snapshot(hub_id, revision)
    offline = _offline_by_setting() or not hub_reachable()
    if headers_only and cached:
        return open_local(cached, label=label, hub_id=hub_id, revision=revision)
    if offline:
        if cached is None:
            raise _not_cached(hub_id)
        return open_local(cached, label=label, hub_id=hub_id, revision=revision)
    if headers_only:
        return _open_remote_headers(label, hub_id, revision)
    try:
        folder = huggingface_hub.snapshot_download(hub_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # the hub client raises many types; each becomes one line
        raise _explain(hub_id, exc) from None
    return open_local(folder, label=label, hub_id=hub_id, revision=revision)


def _cached_snapshot(hub_id: str, revision: str | None) -> str | None:
    """A snapshot already in the local cache with its weights: headers can be read from disk, no network."""
    import huggingface_hub

    try:
        folder = huggingface_hub.snapshot_download(
            hub_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True
        )
    except Exception:
        return None
    has_weights = any(name.endswith(".safetensors") for name in os.listdir(folder))
    return folder if has_weights and os.path.isfile(os.path.join(folder, "config.json")) else None


def _open_remote_headers(label: str, hub_id: str, revision: str | None) -> ModelSource:
    import huggingface_hub

    try:
        config_path = huggingface_hub.hf_hub_download(hub_id, "config.json", revision=revision)
        metadata = huggingface_hub.get_safetensors_metadata(hub_id, revision=revision)
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
    return ModelSource(
        label,
        os.path.dirname(config_path),
        config,
        tensors,
        [f"hub://{hub_id}/{s}" for s in shards],
        {},
        hub_id,
        revision,
    )
