"""What a worker runs for one output shard: rebuild the plan from simple arguments, write the shard.

Workers get strings, ints and a dict of options, never a Plan: planning from the input's headers is cheap
and deterministic, so a worker on another machine rebuilds exactly the driver's plan, and nothing but our
own plain data crosses process boundaries. A fingerprint of the shard's layout, computed by the driver,
proves the rebuilt plan is the same one (an input rewritten in between would fail here, not write junk).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
from dataclasses import asdict, replace

from ..errors import TensorscaleError

_PLAN_CACHE: dict[str, object] = {}  # one plan per worker process per job: shards of a job share it
_PLAN_CACHE_SIZE = 4


def job_spec(plan, rules_path: str | None) -> dict:
    """The picklable description of a job a worker needs: local input (folder, or a GGUF file), options, rules
    file, and the shards' provenance metadata (string values, decided by the driver's execute_plan)."""
    local = plan.source.shards[0] if getattr(plan.source, "gguf", None) is not None else plan.source.folder
    return {
        "input": os.path.abspath(local),
        "options": asdict(plan.options),
        "rules": rules_path,
        "metadata": dict(plan.metadata) if plan.metadata else None,
    }


def shard_fingerprint(plan, index: int) -> str:
    shard = plan.shards[index]
    layout = [shard.filename, len(plan.shards)]
    layout += [
        [t.name, t.out_dtype, list(t.out_shape), t.offset, t.source.dtype, list(t.source.shape), t.source.start]
        for t in shard.tensors
    ]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def _plan_for(spec: dict):
    from ..convert import plan_conversion
    from ..planning.plan import UpOptions

    key = json.dumps(spec, sort_keys=True)
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        if len(_PLAN_CACHE) >= _PLAN_CACHE_SIZE:
            _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
        plan = plan_conversion(spec["input"], UpOptions(**spec["options"]), spec["rules"])
        plan = _PLAN_CACHE[key] = replace(plan, metadata=spec.get("metadata"))
    return plan


def produce_shard_task(spec: dict, index: int, path: str, fingerprint: str, verify_files: bool) -> dict:
    """Write shard `index` of the job described by `spec` at `path`; return this worker's pid and peak RSS."""
    from ..rewrite import produce_shard

    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise TensorscaleError(
            f"the job's temporary folder {folder} is not visible on {socket.gethostname()}; "
            "inputs and outputs must be on storage that every worker mounts at the same path"
        )
    try:
        plan = _plan_for(spec)
    except TensorscaleError as exc:
        raise TensorscaleError(f"{exc} (on worker {socket.gethostname()})") from None
    if index >= len(plan.shards) or shard_fingerprint(plan, index) != fingerprint:
        _PLAN_CACHE.clear()
        raise TensorscaleError(f"the input {spec['input']} changed since the job was planned; run the batch again")
    nonfinite = produce_shard(plan, plan.shards[index], path, verify_files=verify_files)
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "nonfinite": nonfinite,
    }


def init_worker(threads: int) -> None:
    """Pool worker start-up: leave Ctrl-C to the driver (it stops workers itself), die with the driver
    (a SIGKILLed driver runs no clean-up, and its workers would wait forever holding their memory), and
    give torch a fair share of the cores so that N workers do not each spawn a thread per core."""
    import signal

    die_with_parent()  # first: importing torch takes seconds
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(max(1, threads))


def die_with_parent(poll_seconds: float = 0.5) -> None:
    """Exit as soon as the process that started us is gone. A watcher thread polls the parent PID: the
    kernel re-parents an orphan, so getppid() changes. (PR_SET_PDEATHSIG fires when the parent *thread*
    exits, and pool workers are started from short-lived job threads, so it would kill live workers.)"""
    import threading
    import time

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="tensorscale-parent-watch", daemon=True).start()
