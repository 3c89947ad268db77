"""Where `down`'s time goes, by phase: start-up, the residual stream's sketches and clustering, the per-layer
folds, plan building and the write (wall seconds; the analysis runs its worker threads).

    python benchmarks/down_phases.py CHECKPOINT --hidden-size 1024 --intermediate-size 2816 [--repeat 2]

CHECKPOINT is a folder such as `make_checkpoint.py --params 1e9` writes; the output goes to a temporary folder.
Phases are timed by wrapping the analysis functions in this process, so the numbers are those of one plain run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, time
t0 = time.perf_counter()
from tensorscale.heap import keep_freed_chunks
keep_freed_chunks()
import tensorscale.folding.analysis as analysis
from tensorscale.convert import execute_plan, plan_down
from tensorscale.planning.plan import DownOptions
import torch  # noqa: F401  (start-up includes the torch import, as in the CLI)

times = {"residual": 0.0, "residual clustering": 0.0, "analysis": 0.0}
fold_global, cluster_units, analyse = analysis._fold_global, analysis.cluster_units, analysis.analyse

def timed(key, function):
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[key] += time.perf_counter() - started
    return run

def clustering(features, k, **kwargs):
    started = time.perf_counter()
    try:
        return cluster_units(features, k, **kwargs)
    finally:
        if str(kwargs.get("what", "")).startswith("space hidden"):
            times["residual clustering"] += time.perf_counter() - started

analysis._fold_global = timed("residual", fold_global)
analysis.cluster_units = clustering
analysis.analyse = timed("analysis", analyse)
source, output, hidden, intermediate = sys.argv[1:5]
t1 = time.perf_counter()
plan = plan_down(source, DownOptions(targets={"hidden_size": int(hidden), "intermediate_size": int(intermediate)}))
t2 = time.perf_counter()
execute_plan(plan, output, show_progress=False, force=True)
t3 = time.perf_counter()
print(f"| {t1 - t0:.2f} | {times['residual'] - times['residual clustering']:.2f} | {times['residual clustering']:.2f} "
      f"| {times['analysis'] - times['residual']:.2f} | {t2 - t1 - times['analysis']:.2f} | {t3 - t2:.2f} | "
      f"{t3 - t0:.2f} |")
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--hidden-size", type=int, required=True)
    parser.add_argument("--intermediate-size", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    print("| start-up | residual sketches | residual clustering | per-layer folds | plan building | write | total |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="down-phases-") as work:
        for _ in range(args.repeat):  # a fresh process each time: start-up is part of what is measured
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    args.checkpoint,
                    f"{work}/out",
                    str(args.hidden_size),
                    str(args.intermediate_size),
                ],
                check=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
