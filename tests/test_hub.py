"""Hub ids go through huggingface_hub; here the hub is a local cache folder (tests never go online)."""

from __future__ import annotations

import os
import shutil

from fixtures import build_checkpoint, relative_logit_error
from test_cli import run_process


def make_cache(cache, repo_id, model_folder, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay out `model_folder` as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in os.listdir(model_folder):
        shutil.copy(os.path.join(model_folder, name), snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_from_cache(tmp_path, monkeypatch):
    model = build_checkpoint(tmp_path / "model", "llama", tie_word_embeddings=False)
    make_cache(tmp_path / "cache", "tiny-org/tiny-llama", model)
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    desc = run_process("desc", "-i", "tiny-org/tiny-llama", "--json")
    assert desc.returncode == 0, desc.stderr
    assert '"input": "tiny-org/tiny-llama"' in desc.stdout
    up = run_process("up", "-i", "tiny-org/tiny-llama", "-edm", "2", "-q", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    outputs = [name for name in os.listdir(tmp_path) if name.startswith("tiny-llama-")]
    assert len(outputs) == 1, "output is named after the repo"
    assert relative_logit_error(model, tmp_path / outputs[0]) <= 1e-5
