"""Performance of the rewrite engine against the disk floor, the in-memory approach, and its own targets.

For each size of a ladder of generated bf16 Llama checkpoints, in one run:
- the disk floor: read the input once and write as many bytes as `up` writes (bench_up.disk_floor: a
  plain buffered copy, each file fsynced), the fastest of --floor-repeats runs (the conservative choice);
- for reference, the same copy with O_DIRECT writes (`bench_up.disk_floor(direct=True)`): what the disk itself allows,
  without the page cache, which is how tensorscale writes;
- `tensorscale up -edm 2 -upm 2` and `tensorscale down -edd 2 -upd 2` on the same input;
- the in-memory approach (benchmarks/baseline_in_memory.py: transformers load, tile, save_pretrained), up
  to --baseline-max parameters;
each under /usr/bin/time -v with a 50 ms sampler of the anonymous memory. The input is read once before
each measurement so that all of them start from the same, warm page cache. Then `desc` and `plan` on a
12B-shaped header-only checkpoint (sparse files, no disk). Prints a table, checks the targets of the
performance issue and says which it misses, writes results/bench_rewrite.json and .png.

    python benchmarks/bench_rewrite.py                         # 0.1B, 0.5B, 1B, 2B (about 10 min, quiet machine)
    python benchmarks/bench_rewrite.py --sizes 0.1e9,0.5e9     # quicker
    python benchmarks/bench_rewrite.py --down-sizes 7e9        # also `down` alone on a 7B-shaped input (14 GB)

Memory must also stay flat as the model grows: the peak RSS of the largest size may exceed the smallest
size's by at most FLAT_SLACK. `--down-sizes` extends `down`'s ladder to sizes where `up`'s output (4x the
input) would not fit on the disk; `up`'s memory is bounded by its chunk size by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_up import (  # noqa: E402  (benchmarks share their measuring helpers)
    Sampler,
    check_space,
    cpu_busy_seconds,
    disk_floor,
    ensure_checkpoint,
    folder_bytes,
    folder_files,
    label,
    parse_time_v,
)
from make_checkpoint import make_checkpoint  # noqa: E402

GIB = 2**30
TARGETS = {
    "up_over_floor": 1.25,
    "peak_rss": 1 * GIB,
    "speedup_vs_in_memory": 5.0,
    "memory_vs_in_memory": 10.0,
    "desc_seconds": 1.0,
    "plan_seconds": 2.0,
    "down_over_up": 3.0,
}
FLAT_SLACK = 128 * 2**20  # peak RSS at the largest size over the smallest's; run-to-run noise is about 50 MiB


def tool() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "tensorscale")
    return path if os.access(path, os.X_OK) else (shutil.which("tensorscale") or "tensorscale")


def measure(cmd: list[str], out: str | None) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall, user, sys, peak RSS, peak anonymous memory, others' CPU."""
    if out and os.path.exists(out):
        shutil.rmtree(out)
    busy_before = cpu_busy_seconds()
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"bench_rewrite: `{' '.join(cmd)}` failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-2000:]}")
    result = parse_time_v(stderr)
    busy = cpu_busy_seconds() - busy_before
    result["other_cpu_s"] = max(0.0, busy - result.get("user", 0.0) - result.get("sys", 0.0))
    result["peak_anon"] = sampler.peak["RssAnon"]
    if out:
        result["out_sizes"] = [os.path.getsize(f) for f in folder_files(out)]
        result["out_bytes"] = sum(result["out_sizes"])
    return result


def warm(paths: list[str]) -> None:
    """Read the files once, so that every measurement starts from the same (warm) page cache."""
    buf = bytearray(16 * 2**20)
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def time_command(cmd: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - started)
    return best


