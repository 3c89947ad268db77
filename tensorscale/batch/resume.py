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
from ..writing.replace_guard import is_model_file


@dataclass
class Verdict:
    matches: bool
    ours: bool  # it has a tensorscale manifest: a previous output of some job, safe to replace
    reason: str  # why it does not match (empty when it does)


def compared_files(folder: str, listed=None) -> list[str]:
    """The files a manifest lists (as build_manifest lists them). With `listed` (the manifest's names),
    files the user added that are no model files are left out: they do not make a finished output
    unfinished, and a skip keeps them."""
    names = manifest_files(folder)
    if listed is not None:
        names = [name for name in names if name in listed or is_model_file(name)]
    return names


def output_hashes(folder: str, listed=None) -> dict[str, str]:
    """compared_files with their sha256."""
    return {name: file_sha256(os.path.join(folder, name)) for name in compared_files(folder, listed)}


def _read_manifest(output: str):
    with open(os.path.join(output, MANIFEST_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def records_job(job, output: str) -> bool:
    """The output's manifest was written by tensorscale for this very job (its command line)."""
    try:
        recorded = _read_manifest(output)
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("tool") == "tensorscale"
        and recorded.get("command") == job.command_line()
    )


def check_existing(job, source, output: str) -> Verdict:
    if not os.path.isdir(output):
        return Verdict(False, False, "is not a folder")
    try:
        recorded = _read_manifest(output)
    except FileNotFoundError:
        return Verdict(False, False, "has no tensorscale manifest")
    except RecursionError:
        return Verdict(False, False, "has a manifest nested too deeply to read")
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
        files = (recorded.get("output") or {}).get("files") or {}
        if not isinstance(files, dict):
            return Verdict(False, True, "has a manifest whose file list is not a mapping")
        current = output_hashes(output, set(files))
    else:
        files = stats.get("output") or {}
        if not isinstance(files, dict):
            return Verdict(False, True, "has a manifest whose file list is not a mapping")
        current = {name: file_stat(os.path.join(output, name)) for name in compared_files(output, set(files))}
    if files != current:
        changed = sorted(set(files) ^ set(current)) or sorted(name for name in files if files[name] != current[name])
        return Verdict(False, True, f"output file {changed[0]} differs from the manifest")
    return Verdict(True, True, "")
