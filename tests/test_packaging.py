"""The wheel must carry every subpackage: pyproject.toml lists them by hand (rules/ is mapped into the
package), so a new folder that is not listed works in an editable install and breaks in a real one."""

from __future__ import annotations

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_listed_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        listed = set(tomllib.load(handle)["tool"]["setuptools"]["packages"])
    found = set()
    for folder, dirs, files in os.walk(os.path.join(ROOT, "tensorscale")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages"
    assert "tensorscale.rules_data" in listed
