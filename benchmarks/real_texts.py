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


def eval_texts() -> dict[str, str]:
    root = python_doc_sources()
    library = sorted(glob.glob(os.path.join(root, "library", "*.rst.txt")))
    licenses = sorted(os.path.join(LICENSES, name) for name in os.listdir(LICENSES))
    return {"pydoc-library": _read(library), "licenses": _read(licenses)}
