"""The text of `down --calibration FILE`: read once, with one-line errors for a missing or empty file.

What is done with it (activation statistics, select-and-refit) lives in folding.statistics and
folding.selection; data-free `down` uses text the model writes itself instead.
"""

from __future__ import annotations

from ..errors import TensorscaleError

DEFAULT_TOKENS = 8192


def read_calibration_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise TensorscaleError(f"cannot read calibration text {path}: {exc}") from None
    if not text.strip():
        raise TensorscaleError(f"calibration text {path} is empty; give a file of ordinary text in the model's language")
    return text
