"""`gen` and `verify` (and `up --verify`) on tiny checkpoints.

The tiny checkpoints have no tokenizer, so `gen` tests save a small WordLevel tokenizer into a copy; `verify`
falls back to seeded random token ids without one. verify must pass an up-scaled copy, fail a copy with one
weight changed, and refuse models whose vocabularies differ.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint

from tensorscale.cli.main import cli
from tensorscale.convert import run_up
from tensorscale.planning.plan import UpOptions

SENTENCES = [
    "the capital of france is paris",
    "the capital of germany is berlin",
    "once upon a time there lived an old fisherman and his wife by the sea",
    "to make tea boil the water and wait four minutes",
]


def save_tokenizer(folder, vocab_size=96, extra_words=()):
    """A WordLevel tokenizer trained on a few sentences, saved as a PreTrainedTokenizerFast.

    Filler words make its vocabulary exactly `vocab_size`, so every id a random model emits decodes to a word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    filler = " ".join(f"w{i}" for i in range(vocab_size))
    tokenizer.train_from_iterator(SENTENCES * 2 + [" ".join(extra_words)] * 2 + [filler], trainer)
    assert tokenizer.get_vocab_size() == vocab_size
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama, its ×2/×2 up-scaled copy, and a copy of each with a tokenizer."""
    root = tmp_path_factory.mktemp("inference")
    plain = build_checkpoint(root / "tiny", "llama", tie_word_embeddings=False)
    wide = run_up(plain, str(root / "tiny-x2"), UpOptions(2, 2), show_progress=False).output
    talking = str(root / "talking")
    shutil.copytree(plain, talking)
    save_tokenizer(talking)
    talking_wide = run_up(talking, str(root / "talking-x2"), UpOptions(2, 2), show_progress=False).output
    return {"root": root, "plain": plain, "wide": wide, "talking": talking, "talking_wide": talking_wide}


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tensorscale: error:"), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


# --- gen ---------------------------------------------------------------------------------------------------


def test_gen_greedy_is_deterministic_and_streams_after_the_prompt(models):
    first = run("gen", "-i", models["talking"], "-p", "the capital of", "-n", "8", "--greedy")
    second = run("gen", "-i", models["talking"], "-p", "the capital of", "-n", "8", "--greedy")
    assert first.exit_code == 0, first.output
    assert first.output == second.output
    assert first.output.startswith("the capital of") and len(first.output.strip()) > len("the capital of")
    data = json.loads(
        run("gen", "-i", models["talking"], "-p", "the capital of", "-n", "8", "--greedy", "--json").output
    )
    assert set(data) >= {"prompt", "completion", "tokens"} and data["prompt"] == "the capital of"
    assert 1 <= data["tokens"] <= 8
    assert data["completion"].strip() and data["completion"].strip() in first.output


def test_gen_streams_pieces_as_they_decode(models):
    from tensorscale.gguf_import import runnable_source
    from tensorscale.inference.generate import Settings, generate

    pieces = []
    result = generate(
        runnable_source(models["talking"]),
        models["talking"],
        "once upon a",
        Settings(n_predict=6, greedy=True),
        on_text=pieces.append,
    )
    assert result["tokens"] >= 2 and len(pieces) >= 2, (result, pieces)  # not one lump at the end
    assert "".join(pieces).split() == result["completion"].split()


def test_gen_sampling_with_a_seed_is_reproducible(models):
    args = (
        "gen",
        "-i",
        models["talking"],
        "-n",
        "12",
        "--temperature",
        "1.5",
        "--top-k",
        "0",
        "--top-p",
        "1",
        "--json",
    )
    a, b = (json.loads(run(*args, "--seed", "7").output) for _ in range(2))
    assert a == b and a["seed"] == 7 and not a["greedy"]
    others = {json.loads(run(*args, "--seed", str(seed)).output)["completion"] for seed in range(8, 12)}
    assert len(others | {a["completion"]}) > 1, "sampling ignores the seed"


def test_gen_without_tokenizer_is_one_line(models):
    one_line_error(run("gen", "-i", models["plain"]), "no tokenizer files", "copy them")


def test_gen_rejects_bad_sampling_options(models):
    # --temperature 0 is greedy (as in llama.cpp, test_gen_chat.py); below 0 is a mistake
    one_line_error(run("gen", "-i", models["talking"], "--temperature", "-1"), "--temperature", "--greedy")
    one_line_error(run("gen", "-i", models["talking"], "--repeat-penalty", "0"), "--repeat-penalty")
    one_line_error(run("gen", "-i", models["talking"], "--top-p", "1.5"), "--top-p")
    one_line_error(run("gen", "-i", models["talking"], "-n", "0"), "--n-predict")


# --- verify ------------------------------------------------------------------------------------------------


def test_verify_passes_an_up_scaled_copy(models):
    result = run("verify", models["plain"], models["wide"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["passed"] and report["relative_logit_error"] < 1e-5
    assert report["top1_agreement"] == 1.0 and report["kl_mean"] < 1e-9
    assert "random token ids" in report["inputs"] and report["positions"] > 0
    assert report["perplexity_source"] == pytest.approx(report["perplexity_output"], rel=1e-4)
    text = run("verify", "-i", models["plain"], "-o", models["wide"])
    assert text.exit_code == 0 and "PASS" in text.output and "random token ids" in text.output


def test_verify_fails_a_tampered_copy(models, tmp_path):
    from safetensors.torch import load_file, save_file

    tampered = str(tmp_path / "tampered")
    shutil.copytree(models["wide"], tampered)
    shards = [name for name in os.listdir(tampered) if name.endswith(".safetensors")]
    assert len(shards) == 1
    path = os.path.join(tampered, shards[0])
    tensors = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][0, 0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    result = run("verify", models["plain"], tampered, "--json")
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert not report["passed"] and report["relative_logit_error"] > 1e-3
    text = run("verify", models["plain"], tampered)
    assert text.exit_code == 1 and "FAIL" in text.output.splitlines()[-1]
    # A looser pass mark accepts the same pair: --tolerance is the pass mark.
    assert run("verify", models["plain"], tampered, "--tolerance", "1").exit_code == 0


def test_verify_refuses_different_vocabularies(models, tmp_path):
    bigger = build_checkpoint(tmp_path / "vocab128", "llama", vocab_size=128, tie_word_embeddings=False)
    one_line_error(run("verify", models["plain"], bigger), "vocab", "96", "128")


def test_verify_refuses_different_tokenizers(models, tmp_path):
    other = str(tmp_path / "other-tokenizer")
    shutil.copytree(models["plain"], other)
    save_tokenizer(other, extra_words=["zebra", "quokka", "axolotl"])
    one_line_error(run("verify", models["talking"], other), "tokenizers", "differ")


def test_verify_with_a_tokenizer_and_a_text_file(models, tmp_path):
    result = run("verify", models["talking"], models["talking_wide"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert "built-in texts" in report["inputs"] and report["passed"]
    text_file = tmp_path / "text.txt"
    text_file.write_text("the capital of france is paris\n\nonce upon a time\n")
    report = json.loads(
        run("verify", models["talking"], models["talking_wide"], "--text", str(text_file), "--json").output
    )
    assert report["sequences"] == 2 and "--text" in report["inputs"] and report["passed"]
    assert report["perplexity_source"] == pytest.approx(report["perplexity_output"], rel=1e-4)


def test_verify_argument_mistakes_are_one_line(models, tmp_path):
    one_line_error(run("verify", models["plain"]), "SRC DST")
    one_line_error(run("verify", models["plain"], models["wide"], "-i", models["plain"]), "not both")
    one_line_error(run("verify", models["plain"], models["plain"], "--text", str(tmp_path / "none.txt")), "--text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(run("verify", models["talking"], models["talking"], "--text", str(empty)), "empty")


# --- up --verify -------------------------------------------------------------------------------------------


def test_up_verify_passes_and_reports(models, tmp_path):
    result = run("up", "-i", models["plain"], "-o", str(tmp_path / "out"), "-edm", "2", "-upm", "3", "--verify", "-q")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "PASS" in result.output.splitlines()[-1]
    data = json.loads(
        run(
            "up", "-i", models["plain"], "-o", str(tmp_path / "out"), "-edm", "2", "--force", "--verify", "--json"
        ).output
    )
    assert data["verify"]["passed"] and data["verify"]["relative_logit_error"] < 1e-5


def test_up_verify_fails_when_precision_is_lost(models, tmp_path):
    """Storing a float32 model in bfloat16 changes its logits by ~1e-2: --verify must say so with exit 1."""
    result = run(
        "up", "-i", models["plain"], "-o", str(tmp_path / "bf16"), "-edm", "2", "--dtype", "bfloat16", "--verify", "-q"
    )
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output.splitlines()[-1]


# --- transformers stays optional ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["gen", "verify"])
def test_missing_transformers_is_a_one_line_hint(models, command):
    args = ["gen", "-i", models["talking"]] if command == "gen" else ["verify", models["plain"], models["wide"]]
    code = (
        "import sys\nsys.modules['transformers'] = None\nfrom tensorscale.cli.main import main\n"
        f"sys.argv = ['tensorscale', *{args!r}]\nmain()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tensorscale[transformers]'" in lines[0], result.stderr
    assert result.stdout == ""


def test_registering_the_commands_imports_neither_torch_nor_transformers():
    code = (
        "import sys\nimport tensorscale.cli.main\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import at CLI load'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
