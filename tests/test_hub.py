"""Hub ids go through huggingface_hub and its cache, laid out by huggingface_hub's own code (hub_cache.py):
blobs named by hash, snapshots of relative symlinks, refs/main. Tests never go online."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from fixtures import PYDOC_LLAMA as PYDOC
from fixtures import build_checkpoint, pydoc_copy, relative_logit_error
from hub_cache import REVISION, make_cache

REPO = "tiny-org/pydoc-llama"
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CARD = "---\nlicense: psf-2.0\nlanguage: en\n---\n# pydoc-llama\n"


def tensorscale(*args, env, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tensorscale.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def use_cache(monkeypatch, hf_home):
    """Point this process's huggingface_hub at the cache under `hf_home` (it read HF_HOME at import)."""
    from hub_cache import cache_folder
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_folder(hf_home))


def invoke(*args):
    """The CLI in this process (no torch import per call): exit code, stdout and stderr apart."""
    from click.testing import CliRunner

    from tensorscale.cli.main import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def hub_env(hf_home, offline=True, **extra):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", **extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def pydoc_hub(tmp_path_factory):
    """pydoc-llama (a real trained model with its tokenizer) as a hub download, plus a chat template and card."""
    root = tmp_path_factory.mktemp("hub")
    model = pydoc_copy(root / "model", **{"chat_template.jinja": CHAT_TEMPLATE, "README.md": CARD})
    hf_home = root / "hf_home"
    snapshot = make_cache(hf_home, REPO, model)
    return hf_home, snapshot, model


def test_cache_is_links_into_blobs(pydoc_hub):
    hf_home, snapshot, _ = pydoc_hub
    names = sorted(os.listdir(snapshot))
    assert "model.safetensors" in names and "chat_template.jinja" in names
    for name in names:
        path = os.path.join(snapshot, name)
        assert os.path.islink(path) and os.readlink(path).startswith("../../blobs/"), name


