"""The wheel must carry every subpackage: pyproject.toml lists them by hand (rules/ is mapped into the
package), so a new folder that is not listed works in an editable install and breaks in a real one."""

from __future__ import annotations

import os
import re

import pytest
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


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        return tomllib.load(handle)["project"]


def test_metadata_states_lower_bounds_only_and_an_spdx_license():
    project = _project()
    torch = [dep for dep in project["dependencies"] if dep.replace(" ", "").startswith("torch")]
    assert torch == ["torch>=2.1"], "torch is core, with a lower bound only: a cap blocks every newer torch"
    assert not [dep for dep in project["dependencies"] if "<" in dep], "no upper caps in the package metadata"
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as handle:
        text = handle.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # PEP 639: the SPDX field says it
    assert "Programming Language :: Python :: 3" in project["classifiers"] and project["urls"]


def test_safetensors_is_not_a_dependency_of_code_that_does_not_import_it():
    """The engine reads and writes the format itself (headers, pread/pwrite); only the tests use the
    safetensors library, as an independent implementation to check ours against."""
    names = [dep.split(">")[0].split("=")[0].strip() for dep in _project()["dependencies"]]
    assert "safetensors" not in names
    assert any(dep.startswith("safetensors") for dep in _project()["optional-dependencies"]["test"])
    for folder, _, files in os.walk(os.path.join(ROOT, "tensorscale")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    source = handle.read()
                assert not re.search(r"^\s*(import|from) safetensors(\s|\.|$)", source, re.M), name


def test_pypi_description_is_self_contained():
    """PyPI shows the readme without the repository: no repo-relative links or paths, least of all first."""
    readme = _project()["readme"]
    with open(os.path.join(ROOT, readme), encoding="utf-8") as handle:
        text = handle.read()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all(link.startswith("https://") for link in links), links
    opening = text.split("```")[0]
    assert "examples/" not in opening and ".venv" not in opening and "../" not in text
    assert "pip install" in text


@pytest.mark.parametrize(
    "args",
    [
        ["desc", "{model}"],
        ["plan", "{model}", "-edm", "2"],
        ["rules", "list"],
        ["rules", "show", "llama"],
        ["rules", "check", "{model}"],
        ["rules", "new", "{model}"],
    ],
)
def test_reading_commands_do_not_import_torch(args):
    """Why torch can stay a core dependency without slowing these down: they never import it (the README
    says so); the rewriting commands need it."""
    from fixtures import run_cli_in_fresh_process

    model = os.path.join(ROOT, "examples", "tiny-llama")
    result = run_cli_in_fresh_process([arg.format(model=model) for arg in args], forbidden=("torch", "transformers"))
    assert result.returncode == 0, result.stderr


def test_importing_the_command_line_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, tensorscale.cli.main, tensorscale.__main__; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_readme_links_stay_inside_the_repository():
    """A link to ../shared/... worked only beside this checkout; every relative link must resolve here."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    relative = [
        link.split("#")[0]
        for link in re.findall(r"\]\(([^)]+)\)", text)
        if not link.startswith(("https://", "http://", "#"))
    ]
    assert relative and all(not link.startswith("..") for link in relative)
    missing = [link for link in relative if not os.path.exists(os.path.join(ROOT, link))]
    assert missing == [], missing
    assert "shared/reference" not in text
