"""Ctrl-C, SIGTERM and SIGHUP: never lost, never a traceback, never a partial output.

The handler records the signal, then raises KeyboardInterrupt so that the run unwinds at once (removing its
temporary output on the way). But Python swallows an exception raised where no caller can catch it: in a
weakref callback (the import system runs one, `_get_module_lock.<locals>.cb`, as each import finishes), in a
`__del__`, in an atexit function. It then prints "Exception ignored in ... Traceback ... KeyboardInterrupt"
and the run goes on as if no signal had come (1 run in 5 of tests/test_reliability.py's kill test). Raising
again from sys.unraisablehook does not help: the hook runs inside the same swallowing context.

So the record, not the raise, is what counts:
- `check()` raises KeyboardInterrupt again where a signal was recorded; the engine calls it at safe points
  (before each tensor, between row chunks, before an output is moved into place), so a swallowed interrupt
  still stops the run before anything is committed;
- the unraisable hook stays quiet about a KeyboardInterrupt that we recorded (no traceback);
- `deferred()` sections (the swap of a finished output into place, the removal of a temporary one) only
  record a signal and raise once they are done, so they are never cut half-way;
- `hold()`, once the command has decided how it ends, only records from then on, and the CLI turns a run
  that finished although a signal came into an interrupted exit (cli/main.py).
Signals are not blocked with pthread_sigmask: that masks one thread, and the kernel hands a process signal
to any thread that does not block it (torch's and the writer's threads), so the handler would run anyway.
"""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

_received: list[int] = []  # every signal that arrived, in order
_installed = False
_raising = False  # the handler raises: from install() on, until hold()
_deferring = 0  # depth of deferred() sections
_holding = False  # set by hold(): record only, for good


def received() -> bool:
    """True once SIGINT, SIGTERM or SIGHUP arrived (whether or not its KeyboardInterrupt got through)."""
    return bool(_received)


def check() -> None:
    """A safe point: raise KeyboardInterrupt if a signal arrived (its first raise may have been swallowed)."""
    if _received and not _holding:
        raise KeyboardInterrupt


@contextmanager
def deferred():
    """A section that must not be cut half-way: a signal during it is recorded, and raised when it ends."""
    global _deferring
    before = len(_received)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if len(_received) > before and not _deferring and not _holding:
        raise KeyboardInterrupt


def hold() -> None:
    """From now on a signal is only recorded: the command is reporting how it ended, or exiting."""
    global _holding, _raising
    _holding = True
    _raising = False


def _handle(signum, frame):
    _received.append(signum)
    if _raising and not _deferring:
        raise KeyboardInterrupt


def _unraisable(info, default=None):
    """Quiet for the KeyboardInterrupt of a recorded signal (check() delivers it); the rest as usual."""
    if isinstance(info.exc_value, KeyboardInterrupt) and _received:
        return
    (default or sys.__unraisablehook__)(info)


def install(raising: bool = True) -> None:
    """Take SIGINT, SIGTERM and SIGHUP in this process (the command line's main thread). The program's
    first lines call this with raising=False, before the command line's modules load: a signal then is
    recorded (no traceback from the middle of an import) and main() raises it, inside its handling."""
    global _installed, _raising
    if not _installed:
        for name in SIGNALS:
            try:
                signal.signal(getattr(signal, name), _handle)
            except (ValueError, OSError, AttributeError):  # not the main thread, or not on this platform
                pass
        previous = sys.unraisablehook
        sys.unraisablehook = lambda info: _unraisable(info, previous)
        _installed = True
    _raising = raising and not _holding