def one_size(work: str, params: float, baseline_max: float, floor_repeats: int = 2) -> dict:
    src = ensure_checkpoint(work, params, "2GB")
    inputs = folder_files(src)
    in_bytes = folder_bytes(src)
    check_space(work, 6 * in_bytes)
    out = os.path.join(work, "out")
    row = {"size": label(params), "params": params, "in_bytes": in_bytes}
    warm(inputs)
    up = measure([tool(), "up", "-i", src, "-o", out, "-edm", "2", "-upm", "2", "--quiet"], out)
    shutil.rmtree(out)
    floors, direct = [], []
    for _ in range(max(1, floor_repeats)):
        warm(inputs)
        floors.append(disk_floor(inputs, up["out_sizes"], os.path.join(work, "floor")))
        shutil.rmtree(os.path.join(work, "floor"))
        warm(inputs)
        direct.append(disk_floor(inputs, up["out_sizes"], os.path.join(work, "floor"), direct=True))
        shutil.rmtree(os.path.join(work, "floor"))
    row.update(floor_s=min(floors), floor_runs=floors, direct_floor_s=min(direct), direct_floor_runs=direct)
    row.update(
        up_s=up["elapsed"],
        up_rss=up["max_rss"],
        up_anon=up["peak_anon"],
        up_user=up["user"],
        up_sys=up["sys"],
        up_cpu=up["user"] + up["sys"],
        out_bytes=up["out_bytes"],
        others_cpu=up["other_cpu_s"],
    )
    warm(inputs)
    down = measure([tool(), "down", "-i", src, "-o", out, "-edd", "2", "-upd", "2", "--method", "fold", "--quiet"], out)
    shutil.rmtree(out)
    row.update(down_s=down["elapsed"], down_rss=down["max_rss"], down_anon=down["peak_anon"])
    if params <= baseline_max:
        warm(inputs)
        base = measure(
            [sys.executable, os.path.join(HERE, "baseline_in_memory.py"), src, out, "-edm", "2", "-upm", "2"], out
        )
        shutil.rmtree(out)
        row.update(baseline_s=base["elapsed"], baseline_rss=base["max_rss"])
    print(
        f"{row['size']}: up {row['up_s']:.1f} s (floor {row['floor_s']:.1f} s, direct {row['direct_floor_s']:.1f} s), "
        f"down {row['down_s']:.1f} s, "
        f"peak RSS up {row['up_rss'] / 2**20:.0f} MiB / down {row['down_rss'] / 2**20:.0f} MiB"
        + (
            f", in-memory {row['baseline_s']:.1f} s {row['baseline_rss'] / 2**20:.0f} MiB"
            if "baseline_s" in row
            else ""
        ),
        flush=True,
    )
    return row


def down_only(work: str, params: float) -> dict:
    """`down` alone on a larger input: its time and memory, for the flatness check."""
    src = ensure_checkpoint(work, params, "2GB")
    inputs = folder_files(src)
    in_bytes = folder_bytes(src)
    check_space(work, in_bytes)
    out = os.path.join(work, "out")
    warm(inputs)
    down = measure([tool(), "down", "-i", src, "-o", out, "-edd", "2", "-upd", "2", "--method", "fold", "--quiet"], out)
    shutil.rmtree(out)
    row = {
        "size": label(params),
        "params": params,
        "in_bytes": in_bytes,
        "down_s": down["elapsed"],
        "down_rss": down["max_rss"],
        "down_anon": down["peak_anon"],
    }
    print(
        f"{row['size']} (down only): down {row['down_s']:.1f} s, peak RSS {row['down_rss'] / 2**20:.0f} MiB, "
        f"anonymous {row['down_anon'] / 2**20:.0f} MiB",
        flush=True,
    )
    return row


def describe_timings(work: str) -> dict:
    folder = os.path.join(work, "header-only-12b")
    if not os.path.exists(os.path.join(folder, "config.json")):
        make_checkpoint(12e9, folder, shard_size=5 * 10**9, header_only=True, quiet=True)
    return {
        "desc_s": time_command([tool(), "desc", "-i", folder]),
        "plan_s": time_command([tool(), "plan", "-i", folder, "-edm", "2", "-upm", "2"]),
    }


