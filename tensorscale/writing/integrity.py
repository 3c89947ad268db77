"""Integrity checks on what we wrote: every shard read back, optional per-tensor sha256, and a manifest.

Each output shard's header is parsed again from disk and compared with the plan (names, dtypes, shapes,
offsets, file size), so a short write or a filesystem problem cannot pass silently. With --verify-files,
the sha256 of each tensor's bytes as they were streamed is compared with the bytes read back from the file.
The manifest lets batch jobs recognise finished work: it names the source (with shard hashes), the command
and version, and the hashes of every output file.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from .. import __version__
from ..errors import TensorscaleError
from ..planning.plan import Plan, ShardPlan
from ..reading.cache_layout import snapshot_revision
from ..reading.safetensors_header import read_header

MANIFEST_NAME = "tensorscale-manifest.json"
_BLOCK = 8 * 2**20


def check_shard_file(path: str, shard: ShardPlan) -> None:
    header = read_header(path)  # raises on any structural problem
    expected = {t.name: (t.out_dtype, tuple(t.out_shape), t.nbytes) for t in shard.tensors}
    found = {name: (info.dtype, info.shape, info.nbytes) for name, info in header.tensors.items()}
    if found != expected:
        raise TensorscaleError(f"read-back of {os.path.basename(path)} does not match the plan; the write failed")


def _hash_range(fd: int, start: int, length: int) -> str:
    digest = hashlib.sha256()
    done = 0
    while done < length:
        chunk = os.pread(fd, min(_BLOCK, length - done), start + done)
        if not chunk:
            break
        digest.update(chunk)
        done += len(chunk)
    return digest.hexdigest()


def verify_tensor_hashes(path: str, streamed: dict[str, str]) -> None:
    """Compare the sha256 of each tensor's bytes on disk with the hash taken while streaming them out."""
    header = read_header(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in header.tensors.items():
            if _hash_range(fd, info.start, info.nbytes) != streamed.get(name):
                raise TensorscaleError(f"{os.path.basename(path)}: tensor {name} on disk differs from what was written")
    finally:
        os.close(fd)


def file_sha256(path: str) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _hash_range(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def build_manifest(plan: Plan, folder: str, command: list[str] | None) -> dict:
    source = plan.source
    revision = snapshot_revision(source.folder) if source.hub_id else None  # the snapshot folder's commit
    options = plan.options.recorded()  # the same keys for up and down
    return {
        "tool": "tensorscale",
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command if command is not None else sys.argv,
        "options": {
            **{
                key: options[key]
                for key in (
                    "embed_dim_multiplier",
                    "up_proj_multiplier",
                    "snr_db",
                    "seed",
                    "untie_embeddings",
                    "dtype",
                    "max_shard_size",
                )
            },
            "rules": plan.rules.name,
        },
        "source": {
            "input": source.label,
            # a GGUF's own path, not the cache folder that holds its config and tokenizer
            "path": os.path.abspath(source.shards[0] if getattr(source, "gguf", None) is not None else source.folder),
            "hub_id": source.hub_id,
            "revision": revision,
            "requested_revision": source.revision,  # as asked (org/name@rev, --revision); None: the default
            "shards": {os.path.basename(p): file_sha256(p) for p in source.shards},
        },
        "output": {"files": {name: file_sha256(os.path.join(folder, name)) for name in manifest_files(folder)}},
        # [size, mtime_ns] of every file hashed above, so that a batch rerun can tell a finished job from
        # a changed one without reading everything again (batch --verify-files re-hashes instead)
        "file_stats": {
            "source": {os.path.basename(p): file_stat(p) for p in source.shards},
            "output": {name: file_stat(os.path.join(folder, name)) for name in manifest_files(folder)},
        },
    }


def manifest_files(folder: str) -> list[str]:
    """The output files a manifest lists: every plain file but hidden ones and the manifest itself."""
    return [
        name
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".") and name != MANIFEST_NAME
    ]


def file_stat(path: str) -> list[int]:
    """[size, mtime_ns]: what a rewrite, a truncation or a re-download changes, read without the data."""
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]
