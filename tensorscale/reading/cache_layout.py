"""Which files a model folder may read through links: the folder itself, or its hub-cache repo folder.

huggingface_hub keeps a downloaded repo as ``<cache>/models--Org--Name/`` with the file contents in
``blobs/`` (each named by its hash) and every revision as ``snapshots/<40-hex commit>/``, whose entries
are relative symlinks into ``../../blobs/``. So in a snapshot folder every file is a link out of the
folder, and that is the normal case; a link that leaves the repo folder is not. Anything else is a plain
local folder, where every link must stay inside the folder. The decision is made by this layout, never by a
substring of the path.

The hub token (``<HF_HOME>/token``) and any other file named ``token`` is never a model file: it is
refused wherever it is reached, so no link can carry it into an output.
"""

from __future__ import annotations

import os
import re

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
REFUSED_NAMES = frozenset({"token"})


def hub_repo_folder(folder: str) -> str | None:
    """The ``models--Org--Name`` folder when ``folder`` is one of its snapshots, else None."""
    real = os.path.realpath(folder)
    snapshots = os.path.dirname(real)
    repo = os.path.dirname(snapshots)
    if (
        _COMMIT.match(os.path.basename(real))
        and os.path.basename(snapshots) == "snapshots"
        and os.path.basename(repo).startswith("models--")
        and os.path.isdir(os.path.join(repo, "blobs"))
    ):
        return repo
    return None


def allowed_root(folder: str) -> str:
    """Where links from ``folder`` may lead: its hub repo folder for a snapshot, the folder itself otherwise."""
    return hub_repo_folder(folder) or os.path.realpath(folder)


def link_allowed(path: str, root: str) -> bool:
    """True when ``path`` (a file in a model folder) resolves inside ``root`` and is not a token file."""
    real = os.path.realpath(path)
    if os.path.basename(path) in REFUSED_NAMES or os.path.basename(real) in REFUSED_NAMES:
        return False
    return os.path.commonpath([root, real]) == root


def snapshot_revision(folder: str) -> str | None:
    """The commit hash of a hub snapshot folder (its name), or None for a plain folder."""
    return os.path.basename(os.path.realpath(folder)) if hub_repo_folder(folder) else None
