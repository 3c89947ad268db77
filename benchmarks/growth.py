#!/usr/bin/env python
"""The growth experiment at small scale: does a HyperCloned model train better than the same-size model
from random init, and does HyperCloning's symmetry-breaking noise matter?

    python benchmarks/growth.py                      # defaults: ~10 min on 2 CPUs
    python benchmarks/growth.py --steps 200          # a longer budget (~4x the time)

Why: tensorscale's reason to exist is the "Recipe 2" of growing-sparse-llms (a small pretrained model,
expanded, then trained further) against "Recipe 1" (the large model from tabula rasa). This runs that
comparison end to end with tensorscale itself doing the expansion, so the claim "continued training
starts from the small model's loss" is measured rather than asserted.

Recipes, all trained on the same tokens in the same order with the same AdamW schedule (corpus.py):

  baseline     the small pretrained model (examples/pydoc-llama) continues training
  expanded     `up -edm 2 -upm 2` of it, no noise: Recipe 2 without symmetry breaking
  expanded+snr the same with `--snr-db` noise (default 20 dB): Recipe 2 as HyperCloning prescribes
  random       the expanded config from random init: Recipe 1 (same size as the expanded model)

Expansions are written in float32 (`dtype="float32"`) so the ±noise pairs cancel exactly; the source's
bf16 values upcast exactly. Before training the script checks that each expanded model's logits equal
the source's (max |delta logit|) and that its held-out loss is the small model's.

Clone divergence. Without noise, the two copies of every hidden unit and head receive identical
gradients, so (up to float rounding) they stay copies forever and the 2x model computes only what the
small one can. The probe measures how far the copies have come apart, on the residual stream itself:
for a fixed held-out batch, every layer's hidden state h = [h_a, h_b] (the halves are the clones),
divergence = ||h_a - h_b|| / ||h_a + h_b|| averaged over layers: 0 for exact clones, ~1 for unrelated
halves. It is 0 at step 0 for both expanded models (the noise changes weights, not activations) and
only grows if the noise lets the gradients differ.

FLOPs are the usual 6 x parameters x tokens for this phase only; the small model's own pretraining
(the same for baseline and both expanded recipes) is not added.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

import corpus  # noqa: E402

RECIPES = ["baseline", "expanded", "expanded+snr", "random"]
STYLE = {"baseline": ("tab:gray", "small pretrained, continued (baseline)"),
         "expanded": ("tab:orange", "expanded x2, no noise (Recipe 2, no symmetry breaking)"),
         "expanded+snr": ("tab:blue", "expanded x2 + noise (Recipe 2)"),
         "random": ("tab:red", "same size, random init (Recipe 1)")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=os.path.join(REPO, "examples", "pydoc-llama"),
                   help="the small pretrained model (train_reference.py output)")
    p.add_argument("--work", default=os.path.join(HERE, "work", "growth"), help="expanded checkpoints go here")
    p.add_argument("--edm", type=int, default=2)
    p.add_argument("--upm", type=int, default=2)
    p.add_argument("--snr-db", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-windows", type=int, default=24, help="held-out windows per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--tag", default="growth", help="file name stem of the results")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- probes

def clone_divergence(windows: torch.Tensor, n: int):
    """Probe: residual-stream divergence between the first and second copies (see the module docstring)."""
    def probe(model) -> float:
        model.eval()
        with torch.no_grad():
            states = model(input_ids=windows, output_hidden_states=True).hidden_states[1:]
        model.train()
        values = []
        for h in states:
            d = h.shape[-1] // n
            a, b = h[..., :d].float(), h[..., d:2 * d].float()
            values.append(((a - b).norm() / (a + b).norm().clamp_min(1e-30)).item())
        return sum(values) / len(values)
    return probe


def crossing(xa, a, xb, b):
    """First x where curve a goes from above curve b to at-or-below it, or None. Curve b is linearly
    interpolated onto a's points, so the two may be sampled on different x (FLOPs of different-size
    models); between a's points the crossing is interpolated linearly too. The slides' N."""
    import numpy as np
    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    pts = [(x, y) for x, y in zip(xa, a) if lo <= x <= hi]
    if len(pts) < 2:
        return None
    xs = [x for x, _ in pts]
    d = [y - float(np.interp(x, xb, b)) for x, y in pts]
    for i in range(1, len(xs)):
        if d[i - 1] > 0 and d[i] <= 0:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * d[i - 1] / (d[i - 1] - d[i])
    return None


def first_reach(tokens, curve, level):
    """First token count at which curve is at or below level (interpolated), or None."""
    for i in range(len(tokens)):
        if curve[i] <= level:
            if i == 0:
                return 0
            c0, c1 = curve[i - 1], curve[i]
            return tokens[i - 1] + (tokens[i] - tokens[i - 1]) * (c0 - level) / (c0 - c1)
    return None


# ----------------------------------------------------------------------------------------------- plots

def plot(runs: dict, params: dict, path_stem: str, title: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plots written")
        return []
    paths = []
    for axis in ("tokens", "flops"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, hist in runs.items():
            color, label = STYLE[name]
            x = hist["tokens"] if axis == "tokens" else [6 * params[name] * t for t in hist["tokens"]]
            ax.plot(x, hist["val_loss"], marker="o", ms=3, color=color,
                    label=f"{label}, {params[name] / 1e6:.1f}M")
        ax.set_xlabel("training tokens" if axis == "tokens" else "training FLOPs (6 x params x tokens, this phase)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = f"{path_stem}_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, hist in runs.items():
        if "clone_divergence" in hist["extra"]:
            color, label = STYLE[name]
            ax.plot(hist["tokens"], hist["extra"]["clone_divergence"], marker="o", ms=3, color=color, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("clone divergence ||a-b||/||a+b||")
    ax.set_yscale("symlog", linthresh=1e-7)
    ax.set_title("Do the cloned halves of the residual stream come apart?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = f"{path_stem}_divergence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tensorscale.convert import run_up
    from tensorscale.planning.plan import Options

    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        sys.exit(f"unknown recipes {sorted(unknown)}; choose from {RECIPES}")
    if not os.path.exists(os.path.join(args.source, "config.json")):
        sys.exit(f"{args.source} has no config.json: run benchmarks/train_reference.py first")
    t_all = time.time()
    torch.manual_seed(args.seed)

    tok = AutoTokenizer.from_pretrained(args.source)
    data = corpus.build_data(tokenizer=tok)   # same hash split as training; the source's tokenizer
    windows = corpus.val_windows(data.val, args.seq_len, max_windows=args.eval_windows)
    probe_batch = windows[:8]
    print(f"corpus: {len(data.train):,} train tokens, {len(data.val):,} held out; eval on {len(windows)} x "
          f"{args.seq_len} tokens; {corpus.machine()}")

    # 1. Expand with tensorscale (float32 storage: exact ±noise pairs).
    os.makedirs(args.work, exist_ok=True)
    folders = {"baseline": args.source}
    t0 = time.time()
    for name, snr in (("expanded", None), ("expanded+snr", args.snr_db)):
        if name in recipes or (name == "expanded" and "random" in recipes):
            out = os.path.join(args.work, f"x{args.edm}-{args.upm}" + ("" if snr is None else f"-snr{snr:g}"))
            # tensorscale.writing.execute calls torch.set_grad_enabled(False) process-wide (fine for a
            # CLI, not for a library caller who trains next): restore the caller's setting.
            grad = torch.is_grad_enabled()
            try:
                run_up(args.source, out, Options(embed_dim_multiplier=args.edm, up_proj_multiplier=args.upm,
                                                 snr_db=snr, seed=args.seed, dtype="float32"),
                       force=True, show_progress=False)
            finally:
                torch.set_grad_enabled(grad)
            folders[name] = out
    t_expand = time.time() - t0

    def load(name):
        if name == "random":
            config = AutoModelForCausalLM.from_pretrained(folders["expanded"]).config
            torch.manual_seed(args.seed)
            return LlamaForCausalLM(config)
        return AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.float32)

    # 2. Function preservation, measured.
    small = load("baseline")
    with torch.no_grad():
        ref_logits = small(input_ids=probe_batch).logits
    checks = {}
    for name in ("expanded", "expanded+snr"):
        if name in folders:
            with torch.no_grad():
                logits = load(name)(input_ids=probe_batch).logits
            checks[name] = (logits - ref_logits).abs().max().item()
            print(f"{name}: max |delta logit| vs source = {checks[name]:.2e} (logit scale {ref_logits.abs().max():.1f})")
    del small

    # 3. Train every recipe on the same data order and schedule.
    schedule = corpus.Schedule(lr=args.lr, warmup=args.warmup)
    runs, params, seconds = {}, {}, {}
    for name in recipes:
        model = load(name)
        params[name] = corpus.count_params(model)
        probes = {"clone_divergence": clone_divergence(probe_batch, args.edm)} if name != "baseline" else {}
        print(f"\n== {name}: {params[name]:,} parameters")
        hist = corpus.train(model, data.train, steps=args.steps, batch_size=args.batch, seq_len=args.seq_len,
                            schedule=schedule, seed=args.seed, eval_windows=windows, eval_every=args.eval_every,
                            probes=probes, label=f"{name:>12}  ")
        runs[name] = {"tokens": hist.tokens, "val_loss": hist.val_loss, "train_loss": hist.train_loss,
                      "extra": hist.extra, "seconds": hist.seconds, "cpu_seconds": hist.cpu_seconds}
        seconds[name] = hist.seconds
        del model

    # 4. Summary: initial/final losses, crossings, noise comparison.
    rows = []
    small0 = runs["baseline"]["val_loss"][0] if "baseline" in runs else None
    for name, r in runs.items():
        div = r["extra"].get("clone_divergence")
        rows.append({
            "recipe": name, "params": params[name], "initial": r["val_loss"][0], "final": r["val_loss"][-1],
            "min": min(r["val_loss"]), "tokens": r["tokens"][-1], "flops": 6 * params[name] * r["tokens"][-1],
            "seconds": seconds[name], "cpu_seconds": r["cpu_seconds"], "divergence_final": div[-1] if div else None,
            "reach_small_start": (first_reach(r["tokens"], r["val_loss"], small0) if small0 is not None else None),
        })
    crossings, crossings_flops = {}, {}
    pairs = [("random", "expanded+snr"), ("random", "expanded"), ("random", "baseline"),
             ("expanded+snr", "baseline"), ("expanded", "baseline"), ("expanded+snr", "expanded")]
    for a, b in pairs:
        if a in runs and b in runs:
            ta, tb = runs[a]["tokens"], runs[b]["tokens"]
            crossings[f"{a} below {b}"] = crossing(ta, runs[a]["val_loss"], tb, runs[b]["val_loss"])
            crossings_flops[f"{a} below {b}"] = crossing([6 * params[a] * t for t in ta], runs[a]["val_loss"],
                                                         [6 * params[b] * t for t in tb], runs[b]["val_loss"])

    print(f"\nexpansion {t_expand:.1f} s; total {time.time() - t_all:.0f} s; {args.steps} steps x {args.batch} x "
          f"{args.seq_len} tokens, AdamW lr {args.lr} (warmup {args.warmup}, cosine to 10%), seed {args.seed}\n")
    print("| recipe | params | initial loss | final loss | best loss | tokens | FLOPs | train s (CPU s) | clone divergence (end) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        div = "-" if row["divergence_final"] is None else f"{row['divergence_final']:.2e}"
        print(f"| {row['recipe']} | {row['params'] / 1e6:.2f}M | {row['initial']:.3f} | {row['final']:.3f} | "
              f"{row['min']:.3f} | {row['tokens']:,} | {row['flops']:.2e} | {row['seconds']:.0f} ({row['cpu_seconds']:.0f}) | {div} |")
    print()
    for key, value in crossings.items():
        flops = crossings_flops[key]
        print(f"{key}: " + ("no crossing within the budget" if value is None else f"at ~{value:,.0f} tokens")
              + ("; in FLOPs: none" if flops is None else f"; in FLOPs: at ~{flops:.2e}"))
    for name, value in checks.items():
        print(f"{name}: max |delta logit| at step 0 = {value:.2e}")

    result = {"args": vars(args), "date": datetime.date.today().isoformat(), "machine": corpus.machine(),
              "expand_seconds": t_expand, "logit_check": checks, "rows": rows, "crossings": crossings, "crossings_flops": crossings_flops,
              "runs": runs, "total_seconds": time.time() - t_all}
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        stem = os.path.join(args.results, args.tag)
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        title = (f"x{args.edm} growth of pydoc-llama: {args.steps} steps x {args.batch * args.seq_len} tokens, "
                 f"lr {args.lr}")
        pngs = plot(runs, params, stem, title)
        print(f"results: {stem}.json" + "".join(f", {p}" for p in pngs))
    return result


if __name__ == "__main__":
    main()