def table(rows: list[dict]) -> str:
    head = (
        "| size | in GB | out GB | floor s | direct floor s | up s | up/floor | up/direct | up user+sys s | down s "
        "| down/up | up peak RSS MiB | up anon MiB "
        "| down peak RSS MiB | down anon MiB | in-memory s | in-memory RSS MiB | speed-up | memory ratio | others' "
        "CPU s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        base = "baseline_s" in r
        lines.append(
            f"| {r['size']} | {r['in_bytes'] / 1e9:.2f} | {r['out_bytes'] / 1e9:.2f} | {r['floor_s']:.2f} "
            f"| {r['direct_floor_s']:.2f} | {r['up_s']:.2f} | {r['up_s'] / r['floor_s']:.2f} "
            f"| {r['up_s'] / r['direct_floor_s']:.2f} | {r['up_user']:.1f}+{r['up_sys']:.1f} "
            f"| {r['down_s']:.2f} | {r['down_s'] / r['up_s']:.2f} "
            f"| {r['up_rss'] / 2**20:.0f} | {r['up_anon'] / 2**20:.0f} | {r['down_rss'] / 2**20:.0f} "
            f"| {r['down_anon'] / 2**20:.0f} "
            + (
                f"| {r['baseline_s']:.1f} | {r['baseline_rss'] / 2**20:.0f} | {r['baseline_s'] / r['up_s']:.1f}x "
                f"| {r['baseline_rss'] / r['up_rss']:.1f}x "
                if base
                else "| - | - | - | - "
            )
            + f"| {r['others_cpu']:.1f} |"
        )
    return "\n".join(lines)


def down_table(rows: list[dict]) -> str:
    lines = ["| size | in GB | down s | down peak RSS MiB | down peak anon MiB |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['size']} | {r['in_bytes'] / 1e9:.2f} | {r['down_s']:.1f} | {r['down_rss'] / 2**20:.0f} "
        f"| {r['down_anon'] / 2**20:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def flatness(rows: list[dict], key: str, what: str) -> str:
    """Peak RSS of the largest size against the smallest's."""
    ladder = sorted((r for r in rows if key in r), key=lambda r: r["params"])
    first, last = ladder[0], ladder[-1]
    growth = last[key] - first[key]
    return (
        f"memory flat, {what}: {first['size']} {first[key] / 2**20:.0f} MiB -> {last['size']} "
        f"{last[key] / 2**20:.0f} MiB ({growth / 2**20:+.0f}, target <= +{FLAT_SLACK // 2**20}): "
        + ("PASS" if growth <= FLAT_SLACK else "MISS")
    )


def verdicts(rows: list[dict], describe: dict, down_rows: list[dict] = ()) -> list[str]:
    out = []
    big = [r for r in rows if r["in_bytes"] >= 1e9]
    for r in big:
        ratio = r["up_s"] / r["floor_s"]
        out.append(
            f"speed {r['size']}: up/floor {ratio:.2f} (target <= {TARGETS['up_over_floor']}): "
            + ("PASS" if ratio <= TARGETS["up_over_floor"] else "MISS")
        )
    for r in big:  # for reference, not a target: how close `up` comes to the disk's own speed
        out.append(f"(reference) {r['size']}: up / direct-I/O copy {r['up_s'] / r['direct_floor_s']:.2f}")
    worst = max([max(r["up_rss"], r["down_rss"]) for r in rows] + [r["down_rss"] for r in down_rows])
    out.append(
        f"memory: worst peak RSS {worst / 2**20:.0f} MiB (target <= 1024): "
        + ("PASS" if worst <= TARGETS["peak_rss"] else "MISS")
    )
    if len(rows) > 1:
        out.append(flatness(rows, "up_rss", "up"))
    if len(rows) + len(down_rows) > 1:
        out.append(flatness([*rows, *down_rows], "down_rss", "down"))
    for r in rows:
        if "baseline_s" in r and r["params"] >= 0.9e9:
            speed, memory = r["baseline_s"] / r["up_s"], r["baseline_rss"] / r["up_rss"]
            out.append(
                f"vs in-memory at {r['size']}: {speed:.1f}x faster (target >= 5), {memory:.1f}x less memory "
                "(target >= 10): " + ("PASS" if speed >= 5 and memory >= 10 else "MISS")
            )
    for r in rows:
        ratio = r["down_s"] / r["up_s"]
        out.append(f"down {r['size']}: down/up {ratio:.2f} (target <= 3): " + ("PASS" if ratio <= 3 else "MISS"))
    out.append(
        f"desc on 12B headers: {describe['desc_s']:.2f} s (target < 1): "
        + ("PASS" if describe["desc_s"] < 1 else "MISS")
    )
    out.append(
        f"plan on 12B headers: {describe['plan_s']:.2f} s (target < 2): "
        + ("PASS" if describe["plan_s"] < 2 else "MISS")
    )
    return out


def plot(rows: list[dict], path: str, down_rows: list[dict] = ()) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = [r["params"] / 1e9 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(sizes, [r["floor_s"] for r in rows], "k--", marker="o", label="disk floor (plain copy)")
    left.plot(sizes, [r["direct_floor_s"] for r in rows], "k:", marker="o", label="direct-I/O copy")
    left.plot(sizes, [r["up_s"] for r in rows], marker="o", label="tensorscale up")
    left.plot(sizes, [r["down_s"] for r in rows], marker="o", label="tensorscale down")
    base = [r for r in rows if "baseline_s" in r]
    if base:
        left.plot([r["params"] / 1e9 for r in base], [r["baseline_s"] for r in base], marker="o", label="in-memory")
    left.set_xlabel("source parameters (B)")
    left.set_ylabel("seconds")
    left.legend()
    right.plot(sizes, [r["up_rss"] / 2**20 for r in rows], marker="o", label="up peak RSS")
    right.plot(sizes, [r["up_anon"] / 2**20 for r in rows], marker="o", label="up peak anonymous")
    ladder = sorted([*rows, *down_rows], key=lambda r: r["params"])
    right.plot(
        [r["params"] / 1e9 for r in ladder], [r["down_rss"] / 2**20 for r in ladder], marker="o", label="down peak RSS"
    )
    right.plot(
        [r["params"] / 1e9 for r in ladder],
        [r["down_anon"] / 2**20 for r in ladder],
        marker="o",
        label="down peak anonymous",
    )
    if base:
        right.plot(
            [r["params"] / 1e9 for r in base],
            [r["baseline_rss"] / 2**20 for r in base],
            marker="o",
            label="in-memory peak RSS",
        )
    right.axhline(1024, color="red", linestyle=":", label="1 GiB target")
    right.set_xlabel("source parameters (B)")
    right.set_ylabel("MiB")
    right.set_yscale("log")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.1e9,0.5e9,1e9,2e9")
    parser.add_argument("--baseline-max", type=float, default=1.0e9, help="largest size for the in-memory baseline")
    parser.add_argument("--work", default=os.path.join(HERE, "work"))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--clean", action="store_true", help="delete the generated inputs at the end")
    parser.add_argument("--floor-repeats", type=int, default=2, help="floor runs per size; the fastest is kept")
    parser.add_argument("--down-sizes", default="", help="larger sizes to run `down` alone on (e.g. 7e9: 14 GB)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    rows = [one_size(args.work, float(size), args.baseline_max, args.floor_repeats) for size in args.sizes.split(",")]
    down_rows = [down_only(args.work, float(size)) for size in args.down_sizes.split(",") if size]
    describe = describe_timings(args.work)
    print()
    print(table(rows))
    if down_rows:
        print()
        print(down_table(down_rows))
    print()
    lines = verdicts(rows, describe, down_rows)
    print("\n".join(lines))
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min)")
    with open(os.path.join(args.results, "bench_rewrite.json"), "w") as handle:
        json.dump(
            {
                "rows": rows,
                "down_rows": down_rows,
                "describe": describe,
                "verdicts": lines,
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "seconds": time.perf_counter() - started,
            },
            handle,
            indent=2,
        )
    if plot(rows, os.path.join(args.results, "bench_rewrite.png"), down_rows):
        print(f"plot: {os.path.join(args.results, 'bench_rewrite.png')}")
    if args.clean:
        for name in os.listdir(args.work):
            if name.startswith("llama-"):
                shutil.rmtree(os.path.join(args.work, name), ignore_errors=True)
    return 0 if all(line.endswith("PASS") for line in lines if not line.startswith("(reference)")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
