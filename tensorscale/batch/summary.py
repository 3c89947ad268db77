"""The JSON summary written when a batch ends: what each job did, how long it took, why it failed.

It is the record a rerun or a script reads, so it is written atomically (a temporary file renamed over
the old one) and lists every job, including skipped ones, in jobs-file order.
"""

from __future__ import annotations

import json
import os
import time

from ..errors import TensorscaleError


def default_summary_path(jobs_path: str) -> str:
    """jobs.yaml -> jobs.summary.json, beside the jobs file."""
    stem, _ = os.path.splitext(os.path.abspath(jobs_path))
    return stem + ".summary.json"


def build_summary(jobs_path: str, executor, entries: list[dict], seconds: float) -> dict:
    counts = {status: sum(1 for e in entries if e["status"] == status) for status in ("done", "skipped", "failed")}
    peaks: dict[str, float] = {}
    for entry in entries:
        for worker, mib in entry.pop("_workers", {}).items():
            peaks[worker] = max(peaks.get(worker, 0.0), mib)
    return {
        "jobs_file": os.path.abspath(jobs_path),
        "executor": executor.name,
        "workers": executor.workers,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 3),
        "counts": counts,
        "worker_peak_rss_mib": peaks,
        "jobs": entries,
    }


def write_summary(path: str, summary: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise TensorscaleError(
            f"cannot write the summary {path}: {exc.strerror}; pass --summary FILE elsewhere"
        ) from None
