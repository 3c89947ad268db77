"""NaN and Inf never pass: verify fails on any non-finite logit (naming it), and `up`/`down` refuse input
weights holding NaN/Inf unless --allow-nonfinite (then they warn). Before issue 14, one NaN weight gave
"relative logit error 0 ... PASS" and `up` turned one Inf into 2 Inf + 2 NaN silently."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint
from safetensors.torch import load_file, save_file

from tensorscale.cli.main import cli


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("nonfinite") / "clean", "llama", tie_word_embeddings=False)


def poisoned(clean, folder, value=float("nan"), name="model.layers.0.mlp.down_proj.weight", everywhere=False):
    shutil.copytree(clean, folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    for key in tensors if everywhere else [name]:
        if tensors[key].is_floating_point():
            if everywhere:
                tensors[key].fill_(value)
            else:
                tensors[key].view(-1)[3] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return str(folder)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_verify_fails_on_one_nan_weight(clean, tmp_path):
    broken = poisoned(clean, tmp_path / "broken")
    result = invoke("verify", clean, broken)
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("FAIL") and "NaN" in last and "broken" in last, last
    result = invoke("verify", clean, broken, "--json")
    report = json.loads(result.output)
    assert report["passed"] is False and "NaN" in report["nonfinite"]


def test_verify_fails_on_an_inf_source(clean, tmp_path):
    broken = poisoned(clean, tmp_path / "broken", value=float("inf"), name="model.norm.weight")
    result = invoke("verify", broken, clean)
    assert result.exit_code == 1, result.output
    assert "Inf" in result.output.strip().splitlines()[-1] or "NaN" in result.output.strip().splitlines()[-1]


def test_up_refuses_nonfinite_input_and_writes_nothing(clean, tmp_path):
    broken = poisoned(clean, tmp_path / "broken", value=float("inf"))
    result = invoke("up", "-i", broken, "-o", tmp_path / "out", "-edm", "2", "-q")
    assert result.exit_code == 2, result.output
    assert "NaN or Inf" in result.output and "model.layers.0.mlp.down_proj.weight" in result.output
    assert "--allow-nonfinite" in result.output and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_allow_nonfinite_writes_with_a_warning(clean, tmp_path):
    broken = poisoned(clean, tmp_path / "broken", value=float("inf"))
    result = invoke("up", "-i", broken, "-o", tmp_path / "out", "-edm", "2", "-q", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "NaN or Inf" in result.output


def test_up_verify_on_an_all_nan_input_fails(clean, tmp_path):
    """Before: `up --verify` of an all-NaN input passed."""
    broken = poisoned(clean, tmp_path / "broken", everywhere=True)
    result = invoke("up", "-i", broken, "-o", tmp_path / "out", "-edm", "2", "-q", "--allow-nonfinite", "--verify")
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("FAIL")


def test_down_refuses_nonfinite_input(clean, tmp_path):
    broken = poisoned(clean, tmp_path / "broken", name="model.embed_tokens.weight")
    result = invoke("down", "-i", broken, "-o", tmp_path / "out", "-edd", "2", "-q")
    assert result.exit_code == 2, result.output
    assert "NaN or Inf" in result.output and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["broken"]


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "pydoc-llama")


@pytest.mark.parametrize("mode", [["--seed", "1"], ["--greedy"]])
def test_gen_on_a_nan_model_is_one_line(tmp_path, mode):
    """Before: sampling raised a torch traceback (probability tensor contains nan); greedy printed junk."""
    broken = poisoned(EXAMPLE, tmp_path / "broken", everywhere=True)
    result = invoke("gen", "-i", broken, "-n", "3", *mode)
    assert result.exit_code == 2, result.output
    assert "NaN or Inf logits" in result.output and "Traceback" not in result.output


def test_gen_prompt_that_is_not_utf8_is_one_line():
    """Before: `gen -p $'\\xff'` (a surrogate-escaped byte) ended in a UnicodeEncodeError traceback."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", "gen", "-i", EXAMPLE, "-p", b"\xff", "-n", "2", "--greedy"],
        capture_output=True,
    )
    assert result.returncode == 2, result.stderr
    assert b"UTF-8" in result.stderr and b"Traceback" not in result.stderr
