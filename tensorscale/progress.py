"""Progress on stderr: a tqdm bar on a terminal, plain lines in a log, nothing when asked for none.

A `\\r`-redrawn bar is unreadable in a CI log or a file, so when stderr is not a terminal progress is a
few whole lines (every 10%, at most one each 2 s, and the end). `HF_HUB_DISABLE_PROGRESS_BARS` and
`TQDM_DISABLE`, which users set to silence the hub's and tqdm's bars, silence ours too, as `-q` does.
"""

from __future__ import annotations

import os
import sys
import time

SILENCING_VARIABLES = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")
_TRUE = ("1", "true", "yes", "on")


_SET_HERE: dict[str, str] = {}  # variables this process set for the hub's sake, not the user's choice


def silenced_by_environment(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return any(
        str(environ.get(name, "")).strip().lower() in _TRUE
        for name in SILENCING_VARIABLES
        if not (name in _SET_HERE and environ.get(name) == _SET_HERE[name])
    )


def quiet_hub_bars_in_logs(stream=None) -> None:
    """The hub's download bars are tqdm bars too: when stderr is a log, switch them off (huggingface_hub
    reads the variable when it is imported, which happens later, inside the commands)."""
    name = "HF_HUB_DISABLE_PROGRESS_BARS"
    if not is_terminal(stream if stream is not None else sys.stderr) and name not in os.environ:
        os.environ[name] = _SET_HERE[name] = "1"


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """Bytes done out of `total`, plus a count of finished items (`noun`: tensors, layers) shown beside them."""

    STEPS = 10  # a plain line at each 10% ...
    MIN_INTERVAL_S = 2.0  # ... but not more often than this

    def __init__(
        self,
        total: int,
        label: str,
        items: int = 0,
        stream=None,
        clock=time.monotonic,
        unit: str = "B",
        noun: str = "tensors",
    ):
        self.unit = unit  # "B": bytes (scaled to KiB, MiB, ...); any other word: a plain count of those
        self.noun = noun  # what the items are: tensors, layers
        self.total = max(0, int(total))
        self.label = label
        self.items = items
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.items_done = 0
        self.bar = None
        self._steps_shown = 0
        self._last_line = None
        self._finished = False
        if is_terminal(self.stream):
            from tqdm import tqdm

            # disable=False: whether to show progress was decided above (tqdm would read TQDM_DISABLE once,
            # when first imported, and ignore a later change)
            scaled = unit == "B"
            self.bar = tqdm(
                total=self.total,
                unit=unit if scaled else f" {unit}",
                unit_scale=scaled,
                unit_divisor=1024,
                desc=label,
                leave=False,
                file=self.stream,
                disable=False,
            )

    def update(self, nbytes: int = 0, items: int = 0) -> None:
        self.done += nbytes
        self.items_done += items
        if self.bar is not None:
            if nbytes:
                self.bar.update(nbytes)
            if items and self.items:
                self.bar.set_postfix_str(f"{self.items_done}/{self.items} {self.noun}", refresh=False)
            return
        steps = self.done * self.STEPS // self.total if self.total else self.STEPS
        now = self.clock()
        due = self._last_line is None or now - self._last_line >= self.MIN_INTERVAL_S
        if self._steps_shown < steps < self.STEPS and due:  # the last step is close()'s line
            self._line()
            self._last_line = now
            self._steps_shown = steps

    def _line(self) -> None:
        percent = 100.0 * self.done / self.total if self.total else 100.0
        items = f", {self.items_done}/{self.items} {self.noun}" if self.items else ""
        done, total = (
            (_human(self.done), _human(self.total))
            if self.unit == "B"
            else (f"{self.done:,}", f"{self.total:,} {self.unit}")
        )
        print(f"tensorscale: {self.label} {percent:3.0f}% ({done} of {total}{items})", file=self.stream, flush=True)

    def close(self, completed: bool = True) -> None:
        if self._finished:
            return
        self._finished = True
        if self.bar is not None:
            self.bar.close()
        elif completed:
            self._line()


def progress_for(
    total: int, label: str, items: int = 0, *, enabled: bool = True, stream=None, unit: str = "B", noun: str = "tensors"
) -> Progress | None:
    """A Progress, or None when progress is off (-q, --json, or a silencing environment variable)."""
    if not enabled or silenced_by_environment():
        return None
    return Progress(total, label, items, stream, unit=unit, noun=noun)
