#!/usr/bin/env python
"""Benchmark `tensorscale up` against the disk floor: wall time and peak memory, in one run.

    python benchmarks/bench_up.py                        # one ~0.6B bf16 checkpoint (1.2 GB in)
    python benchmarks/bench_up.py --sizes 0.1e9,0.5e9,1e9

For every size it generates (or reuses, in benchmarks/work/) a synthetic Llama checkpoint with
make_checkpoint.py, then measures, for each cache state asked for (--cache):

* up:    `tensorscale up -i SRC -o OUT -edm 2 -upm 2 --quiet` under `/usr/bin/time -v` (wall clock and
         "Maximum resident set size"), while a thread samples /proc/PID/status of the tensorscale
         process every 50 ms for RssAnon (anonymous memory: our buffers, torch's heap) and VmHWM.
* floor: the least any tool must do: read every input byte once and write as many bytes as `up`
         wrote, into files of the same sizes, each fsynced (tensorscale fsyncs every shard). A plain
         Python read/write loop with 16 MiB buffers; no transformation at all.

Cache states. Dropping the page cache needs root, so "cold" evicts only the *input* files, with
posix_fadvise(DONTNEED) (allowed for any file we can open; clean pages only, so the inputs are fsynced
first). "warm" leaves them cached (24 GB RAM holds them). Output writes go through the page cache
either way and are paid for at fsync.

Each measurement is repeated --repeats times, alternating up and floor; the table shows the fastest of
each (the conservative choice for the ratio is to take the fastest floor). Outputs are deleted as soon
as they are measured; inputs are kept for reuse unless --clean.
"""

from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import make_checkpoint  # noqa: E402

GiB = 2**30
MiB = 2**20
TARGET_RSS = 1 * GiB
BUFFER = 16 * MiB


# ----------------------------------------------------------------------------------------------- helpers


def label(params: float) -> str:
    return f"{params / 1e9:.2f}B".replace(".00B", "B")


def folder_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(f) for f in folder_files(folder))


def evict(paths: list[str]) -> None:
    """Drop these files' clean pages from the page cache (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ensure_checkpoint(work: str, params: float, shard_size: str) -> str:
    folder = os.path.join(work, f"llama-{label(params)}-bf16")
    stamp = os.path.join(folder, ".bench-stamp.json")
    want = {"params": params, "shard_size": shard_size, "generator": "make_checkpoint v1"}
    try:
        with open(stamp) as fh:
            if json.load(fh) == want and folder_files(folder):
                print(f"reusing {folder} ({folder_bytes(folder) / 1e9:.2f} GB)")
                return folder
    except (OSError, ValueError):
        pass
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    make_checkpoint.make_checkpoint(params, folder, "bf16", make_checkpoint.parse_size(shard_size), seed=0)
    with open(stamp, "w") as fh:
        json.dump(want, fh)
    return folder


def check_space(work: str, need: int) -> None:
    free = shutil.disk_usage(work).free
    if free < need * 1.1:
        sys.exit(f"bench_up: need ~{need / 1e9:.1f} GB free in {work}, have {free / 1e9:.1f} GB")


# ------------------------------------------------------------------------------------------------- floor


def disk_floor(inputs: list[str], out_sizes: list[int], out_dir: str, direct: bool = False) -> float:
    """Read every input byte once, write sum(out_sizes) bytes into files of those sizes, fsync each.

    With `direct`, the writes bypass the page cache (O_DIRECT from a page-aligned buffer, the last write of a
    file padded to a block and the file cut back): the disk's own speed, for reference."""
    block = 4096
    buf = mmap.mmap(-1, BUFFER)  # page-aligned, as O_DIRECT needs; the buffered copy does not mind
    view = memoryview(buf)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    os.makedirs(out_dir, exist_ok=True)
    pending = list(inputs)
    in_fd = None
    started = time.perf_counter()
    try:
        for k, total in enumerate(out_sizes):
            fd = os.open(os.path.join(out_dir, f"{'direct' if direct else 'floor'}-{k}.bin"), flags, 0o644)
            try:
                at = 0
                while at < total:
                    n = min(BUFFER, total - at)
                    # Fill the buffer from the inputs while any remain; afterwards resend the last bytes.
                    got = 0
                    while got < n and (in_fd is not None or pending):
                        if in_fd is None:
                            in_fd = os.open(pending.pop(0), os.O_RDONLY)
                        r = os.readv(in_fd, [view[got:n]])
                        if r == 0:
                            os.close(in_fd)
                            in_fd = None
                        got += r
                    end = n + (-n % block) if direct else n
                    done = 0
                    while done < end:
                        done += os.pwrite(fd, view[done:end], at + done)
                    at += n
                if direct:
                    os.ftruncate(fd, total)
                os.fsync(fd)
            finally:
                os.close(fd)
        # Output smaller than input (not the case for up): still read the rest once.
        while in_fd is not None or pending:
            if in_fd is None:
                in_fd = os.open(pending.pop(0), os.O_RDONLY)
            if os.readv(in_fd, [view]) == 0:
                os.close(in_fd)
                in_fd = None
    finally:
        if in_fd is not None:
            os.close(in_fd)
        view.release()
        buf.close()
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- up run


