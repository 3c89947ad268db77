"""`tensorscale batch`: the jobs file is checked whole, parallel runs give the bytes of a plain `up`, failures
stay inside their job, reruns skip finished work and redo the rest, and Ray writes the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import yaml
from click.testing import CliRunner
from fixtures import build_checkpoint

from tensorscale.batch.jobs import load_jobs
from tensorscale.batch.local_executor import LocalExecutor, worker_count
from tensorscale.batch.overview import Overview
from tensorscale.batch.runner import run_batch
from tensorscale.batch.tasks import produce_shard_task
from tensorscale.cli.main import cli
from tensorscale.convert import run_up
from tensorscale.errors import TensorscaleError
from tensorscale.planning.plan import UpOptions, parse_size
from tensorscale.writing.integrity import MANIFEST_NAME
from tensorscale.writing.output_folder import TMP_MARKER

SHARD = "24KB"  # small enough that every tiny output has several shards to spread over workers


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-sources")
    return {
        "llama": build_checkpoint(root / "llama", "llama"),
        "qwen2": build_checkpoint(root / "qwen2", "qwen2", seed=1),
    }


def _jobs(sources):
    return [
        {
            "command": "up",
            "input": sources["llama"],
            "output": "out/llama-x2",
            "embed_dim_multiplier": 2,
            "up_proj_multiplier": 2,
        },
        {
            "command": "up",
            "input": sources["llama"],
            "output": "out/llama-x3-noise",
            "embed_dim_multiplier": 3,
            "snr_db": 20,
            "seed": 7,
        },
        {
            "command": "up",
            "input": sources["qwen2"],
            "output": "out/qwen2-x2",
            "embed_dim_multiplier": 2,
            "up_proj_multiplier": 3,
            "untie_embeddings": True,
        },
    ]


def _write_jobs(folder, jobs, defaults=None):
    data = {"jobs": jobs}
    if defaults is not None:
        data["defaults"] = defaults
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "jobs.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(data, handle)
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    return path


def _batch(*args):
    return CliRunner().invoke(cli, ["batch", *args, "--quiet"], catch_exceptions=False)


def _summary(jobs_path):
    with open(jobs_path[: -len(".yaml")] + ".summary.json") as handle:
        return json.load(handle)


def _hashes(folder, with_manifest=False):
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
        if with_manifest or name != MANIFEST_NAME
    }


def _leftovers(folder):
    return [name for name in os.listdir(folder) if TMP_MARKER in name]


# ---------------------------------------------------------------- the jobs file


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"command": "up", "input": "m", "output": "o", "seed": 1, "edm": 2}, "job 2: unknown key 'edm'"),
        (
            {"command": "up", "input": "m", "output": "o", "embed-dim-multiplier": 2},
            "did you mean 'embed_dim_multiplier'",
        ),
        ({"command": "up", "input": "m"}, "job 2: missing `output`"),
        ({"command": "down", "input": "m", "output": "o"}, "job 2: say how small"),
        (
            {"command": "down", "input": "m", "output": "o", "embed_dim_divisor": 2, "snr_db": 20},
            "job 2: `snr_db` is not an option of `down`",
        ),
        (
            {"command": "up", "input": "m", "output": "o", "calibration": "t.txt"},
            "job 2: `calibration` is not an option of `up`",
        ),
        (
            {"command": "down", "input": "m", "output": "o", "hidden_size": 0},
            "job 2: `hidden_size` must be a whole number >= 1",
        ),
        (
            {"command": "down", "input": "m", "output": "o", "embed_dim_divisor": 2, "calibration": "none.txt"},
            "job 2: calibration text",
        ),
        (
            {"command": "down", "input": "m", "output": "o", "embed_dim_divisor": 2, "method": "best"},
            "job 2: `method` must be auto, fold or refit",
        ),
        ({"command": "sideways", "input": "m", "output": "o"}, "job 2: command must be `up` or `down`"),
        (
            {"command": "up", "input": "m", "output": "o", "embed_dim_multiplier": 0},
            "job 2: `embed_dim_multiplier` must be a whole number >= 1",
        ),
        (
            {"command": "up", "input": "m", "output": "o", "untie_embeddings": "yes"},
            "job 2: `untie_embeddings` must be true or false",
        ),
        ({"command": "up", "input": "m", "output": "o", "dtype": "int8"}, "job 2: `dtype` must be one of"),
        (
            {"command": "up", "input": "m", "output": "o", "max_shard_size": "5 parsecs"},
            "job 2: `max_shard_size` cannot read size",
        ),
        (
            {"command": "up", "input": "m", "output": "o", "snr_db": float("inf")},
            "job 2: `snr_db` must be a finite number",
        ),
        ({"command": "up", "input": "m", "output": "o", "rules": "missing.yaml"}, "job 2: rules file"),
        ({"command": "up", "input": "m", "output": "first"}, "jobs 1 and 2 both write"),
        ({"command": "up", "input": "first", "output": "o"}, "job 2 reads the output of job 1"),
        ("up m o", "job 2: expected a mapping"),
    ],
)
def test_schema_errors_name_the_job_and_the_key(tmp_path, entry, message):
    path = _write_jobs(str(tmp_path), [{"command": "up", "input": "m", "output": "first"}, entry])
    with pytest.raises(TensorscaleError, match=re.escape(message)) as info:
        load_jobs(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("jobs: []\n", "non-empty list"),
        ("- {command: up}\n", "top-level `jobs:`"),
        ("jobs:\n  - {command: up, input: m, output: o}\nextra: 1\n", "unknown top-level key 'extra'"),
        ("jobs:\n  - {command: up, input: m, output: o, seed: 1, seed: 2}\n", "line 2: key 'seed' is given twice"),
        ("jobs:\n  - {command: up, input: m\n", "invalid YAML at line"),
        ("defaults: {colour: red}\njobs:\n  - {command: up, input: m, output: o}\n", "defaults: unknown key 'colour'"),
        ("jobs:\n  - !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ],
)
def test_file_level_errors(tmp_path, text, message):
    path = tmp_path / "jobs.yaml"
    path.write_text(text)
    with pytest.raises(TensorscaleError, match=message):
        load_jobs(str(path))


def test_defaults_apply_and_paths_are_relative_to_the_jobs_file(tmp_path):
    path = _write_jobs(
        str(tmp_path),
        [{"command": "up", "input": "m", "output": "o", "seed": 3}],
        defaults={"seed": 1, "embed_dim_multiplier": 2},
    )
    [job] = load_jobs(path)
    assert job.options["seed"] == 3 and job.options["embed_dim_multiplier"] == 2
    assert job.output == str(tmp_path / "o") and job.input == str(tmp_path / "m")


def test_manifest_records_the_equivalent_command(tmp_path):
    path = _write_jobs(
        str(tmp_path),
        [
            {
                "command": "up",
                "input": "m",
                "output": "o",
                "embed_dim_multiplier": 2,
                "snr_db": 20,
                "untie_embeddings": True,
                "force": True,
            }
        ],
    )
    [job] = load_jobs(path)
    assert job.command_line() == [
        "tensorscale",
        "up",
        "--input",
        str(tmp_path / "m"),
        "--output",
        str(tmp_path / "o"),
        "--embed-dim-multiplier",
        "2",
        "--up-proj-multiplier",
        "1",
        "--snr-db",
        "20.0",
        "--untie-embeddings",
        "--seed",
        "0",
        "--dtype",
        "keep",
        "--max-shard-size",
        "5GB",
        "--manifest",
    ]


def test_cli_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, sources):
    jobs = _jobs(sources)
    jobs[2]["colour"] = "red"
    path = _write_jobs(str(tmp_path), jobs)
    result = CliRunner().invoke(cli, ["batch", path])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"tensorscale: error: {path}: job 3: unknown key 'colour'; "
        f"known keys: {result.output.split('known keys: ')[1].strip()}"
    ]
    assert os.listdir(tmp_path / "out") == [] and not os.path.exists(tmp_path / "jobs.summary.json")


def test_memory_budget_bounds_the_workers():
    assert worker_count(8, parse_size("4GiB")) == 8
    assert worker_count(8, parse_size("1.2GiB")) == 2
    assert worker_count(2, parse_size("64GiB")) == 2
    with pytest.raises(TensorscaleError, match="below one worker"):
        worker_count(2, parse_size("100MB"))


# ---------------------------------------------------------------- running


def test_local_parallel_run_equals_plain_up_byte_for_byte(tmp_path, sources):
    jobs = _jobs(sources)
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    result = _batch(path, "--jobs", "2", "--memory-budget", "2GiB")
    assert result.exit_code == 0, result.output
    summary = _summary(path)
    assert summary["workers"] == 2 and summary["counts"] == {"done": 3, "skipped": 0, "failed": 0}
    # Peaks are reported per worker that wrote a shard. Which of the two spawned workers gets shards is up
    # to the pool: a worker still importing torch when the other has drained the queue gets none.
    assert 1 <= len(summary["worker_peak_rss_mib"]) <= 2
    for job, loaded, entry in zip(jobs, load_jobs(path), summary["jobs"]):
        assert entry["status"] == "done" and entry["shards"] > 1
        options = UpOptions(
            job.get("embed_dim_multiplier", 1),
            job.get("up_proj_multiplier", 1),
            snr_db=job.get("snr_db"),
            seed=job.get("seed", 0),
            untie_embeddings=job.get("untie_embeddings", False),
            max_shard_size=parse_size(SHARD),
        )
        plain = tmp_path / ("plain-" + os.path.basename(job["output"]))
        # The same command recorded (model card, shard metadata): the same bytes.
        run_up(job["input"], str(plain), options, show_progress=False, command=loaded.command_line())
        batch_files = _hashes(entry["output"])
        assert batch_files == _hashes(plain)
        assert os.path.isfile(os.path.join(entry["output"], MANIFEST_NAME))
    assert _leftovers(tmp_path / "out") == []


def test_failed_job_does_not_stop_the_others_and_is_reported(tmp_path, sources):
    # a plan the engine refuses (5 query heads over 2 kv heads) fails when the job runs, not up front
    jobs = _jobs(sources)[:2] + [
        {"command": "up", "input": sources["llama"], "output": "out/broken", "num_attention_heads": 5}
    ]
    path = _write_jobs(str(tmp_path), jobs)
    result = _batch(path, "--jobs", "1")
    assert result.exit_code == 1
    summary = _summary(path)
    assert [e["status"] for e in summary["jobs"]] == ["done", "done", "failed"]
    failed = summary["jobs"][2]
    assert "heads" in failed["reason"] and "\n" not in failed["reason"]
    assert f"job 3 failed: {failed['reason']}" in result.output
    assert not os.path.exists(tmp_path / "out" / "broken") and _leftovers(tmp_path / "out") == []


def _flaky_task(spec, index, path, fingerprint, verify_files):
    """Fails the first attempt at every shard (marker files in $BATCH_FLAKY_DIR), or every attempt for
    shards of outputs named '*always-fails*'."""
    marker = os.path.join(os.environ["BATCH_FLAKY_DIR"], hashlib.sha256(path.encode()).hexdigest())
    if "always-fails" in path or not os.path.exists(marker):
        open(marker, "w").close()
        raise OSError(5, "Input/output error (injected)")
    return produce_shard_task(spec, index, path, fingerprint, verify_files)


@pytest.mark.parametrize("workers", [1, 2])
def test_failed_shards_are_retried_then_the_job_fails_cleanly(tmp_path, sources, monkeypatch, workers):
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    monkeypatch.setenv("BATCH_FLAKY_DIR", str(flaky))
    jobs = [
        {"command": "up", "input": sources["llama"], "output": "out/recovers", "embed_dim_multiplier": 2},
        {"command": "up", "input": sources["llama"], "output": "out/always-fails", "embed_dim_multiplier": 2},
    ]
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    job_list = load_jobs(path)
    executor = LocalExecutor(workers, retries=2, task=_flaky_task)
    try:
        entries = run_batch(job_list, executor, Overview(job_list, enabled=False))
    finally:
        executor.close()
    recovered, failed = entries
    assert recovered["status"] == "done" and recovered["retries"] == recovered["shards"]
    plain = tmp_path / "plain"
    run_up(
        sources["llama"],
        str(plain),
        UpOptions(2, max_shard_size=parse_size(SHARD)),
        show_progress=False,
        command=job_list[0].command_line(),
    )
    assert _hashes(recovered["output"]) == _hashes(plain)
    assert failed["status"] == "failed"
    assert "failed after 3 attempt(s): OSError: [Errno 5] Input/output error (injected)" in failed["reason"]
    assert not os.path.exists(tmp_path / "out" / "always-fails") and _leftovers(tmp_path / "out") == []


def test_rerun_skips_finished_jobs_and_redoes_deleted_or_tampered_ones(tmp_path, sources):
    jobs = _jobs(sources)
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    assert _batch(path, "--jobs", "1").exit_code == 0
    first = [_hashes(e["output"]) for e in _summary(path)["jobs"]]

    assert _batch(path, "--jobs", "1").exit_code == 0
    assert [e["status"] for e in _summary(path)["jobs"]] == ["skipped"] * 3

    outputs = [e["output"] for e in _summary(path)["jobs"]]
    import shutil

    shutil.rmtree(outputs[0])
    shard = sorted(n for n in os.listdir(outputs[2]) if n.endswith(".safetensors"))[1]
    with open(os.path.join(outputs[2], shard), "r+b") as handle:  # flip one byte of tensor data
        handle.seek(-3, os.SEEK_END)
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert _batch(path, "--jobs", "1").exit_code == 0
    entries = _summary(path)["jobs"]
    assert [e["status"] for e in entries] == ["done", "skipped", "done"]
    assert f"output file {shard} differs" in entries[2]["note"]
    assert [_hashes(o) for o in outputs] == first

    jobs[1]["seed"] = 8  # an edited job is redone, not skipped
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    assert _batch(path, "--jobs", "1").exit_code == 0
    entries = _summary(path)["jobs"]
    assert [e["status"] for e in entries] == ["skipped", "done", "skipped"]
    assert "options differ" in entries[1]["note"]
    assert _leftovers(tmp_path / "out") == []


def test_existing_folder_without_manifest_needs_force(tmp_path, sources):
    jobs = _jobs(sources)[:1]
    path = _write_jobs(str(tmp_path), jobs)
    os.makedirs(tmp_path / "out" / "llama-x2")
    (tmp_path / "out" / "llama-x2" / "config.json").write_text("{}")
    assert _batch(path).exit_code == 1
    entry = _summary(path)["jobs"][0]
    assert entry["status"] == "failed" and "has no tensorscale manifest; set `force: true`" in entry["reason"]
    assert os.listdir(tmp_path / "out" / "llama-x2") == ["config.json"]
    jobs[0]["force"] = True
    path = _write_jobs(str(tmp_path), jobs)
    assert _batch(path).exit_code == 0
    assert json.load(open(tmp_path / "out" / "llama-x2" / "config.json"))["hidden_size"] == 64


def test_force_never_replaces_a_folder_holding_user_files(tmp_path, sources):
    """Issue 14: `force: true` used to delete precious.txt with the folder; now the batch is refused
    before any job runs, naming the file."""
    jobs = _jobs(sources)[:1]
    jobs[0]["force"] = True
    path = _write_jobs(str(tmp_path), jobs)
    os.makedirs(tmp_path / "out" / "llama-x2")
    (tmp_path / "out" / "llama-x2" / "precious.txt").write_text("mine")
    result = _batch(path)
    assert result.exit_code == 2 and "precious.txt" in result.output
    assert os.listdir(tmp_path / "out" / "llama-x2") == ["precious.txt"]


def test_down_jobs_run_and_resume(tmp_path, sources):
    from tensorscale.convert import execute_plan, plan_down

    wide = tmp_path / "wide"
    run_up(sources["llama"], str(wide), UpOptions(2, 2, max_shard_size=parse_size(SHARD)), show_progress=False)
    jobs = [
        {"command": "down", "input": str(wide), "output": "out/narrow", "embed_dim_divisor": 2, "up_proj_divisor": 2},
        {"command": "up", "input": sources["llama"], "output": "out/llama-x2", "embed_dim_multiplier": 2},
    ]
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD, "seed": 3})
    assert _batch(path, "--jobs", "1").exit_code == 0
    entry = _summary(path)["jobs"][0]
    assert entry["status"] == "done" and entry["shards"] > 1
    [job] = load_jobs(path)[:1]
    plain = tmp_path / "plain"
    execute_plan(
        plan_down(str(wide), job.engine_options()), str(plain), show_progress=False, command=job.command_line()
    )
    assert _hashes(entry["output"]) == _hashes(plain)
    assert _batch(path, "--jobs", "1").exit_code == 0
    assert [e["status"] for e in _summary(path)["jobs"]] == ["skipped", "skipped"]


def test_width_and_depth_options_run_as_jobs(tmp_path, sources):
    """Any-width, pad and depth jobs give the bytes of the same plain `up`; their values are checked up front."""
    jobs = [
        {"command": "up", "input": sources["llama"], "output": "out/any", "hidden_size": 48, "intermediate_size": 70},
        {"command": "up", "input": sources["llama"], "output": "out/pad", "strategy": "pad", "embed_dim_multiplier": 2},
        {"command": "up", "input": sources["llama"], "output": "out/deeper", "add_layers": 1, "at": [1]},
    ]
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    result = _batch(path, "--jobs", "1")
    assert result.exit_code == 0, result.output
    for job, entry in zip(load_jobs(path), _summary(path)["jobs"]):
        assert entry["status"] == "done"
        plain = tmp_path / ("plain-" + os.path.basename(job.output))
        run_up(job.input, str(plain), job.engine_options(), show_progress=False, command=job.command_line())
        assert _hashes(entry["output"]) == _hashes(plain)
    with open(os.path.join(jobs_dir := str(tmp_path / "out" / "pad"), MANIFEST_NAME)) as handle:
        assert "--strategy" in json.dumps(json.load(handle)), jobs_dir
    for bad, words in (
        ({"strategy": "zeros"}, "`strategy` must be one of clone, pad"),
        ({"at": "x,y"}, "`at` must be layer indices"),
        ({"add_layers": -1}, "`add_layers` must be a whole number >= 0"),
    ):
        path = _write_jobs(str(tmp_path / "bad"), [{**jobs[0], **bad}])
        with pytest.raises(TensorscaleError, match=re.escape(words)):
            load_jobs(path)


def test_ray_writes_the_same_bytes_as_local(tmp_path, sources):
    ray = pytest.importorskip("ray")
    jobs = _jobs(sources)[1:]
    local = tmp_path / "local"
    remote = tmp_path / "ray"
    local_path = _write_jobs(str(local), jobs, defaults={"max_shard_size": SHARD})
    ray_path = _write_jobs(str(remote), jobs, defaults={"max_shard_size": SHARD})
    assert _batch(local_path, "--jobs", "1").exit_code == 0  # in-process: the same engine as the workers, no spawn
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        result = _batch(ray_path, "--executor", "ray")
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    summary = _summary(ray_path)
    assert summary["executor"] == "ray" and summary["counts"]["done"] == 2
    for entry_local, entry_ray in zip(_summary(local_path)["jobs"], summary["jobs"]):
        assert entry_ray["shards"] > 1
        assert _hashes(entry_ray["output"]) == _hashes(entry_local["output"])
    assert _leftovers(remote / "out") == []


def test_ray_executor_without_ray_is_one_line(tmp_path, sources, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    path = _write_jobs(str(tmp_path), _jobs(sources)[:1])
    result = CliRunner().invoke(cli, ["batch", path, "--executor", "ray"])
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "tensorscale: error: --executor ray needs Ray; install it with: pip install 'tensorscale[ray]'"
    )
    assert os.listdir(tmp_path / "out") == []


def test_address_without_ray_executor_is_a_mistake(tmp_path, sources):
    path = _write_jobs(str(tmp_path), _jobs(sources)[:1])
    result = CliRunner().invoke(cli, ["batch", path, "--address", "auto"])
    assert result.exit_code == 2 and "--address is for --executor ray" in result.output


def _slow_task(spec, index, path, fingerprint, verify_files):
    """A shard that takes a minute, so the batch can be interrupted while workers are busy."""
    import time

    open(path, "wb").close()
    time.sleep(60)


_INTERRUPT_SCRIPT = """
import os, signal, sys, threading
sys.path.insert(0, {tests!r})
from test_batch import _slow_task
from tensorscale.batch.jobs import load_jobs
from tensorscale.batch.local_executor import LocalExecutor
from tensorscale.batch.overview import Overview
from tensorscale.batch.runner import run_batch

jobs = load_jobs({path!r})
executor = LocalExecutor(2, task=_slow_task)
def interrupt_once_busy():
    # Ctrl-C once a worker is writing a shard (not at a fixed 3 s: spawned workers of a fresh checkout, with no
    # bytecode yet, took longer than that to import, and the interrupt then landed during their start-up)
    import time
    for _ in range(400):
        if any(files for _, _, files in os.walk({out!r})):
            break
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=interrupt_once_busy, daemon=True).start()
try:
    run_batch(jobs, executor, Overview(jobs, enabled=False))
except KeyboardInterrupt:
    print("interrupted", sorted(os.listdir({out!r})))
    sys.exit(130)
"""


def test_interrupt_stops_workers_and_leaves_nothing(tmp_path, sources):
    import subprocess
    import sys

    jobs = [
        {"command": "up", "input": sources["llama"], "output": f"out/slow-{i}", "embed_dim_multiplier": 2}
        for i in range(4)
    ]
    path = _write_jobs(str(tmp_path), jobs, defaults={"max_shard_size": SHARD})
    script = _INTERRUPT_SCRIPT.format(tests=os.path.dirname(__file__), path=path, out=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stdout.strip() == "interrupted []"  # no OUT, no temporary folder, well before the shards' minute
