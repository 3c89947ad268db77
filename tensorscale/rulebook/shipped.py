"""The rules files shipped with tensorscale, as text: top-level rules/, installed as tensorscale.rules_data.

Files whose name starts with ``_`` are bases for ``extends:`` (see rulebook.extends): they are read here
like the others, but the registry neither lists nor detects them.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from importlib import resources

from ..strict_yaml import load_yaml

BASE_PREFIX = "_"


@lru_cache(maxsize=1)
def shipped_files() -> dict[str, str]:
    """Shipped rules: file stem -> YAML text."""
    found = {}
    try:
        folder = resources.files("tensorscale.rules_data")
        for entry in folder.iterdir():
            if entry.name.endswith(".yaml"):
                found[entry.name[: -len(".yaml")]] = entry.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not found:  # running from a source tree without installing
        here = os.path.join(os.path.dirname(__file__), "..", "..", "rules")
        if os.path.isdir(here):
            for name in os.listdir(here):
                if name.endswith(".yaml"):
                    with open(os.path.join(here, name), encoding="utf-8") as handle:
                        found[name[: -len(".yaml")]] = handle.read()
    return found


@lru_cache(maxsize=None)
def _shipped_data(stem: str):
    return load_yaml(shipped_files()[stem], f"rules/{stem}.yaml", aliases=False)


def shipped_data(stem: str):
    """The plain YAML data of a shipped rules file (before its own `extends` is resolved), or None."""
    if stem not in shipped_files():
        return None
    return copy.deepcopy(_shipped_data(stem))
