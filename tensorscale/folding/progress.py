"""A progress bar on stderr for the `down` analysis phases (tqdm; silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
from contextlib import contextmanager


@contextmanager
def bar(total: int, what: str, unit: str):
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit=unit, leave=False, disable=not sys.stderr.isatty(), file=sys.stderr) as progress:
        yield lambda count: progress.update(count)
