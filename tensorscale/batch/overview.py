"""Progress of every job in one overview: a bar per job on a terminal, a line per event otherwise.

Shards finish in other processes, so progress is counted in finished shards, reported by the driver's job
threads; one lock keeps lines whole when several jobs report at once.
"""

from __future__ import annotations

import sys
import threading


class Overview:
    def __init__(self, jobs, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.total = len(jobs)
        self.labels = {
            job.index: f"job {job.index}/{self.total} {job.command} {_short(job.input)} -> {_short(job.output)}"
            for job in jobs
        }
        self.lock = threading.Lock()
        self.bars = {}
        self.use_bars = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            if self.use_bars:
                from tqdm import tqdm

                tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def job_started(self, index: int, shards: int) -> None:
        if self.use_bars:
            from tqdm import tqdm

            with self.lock:
                self.bars[index] = tqdm(
                    total=shards,
                    desc=self.labels[index],
                    unit="shard",
                    position=index - 1,
                    leave=True,
                    file=self.stream,
                    dynamic_ncols=True,
                )
        else:
            self._line(f"{self.labels[index]}: started, {shards} shard(s)")

    def shard_done(self, index: int, done: int, shards: int) -> None:
        if self.use_bars:
            with self.lock:
                if index in self.bars:
                    self.bars[index].update(1)
        elif shards > 1:
            self._line(f"{self.labels[index]}: shard {done}/{shards}")

    def job_finished(self, index: int, status: str, seconds: float, reason: str = "") -> None:
        text = f"{self.labels[index]}: {status} in {seconds:.1f} s" + (f": {reason}" if reason else "")
        if self.use_bars:
            with self.lock:
                bar = self.bars.pop(index, None)
                if bar is not None:
                    bar.set_postfix_str(status)
                    bar.close()
                    return
        self._line(text)


def _short(path: str, width: int = 40) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3) :]
