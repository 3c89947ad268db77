"""Run output shards in worker processes on this machine, bounded by --jobs and a memory budget.

Each worker holds one chunk's working set at a time (`CHUNK_BYTES` of float32 plus its intermediate
copies; measured at 441-481 MiB peak RSS per process in benchmarks/README.md), so the number of workers,
not the model size, sets the memory used: the budget divided by WORKER_BYTES caps it. Workers are spawned
(not forked) because torch and threads do not survive fork reliably. A failed shard is submitted again
up to `retries` times; a crashed worker (killed for memory, say) breaks the pool, which is rebuilt.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..errors import TensorscaleError
from ..writing.execute import CHUNK_BYTES
from .tasks import init_worker, job_spec, produce_shard_task, shard_fingerprint

# Working memory of one worker: 16 chunks' worth covers the float32 chunk, its ops' copies and the
# stored result (~400 MiB anonymous) plus torch's libraries (~85 MiB): 512 MiB.
WORKER_BYTES = 16 * CHUNK_BYTES


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_memory_budget() -> int:
    """Most of what is free now (80%), so a batch started on a busy machine does not push it into swap."""
    free = available_memory()
    return int(free * 0.8) if free else 4 * 2**30


def worker_count(jobs: int, memory_budget: int) -> int:
    """Workers = --jobs, lowered to what the memory budget can hold."""
    if jobs < 1:
        raise TensorscaleError(f"--jobs must be at least 1, got {jobs}")
    fit = memory_budget // WORKER_BYTES
    if fit < 1:
        raise TensorscaleError(
            f"--memory-budget {memory_budget / 2**20:.0f} MiB is below one worker's ~{WORKER_BYTES // 2**20} MiB; "
            "raise it (e.g. --memory-budget 1GiB)"
        )
    return int(min(jobs, fit))


class _InProcess:
    """A one-worker 'pool' that runs each task at submit time in this process: --jobs 1 costs no spawn."""

    def submit(self, fn, *args):
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self, **kwargs):
        pass


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int, retries: int = 2, task=produce_shard_task):
        self.workers = workers
        self.retries = retries
        self.task = task  # tests pass a flaky wrapper; it must be importable by spawned workers
        self.cancelled = False
        self._lock = threading.Lock()
        self._pool = None

    @property
    def job_slots(self) -> int:
        """Jobs driven at once: one per worker keeps every worker fed even when jobs have one shard."""
        return self.workers

    def _new_pool(self):
        if self.workers == 1:
            return _InProcess()
        import multiprocessing

        threads = max(1, (os.cpu_count() or 1) // self.workers)
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker, initargs=(threads,)
        )

    def _submit(self, args):
        with self._lock:
            if self.cancelled:
                raise TensorscaleError("the batch was interrupted")
            if self._pool is None:
                self._pool = self._new_pool()
            pool = self._pool
            try:
                return pool.submit(self.task, *args), pool
            except BrokenProcessPool:  # a worker died: start a fresh pool for this and later tasks
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = pool = self._new_pool()
                return pool.submit(self.task, *args), pool

    def _pool_broke(self, pool) -> None:
        with self._lock:
            if self._pool is pool and not self.cancelled:
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def shard_runner(self, rules_path: str | None, state):
        """A `shard_runner` for execute_plan that farms the plan's shards out to the pool."""

        def run(plan, folder, verify_files, progress):
            spec = job_spec(plan, rules_path)
            state.started(len(plan.shards))
            running: dict[Future, tuple[int, tuple, int, object]] = {}
            for index, shard in enumerate(plan.shards):
                args = (spec, index, os.path.join(folder, shard.filename), shard_fingerprint(plan, index), verify_files)
                future, pool = self._submit(args)
                running[future] = (index, args, 0, pool)
            try:
                while running:
                    # Short waits: after cancel() terminated the workers, their futures may never complete.
                    done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
                    if self.cancelled:
                        raise TensorscaleError("the batch was interrupted")
                    for future in done:
                        index, args, attempt, pool = running.pop(future)
                        try:
                            info = future.result()
                            plan.nonfinite_inputs.update(info.get("nonfinite") or ())
                            state.shard_done(info)
                            continue
                        except BrokenProcessPool as exc:
                            self._pool_broke(pool)
                            error = exc
                        except Exception as exc:  # noqa: BLE001 - retried, then reported in one line
                            error = exc
                        if self.cancelled or attempt >= self.retries:
                            raise TensorscaleError(
                                f"shard {plan.shards[index].filename} failed after {attempt + 1} attempt(s): "
                                f"{one_line(error)}"
                            ) from None
                        state.retried()
                        future, pool = self._submit(args)
                        running[future] = (index, args, attempt + 1, pool)
            finally:
                # Let the job's other shards stop before execute_plan removes their folder (after
                # cancel() the workers are already dead).
                for future in running:
                    future.cancel()
                while running and not self.cancelled:
                    _, still = wait(list(running), timeout=0.5)
                    running = {f: running[f] for f in still}

        return run

    def cancel(self) -> None:
        """Stop everything now (Ctrl-C, SIGTERM): workers are terminated, queued shards dropped."""
        with self._lock:
            self.cancelled = True
            pool = self._pool
        if isinstance(pool, ProcessPoolExecutor):
            processes = list((getattr(pool, "_processes", None) or {}).values())
            for process in processes:
                process.terminate()
            for process in processes:  # dead before the job threads remove their temporary folders
                process.join(timeout=10)
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def one_line(error: BaseException) -> str:
    """An exception as one line: TensorscaleError messages as they are, others with their type."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, TensorscaleError):
        return text
    if isinstance(error, BrokenProcessPool):
        return "a worker process died (killed for memory?)"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
