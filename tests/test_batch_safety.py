"""batch never deletes what is not its own: its jobs file, user files added to a finished output, or one job's
input that another job writes; nested outputs are refused; workers die with a SIGKILLed driver.
Each test failed before issue 14."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner
from fixtures import build_checkpoint

from tensorscale.cli.main import cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("batch-safety") / "src", "llama")


def write_jobs(folder, jobs):
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    path = os.path.join(folder, "jobs.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump({"jobs": jobs}, handle)
    return path


def batch(path, *extra):
    return CliRunner().invoke(cli, ["batch", str(path), "--quiet", *extra])


def one_line_error(result, *needles):
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, line
    return line


def test_a_job_writing_the_jobs_files_folder_is_refused(model, tmp_path, monkeypatch):
    """Before: `{output: ., force: true}` deleted its own jobs file, then crashed with a traceback."""
    work = tmp_path / "work"
    path = write_jobs(
        work, [{"command": "up", "input": model, "output": ".", "force": True, "embed_dim_multiplier": 2}]
    )
    monkeypatch.chdir(work)
    one_line_error(batch(path), "jobs file")
    assert sorted(os.listdir(work)) == ["jobs.yaml", "out"]


def test_reading_an_output_that_does_not_exist_yet_is_refused(model, tmp_path):
    """Before: `out/a` did not exist yet, so job 2's input was taken for a hub id and the check skipped."""
    path = write_jobs(
        tmp_path,
        [
            {"command": "up", "input": model, "output": "out/a", "embed_dim_multiplier": 2},
            {"command": "up", "input": "out/a", "output": "out/b", "embed_dim_multiplier": 2},
        ],
    )
    one_line_error(batch(path), "job 2 reads the output of job 1")


def test_nested_outputs_are_refused(model, tmp_path):
    path = write_jobs(
        tmp_path,
        [
            {"command": "up", "input": model, "output": "out/a", "embed_dim_multiplier": 2},
            {"command": "up", "input": model, "output": "out/a/inner", "up_proj_multiplier": 2},
        ],
    )
    one_line_error(batch(path), "nested")


def test_a_rerun_keeps_files_the_user_added_to_a_finished_output(model, tmp_path):
    """Before: the added file made the output 'differ from the manifest', and the rerun replaced the
    folder, deleting the user's file."""
    path = write_jobs(tmp_path, [{"command": "up", "input": model, "output": "out/a", "embed_dim_multiplier": 2}])
    assert batch(path).exit_code == 0
    notes = tmp_path / "out" / "a" / "notes.txt"
    notes.write_text("my evaluation results")
    result = batch(path, "--json")
    assert result.exit_code == 0, result.output
    assert '"skipped": 1' in result.output
    assert notes.read_text() == "my evaluation results"


def test_a_redo_never_deletes_user_files(model, tmp_path):
    """An edited job must redo its output, but the user's file there is not ours to delete: the batch is
    refused before any job runs, in one line, and the folder stays as it was."""
    jobs = [{"command": "up", "input": model, "output": "out/a", "embed_dim_multiplier": 2}]
    path = write_jobs(tmp_path, jobs)
    assert batch(path).exit_code == 0
    (tmp_path / "out" / "a" / "notes.txt").write_text("mine")
    jobs[0]["up_proj_multiplier"] = 2
    write_jobs(tmp_path, jobs)
    one_line_error(batch(path), "job 1", "notes.txt")
    assert (tmp_path / "out" / "a" / "notes.txt").read_text() == "mine"


def test_a_non_model_folder_as_output_is_refused_before_any_job(model, tmp_path):
    (tmp_path / "out" / "b").mkdir(parents=True)
    (tmp_path / "out" / "b" / "thesis.txt").write_text("years")
    path = write_jobs(
        tmp_path,
        [
            {"command": "up", "input": model, "output": "out/a", "embed_dim_multiplier": 2},
            {"command": "up", "input": model, "output": "out/b", "embed_dim_multiplier": 2, "force": True},
        ],
    )
    one_line_error(batch(path), "job 2", "thesis.txt")
    assert not (tmp_path / "out" / "a").exists()  # nothing ran


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read()
            except OSError:
                continue
            if int(fields[1]) == pid and b"spawn_main" in cmdline:
                found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_die_with_a_killed_driver(tmp_path):
    """Before: SIGKILL of the driver left its workers blocked forever (~237 MB each)."""
    big = build_checkpoint(
        tmp_path / "big",
        "llama",
        tie_word_embeddings=False,
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    path = write_jobs(
        tmp_path,
        [
            {
                "command": "up",
                "input": big,
                "output": f"out/{i}",
                "embed_dim_multiplier": 3,
                "up_proj_multiplier": 3,
                "max_shard_size": "1MB",
            }
            for i in range(4)
        ],
    )
    driver = subprocess.Popen(
        [sys.executable, "-m", "tensorscale.cli.main", "batch", path, "--jobs", "2", "-q", "--memory-budget", "2GiB"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = []
    deadline = time.time() + 120

    def writing():  # a shard file in a temporary folder: the workers are past start-up, at work
        try:
            return any(
                name.endswith(".safetensors")
                for folder in (tmp_path / "out").glob(".*tensorscale-tmp-*")
                for name in os.listdir(folder)
            )
        except OSError:
            return False

    while time.time() < deadline and driver.poll() is None and not (len(workers) >= 2 and writing()):
        time.sleep(0.2)
        workers = _children(driver.pid)
    assert workers, "no worker processes appeared"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30  # the watcher polls every 0.5 s; a loaded machine is slow to schedule it
    while time.time() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.2)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their driver"