class Sampler(threading.Thread):
    """Polls /proc/PID/status of /usr/bin/time's child (tensorscale) every `period` seconds."""

    def __init__(self, time_pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.time_pid, self.period = time_pid, period
        self.stop = threading.Event()
        self.peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "VmHWM": 0}
        self.samples = 0

    def _child(self):
        try:
            with open(f"/proc/{self.time_pid}/task/{self.time_pid}/children") as fh:
                pids = fh.read().split()
            return int(pids[0]) if pids else None
        except (OSError, ValueError):
            return None

    def run(self):
        child = None
        while not self.stop.is_set():
            child = child or self._child()
            if child:
                try:
                    with open(f"/proc/{child}/status") as fh:
                        for line in fh:
                            key, _, rest = line.partition(":")
                            if key in self.peak:
                                self.peak[key] = max(self.peak[key], int(rest.split()[0]) * 1024)
                    self.samples += 1
                except (OSError, ValueError, IndexError):
                    pass
            self.stop.wait(self.period)


def cpu_busy_seconds() -> float:
    """Machine-wide non-idle CPU seconds so far, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def parse_time_v(text: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["max_rss"] = int(m.group(1)) * 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        seconds = 0.0
        for part in m.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["elapsed"] = seconds
    for key, pattern in (("user", r"User time \(seconds\): ([\d.]+)"), ("sys", r"System time \(seconds\): ([\d.]+)")):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    return out


def run_up(src: str, out: str, edm: int, upm: int) -> dict:
    if os.path.exists(out):
        shutil.rmtree(out)
    # The console script next to this interpreter, not a version-manager shim (pyenv's adds a bash hop).
    tool = os.path.join(os.path.dirname(sys.executable), "tensorscale")
    if not os.access(tool, os.X_OK):
        tool = shutil.which("tensorscale") or "tensorscale"
    cmd = ["/usr/bin/time", "-v", tool, "up", "-i", src, "-o", out, "-edm", str(edm), "-upm", str(upm), "--quiet"]
    busy_before = cpu_busy_seconds()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.stop.set()
    sampler.join()
    busy = cpu_busy_seconds() - busy_before
    if proc.returncode != 0:
        sys.exit(f"bench_up: `{' '.join(cmd)}` failed ({proc.returncode}):\n{stdout}\n{stderr}")
    result = parse_time_v(stderr)
    sizes = [os.path.getsize(f) for f in folder_files(out)]
    # CPU the rest of the machine used meanwhile: a busy neighbour (tests, builds) slows `up` on 2 cores.
    result["other_cpu_s"] = max(0.0, busy - result.get("user", 0.0) - result.get("sys", 0.0))
    result.update(
        out_sizes=sizes,
        out_bytes=sum(sizes),
        peak_anon=sampler.peak["RssAnon"],
        peak_file=sampler.peak["RssFile"],
        vm_hwm=sampler.peak["VmHWM"],
        samples=sampler.samples,
        command=" ".join(["tensorscale"] + cmd[3:]),
    )
    shutil.rmtree(out)
    return result


def startup_seconds() -> float:
    """What every `up` pays before touching data: Python, torch and the engine imports."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, tensorscale.convert"], check=True)
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------- report


