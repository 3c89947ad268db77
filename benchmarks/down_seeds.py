"""`down`'s held-out perplexity ratio on the reference model for several k-means seeds, so that a change to the
clustering is judged on a mean, not on one seed (one seed's ratio at 40% moves by ~0.1 from seed to seed).

    python benchmarks/down_seeds.py [--seeds 0,1,2,3] [--code FOLDER,FOLDER...]

--code runs `down` from other checkouts of tensorscale (e.g. `git worktree add /tmp/before HEAD~3`), one row each,
against the same reference logits; the default is this checkout. Targets and evaluation are bench_down.py's
(examples/pydoc-llama, 226 held-out windows of 128 tokens); about a minute per code folder and seed here.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_down  # noqa: E402
import corpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--code", default=bench_down.REPO, help="comma-separated tensorscale checkouts")
    parser.add_argument("--model", default=bench_down.MODEL)
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    seeds = [int(seed) for seed in args.seeds.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    _, held_out = corpus.split_documents(corpus.stdlib_documents())
    windows = corpus.val_windows(corpus.encode_stream(tokenizer, held_out), bench_down.SEQ_LEN)
    original = bench_down.load_model(args.model)
    reference = bench_down.reference_logprobs(original, windows)
    base = bench_down.evaluate(original, windows, reference)
    print(f"| code | level | {' | '.join(f'seed {seed}' for seed in seeds)} | mean |")
    print(f"|---|---|{'---|' * len(seeds)}---|")
    with tempfile.TemporaryDirectory(prefix="down-seeds-") as work:
        for label, hidden, inter, heads, kv in bench_down.TARGETS:
            for code in args.code.split(","):
                ratios = []
                for seed in seeds:
                    out = os.path.join(work, "out")
                    command = [
                        sys.executable,
                        "-m",
                        "tensorscale.cli.main",
                        "down",
                        "-i",
                        args.model,
                        "-o",
                        out,
                        "--force",
                        "--quiet",
                        "--method",
                        "fold",
                        "--seed",
                        str(seed),
                        "--hidden-size",
                        str(hidden),
                        "--intermediate-size",
                        str(inter),
                        "--num-attention-heads",
                        str(heads),
                        "--num-key-value-heads",
                        str(kv),
                    ]
                    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": code})
                    result = bench_down.evaluate(bench_down.load_model(out), windows, reference)
                    ratios.append(math.exp(result["loss"] - base["loss"]))
                cells = " | ".join(f"{ratio:.3f}" for ratio in ratios)
                print(
                    f"| {os.path.basename(os.path.abspath(code))} | {label} | {cells} | "
                    f"{sum(ratios) / len(ratios):.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
