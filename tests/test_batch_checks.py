"""batch, as a user runs it: output parent folders are created, every input is checked before any job
runs, up's notes reach the summary, and a rerun decides what is finished without rehashing every file."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from fixtures import build_checkpoint

from tensorscale.cli.main import cli


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-checks")
    return {
        "llama": build_checkpoint(root / "llama", "llama"),
        "bf16": build_checkpoint(root / "bf16", "llama", dtype=torch.bfloat16, seed=5),
    }


def write_jobs(folder, jobs):
    path = os.path.join(folder, "jobs.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump({"jobs": jobs}, handle)
    return path


def batch(path, *args, env=None):
    return CliRunner().invoke(cli, ["batch", path, "--jobs", "1", *args], catch_exceptions=False, env=env)


def summary(path):
    with open(path[: -len(".yaml")] + ".summary.json") as handle:
        return json.load(handle)


def test_parent_folders_are_created_and_notes_reach_the_summary(tmp_path, sources):
    path = write_jobs(
        str(tmp_path),
        [
            {"command": "up", "input": sources["bf16"], "output": "new/deeper/bf16-wide", "hidden_size": 48},
            {"command": "up", "input": sources["llama"], "output": "other/llama-x2", "embed_dim_multiplier": 2},
        ],
    )
    result = batch(path, "-q")
    assert result.exit_code == 0, result.output
    assert os.path.isfile(tmp_path / "new" / "deeper" / "bf16-wide" / "config.json")
    assert os.path.isfile(tmp_path / "other" / "llama-x2" / "config.json")
    first, second = summary(path)["jobs"]
    assert any("not exact in bfloat16" in note for note in first["notes"]) and "notes" not in second
    assert "job 1 note: not exact in bfloat16" in result.stderr and "note" not in result.stdout


@pytest.mark.parametrize(
    "job, message",
    [
        ({"input": "no-such-model"}, "no-such-model: no model folder at"),
        ({"input": "/nowhere/model"}, "job 2: input /nowhere/model: no model folder at /nowhere/model"),
        (
            {"input": "some-org/not-cached"},
            "job 2: input some-org/not-cached: some-org/not-cached: not in the local cache",
        ),
        ({"embed_dim_multiplier": 1}, "job 2: nothing to change"),
        ({"output": "a-file/inside"}, "job 2: cannot create the folder for"),
    ],
)
def test_every_job_is_checked_before_any_runs(tmp_path, sources, job, message):
    (tmp_path / "a-file").write_text("not a folder")
    second = {"command": "up", "input": sources["llama"], "output": "out/second", "embed_dim_multiplier": 2, **job}
    path = write_jobs(
        str(tmp_path),
        [{"command": "up", "input": sources["llama"], "output": "out/first", "embed_dim_multiplier": 2}, second],
    )
    result = batch(path)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()  # not even the parent folder of job 1's output
    assert not os.path.exists(path[: -len(".yaml")] + ".summary.json")


def test_rerun_skips_by_sizes_and_mtimes_and_verify_files_rehashes(tmp_path, sources, monkeypatch):
    path = write_jobs(
        str(tmp_path),
        [
            {
                "command": "up",
                "input": sources["llama"],
                "output": "out/llama-x2",
                "embed_dim_multiplier": 2,
                "max_shard_size": "24KB",
            }
        ],
    )
    assert batch(path, "-q").exit_code == 0
    output = summary(path)["jobs"][0]["output"]
    with open(os.path.join(output, "tensorscale-manifest.json")) as handle:
        stats = json.load(handle)["file_stats"]
    assert set(stats["output"]) >= {"config.json", "model.safetensors.index.json"}

    import tensorscale.batch.resume as resume

    hashed = []
    real_hash = resume.file_sha256
    monkeypatch.setattr(resume, "file_sha256", lambda p: hashed.append(p) or real_hash(p))
    assert batch(path, "-q").exit_code == 0
    assert summary(path)["jobs"][0]["status"] == "skipped" and hashed == []  # no file read again

    # a change that keeps size and mtime (restored by hand) passes the quick check; --verify-files sees it
    shard = os.path.join(output, sorted(n for n in os.listdir(output) if n.endswith(".safetensors"))[0])
    status = os.stat(shard)
    with open(shard, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert batch(path, "-q").exit_code == 0 and summary(path)["jobs"][0]["status"] == "skipped"
    assert batch(path, "-q", "--verify-files").exit_code == 0
    entry = summary(path)["jobs"][0]
    assert entry["status"] == "done" and "differs from the manifest" in entry["note"] and hashed

    # a touched input shard (a re-download) is redone without --verify-files
    hashed.clear()
    source_shard = os.path.join(sources["llama"], "model.safetensors")
    os.utime(source_shard)
    assert batch(path, "-q").exit_code == 0
    assert "the input's shards differ" in summary(path)["jobs"][0]["note"]


def test_batch_progress_honours_the_silencing_variables(tmp_path, sources):
    path = write_jobs(
        str(tmp_path), [{"command": "up", "input": sources["llama"], "output": "out/x2", "embed_dim_multiplier": 2}]
    )
    shown = batch(path, env={"TQDM_DISABLE": "", "HF_HUB_DISABLE_PROGRESS_BARS": ""})
    assert shown.exit_code == 0 and "job 1/1 up" in shown.stderr
    silenced = batch(path, env={"TQDM_DISABLE": "", "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert silenced.exit_code == 0 and "job 1/1" not in silenced.stderr
