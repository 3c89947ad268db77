#!/usr/bin/env python
"""Time and memory of `down`'s refit (a trained model, not a HyperCloned one) against `up` on the same checkpoint.

#17's targets: calibrated `down` within 3x `up`'s wall time on the same 1B checkpoint, data-free within 1.5x,
and a peak RSS of at most 1 GiB with calibration too. For each size of generated bf16 Llama checkpoints
(bench_up.ensure_checkpoint, the checkpoints bench_rewrite.py uses), in one run and one after the other:

- `tensorscale up -edm 2 -upm 2` (the reference: this machine is noisy, so the ratio is what is quoted);
- `tensorscale down --reduction R --calibration TEXT` (the Python docs, real_texts.calibration_text; the
  tokenizer is examples/pydoc-llama's, copied in: the generated checkpoints have none);
- `tensorscale down --reduction R` with no text: data-free, the model samples its own calibration text;

each under /usr/bin/time -v with bench_up's sampler of the anonymous memory. Random weights cost what trained
ones cost (the same layers, tokens and solves), so time and memory carry over; quality does not and is
bench_down.py's job. Prints the table and the verdicts, writes results/bench_refit.json and .png.

    python benchmarks/bench_refit.py                          # 1B, 8,192 calibration tokens
    python benchmarks/bench_refit.py --sizes 0.1e9,0.5e9 --tokens 2048   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench_rewrite import measure, tool  # noqa: E402  (benchmarks share their measuring helpers)
from bench_up import ensure_checkpoint, folder_bytes, label  # noqa: E402

GIB = 2**30
TARGETS = {"calibrated_over_up": 3.0, "data_free_over_up": 1.5, "peak_rss": 1 * GIB}
TOKENIZER = os.path.join(REPO, "examples", "pydoc-llama")  # vocabulary 4,096: every id fits the 32,000 rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1e9", help="comma-separated parameter counts (default 1e9)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (down's default)")
    p.add_argument("--reduction", default="25%", help="down's budget")
    p.add_argument("--work", default=os.path.join(HERE, "work"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--skip-data-free", action="store_true", help="the calibrated down only (data-free samples)")
    return p.parse_args(argv)


def with_tokenizer(folder: str) -> None:
    """The generated checkpoints have no tokenizer; --calibration needs one whose ids the embedding holds."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(TOKENIZER, name), os.path.join(folder, name))


def calibration_file(work: str) -> str:
    from real_texts import calibration_text

    path = os.path.join(work, "bench_refit-calibration.txt")
    with open(path, "w") as fh:
        fh.write(calibration_text())
    return path


def one_size(args, params: float, text: str) -> dict:
    folder = ensure_checkpoint(args.work, params, args.shard_size)
    with_tokenizer(folder)
    exe, out = tool(), os.path.join(args.work, f"bench_refit-{label(params)}-out")
    row = {"size": label(params), "params": params, "in_bytes": folder_bytes(folder)}
    print(f"{row['size']}: up -edm 2 -upm 2", flush=True)
    row["up"] = measure([exe, "up", "-i", folder, "-o", out, "-edm", "2", "-upm", "2", "-q", "--force"], out)
    shutil.rmtree(out, ignore_errors=True)
    down = [exe, "down", "-i", folder, "-o", out, "--reduction", args.reduction, "--json", "--force"]
    down += ["--calibration-tokens", str(args.tokens)]
    runs = [("calibrated", ["--calibration", text])] + ([] if args.skip_data_free else [("data_free", [])])
    for name, extra in runs:
        print(f"{row['size']}: down --reduction {args.reduction} ({name})", flush=True)
        row[name] = measure(down + extra, out)
        shutil.rmtree(out, ignore_errors=True)
        row[f"{name}_over_up"] = row[name]["elapsed"] / row["up"]["elapsed"]
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| size | up s | up RSS MiB | down (calibrated) s | /up | RSS MiB | anon MiB "
        "| down (data-free) s | /up | RSS MiB | anon MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for r in rows:
        cells = [r["size"], f"{r['up']['elapsed']:.1f}", f"{r['up']['max_rss'] / mib:.0f}"]
        for name in ("calibrated", "data_free"):
            m = r.get(name)
            cells += (
                [
                    f"{m['elapsed']:.1f}",
                    f"{r[name + '_over_up']:.1f}",
                    f"{m['max_rss'] / mib:.0f}",
                    f"{m['peak_anon'] / mib:.0f}",
                ]
                if m
                else ["-"] * 4
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        for name in ("calibrated", "data_free"):
            if name not in r:
                continue
            limit = TARGETS[f"{name}_over_up"]
            ratio = r[f"{name}_over_up"]
            out.append(
                f"{r['size']} {name}: down/up {ratio:.1f} (target <= {limit:g}): {'PASS' if ratio <= limit else 'MISS'}"
            )
            rss = r[name]["max_rss"]
            out.append(
                f"{r['size']} {name}: peak RSS {rss / 2**20:.0f} MiB (target <= 1024): "
                f"{'PASS' if rss <= TARGETS['peak_rss'] else 'MISS'}"
            )
    return out


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [n for n in ("calibrated", "data_free") if any(n in r for r in rows)]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + i * width for j, r in enumerate(rows) if name in r]
        left.bar(xs, [r[f"{name}_over_up"] for r in rows if name in r], width, label=name)
        right.bar(xs, [r[name]["max_rss"] / 2**20 for r in rows if name in r], width, label=name)
    for axis, what in ((left, "down wall time / up's"), (right, "peak RSS, MiB")):
        axis.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rows))], [r["size"] for r in rows])
        axis.set_ylabel(what)
        axis.legend()
    for name in names:
        left.axhline(TARGETS[f"{name}_over_up"], linestyle="--", color="gray", linewidth=0.8)
    right.axhline(1024, linestyle="--", color="gray", linewidth=0.8)
    left.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    text = calibration_file(args.work)
    rows = [one_size(args, float(s), text) for s in args.sizes.split(",")]
    print(table(rows))
    for line in verdicts(rows):
        print(line)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "commit": commit.stdout.strip(),
        "command": "python benchmarks/bench_refit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "targets": TARGETS,
        "rows": rows,
    }
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "bench_refit.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    if plot(rows, os.path.join(args.results, "bench_refit.png")):
        print(f"wrote {os.path.join(args.results, 'bench_refit.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
