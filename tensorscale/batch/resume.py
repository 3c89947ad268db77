"""Is an existing output the finished result of this very job? Decides skip, redo or refuse on a rerun.

An output counts as done only if its manifest (written by every batch job) records the job's own command
line (every option that shapes the bytes, see Job.command_line), the same input shards as the input has
now, and the same output files. The check needs no plan (a `down` plan reads the whole model).

By default files are compared by size and mtime against the manifest's `file_stats`, so a rerun of a
finished zoo reads no tensor data: a re-downloaded input, a rewritten or truncated shard, a deleted or
added file all change them. With `verify_files` (the job option, or `batch --verify-files`) every input
and output file is hashed again and compared with the recorded sha256, which also catches a change that
kept size and mtime. Manifests written before `file_stats` existed get the full check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..writing.integrity import MANIFEST_NAME, file_sha256, file_stat, manifest_files


@dataclass
class Verdict:
    matches: bool
    ours: bool  # it has a tensorscale manifest: a previous output of some job, safe to replace
    reason: str  # why it does not match (empty when it does)


def output_hashes(folder: str) -> dict[str, str]:
    """The files a manifest lists (as build_manifest lists them), with their sha256."""
    return {name: file_sha256(os.path.join(folder, name)) for name in manifest_files(folder)}


def check_existing(job, source, output: str) -> Verdict:
    if not os.path.isdir(output):
        return Verdict(False, False, "is not a folder")
    try:
        with open(os.path.join(output, MANIFEST_NAME), encoding="utf-8") as handle:
            recorded = json.load(handle)
    except FileNotFoundError:
        return Verdict(False, False, "has no tensorscale manifest")
    except (OSError, ValueError) as exc:
        return Verdict(False, False, f"has a manifest that cannot be read ({exc})")
    if not isinstance(recorded, dict) or recorded.get("tool") != "tensorscale":
        return Verdict(False, False, "has a manifest not written by tensorscale")
    if recorded.get("command") != job.command_line():
        return Verdict(False, True, "the job's options differ from the manifest's")
    stats = recorded.get("file_stats")
    full = job.verify_files or not isinstance(stats, dict)
    if full:
        shards = {os.path.basename(path): file_sha256(path) for path in source.shards}
        recorded_shards = (recorded.get("source") or {}).get("shards")
    else:
        shards = {os.path.basename(path): file_stat(path) for path in source.shards}
        recorded_shards = stats.get("source")
    if recorded_shards != shards:
        return Verdict(False, True, "the input's shards differ from the manifest's")
    if full:
        files, current = (recorded.get("output") or {}).get("files") or {}, output_hashes(output)
    else:
        files = stats.get("output") or {}
        current = {name: file_stat(os.path.join(output, name)) for name in manifest_files(output)}
    if files != current:
        changed = sorted(set(files) ^ set(current)) or sorted(name for name in files if files[name] != current[name])
        return Verdict(False, True, f"output file {changed[0]} differs from the manifest")
    return Verdict(True, True, "")
