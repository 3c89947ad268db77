"""The command line: every command, its --json, and one-line errors with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
from click.testing import CliRunner
from fixtures import build_checkpoint, read_config, relative_logit_error, run_cli_in_fresh_process

from tensorscale.cli.main import cli

RULES_DIR = os.path.join(os.path.dirname(__file__), "..", "rules")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("cli") / "tiny-llama", "llama", tie_word_embeddings=False)


def run(*args, cwd=None):
    runner = CliRunner()
    if cwd:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    finally:
        if cwd:
            os.chdir(old)


def run_process(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_desc_json(llama):
    result = run("desc", "-i", llama, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    from safetensors import safe_open

    with safe_open(os.path.join(llama, "model.safetensors"), "pt") as handle:
        expected = sum(
            handle.get_slice(k).get_shape()[0] * (handle.get_slice(k).get_shape()[1:] or [1])[0] for k in handle.keys()
        )
    assert isinstance(data["total_parameters"], int) and data["total_parameters"] == expected
    assert set(data["parameters_by_component"]) == {"embeddings", "attention", "mlp", "norms", "head"}
    assert sum(data["parameters_by_component"].values()) == expected
    assert data["dtypes"] == {"F32": expected * 4}


def test_desc_text_and_no_heavy_imports(llama):
    result = run_cli_in_fresh_process(["desc", "-i", llama], forbidden=("transformers", "torch"))
    assert result.returncode == 0, result.stderr
    assert "LlamaForCausalLM" in result.stdout and "attention" in result.stdout


def test_plan_writes_nothing_and_lists_every_tensor(llama, tmp_path):
    before = sorted(os.listdir(llama))
    result = run("plan", "-i", llama, "-edm", "2", "-upm", "3", "-o", str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert not (tmp_path / "out").exists() and sorted(os.listdir(llama)) == before
    assert len(data["tensors"]) == 2 + 9 * 2 + 1  # embed, head, 9 per layer, final norm
    q = next(t for t in data["tensors"] if t["name"].endswith("0.self_attn.q_proj.weight"))
    assert q["out_shape"] == [64, 64] and q["ops"] == ["tile(axis=0, x2)", "tile_divide(axis=1, x2)"]
    assert data["config_changes"]["intermediate_size"] == {"from": 48, "to": 144}
    text = run("plan", "-i", llama, "-edm", "2").output
    assert "nothing was written" in text and "tile_divide" in text


def test_up_default_name_json_and_force(llama, tmp_path):
    result = run("up", "-i", llama, "-edm", "2", "-upm", "2", "--json", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert os.path.basename(summary["output"]) == "tiny-llama-" + summary["output"].rsplit("-", 1)[1]
    assert summary["output"].endswith("K") and os.path.isdir(summary["output"])
    assert relative_logit_error(llama, summary["output"]) <= 1e-5
    again = run("up", "-i", llama, "-edm", "2", "-upm", "2", "-q", cwd=tmp_path)
    assert again.exit_code == 2 and "already exists" in again.output
    forced = run("up", "-i", llama, "-edm", "3", "-q", "--force", "-o", summary["output"])
    assert forced.exit_code == 0
    assert read_config(summary["output"])["hidden_size"] == 96
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary folders left behind"


def test_sharded_output_and_umask(llama, tmp_path):
    old = os.umask(0o027)
    try:
        result = run("up", "-i", llama, "-o", str(tmp_path / "out"), "-edm", "2", "--max-shard-size", "40KB", "-q")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    files = os.listdir(tmp_path / "out")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for name in files:
        mode = stat.S_IMODE(os.stat(tmp_path / "out" / name).st_mode)
        assert mode == 0o640, (name, oct(mode))
    assert relative_logit_error(llama, tmp_path / "out") <= 1e-5


def test_user_rules_file_adds_an_architecture(llama, tmp_path):
    """A new architecture needs a rules file only: rename the model type, point --rules at a file."""
    source = tmp_path / "renamed"
    shutil.copytree(llama, source)
    config = read_config(source)
    config["model_type"] = "my_new_arch"
    config["architectures"] = ["MyNewArchForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    refused = run("up", "-i", str(source), "-o", str(tmp_path / "out"), "-edm", "2")
    assert refused.exit_code == 2 and "--rules" in refused.output and not (tmp_path / "out").exists()
    rules = tmp_path / "mine.yaml"
    rules.write_text(open(os.path.join(RULES_DIR, "llama.yaml")).read().replace("name: llama", "name: mine"))
    check = run("rules", "check", "-i", str(source), "--rules", str(rules))
    assert check.exit_code == 0 and "every tensor matches a rule" in check.output
    done = run("up", "-i", str(source), "-o", str(tmp_path / "out"), "-edm", "2", "--rules", str(rules), "-q")
    assert done.exit_code == 0, done.output
    assert read_config(tmp_path / "out")["hidden_size"] == 64


def test_rules_check_lists_unmatched(llama, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    source = tmp_path / "extra"
    shutil.copytree(llama, source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.mystery.weight"] = torch.zeros(3)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    result = run("rules", "check", "-i", str(source))
    assert result.exit_code == 1 and "model.mystery.weight" in result.output
    up = run("up", "-i", str(source), "-o", str(tmp_path / "out"), "-edm", "2")
    assert up.exit_code == 2 and "model.mystery.weight" in up.output and not (tmp_path / "out").exists()


def test_rules_list_and_show():
    listed = run("rules", "list")
    assert listed.exit_code == 0 and "llama" in listed.output
    shown = run("rules", "show", "llama")
    assert shown.exit_code == 0 and "extends: _decoder" in shown.output and "tensors:" not in shown.output
    resolved = run("rules", "show", "llama", "--resolved")
    assert resolved.exit_code == 0 and "tensors:" in resolved.output and "extends" not in resolved.output
    missing = run("rules", "show", "nope")
    assert missing.exit_code == 2 and "rules list" in missing.output


BAD_RULES = {
    "invalid YAML": ("name: x\ntensors: [\n", "invalid YAML"),
    "unknown op": ("name: x\ntensors:\n  - match: '.*'\n    ops: [{explode: {axis: 0}}]\n", "unknown op 'explode'"),
    "code in an expression": (
        "name: x\ntensors:\n  - match: '.*'\n    scale: \"__import__('os').getcwd()\"\n",
        "not allowed",
    ),
    "attribute access": ("name: x\ntensors:\n  - match: '.*'\n    scale: 'n.real'\n", "forbidden construct"),
    "bad regex": ("name: x\ntensors:\n  - match: '(unclosed'\n", "does not compile"),
    "unknown key": ("name: x\ntensors:\n  - match: '.*'\n    axe: [a]\n", "unknown key 'axe'"),
    "unknown space": ("name: x\ntensors:\n  - match: '.*'\n    axes: [hidden]\n", "names no space"),
}


@pytest.mark.parametrize("case", sorted(BAD_RULES))
def test_bad_rules_are_one_line_errors(llama, tmp_path, case):
    text, message = BAD_RULES[case]
    rules = tmp_path / "bad.yaml"
    rules.write_text(text)
    result = run_process("up", "-i", llama, "-o", str(tmp_path / "out"), "--rules", str(rules), "-edm", "2")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["-edm", "0"], "--embed-dim-multiplier must be a whole number >= 1"),
        (["-upm", "-2"], "--up-proj-multiplier must be a whole number >= 1"),
        (["--max-shard-size", "lots"], "cannot read size"),
    ],
)
def test_bad_options(llama, tmp_path, args, message):
    result = run_process("up", "-i", llama, "-o", str(tmp_path / "out"), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_inputs(llama, tmp_path):
    inside = run_process("up", "-i", llama, "-o", os.path.join(llama, "sub"), "-edm", "2")
    assert inside.returncode == 2 and "inside" in inside.stderr
    same = run_process("up", "-i", llama, "-o", llama, "--force", "-edm", "2")
    assert same.returncode == 2 and "input folder" in same.stderr
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), pickles)
    (pickles / "pytorch_model.bin").write_bytes(b"not really a pickle")
    refused = run_process("desc", "-i", str(pickles))
    assert refused.returncode == 2 and "never unpickles" in refused.stderr
    no_config = tmp_path / "empty"
    no_config.mkdir()
    assert "no config.json" in run_process("desc", "-i", str(no_config)).stderr
    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    (broken / "config.json").write_text("{oops")
    result = run_process("up", "-i", str(broken), "-o", str(tmp_path / "o2"), "-edm", "2")
    assert result.returncode == 2 and "not valid JSON" in result.stderr


def test_hub_id_offline_is_one_line(tmp_path):
    result = run_process("up", "-i", "some-org/some-model", "-o", str(tmp_path / "out"), "-edm", "2", cwd=tmp_path)
    assert result.returncode == 2 and "offline" in result.stderr and "Traceback" not in result.stderr
    desc = run_process("desc", "-i", "some-org/some-model", cwd=tmp_path)
    assert desc.returncode == 2 and "offline" in desc.stderr


def test_plan_does_not_import_torch(llama):
    """plan reads headers only; torch (over a second to import) must not load for it."""
    result = run_cli_in_fresh_process(["plan", "-i", llama, "-edm", "2"], forbidden=("torch",))
    assert result.returncode == 0, result.stderr
    assert "nothing was written" in result.stdout
