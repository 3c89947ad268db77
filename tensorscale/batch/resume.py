"""Is an existing output the finished result of this very job? Decides skip, redo or refuse on a rerun.

An output counts as done only if its manifest (written by every batch job) records the job's own command
line (every option that shapes the bytes, see Job.command_line), the same input shard hashes as the input
has now, and every output file still hashes to what the manifest recorded: a folder whose input was
re-downloaded, whose job was edited, or whose shards were touched is redone. The check needs no plan
(a `down` plan reads the whole model), but everything is hashed again: a rerun reads each finished output
and its input once, the price of never skipping a wrong folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..writing.integrity import MANIFEST_NAME, file_sha256
from ..writing.replace_guard import is_model_file


@dataclass
class Verdict:
    matches: bool
    ours: bool  # it has a tensorscale manifest: a previous output of some job, safe to replace
    reason: str  # why it does not match (empty when it does)


def output_hashes(folder: str, listed=None) -> dict[str, str]:
    """The files a manifest lists (as build_manifest lists them), with their sha256. With `listed` (the
    manifest's names), files the user added that are no model files are left out: they do not make a
    finished output unfinished, and a skip keeps them."""
    names = [name for name in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".") and name != MANIFEST_NAME]
    if listed is not None:
        names = [name for name in names if name in listed or is_model_file(name)]
    return {name: file_sha256(os.path.join(folder, name)) for name in names}


def _read_manifest(output: str):
    with open(os.path.join(output, MANIFEST_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def records_job(job, output: str) -> bool:
    """The output's manifest was written by tensorscale for this very job (its command line)."""
    try:
        recorded = _read_manifest(output)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(recorded, dict) and recorded.get("tool") == "tensorscale" and recorded.get("command") == job.command_line()


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
    shards = {os.path.basename(path): file_sha256(path) for path in source.shards}
    if (recorded.get("source") or {}).get("shards") != shards:
        return Verdict(False, True, "the input's shards differ from the manifest's")
    files = (recorded.get("output") or {}).get("files") or {}
    if not isinstance(files, dict):
        return Verdict(False, True, "has a manifest whose file list is not a mapping")
    current = output_hashes(output, set(files))
    if files != current:
        changed = sorted(set(files) ^ set(current)) or sorted(name for name in files if files[name] != current[name])
        return Verdict(False, True, f"output file {changed[0]} differs from the manifest")
    return Verdict(True, True, "")
