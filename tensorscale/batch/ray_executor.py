"""Run output shards as Ray tasks: one task per shard, anywhere in the cluster.

Ray is optional (`pip install 'tensorscale[ray]'`) and imported only here, only when `--executor ray` is
chosen. Workers read inputs and write their shard into the job's temporary folder on shared storage; the
driver (runner + execute_plan) writes index, config and manifest and renames the folder once every shard
has succeeded. Each task asks Ray for one CPU and WORKER_BYTES of memory, so Ray's scheduler applies the
same per-worker memory bound as the local executor, per node. Task arguments are plain strings, ints and
a dict of options, produced by the driver; no user data is pickled.
"""

from __future__ import annotations

import logging
import os
import threading

from ..errors import TensorscaleError
from .local_executor import WORKER_BYTES, one_line
from .tasks import job_spec, produce_shard_task, shard_fingerprint


def _import_ray():
    try:
        import ray
    except ImportError:
        raise TensorscaleError("--executor ray needs Ray; install it with: pip install 'tensorscale[ray]'") from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, job_slots: int, retries: int = 2):
        ray = _import_ray()
        self.ray = ray
        self.retries = retries
        self.job_slots = job_slots
        self.cancelled = False
        self._lock = threading.Lock()
        self._refs: set = set()
        self._owns = False
        if not ray.is_initialized():
            try:
                ray.init(
                    address=address, include_dashboard=False, logging_level=logging.WARNING, ignore_reinit_error=True
                )
            except ConnectionError as exc:
                raise TensorscaleError(
                    f"cannot reach the Ray cluster at {address}: {one_line(exc)}; check --address"
                ) from None
            self._owns = True
        resources = ray.cluster_resources()
        self.workers = int(resources.get("CPU", 1))
        # Ray's own retries cover both a task that raised and a worker that died.
        self._remote = ray.remote(produce_shard_task).options(
            num_cpus=1, memory=WORKER_BYTES, max_retries=retries, retry_exceptions=True
        )

    def shard_runner(self, rules_path: str | None, state):
        ray = self.ray

        def run(plan, folder, verify_files, progress):
            spec = job_spec(plan, rules_path)
            state.started(len(plan.shards))
            names = {}
            with self._lock:
                if self.cancelled:
                    raise TensorscaleError("the batch was interrupted")
                for index, shard in enumerate(plan.shards):
                    ref = self._remote.remote(
                        spec, index, os.path.join(folder, shard.filename), shard_fingerprint(plan, index), verify_files
                    )
                    names[ref] = shard.filename
                    self._refs.add(ref)
            pending = list(names)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    for ref in ready:
                        try:
                            info = ray.get(ref)
                            plan.nonfinite_inputs.update(info.get("nonfinite") or ())
                            state.shard_done(info)
                        except Exception as exc:  # noqa: BLE001 - reported in one line
                            cause = getattr(exc, "cause", None) or exc
                            raise TensorscaleError(
                                f"shard {names[ref]} failed after {self.retries + 1} attempt(s): {one_line(cause)}"
                            ) from None
            finally:
                for ref in pending:  # the job failed: stop its other shards before its folder is removed
                    ray.cancel(ref, force=True)
                if pending:
                    ray.wait(pending, num_returns=len(pending), timeout=60)
                with self._lock:
                    self._refs.difference_update(names)

        return run

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            refs = list(self._refs)
        for ref in refs:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owns:
            self.ray.shutdown()
