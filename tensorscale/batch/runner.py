"""Drive every job: plan, skip if already done, hand shards to the executor, commit; never stop the batch
for one job's failure.

Jobs run in driver threads (`executor.job_slots` at once); each thread does the light work (planning,
the resume check, index, config, manifest and the atomic rename through execute_plan) while shards run in
the executor's workers. A job's failure becomes its summary entry; execute_plan has already removed its
temporary folder, so nothing partial is left at OUT.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from ..errors import TensorscaleError
from .jobs import Job
from .local_executor import one_line


class JobState:
    """What a job's shards report back (from worker results), for the overview and the summary."""

    def __init__(self, job: Job, overview):
        self.job = job
        self.overview = overview
        self.shards = 0
        self.done = 0
        self.retries = 0
        self.workers: dict[str, float] = {}  # "host:pid" -> peak RSS MiB
        self.lock = threading.Lock()

    def started(self, shards: int) -> None:
        self.shards = shards
        self.overview.job_started(self.job.index, shards)

    def shard_done(self, info: dict) -> None:
        with self.lock:
            self.done += 1
            if info is not None:  # None: written in the driver (down)
                key = f"{info['host']}:{info['pid']}"
                self.workers[key] = max(self.workers.get(key, 0.0), round(info["peak_rss_kib"] / 1024, 1))
            done = self.done
        self.overview.shard_done(self.job.index, done, self.shards)

    def retried(self) -> None:
        with self.lock:
            self.retries += 1


def run_job(job: Job, executor, overview) -> dict:
    from ..reading.source import open_source
    from .resume import check_existing

    started = time.perf_counter()
    state = JobState(job, overview)
    entry = {"index": job.index, "command": job.command, "input": job.input, "output": job.output}
    try:
        if os.path.lexists(job.output):
            verdict = check_existing(job, open_source(job.input), job.output)
            if verdict.matches:
                entry.update(
                    status="skipped",
                    seconds=round(time.perf_counter() - started, 3),
                    note="output exists and matches its manifest",
                )
                overview.job_finished(job.index, "skipped (already done)", entry["seconds"])
                return entry
            if not verdict.ours and not job.force:
                raise TensorscaleError(
                    f"output {job.output} exists and {verdict.reason}; set `force: true` in this job "
                    "to replace it, or choose another output"
                )
            entry["note"] = f"redone: {verdict.reason}"
        plan, runner = _plan(job, executor, state)
        from ..convert import plan_changes_nothing
        from ..rewrite import execute_plan

        if job.command == "up" and plan_changes_nothing(plan):
            raise TensorscaleError("nothing to change: the output would equal the input; give a larger size")
        if plan.notes:
            entry["notes"] = list(plan.notes)  # e.g. "not exact in bfloat16": the summary must say so too

        result = execute_plan(
            plan,
            job.output,
            force=True,
            show_progress=False,
            verify_files=job.verify_files,
            manifest=True,
            command=job.command_line(),
            shard_runner=runner,
            extra_kept=tuple(job.kept),
            allow_nonfinite=job.options["allow_nonfinite"],
        )
        entry.update(
            status="done",
            seconds=round(time.perf_counter() - started, 3),
            shards=len(plan.shards),
            total_bytes=plan.total_bytes,
            manifest=result.manifest,
        )
        if result.warnings:
            entry["warnings"] = list(result.warnings)
    except Exception as exc:  # noqa: BLE001 - one job's failure is reported, the batch goes on
        entry.update(status="failed", seconds=round(time.perf_counter() - started, 3), reason=one_line(exc))
    entry["retries"] = state.retries
    if state.workers:
        entry["worker_peak_rss_mib"] = max(state.workers.values())
        entry["_workers"] = dict(state.workers)
    overview.job_finished(job.index, entry["status"], entry["seconds"], entry.get("reason", ""))
    return entry


def _plan(job: Job, executor, state: JobState):
    """The job's plan and its shard runner. `up` shards go to the executor's workers, which rebuild the
    plan from headers; a `down` plan clusters every unit from a full read of the weights, too costly to
    redo per shard, so `down` jobs write their shards here, in this job's thread (in parallel with other
    jobs, not within the job)."""
    from ..convert import plan_conversion

    if job.command == "down":
        import atexit

        from ..convert import plan_down_by_method
        from ..writing.output_folder import SpillWorkspace

        text = None
        if job.options["calibration"] is not None:
            from ..folding.calibration import read_calibration_text

            text = read_calibration_text(job.options["calibration"])
        workspace = SpillWorkspace(job.output)
        spill = workspace.open()
        atexit.register(workspace.close)  # a job that fails before writing leaves nothing either
        plan, _ = plan_down_by_method(
            job.input,
            job.engine_options(),
            job.rules,
            job.options["method"],
            text,
            job.options["calibration_tokens"],
            spill,
        )

        def in_this_thread(plan, folder, verify_files, progress):
            from ..rewrite import run_shards_in_order

            state.started(len(plan.shards))
            try:
                run_shards_in_order(plan, folder, verify_files, None)
            finally:
                workspace.close()  # refitted tensors, now written (fold leaves it empty)
            for _ in plan.shards:
                state.shard_done(None)

        return plan, in_this_thread
    return plan_conversion(job.input, job.engine_options(), job.rules), executor.shard_runner(job.rules, state)


def run_batch(jobs: list[Job], executor, overview) -> list[dict]:
    """Run every job; return their summary entries in jobs-file order. Ctrl-C stops the workers, lets each
    running job remove its temporary folder, and re-raises."""
    slots = max(1, min(executor.job_slots, len(jobs)))
    if slots == 1:
        # One job at a time runs in this thread, so Ctrl-C interrupts the running job itself (which removes
        # its temporary folder) instead of waiting for it to finish.
        return [run_job(job, executor, overview) for job in jobs]
    threads = ThreadPoolExecutor(slots, thread_name_prefix="tensorscale-job")
    futures = []
    try:
        for job in jobs:
            futures.append(threads.submit(run_job, job, executor, overview))
        pending = set(futures)
        while pending:  # short waits keep the main thread responsive to signals
            _, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
    except BaseException:
        threads.shutdown(wait=False, cancel_futures=True)  # jobs not started yet never start
        executor.cancel()
        threads.shutdown(wait=True)
        raise
    threads.shutdown(wait=True)
    return [future.result() for future in futures]
