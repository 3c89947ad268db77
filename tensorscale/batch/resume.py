"""Is an existing output the finished result of this very job? Decides skip, redo or refuse on a rerun.

An output counts as done only if its manifest (written by every batch job) names the same options and the
same source shard hashes as the job now, and every output file still hashes to what the manifest recorded:
a folder whose input was re-downloaded, whose options were edited, or whose shards were touched is redone.
Everything is hashed again, so a rerun reads each finished output once; that is the price of never
skipping a wrong folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..writing.integrity import MANIFEST_NAME, build_manifest


@dataclass
class Verdict:
    matches: bool
    ours: bool  # it has a tensorscale manifest: a previous output of some job, safe to replace
    reason: str  # why it does not match (empty when it does)


def check_existing(plan, output: str) -> Verdict:
    path = os.path.join(output, MANIFEST_NAME)
    if not os.path.isdir(output):
        return Verdict(False, False, f"{output} exists and is not a folder")
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except FileNotFoundError:
        return Verdict(False, False, "it has no tensorscale manifest")
    except (OSError, ValueError) as exc:
        return Verdict(False, False, f"its manifest cannot be read ({exc})")
    if not isinstance(recorded, dict) or recorded.get("tool") != "tensorscale":
        return Verdict(False, False, "its manifest was not written by tensorscale")
    current = build_manifest(plan, output, command=[])  # hashes the source and the output as they are now
    if recorded.get("options") != current["options"]:
        return Verdict(False, True, "the job's options differ from the manifest's")
    if (recorded.get("source") or {}).get("shards") != current["source"]["shards"]:
        return Verdict(False, True, "the input's shards differ from the manifest's")
    files = (recorded.get("output") or {}).get("files")
    if files != current["output"]["files"]:
        changed = sorted(set(files or {}) ^ set(current["output"]["files"])) or sorted(
            name for name in files if files[name] != current["output"]["files"].get(name))
        return Verdict(False, True, f"output file {changed[0]} differs from the manifest")
    return Verdict(True, True, "")
