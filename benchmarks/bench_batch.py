#!/usr/bin/env python
"""Benchmark `tensorscale batch`: one batch of 4 conversions, sequentially, on 2 local workers, and on Ray.

    python benchmarks/bench_batch.py                         # 4 x 0.15B bf16 inputs, up -edm 2 -upm 2
    python benchmarks/bench_batch.py --params 0.1e9 --modes local1,local2

Inputs are synthetic Llama checkpoints from make_checkpoint.py (different seeds, reused from
benchmarks/work/batch/). Each mode runs `tensorscale batch JOBS --quiet --json` in a fresh output folder:

* local1: `--executor local --jobs 1`: every shard in the driver process, one after another;
* local2: `--executor local --jobs 2`: 2 spawned worker processes, jobs and shards in parallel;
* ray:    `--executor ray`: a local Ray instance started by the command (its start-up is in the time).

Reported per mode: wall time, output GB/s, peak RSS per worker (VmHWM, as each worker reports it in the
summary: ru_maxrss after its last shard), and the peak of the summed RSS of the whole process tree
(driver, workers and, for Ray, its GCS/raylet/agents), sampled from /proc every 100 ms, and the CPU time
of the batch's process tree (sampled too) beside the CPU that other processes used meanwhile (from
/proc/stat), since a busy neighbour on a 2-core machine changes the wall times a lot. The outputs of
every mode are compared through their manifests' sha256 of every file: they must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = {
    "local1": ["--executor", "local", "--jobs", "1"],
    "local2": ["--executor", "local", "--jobs", "2"],
    "ray": ["--executor", "ray"],
}


def make_inputs(work: str, params: float, count: int) -> list[str]:
    folders = []
    for i in range(count):
        folder = os.path.join(work, f"in-{params / 1e9:g}B-{i}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            subprocess.run(
                [
                    sys.executable,
                    os.path.join(HERE, "make_checkpoint.py"),
                    "--params",
                    str(params),
                    "--out",
                    folder,
                    "--dtype",
                    "bf16",
                    "--seed",
                    str(i),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        folders.append(folder)
    return folders


def _children() -> dict[int, int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    parents[int(name)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return parents


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0.0


def sample_tree(root: int, stop: threading.Event, peak: dict) -> None:
    """Peak of the summed RSS of `root` and all its descendants, and each one's last-seen CPU time (Ray's
    workers are not reaped by the batch process, so rusage of children would miss them)."""
    cpu = peak.setdefault("cpu", {})
    while not stop.is_set():
        parents = _children()
        tree, frontier = {root}, [root]
        while frontier:
            parent = frontier.pop()
            for pid, ppid in parents.items():
                if ppid == parent and pid not in tree:
                    tree.add(pid)
                    frontier.append(pid)
        total = sum(_rss_kib(pid) for pid in tree)
        for pid in tree:
            cpu[pid] = max(cpu.get(pid, 0.0), _cpu_seconds(pid))
        peak["tree_kib"] = max(peak.get("tree_kib", 0), total)
        stop.wait(0.1)


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, jobs_path: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    command = [
        sys.executable,
        "-m",
        "tensorscale.cli.main",
        "batch",
        jobs_path,
        "--quiet",
        "--json",
        "--summary",
        os.path.join(out, "summary.json"),
        *MODES[mode],
    ]
    busy0 = busy_cpu_seconds()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=sample_tree, args=(process.pid, stop, peak), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    busy = busy_cpu_seconds() - busy0
    stop.set()
    sampler.join()
    own = sum(peak.get("cpu", {}).values())
    others = max(0.0, busy - own)
    if process.returncode != 0:
        raise SystemExit(f"{mode} failed ({process.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout)
    manifests = {}
    out_bytes = 0
    for entry in summary["jobs"]:
        with open(entry["manifest"]) as handle:
            manifests[os.path.basename(entry["output"])] = json.load(handle)["output"]["files"]
        out_bytes += sum(os.path.getsize(os.path.join(entry["output"], name)) for name in os.listdir(entry["output"]))
    workers = summary["worker_peak_rss_mib"]
    return {
        "mode": mode,
        "wall_s": wall,
        "workers": summary["workers"],
        "done": summary["counts"]["done"],
        "shards": sum(e["shards"] for e in summary["jobs"]),
        "out_gb": out_bytes / 1e9,
        "worker_peak_mib": sorted(workers.values(), reverse=True),
        "tree_peak_mib": peak.get("tree_kib", 0) / 1024,
        "cpu_s": own,
        "others_cpu_s": others,
        "manifests": manifests,
    }


def ray_startup_seconds() -> float:
    code = (
        "import ray,time; t=time.perf_counter(); ray.init(include_dashboard=False, logging_level='ERROR'); "
        "print(time.perf_counter()-t); ray.shutdown()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.15e9, help="parameters of each input (default 0.15e9)")
    parser.add_argument("--count", type=int, default=4, help="conversions in the batch (default 4)")
    parser.add_argument("--max-shard-size", default="300MB", help="output shard size, so each job has several shards")
    parser.add_argument("--modes", default="local1,local2,ray")
    parser.add_argument("--work", default=os.path.join(HERE, "work", "batch"))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--clean", action="store_true", help="also delete the generated inputs at the end")
    args = parser.parse_args()

    os.makedirs(args.work, exist_ok=True)
    inputs = make_inputs(args.work, args.params, args.count)
    out = os.path.join(args.work, "out")
    jobs_path = os.path.join(args.work, "jobs.yaml")
    with open(jobs_path, "w") as handle:
        json.dump(
            {
                "defaults": {"embed_dim_multiplier": 2, "up_proj_multiplier": 2, "max_shard_size": args.max_shard_size},
                "jobs": [
                    {"command": "up", "input": src, "output": os.path.join("out", os.path.basename(src) + "-x2")}
                    for src in inputs
                ],
            },
            handle,
            indent=1,
        )  # JSON is YAML

    rows = [run_mode(mode, jobs_path, out) for mode in args.modes.split(",")]
    reference = rows[0]["manifests"]
    identical = all(row["manifests"] == reference for row in rows)
    startup = ray_startup_seconds() if "ray" in args.modes.split(",") else None

    base = rows[0]["wall_s"]
    print(
        f"{args.count} x {args.params / 1e9:.2g}B bf16 -> up -edm 2 -upm 2, max shard {args.max_shard_size}; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        "| mode | workers | jobs done | shards | output GB | wall s | speed-up | output GB/s | peak RSS per worker "
        "MiB | peak RSS all processes MiB | CPU s (user+sys) | others' CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_worker = ", ".join(f"{m:.0f}" for m in row["worker_peak_mib"])
        print(
            f"| {row['mode']} | {row['workers']} | {row['done']} | {row['shards']} | {row['out_gb']:.2f} | "
            f"{row['wall_s']:.1f} | {base / row['wall_s']:.2f}x | {row['out_gb'] / row['wall_s']:.2f} | {per_worker} | "
            f"{row['tree_peak_mib']:.0f} | {row['cpu_s']:.0f} | {row['others_cpu_s']:.0f} |"
        )
    print(f"outputs identical across modes (manifest sha256 of every file): {'yes' if identical else 'NO'}")
    if startup is not None:
        print(f"Ray start-up alone (ray.init of a local instance): {startup:.1f} s")

    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "bench_batch.json"), "w") as handle:
        json.dump(
            {
                "params": args.params,
                "count": args.count,
                "rows": [{k: v for k, v in r.items() if k != "manifests"} for r in rows],
                "identical": identical,
                "ray_startup_s": startup,
            },
            handle,
            indent=2,
        )
    shutil.rmtree(out, ignore_errors=True)
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)
    if not identical:
        raise SystemExit("outputs differ between modes")


if __name__ == "__main__":
    main()