@pytest.mark.parametrize("fresh_process", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_desc_up_gen_verify_through_a_hub_id(pydoc_hub, tmp_path, monkeypatch, fresh_process):
    """The four commands on a hub id, offline. In this process by default (each fresh process imports torch
    and transformers again: ~20 s each on a loaded machine); with -m slow also as separate processes."""
    hf_home, snapshot, model = pydoc_hub
    if fresh_process:
        env = hub_env(hf_home)

        def command(*args):
            result = tensorscale(*args, env=env, cwd=tmp_path)
            return result.returncode, result.stdout, result.stderr
    else:
        use_cache(monkeypatch, hf_home)
        monkeypatch.chdir(tmp_path)

        def command(*args):
            result = invoke(*args)
            return result.exit_code, result.stdout, result.stderr

    code, stdout, stderr = command("desc", "-i", REPO, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["input"] == REPO

    code, stdout, stderr = command("up", "-i", REPO, "-edm", "2", "-q", "--manifest", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    out = summary["output"]
    assert os.path.dirname(out) == str(tmp_path) and os.path.basename(out).startswith("pydoc-llama-"), out
    # Tokenizer, generation config and chat template come along, as plain files.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert name in summary["side_files"], (name, summary["side_files"])
        assert os.path.isfile(os.path.join(out, name)) and not os.path.islink(os.path.join(out, name))
    with open(os.path.join(out, "chat_template.jinja")) as handle:
        assert handle.read() == CHAT_TEMPLATE
    with open(os.path.join(out, "tensorscale-manifest.json")) as handle:
        manifest = json.load(handle)
    assert manifest["source"]["hub_id"] == REPO and manifest["source"]["revision"] == REVISION
    assert manifest["source"]["requested_revision"] is None
    assert list(manifest["source"]["shards"]) == ["model.safetensors"]
    # The card names the repo and its commit, and carries the licence of the cached card (a link to a blob).
    from tensorscale.writing.model_card import front_matter

    with open(os.path.join(out, "README.md")) as handle:
        card = handle.read()
    assert front_matter(card)["base_model"] == REPO and front_matter(card)["license"] == "psf-2.0"
    assert f"at revision `{REVISION}`" in card
    assert relative_logit_error(model, out) <= 1e-5

    code, stdout, stderr = command("gen", "-i", REPO, "-p", "Return the", "-n", "5", "--greedy", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tokens"] >= 1

    code, stdout, stderr = command("verify", REPO, out, "--json")
    assert code == 0, stderr + stdout
    report = json.loads(stdout)
    assert report["passed"] and "built-in texts" in report["inputs"]


def test_revision_by_at_and_by_option(pydoc_hub, tmp_path, monkeypatch):
    hf_home, _, _ = pydoc_hub
    use_cache(monkeypatch, hf_home)
    for index, args in enumerate(((f"{REPO}@{REVISION}",), (REPO, "--revision", "main"), (f"{REPO}@main",))):
        out = tmp_path / f"out{index}"
        up = invoke("up", "-i", *args, "-upm", "2", "-q", "--manifest", "-o", str(out))
        assert up.exit_code == 0, up.output
        with open(out / "tensorscale-manifest.json") as handle:
            source = json.load(handle)["source"]
        assert source["revision"] == REVISION
        assert source["requested_revision"] == (REVISION if index == 0 else "main")
    desc = invoke("desc", "-i", REPO, "--revision", REVISION[:-1] + "8")
    assert desc.exit_code == 2 and desc.stderr.count("\n") == 1, desc.output
    assert "not in the local cache" in desc.stderr
    both = invoke("desc", "-i", f"{REPO}@main", "--revision", "main")
    assert both.exit_code == 2 and "either" in both.stderr
    local = invoke("desc", "-i", PYDOC, "--revision", "main")
    assert local.exit_code == 2 and "local path" in local.stderr


def _repo_with_link(hf_home, repo_id, target_for, model_folder):
    """A cached repo whose file `target_for[0]` links to `target_for[1]` instead of its own blob."""
    snapshot = make_cache(hf_home, repo_id, model_folder)
    name, target = target_for
    os.remove(os.path.join(snapshot, name))
    os.symlink(os.path.relpath(target, snapshot), os.path.join(snapshot, name))
    return snapshot


def test_links_that_leave_the_repo_folder_are_refused(tmp_path, monkeypatch):
    model = build_checkpoint(tmp_path / "model", "llama")
    hf_home = tmp_path / "hf_home"
    use_cache(monkeypatch, hf_home)
    other = make_cache(hf_home, "other-org/other", model)  # a real blob, but another repo's
    _repo_with_link(hf_home, "tiny-org/leaky", ("model.safetensors", os.path.join(other, "model.safetensors")), model)
    result = invoke("desc", "-i", "tiny-org/leaky")
    assert result.exit_code == 2, result.output
    assert "model.safetensors is a link out of its hub cache folder" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_snapshot_copy_with_links_is_a_plain_folder(tmp_path):
    """Links are allowed by the layout, not by where a path happens to lie: a copied snapshot (no blobs/
    beside it) is a plain folder, and its links out of it are refused."""
    model = build_checkpoint(tmp_path / "model", "llama")
    snapshot = make_cache(tmp_path / "huggingface", "tiny-org/tiny", model)
    plain = tmp_path / "huggingface" / "copy"
    plain.mkdir()
    for name in os.listdir(snapshot):
        os.symlink(os.path.realpath(os.path.join(snapshot, name)), plain / name)
    result = invoke("desc", "-i", str(plain))
    assert result.exit_code == 2 and "link out of the model folder" in result.stderr, result.stderr


def test_the_hub_token_never_reaches_an_output(tmp_path, monkeypatch):
    """A side-file link to ~/.cache/huggingface/token is not followed, from a hub snapshot or a plain folder."""
    home = tmp_path / "home"
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_SECRET_token_value")
    model = build_checkpoint(tmp_path / "model", "llama")
    # A plain folder, and a hub snapshot whose repo folder holds a file named token (linked from inside).
    plain = tmp_path / "plain"
    shutil.copytree(model, plain)
    os.symlink(token, plain / "special_tokens_map.json")
    hf_home = home / ".cache" / "huggingface"
    snapshot = make_cache(hf_home, "tiny-org/tiny", model)
    repo = os.path.dirname(os.path.dirname(snapshot))
    shutil.copyfile(token, os.path.join(repo, "blobs", "token"))
    os.symlink("../../blobs/token", os.path.join(snapshot, "special_tokens_map.json"))
    os.symlink(token, os.path.join(snapshot, "tokenizer_config.json"))
    monkeypatch.setenv("HOME", str(home))
    use_cache(monkeypatch, hf_home)
    for source in (str(plain), "tiny-org/tiny"):
        out = tmp_path / ("out-" + source.replace("/", "-"))
        up = invoke("up", "-i", source, "-edm", "2", "-q", "-o", str(out), "--json")
        assert up.exit_code == 0, up.output
        assert "special_tokens_map.json" not in json.loads(up.stdout)["side_files"]
        assert "generation_config.json" in json.loads(up.stdout)["side_files"]
        assert "tokenizer_config.json" not in json.loads(up.stdout)["side_files"]
        for name in os.listdir(out):
            with open(out / name, "rb") as handle:
                assert b"hf_SECRET" not in handle.read(), name


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_hub_fails_fast_without_offline_setting(tmp_path):
    """A fresh process, as a user runs it: huggingface_hub reads HF_HUB_OFFLINE (unset here) at import."""
    env = hub_env(tmp_path / "hf_home", offline=False, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    result = tensorscale("desc", "-i", "no-org/not-cached", env=env)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "tensorscale: error: no-org/not-cached: not in the local cache and the hub cannot be "
        "reached (offline); pass a local model folder instead, or go online\n"
    )
    # huggingface_hub alone retries for seconds (24 s measured on a dead network); the probe is one connect.
    # desc imports neither torch nor transformers, so the process itself starts in well under a second.
    assert seconds < 4, seconds


def test_unreachable_hub_uses_the_cache(pydoc_hub, tmp_path):
    hf_home, _, _ = pydoc_hub
    env = hub_env(hf_home, offline=False, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    desc = tensorscale("desc", "-i", REPO, "--json", env=env)
    assert desc.returncode == 0, desc.stderr


def test_hub_id_without_cache_offline(tmp_path, monkeypatch):
    use_cache(monkeypatch, tmp_path / "hf_home")
    result = invoke("desc", "-i", "no-org/nothing")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.stderr and result.stderr.count("\n") == 1
