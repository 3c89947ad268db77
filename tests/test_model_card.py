"""Every output carries its provenance: a README.md model card (YAML front matter the hub reads) and the same
facts in the safetensors __metadata__."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from click.testing import CliRunner
from fixtures import build_checkpoint, pydoc_copy
from safetensors import safe_open

from tensorscale import __version__
from tensorscale.cli.main import cli
from tensorscale.writing.model_card import front_matter

SOURCE_CARD = "---\nlicense: other\nlicense_name: psf-2.0\nlanguage:\n- en\ntags:\n- source-tag\n---\n# pydoc\n"


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def card_of(folder):
    """The card's front matter, parsed strictly (yaml.safe_load of the text between the --- lines), and body."""
    with open(os.path.join(folder, "README.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def metadata_of(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as handle:
        return handle.metadata()


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory):
    return pydoc_copy(tmp_path_factory.mktemp("card") / "pydoc-llama", **{"README.md": SOURCE_CARD})


def test_up_writes_a_card_and_metadata(pydoc, tmp_path):
    out = str(tmp_path / "pydoc-x2")
    result = invoke("up", "-i", pydoc, "-o", out, "-edm", "2", "-upm", "2", "-q", "--manifest", "--json")
    assert result.exit_code == 0, result.output
    header, body = card_of(out)
    assert header["base_model"] == "pydoc-llama"
    assert header["license"] == "other" and header["license_name"] == "psf-2.0" and header["language"] == ["en"]
    assert header["tags"] == ["tensorscale", "hypercloning"]
    assert f"tensorscale {__version__}" in body
    assert f"tensorscale up -i {pydoc} -o {out} -edm 2 -upm 2 -q --manifest --json" in body
    summary = json.loads(result.stdout)
    assert f"| parameters | {summary['source_parameters']:,} | {summary['total_parameters']:,} |" in body
    assert "| `hidden_size` | 192 | 384 |" in body and "| `intermediate_size` | 512 | 1024 |" in body
    assert "## Verification" not in body
    meta = metadata_of(out)
    assert meta["format"] == "pt" and meta["base_model"] == "pydoc-llama" and meta["license"] == "other"
    assert meta["tensorscale.version"] == __version__ and meta["tensorscale.operation"] == "up"
    assert meta["tensorscale.command"].startswith("tensorscale up -i ")
    assert int(meta["tensorscale.parameters"]) == summary["total_parameters"]
    assert int(meta["tensorscale.source_parameters"]) == summary["source_parameters"]
    assert json.loads(meta["tensorscale.config_changes"])["hidden_size"] == [192, 384]
    with open(os.path.join(out, "tensorscale-manifest.json")) as handle:
        assert "README.md" in json.load(handle)["output"]["files"]  # the card is part of what was written


def test_card_carries_verify_numbers(pydoc, tmp_path):
    out = str(tmp_path / "verified")
    result = invoke("up", "-i", pydoc, "-o", out, "-edm", "2", "-q", "--verify", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["verify"]
    assert report["passed"] and report["output"] == out
    _, body = card_of(out)
    assert "## Verification" in body and "passed at tolerance 0.0001" in body
    assert f"| relative logit error (max\\|Δlogit\\| / max\\|logit\\|) | {report['relative_logit_error']:.4g} |" in body
    assert f"| top-1 agreement | {report['top1_agreement']:.2%} |" in body


def test_down_card_says_downscaled(tmp_path):
    source = build_checkpoint(tmp_path / "src", "llama")
    out = str(tmp_path / "small")
    result = invoke("down", "-i", source, "-o", out, "-upd", "2", "-q")
    assert result.exit_code == 0, result.output
    header, body = card_of(out)
    assert header["tags"] == ["tensorscale", "downscaled"] and "license" not in header
    assert "states no licence" in body and "| `intermediate_size` | 48 | 24 |" in body
    assert metadata_of(out)["tensorscale.operation"] == "down"


def test_source_card_front_matter_is_read_safely():
    assert front_matter("---\nlicense: mit\n---\ntext") == {"license": "mit"}
    assert front_matter("no front matter") == {}
    assert front_matter("---\nlicense: [unclosed\n---\n") == {}
    bomb = "---\na: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n---\n"
    assert front_matter(bomb) == {}  # aliases are refused, not expanded
    assert front_matter("---\n!!python/object/apply:os.system [echo]\n---\n") == {}
