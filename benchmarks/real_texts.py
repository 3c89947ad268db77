"""Real prose for the real-model benchmarks, from Debian packages, with calibration and evaluation apart.

Install once (Debian/Ubuntu): `apt-get install -y python3-doc`. The texts:

* calibration: the Python documentation sources (`.rst.txt`) outside library/ (tutorial, howto, faq,
  reference, using, extending, c-api, ...), the text `down --calibration` is given;
* eval "pydoc-library": the sources under library/ (the standard library reference), never calibrated on;
* eval "licenses": the license texts under /usr/share/common-licenses (every Debian system has them), a
  second domain of legal English that nothing here calibrates on.

Files are read in sorted order and deduplicated by content (GPL is a link to GPL-3), so every run sees
the same tokens.
"""

from __future__ import annotations

import glob
import os
import re

LICENSES = "/usr/share/common-licenses"


def python_doc_sources() -> str:
    found = sorted(glob.glob("/usr/share/doc/python3*/html/_sources"))
    if not found:
        raise SystemExit("the Python documentation sources are missing: apt-get install -y python3-doc")
    return found[-1]


def _read(paths) -> str:
    seen, parts = set(), []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, encoding="utf-8", errors="replace") as handle:
            parts.append(handle.read().strip())
    return "\n\n".join(parts)


def calibration_text() -> str:
    root = python_doc_sources()
    paths = [
        p
        for p in sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True))
        if os.path.relpath(p, root).split(os.sep)[0] not in ("library", "whatsnew")
    ]
    return _read(paths)


INFO = "/usr/share/info"
# GNU manuals (Texinfo, as every Debian system installs them), split in two sets that never meet: the first
# may be calibrated on, the second is a held-out domain of its own.
GNU_CALIBRATION = ("gettext", "gnupg", "wget", "nettle", "libtasn1", "gpgrt", "bzip2", "gzip", "time", "ed", "bc")
GNU_HELD_OUT = ("coreutils", "grep", "sed", "find", "diffutils", "rluserman", "autosprintf", "find-maint")
_LICENSE_WORDS = ("GNU Free Documentation License", "GNU GENERAL PUBLIC LICENSE", "Permission is granted to copy")


def gnu_manuals(names) -> str:
    """The prose of GNU info manuals, node by node, without the license texts and copying permissions
    (those are the licenses domain's)."""
    import gzip

    parts = []
    for name in names:
        files = sorted(glob.glob(os.path.join(INFO, f"{name}.info*.gz")))
        files = [f for f in files if re.fullmatch(rf"{re.escape(name)}\.info(-\d+)?\.gz", os.path.basename(f))]
        for path in files:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                raw = handle.read()
            for node in raw.split("\x1f")[1:]:
                if node.startswith("\nTag Table") or node.startswith("\nEnd Tag Table") or "Indirect:" in node[:20]:
                    continue
                if any(word in node for word in _LICENSE_WORDS):
                    continue
                parts.append(node.strip())
    return "\n\n".join(parts)


def _blocks(text: str, size: int) -> list[str]:
    """`text` in blocks of about `size` characters, cut at paragraph ends."""
    blocks, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end < 0 else end
        blocks.append(text[start:end].strip())
        start = end
    return blocks


def mixed_calibration_text(block: int = 8000) -> str:
    """Two domains to calibrate on, in alternating blocks of about 2,000 tokens (each 256-token window is
    mostly one of them): the Python docs outside library/ and the first set of GNU manuals."""
    python, gnu = _blocks(calibration_text(), block), _blocks(gnu_manuals(GNU_CALIBRATION), block)
    mixed = [part for pair in zip(python, gnu) for part in pair]
    longer = python if len(python) > len(gnu) else gnu
    return "\n\n".join(mixed + longer[min(len(python), len(gnu)) :])


def eval_texts(gnu: bool = False) -> dict[str, str]:
    """The held-out domains: the Python library docs and the license texts; `gnu` adds a third, the GNU
    manuals of GNU_HELD_OUT (never in any calibration text)."""
    root = python_doc_sources()
    library = sorted(glob.glob(os.path.join(root, "library", "*.rst.txt")))
    licenses = sorted(os.path.join(LICENSES, name) for name in os.listdir(LICENSES))
    texts = {"pydoc-library": _read(library), "licenses": _read(licenses)}
    if gnu:
        texts["gnu-manuals"] = gnu_manuals(GNU_HELD_OUT)
    return texts