def table(rows: list[dict]) -> str:
    head = [
        "size",
        "cache",
        "input GB",
        "output GB",
        "floor s",
        "up s",
        "up/floor",
        "up GB/s",
        "peak RSS MiB",
        "peak anon MiB",
        "RSS<=1GiB",
        "up CPU s (user+sys)",
        "others' CPU s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [
            r["size"],
            r["cache"],
            f"{r['in_bytes'] / 1e9:.2f}",
            f"{r['out_bytes'] / 1e9:.2f}",
            f"{r['floor_s']:.2f}",
            f"{r['up_s']:.2f}",
            f"{r['up_s'] / r['floor_s']:.2f}",
            f"{(r['in_bytes'] + r['out_bytes']) / 1e9 / r['up_s']:.2f}",
            f"{r['max_rss'] / MiB:.0f}",
            f"{r['peak_anon'] / MiB:.0f}",
            "PASS" if r["max_rss"] <= TARGET_RSS else "MISS",
            f"{(r['user_s'] or 0) + (r['sys_s'] or 0):.1f}",
            f"{r['other_cpu_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable; no plot (pip install matplotlib)")
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for cache, marker in (("warm", "o"), ("cold", "s")):
        sel = sorted((r for r in rows if r["cache"] == cache), key=lambda r: r["in_bytes"])
        if not sel:
            continue
        x = [r["in_bytes"] / 1e9 for r in sel]
        ax_t.plot(x, [r["up_s"] for r in sel], marker=marker, label=f"up ({cache})")
        ax_t.plot(x, [r["floor_s"] for r in sel], marker=marker, linestyle="--", label=f"disk floor ({cache})")
        ax_m.plot(x, [r["max_rss"] / MiB for r in sel], marker=marker, label=f"peak RSS ({cache})")
        ax_m.plot(x, [r["peak_anon"] / MiB for r in sel], marker=marker, linestyle="--", label=f"peak anon ({cache})")
    ax_m.axhline(TARGET_RSS / MiB, color="red", linewidth=1, label="target 1 GiB")
    ax_t.set(
        xlabel="input checkpoint (GB, bf16)", ylabel="wall seconds", title="tensorscale up -edm 2 -upm 2 vs disk floor"
    )
    ax_m.set(xlabel="input checkpoint (GB, bf16)", ylabel="MiB", title="peak memory of up")
    ax_m.set_ylim(bottom=0)
    ax_t.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=0.6e9, help="checkpoint size in parameters (default 0.6e9)")
    parser.add_argument(
        "--sizes", default=None, help="comma-separated ladder, e.g. 0.1e9,0.5e9,1e9 (overrides --params)"
    )
    parser.add_argument("--edm", type=int, default=2)
    parser.add_argument("--upm", type=int, default=2)
    parser.add_argument(
        "--cache", default="cold,warm", help="cache states to measure: cold, warm or both (default cold,warm)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the fastest is reported")
    parser.add_argument("--shard-size", default="2GB", help="input shard size (default 2GB)")
    parser.add_argument("--work", default=os.path.join(HERE, "work"))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--clean", action="store_true", help="also delete the generated inputs at the end")
    args = parser.parse_args(argv)

    sizes = [float(s) for s in args.sizes.split(",")] if args.sizes else [args.params]
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    if not set(caches) <= {"cold", "warm"}:
        parser.error("--cache takes cold, warm or cold,warm")
    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.results, exist_ok=True)
    started = time.perf_counter()
    startup = startup_seconds()
    print(f"startup (python + import torch, tensorscale.convert): {startup:.2f} s")

    rows = []
    for params in sizes:
        est_in = params * 2
        check_space(args.work, int(est_in * (1 + args.edm * max(args.edm, args.upm))))
        src = ensure_checkpoint(args.work, params, args.shard_size)
        inputs = folder_files(src)
        in_bytes = folder_bytes(src)
        out = os.path.join(args.work, f"out-{label(params)}")
        floor_dir = os.path.join(args.work, f"floor-{label(params)}")
        for cache in caches:
            ups, floors = [], []
            for _ in range(args.repeats):
                if cache == "cold":
                    evict(inputs)
                ups.append(run_up(src, out, args.edm, args.upm))
                if cache == "cold":
                    evict(inputs)
                floors.append(disk_floor(inputs, ups[-1]["out_sizes"], floor_dir))
                shutil.rmtree(floor_dir)
            best = min(ups, key=lambda r: r["elapsed"])
            row = {
                "size": label(params),
                "params": params,
                "cache": cache,
                "in_bytes": in_bytes,
                "out_bytes": best["out_bytes"],
                "floor_s": min(floors),
                "floor_all_s": floors,
                "up_s": best["elapsed"],
                "up_all_s": [u["elapsed"] for u in ups],
                "max_rss": max(u["max_rss"] for u in ups),
                "peak_anon": max(u["peak_anon"] for u in ups),
                "vm_hwm": max(u["vm_hwm"] for u in ups),
                "user_s": best.get("user"),
                "sys_s": best.get("sys"),
                "other_cpu_s": round(best["other_cpu_s"], 1),
                "command": best["command"],
            }
            rows.append(row)
            print(
                f"{row['size']} {cache}: up {row['up_s']:.2f} s (user {row['user_s']} sys {row['sys_s']}), "
                f"others' CPU meanwhile {row['other_cpu_s']:.1f} s, floor {row['floor_s']:.2f} s, peak RSS "
                f"{row['max_rss'] / MiB:.0f} MiB, "
                f"anon {row['peak_anon'] / MiB:.0f} MiB",
                flush=True,
            )
        if args.clean:
            shutil.rmtree(src)

    print()
    print(table(rows))
    print()
    verdict = "PASS" if all(r["max_rss"] <= TARGET_RSS for r in rows) else "MISS"
    print(f"memory target peak RSS <= 1 GiB: {verdict}")
    print(f"startup included in every up time: {startup:.2f} s; whole benchmark {time.perf_counter() - started:.0f} s")
    meta = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "argv": sys.argv,
        "startup_s": startup,
        "rows": rows,
        "verdict": verdict,
    }
    with open(os.path.join(args.results, "bench_up.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    if plot(rows, os.path.join(args.results, "bench_up.png")):
        print(f"plot: {os.path.join(args.results, 'bench_up.png')}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
