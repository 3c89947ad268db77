#!/usr/bin/env python
"""The growth study: where does a grown model (Recipe 2) overtake the same size trained from scratch
(Recipe 1), at two scales, and does growing in steps beat growing at once?

    python benchmarks/growth.py --list              # the stages and how far each got
    python benchmarks/growth.py                     # run every stage not yet done, in order (resumes)
    python benchmarks/growth.py --stages s1         # only the stages whose name starts with s1
    python benchmarks/growth.py --report            # rebuild results/growth.json, the plots and the table

Why: tensorscale's reason to exist is the slides' (../shared/seeds/growing-sparse-llms-slides.txt)
Recipe 2, a small pretrained model expanded and trained further, against Recipe 1, the large model from
tabula rasa. The question is the equivalence point N: the tokens after which Recipe 1 has caught up.

Protocol (stated once more, with the results, in benchmarks/README.md):
  - data: one seeded order of 16 x 128-token windows of the training split, indexed by global step,
    the same for every recipe (a run that starts at step k sees windows k, k+1, ...). Seed 1, so the
    growth phase does not replay the small models' pretraining order (seed 0).
  - pretrained recipes continue the small model's schedule: its pretraining (train_reference.py: lr 2e-3,
    warmup 30, cosine to 10%) ended at lr 2e-4; they warm up over 10 steps to 2e-4 (AdamW's moments are not
    in a checkpoint and are rebuilt) and then decay by cosine to 2e-5 at the end of the budget. No jump.
  - tabula rasa: the standard schedule of train_reference.py (lr 2e-3, warmup 30, cosine to 10%) over
    the same budget.
  - Recipe 1 and Recipe 2 have the same size (checked: equal parameter counts and configs).
  - held-out loss on a fixed set of held-out windows (64 x 128 tokens), at fixed steps.
  - loss against tokens and against total FLOPs: 6 x params x tokens for every phase a model went
    through, the small model's pretraining included (0 for tabula rasa).
  - every expansion is `tensorscale up` (the real CLI, in a subprocess) on a saved checkpoint, in float32
    so the +-noise pairs cancel exactly; before training, the expanded model's logits are compared with
    its source's.

Stages (see STAGES): s1.* grows the 2.4M examples/pydoc-llama to 8.1M; s2.* pretrains an 8.1M model
here with the reference recipe and grows it to 29M; p.* grows 2.4M -> x2 -> x2 with training in between
against one-shot x4 and tabula rasa x4 (the latter is s2.tabula: the same config, data and schedule);
d.* is the mirror: d.s1.down narrows the trained 8.1M tabula rasa back to 2.4M with `tensorscale down
--method refit`, d.s1.down-init trains it on against d.s1.scratch (the same size from scratch, same schedule
and data), and d.heal trains SmolLM2-135M-Instruct after a 25% down until it is within 10% of the original
perplexity on held-out text, or --heal-minutes of CPU run out.

Every training stage checkpoints its model, optimizer and curve (work folder) every few minutes and at
any stop (--max-minutes), and writes its curve to results/growth/<stage>.json as it goes; running the
script again resumes where it stopped, with the same data and schedule, so an interrupted run ends
where an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import corpus  # noqa: E402
import torch  # noqa: E402

REFERENCE = os.path.join(REPO, "examples", "pydoc-llama")
PRETRAIN = dict(lr=2e-3, warmup=30, steps=360)  # train_reference.py's defaults: the small models' recipe
CONTINUED_LR = PRETRAIN["lr"] * 0.1  # where that cosine ends: the small models' last lr
REWARM_STEPS = 10
SNR_DB = 20.0
DATA_ROWS = 100_000  # rows of the one data order (steps, whatever the budget)

# The recipes of a scale: name -> (how it starts, schedule kind, label for tables and plots).
RECIPES = {
    "small": ("small", "continued", "small pretrained, continued"),
    "tabula": ("random", "standard", "tabula rasa, same size (Recipe 1)"),
    "iso-snr": ("iso-snr", "continued", f"expanded isotropic + {SNR_DB:g} dB noise (Recipe 2)"),
    "iso": ("iso", "continued", "expanded isotropic, no noise"),
    "pad": ("pad", "continued", "expanded top-left (zero-pad)"),
}
RECIPE2 = "iso-snr"  # HyperCloning as its paper prescribes: the crossing is measured against this one
EXPANSIONS = {"iso": [], "iso-snr": ["--snr-db", str(SNR_DB)], "pad": ["--strategy", "pad"]}
COLORS = {
    "small": "tab:gray",
    "tabula": "tab:red",
    "iso-snr": "tab:blue",
    "iso": "tab:orange",
    "pad": "tab:green",
    "progressive": "tab:purple",
    "oneshot": "tab:blue",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="", help="comma-separated name prefixes (default: every stage)")
    p.add_argument("--list", action="store_true", help="list the stages and their state, run nothing")
    p.add_argument("--report", action="store_true", help="only rebuild growth.json, plots and table")
    p.add_argument("--work", default=os.path.join(HERE, "work", "growth"), help="checkpoints (not in git)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--source", default=REFERENCE, help="scale 1's small pretrained model")
    p.add_argument("--s1-steps", type=int, default=300, help="scale 1 budget, steps after growth")
    p.add_argument("--s2-steps", type=int, default=300, help="scale 2 budget (and progressive's), steps")
    p.add_argument("--s2-pretrain-steps", type=int, default=PRETRAIN["steps"])
    p.add_argument("--p-switch", type=int, default=100, help="progressive: steps at x2 before the second x2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="init and noise seed")
    p.add_argument("--data-seed", type=int, default=1, help="seed of the growth phase's data order")
    p.add_argument(
        "--chunk-steps", type=int, default=20, help="steps a stage trains before the next of its group takes a turn"
    )
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long")
    p.add_argument("--heal-minutes", type=float, default=60.0, help="d.heal: CPU minutes of continued training")
    p.add_argument("--heal-steps", type=int, default=400, help="d.heal: the steps its cosine is laid over")
    p.add_argument("--heal-batch", type=int, default=4, help="d.heal: windows of 256 tokens per step")
    p.add_argument("--heal-lr", type=float, default=1e-4)
    p.add_argument("--heal-eval-every", type=int, default=25)
    p.add_argument("--heal-eval-tokens", type=int, default=2048, help="d.heal: held-out tokens per domain")
    p.add_argument("--heal-calibration-tokens", type=int, default=8192, help="d.heal: the down's calibration")
    p.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop each training stage after this many steps of this call (tests resumption)",
    )
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ settings


@dataclass
class Study:
    args: argparse.Namespace
    started: float = field(default_factory=time.time)
    chunk: int | None = None  # steps a training stage takes before yielding to its group

    @property
    def work(self):
        return self.args.work

    @property
    def stage_dir(self):
        return os.path.join(self.args.results, "growth")

    def tokens(self, steps: int) -> int:
        return steps * self.args.batch * self.args.seq_len

    def out_of_time(self) -> bool:
        m = self.args.max_minutes
        return m is not None and time.time() - self.started > 60 * m


class Paused(Exception):
    """A training stage stopped early (--max-minutes / --stop-after-steps); its checkpoint is saved."""


class Pending(Exception):
    """A stage that cannot run yet (a dependency outside this script is missing)."""


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------- data

_DATA = {}


def data(study: Study):
    """Token streams (cached in the work folder: parsing the stdlib takes a while) and eval windows."""
    if "d" not in _DATA:
        from transformers import AutoTokenizer

        cache = os.path.join(study.work, "data.pt")
        if os.path.exists(cache):
            streams = torch.load(cache, weights_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(REFERENCE)  # every scale shares the reference's tokenizer
            d = corpus.build_data(tokenizer=tok)
            streams = {"train": d.train, "val": d.val}
            os.makedirs(study.work, exist_ok=True)
            torch.save(streams, cache + ".tmp")
            os.replace(cache + ".tmp", cache)
        windows = corpus.val_windows(streams["val"], study.args.seq_len, max_windows=study.args.eval_windows)
        _DATA["d"] = (streams["train"], windows)
    return _DATA["d"]


def data_order(n_tokens: int, study: Study, seed: int) -> torch.Tensor:
    """Window starts for global steps 0..DATA_ROWS-1: one order, whatever a run's budget or first step."""
    return corpus.batch_starts(n_tokens, study.args.seq_len, study.args.batch, DATA_ROWS, seed)


# ------------------------------------------------------------------------------------------ models


def tensorscale_up(source: str, out: str, extra: list[str]) -> dict:
    """`tensorscale up`, the real CLI in a subprocess, exactly as a user runs it."""
    return tensorscale_cli("up", source, out, ["--seed", "0", *extra])


def tensorscale_cli(command: str, source: str, out: str, extra: list[str]) -> dict:
    """A tensorscale command (float32 output, JSON summary), in a subprocess, exactly as a user runs it."""
    exe = shutil.which("tensorscale", path=os.path.dirname(sys.executable)) or shutil.which("tensorscale")
    cmd = [exe, command, "-i", source, "-o", out, "--dtype", "float32", "--json", *extra]
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    command = "tensorscale " + " ".join(cmd[1:])
    return {"command": command.replace(REPO + os.sep, ""), "seconds": time.time() - t0}  # paths from the repo


def load_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def random_model(config_folder: str, seed: int):
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(config_folder)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def params_of(model) -> int:
    return corpus.count_params(model)


def same_shape_config(a: str, b: str) -> bool:
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
    )
    ca, cb = read_json(os.path.join(a, "config.json")), read_json(os.path.join(b, "config.json"))
    return all(ca.get(k) == cb.get(k) for k in keys)


def clone_divergence(windows: torch.Tensor, n: int):
    """||h_a - h_b|| / ||h_a + h_b|| of the two halves of each layer's residual stream, averaged over layers:
    0 while the clones are exact copies (the wide model computes only what the small one could)."""

    def probe(model) -> float:
        model.eval()
        with torch.no_grad():
            states = model(input_ids=windows, output_hidden_states=True).hidden_states[1:]
        model.train()
        values = []
        for h in states:
            d = h.shape[-1] // n
            a, b = h[..., :d].float(), h[..., d : 2 * d].float()
            values.append(((a - b).norm() / (a + b).norm().clamp_min(1e-30)).item())
        return sum(values) / len(values)

    return probe


# ---------------------------------------------------------------------------------------- training


@dataclass
class Run:
    """One training stage: a model, the global steps it trains [start, end), and its schedule."""

    name: str
    make_model: object  # () -> model, called only when there is no checkpoint
    start: int  # first global step (data and schedule position)
    end: int
    schedule: str  # "standard" or "continued"
    schedule_steps: int  # the length the cosine is laid over (global steps)
    flops_before: float  # total FLOPs the starting model already cost (pretraining, earlier phases)
    data_seed: int
    probes: dict = field(default_factory=dict)
    save_final: str | None = None  # folder to save the trained model in (for a later expansion)
    meta: dict = field(default_factory=dict)


def lr_at(run: Run, step: int) -> float:
    """Standard: train_reference's schedule. Continued: a 10-step warm-up (to rebuild AdamW's moments) onto
    a cosine from the small model's last lr (2e-4) down to 10% of it, laid over global steps."""
    if run.schedule == "standard":
        return corpus.Schedule(lr=PRETRAIN["lr"], warmup=PRETRAIN["warmup"]).at(step, run.schedule_steps)
    base = corpus.Schedule(lr=CONTINUED_LR, warmup=0).at(step, run.schedule_steps)
    return base * min(1.0, (step - run.start + 1) / REWARM_STEPS)


def train_stage(study: Study, run: Run) -> dict:
    """Train with checkpoints; return the stage's result (curve). Resumes from work/<name>/state.pt."""
    from transformers import AutoTokenizer

    args = study.args
    train_stream, windows = data(study)
    starts = data_order(len(train_stream), study, run.data_seed)
    ckpt_dir = os.path.join(study.work, run.name)
    state_path = os.path.join(ckpt_dir, "state.pt")
    result_path = os.path.join(study.stage_dir, f"{run.name}.json")
    os.makedirs(ckpt_dir, exist_ok=True)

    model = run.make_model()
    n_params = params_of(model)
    opt = corpus.make_optimizer(model, corpus.Schedule(lr=CONTINUED_LR))
    hist = {
        "steps": [],
        "tokens": [],
        "val_loss": [],
        "train_loss": [],
        "lr": [],
        "extra": {},
        "seconds": 0.0,
        "cpu_seconds": 0.0,
    }
    step, running, running_n = run.start, 0.0, 0
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, running, running_n, hist = state["step"], state["running"], state["running_n"], state["hist"]
        print(f"{run.name}: resuming at step {step} of {run.end}")
    else:
        print(f"{run.name}: {n_params:,} parameters, steps {run.start}..{run.end}")

    def result(done: bool) -> dict:
        tokens_total = [study.tokens(s) for s in hist["steps"]]
        return {
            "stage": run.name,
            "params": n_params,
            "start_step": run.start,
            "end_step": run.end,
            "schedule": run.schedule,
            "schedule_steps": run.schedule_steps,
            "flops_before": run.flops_before,
            "steps": hist["steps"],
            "tokens": tokens_total,
            "val_loss": hist["val_loss"],
            "train_loss": hist["train_loss"],
            "lr": hist["lr"],
            "extra": hist["extra"],
            "flops_total": [run.flops_before + 6 * n_params * study.tokens(s - run.start) for s in hist["steps"]],
            "seconds": hist["seconds"],
            "cpu_seconds": hist["cpu_seconds"],
            "done": done,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "eval_windows": int(len(windows)),
            "data_seed": run.data_seed,
            "machine": corpus.machine(),
            "date": datetime.date.today().isoformat(),
            **run.meta,
        }

    def record():
        nonlocal running, running_n
        hist["steps"].append(step)
        hist["tokens"].append(study.tokens(step))
        hist["val_loss"].append(corpus.evaluate(model, windows))
        hist["train_loss"].append(running / running_n if running_n else None)
        hist["lr"].append(lr_at(run, min(step, run.end - 1)))
        for name, fn in run.probes.items():
            hist["extra"].setdefault(name, []).append(fn(model))
        running, running_n = 0.0, 0
        extra = "".join(f"  {k} {v[-1]:.3g}" for k, v in hist["extra"].items())
        tl = hist["train_loss"][-1]
        print(
            f"{run.name:>14} step {step:5d}/{run.end}  train {'-' if tl is None else f'{tl:.3f}'}  "
            f"val {hist['val_loss'][-1]:.4f}  lr {hist['lr'][-1]:.2e}{extra}  ({hist['seconds']:.0f} s)",
            flush=True,
        )

    def checkpoint():
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "running": running,
                "running_n": running_n,
                "hist": hist,
            },
            state_path + ".tmp",
        )
        os.replace(state_path + ".tmp", state_path)
        write_json(result_path, result(done=False))

    model.train()
    if not hist["steps"]:
        record()
    t0, c0, last_ckpt, steps_here = time.time(), time.process_time(), time.time(), 0
    seconds0, cpu0 = hist["seconds"], hist["cpu_seconds"]
    while step < run.end:
        for group in opt.param_groups:
            group["lr"] = lr_at(run, step)
        x = corpus.gather(train_stream, starts[step], args.seq_len)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        running_n += 1
        step += 1
        steps_here += 1
        hist["seconds"] = seconds0 + time.time() - t0
        hist["cpu_seconds"] = cpu0 + time.process_time() - c0
        if (step - run.start) % args.eval_every == 0 or step == run.end or step - run.start in (5, 10):
            record()
        limit = min(x for x in (args.stop_after_steps, study.chunk, 1 << 62) if x)
        stop = study.out_of_time() or steps_here >= limit
        if step < run.end and (stop or time.time() - last_ckpt > 60 * args.checkpoint_minutes):
            checkpoint()
            last_ckpt = time.time()
            if stop:
                raise Paused(f"{run.name}: stopped at step {step} of {run.end}; run again to resume")
    if run.save_final:
        model.save_pretrained(run.save_final, safe_serialization=True)
        AutoTokenizer.from_pretrained(REFERENCE).save_pretrained(run.save_final)
    res = result(done=True)
    write_json(result_path, res)
    if os.path.exists(state_path):
        os.remove(state_path)
    return res


# ------------------------------------------------------------------------------------------- stages


def pretrain_flops(params: int, steps: int, study_tokens_per_step: int) -> float:
    return 6.0 * params * steps * study_tokens_per_step


def reference_pretrain_tokens() -> int:
    """examples/pydoc-llama's pretraining tokens, from its training record (train_reference.py)."""
    path = os.path.join(HERE, "results", "train_reference.json")
    if os.path.exists(path):
        return int(read_json(path)["tokens_seen"])
    return PRETRAIN["steps"] * 16 * 128


def scale_source(study: Study, scale: str) -> tuple[str, float]:
    """(small model folder, FLOPs of its pretraining) of a scale."""
    if scale == "s1":
        model = load_model(study.args.source)
        return study.args.source, 6.0 * params_of(model) * reference_pretrain_tokens()
    res = read_json(os.path.join(study.stage_dir, "s2.pretrain.json"))
    return os.path.join(study.work, "s2.pretrain", "final"), 6.0 * res["params"] * res["tokens"][-1]


def expand_stage(study: Study, scale: str) -> dict:
    """The three expansions of a scale's small model, each checked for function preservation."""
    source, _ = scale_source(study, scale)
    _, windows = data(study)
    probe = windows[:8]
    small = load_model(source)
    with torch.no_grad():
        ref = small(input_ids=probe).logits
    out = {
        "stage": f"{scale}.expand",
        "source": os.path.relpath(source, REPO),
        "done": True,
        "small_loss": corpus.evaluate(small, windows),
        "expansions": {},
    }
    for name, extra in EXPANSIONS.items():
        folder = os.path.join(study.work, scale, name)
        info = tensorscale_up(source, folder, ["-edm", "2", "-upm", "2", *extra])
        big = load_model(folder)
        with torch.no_grad():
            delta = (big(input_ids=probe).logits - ref).abs().max().item()
        info.update(
            max_delta_logit=delta,
            logit_scale=ref.abs().max().item(),
            params=params_of(big),
            loss=corpus.evaluate(big, windows),
        )
        out["expansions"][name] = info
        print(
            f"{scale}.expand {name}: {info['params']:,} params, max |delta logit| {delta:.2e}, "
            f"held-out loss {info['loss']:.4f} (small {out['small_loss']:.4f})"
        )
    write_json(os.path.join(study.stage_dir, f"{scale}.expand.json"), out)
    return out


def recipe_run(study: Study, scale: str, recipe: str) -> Run:
    steps = study.args.s1_steps if scale == "s1" else study.args.s2_steps
    source, flops_small = scale_source(study, scale)
    start, schedule, _ = RECIPES[recipe]
    if start == "small":
        make, before = (lambda: load_model(source)), flops_small
    elif start == "random":
        make, before = (lambda: random_model(os.path.join(study.work, scale, "iso"), study.args.seed)), 0.0
    else:
        folder = os.path.join(study.work, scale, start)
        make, before = (lambda: load_model(folder)), flops_small
    _, windows = data(study)
    probes = {"clone_divergence": clone_divergence(windows[:8], 2)} if recipe != "small" else {}
    # the trained model is kept: down-as-initialisation (d.*) starts from a trained large one
    return Run(
        f"{scale}.{recipe}",
        make,
        0,
        steps,
        schedule,
        steps,
        before,
        study.args.data_seed,
        probes,
        save_final=os.path.join(study.work, f"{scale}.{recipe}", "final"),
        meta={"scale": scale, "recipe": recipe},
    )


def pretrain_s2(study: Study) -> dict:
    """Scale 2's small model: the reference recipe (train_reference.py's schedule, data seed 0, 360 steps),
    at twice the reference's width: hidden 384, 8 heads / 4 kv heads, FFN 1024 = the x2 shape (8.1M)."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(REFERENCE)
    cfg.hidden_size, cfg.intermediate_size = 2 * cfg.hidden_size, 2 * cfg.intermediate_size
    cfg.num_attention_heads, cfg.num_key_value_heads = 2 * cfg.num_attention_heads, 2 * cfg.num_key_value_heads

    def make():
        torch.manual_seed(study.args.seed)
        return LlamaForCausalLM(cfg)

    steps = study.args.s2_pretrain_steps
    run = Run(
        "s2.pretrain",
        make,
        0,
        steps,
        "standard",
        steps,
        0.0,
        0,
        save_final=os.path.join(study.work, "s2.pretrain", "final"),
        meta={"scale": "s2", "recipe": "pretrain"},
    )
    return train_stage(study, run)


def progressive_runs(study: Study) -> dict:
    """p.phase1: the x2 (iso + noise) of the reference, trained p_switch steps; p.phase2: `up` x2 of that
    checkpoint, trained on to the budget, continuing the same global schedule and data; p.oneshot: `up` x4
    of the reference, trained the whole budget. Tabula rasa x4 is s2.tabula (same config, data, schedule)."""
    a = study.args
    src, flops_small = scale_source(study, "s1")
    _, windows = data(study)
    div = {"clone_divergence": clone_divergence(windows[:8], 2)}
    phase1_final = os.path.join(study.work, "p.phase1", "final")
    x4 = os.path.join(study.work, "p", "x2x2")
    one = os.path.join(study.work, "p", "x4")
    runs = {
        "p.phase1": Run(
            "p.phase1",
            lambda: load_model(os.path.join(study.work, "s1", "iso-snr")),
            0,
            a.p_switch,
            "continued",
            a.s2_steps,
            flops_small,
            a.data_seed,
            div,
            save_final=phase1_final,
            meta={"recipe": "progressive", "phase": 1},
        ),
        "p.phase2": Run(
            "p.phase2",
            lambda: load_model(x4),
            a.p_switch,
            a.s2_steps,
            "continued",
            a.s2_steps,
            None,
            a.data_seed,
            div,
            meta={"recipe": "progressive", "phase": 2},
        ),
        "p.oneshot": Run(
            "p.oneshot",
            lambda: load_model(one),
            0,
            a.s2_steps,
            "continued",
            a.s2_steps,
            flops_small,
            a.data_seed,
            {"clone_divergence": clone_divergence(windows[:8], 4)},
            meta={"recipe": "oneshot"},
        ),
    }
    return runs


def p_grow(study: Study) -> dict:
    p1 = read_json(os.path.join(study.stage_dir, "p.phase1.json"))
    folder = os.path.join(study.work, "p", "x2x2")
    info = tensorscale_up(
        os.path.join(study.work, "p.phase1", "final"), folder, ["-edm", "2", "-upm", "2", "--snr-db", str(SNR_DB)]
    )
    out = {"stage": "p.grow", "done": True, "from_flops": p1["flops_total"][-1], **info}
    write_json(os.path.join(study.stage_dir, "p.grow.json"), out)
    return out


def p_oneshot_expand(study: Study) -> dict:
    folder = os.path.join(study.work, "p", "x4")
    info = tensorscale_up(study.args.source, folder, ["-edm", "4", "-upm", "4", "--snr-db", str(SNR_DB)])
    same = (
        same_shape_config(folder, os.path.join(study.work, "s2", "iso"))
        if os.path.isdir(os.path.join(study.work, "s2", "iso"))
        else None
    )
    out = {"stage": "p.x4", "done": True, "same_config_as_s2_large": same, **info}
    write_json(os.path.join(study.stage_dir, "p.x4.json"), out)
    return out


# ------------------------------------------------------------------- down as initialisation (d.*)

DOWN_LARGE = "s1.tabula"  # the trained large model that d.s1.down narrows: trained from scratch, no clones
DOWN_CALIBRATION_TOKENS = 8192


def small_shape() -> dict:
    """The reference's (examples/pydoc-llama) width: d.s1.down's target and d.s1.scratch's config."""
    cfg = read_json(os.path.join(REFERENCE, "config.json"))
    return {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")}


def write_calibration(study: Study, tokens: int) -> str:
    """The first `tokens` of the training stream as text (the training data, so no held-out text is used)."""
    from transformers import AutoTokenizer

    train_stream, _ = data(study)
    path = os.path.join(study.work, "d", "calibration.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    text = AutoTokenizer.from_pretrained(REFERENCE).decode(train_stream[: 2 * tokens].tolist())
    with open(path, "w") as f:
        f.write(text)
    return path


def d_s1_down(study: Study) -> dict:
    """`tensorscale down --method refit` of the trained large model to the reference's width (8.06M -> 2.41M)."""
    large = os.path.join(study.work, DOWN_LARGE, "final")
    if not os.path.isdir(large):
        raise Pending(f"{DOWN_LARGE} has not saved its trained model ({large}); run that stage to its end")
    _, windows = data(study)
    out = os.path.join(study.work, "d", "s1-down")
    flags = [x for key, value in small_shape().items() for x in (f"--{key.replace('_', '-')}", str(value))]
    info = tensorscale_cli(
        "down",
        large,
        out,
        [
            "--method",
            "refit",
            "--calibration",
            write_calibration(study, DOWN_CALIBRATION_TOKENS),
            "--calibration-tokens",
            str(DOWN_CALIBRATION_TOKENS),
            *flags,
        ],
    )
    large_model, small = load_model(large), load_model(out)
    large_res = read_json(os.path.join(study.stage_dir, f"{DOWN_LARGE}.json"))
    res = {
        "stage": "d.s1.down",
        "done": True,
        **info,
        "large": os.path.relpath(large, REPO),
        "large_params": params_of(large_model),
        "params": params_of(small),
        "large_loss": corpus.evaluate(large_model, windows),
        "loss": corpus.evaluate(small, windows),
        # what the large model cost: its training (tabula rasa, so nothing before it)
        "large_flops": large_res["flops_total"][-1],
    }
    print(
        f"d.s1.down: {res['large_params']:,} -> {res['params']:,} parameters, held-out loss "
        f"{res['large_loss']:.4f} -> {res['loss']:.4f}"
    )
    write_json(os.path.join(study.stage_dir, "d.s1.down.json"), res)
    return res


def down_init_runs(study: Study) -> dict:
    """d.s1.down-init: the downed model trained on; d.s1.scratch: the same size from scratch. One schedule
    for both (train_reference's standard one: the downed model is damaged, not a converged small model),
    the same data order and budget as scale 1: only the initialisation differs."""
    steps = study.args.s1_steps
    folder = os.path.join(study.work, "d", "s1-down")

    def scratch():
        return random_model(REFERENCE, study.args.seed)

    def flops_before():
        path = os.path.join(study.stage_dir, "d.s1.down.json")
        return read_json(path)["large_flops"] if os.path.exists(path) else None

    return {
        "d.s1.down-init": Run(
            "d.s1.down-init",
            lambda: load_model(folder),
            0,
            steps,
            "standard",
            steps,
            flops_before(),
            study.args.data_seed,
            meta={"recipe": "down-init"},
        ),
        "d.s1.scratch": Run(
            "d.s1.scratch", scratch, 0, steps, "standard", steps, 0.0, study.args.data_seed, meta={"recipe": "scratch"}
        ),
    }


HEAL_LEVEL = {"hidden_size": 576, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 3}
HEAL_TARGET = 1.10  # "within 10% of the original perplexity"


def heal_stage(study: Study) -> dict:
    """SmolLM2-135M-Instruct after a 25% `down` (refit on Python docs), trained on by continued pretraining on
    more of the same calibration domain until --heal-minutes of CPU, with held-out perplexity (two domains
    never trained on: the Python library reference, Debian's licenses) against the original's. Resumable."""
    import real_eval
    import real_model
    import real_texts
    from transformers import AutoTokenizer

    args = study.args
    source = real_model.real_model_folder("float32")
    work = os.path.join(study.work, "d.heal")
    os.makedirs(work, exist_ok=True)
    result_path = os.path.join(study.stage_dir, "d.heal.json")
    tokenizer = AutoTokenizer.from_pretrained(source)
    text = real_texts.calibration_text()
    windows = real_eval.domain_windows(tokenizer, real_texts.eval_texts(), args.heal_eval_tokens)
    downed = os.path.join(work, "down")
    res = read_json(result_path) if os.path.exists(result_path) else None
    if res is None or not os.path.isdir(downed):
        cal = os.path.join(work, "calibration.txt")
        with open(cal, "w") as f:
            f.write(text[:400_000])
        flags = [x for key, value in HEAL_LEVEL.items() for x in (f"--{key.replace('_', '-')}", str(value))]
        info = tensorscale_cli(
            "down",
            source,
            downed,
            [
                "--method",
                "refit",
                "--calibration",
                cal,
                "--calibration-tokens",
                str(args.heal_calibration_tokens),
                *flags,
            ],
        )
        original = real_eval.load(source)
        original_ppl = {name: corpus_ppl(original, w) for name, w in windows.items()}
        res = {
            "stage": "d.heal",
            "done": False,
            "down": info,
            "level": HEAL_LEVEL,
            "target_ratio": HEAL_TARGET,
            "source_params": params_of(original),
            "original_ppl": original_ppl,
            "steps": [],
            "tokens": [],
            "ppl": {name: [] for name in windows},
            "ppl_ratio": {name: [] for name in windows},
            "train_loss": [],
            "seconds": 0.0,
            "cpu_seconds": 0.0,
            "batch": args.heal_batch,
            "seq_len": real_eval.WINDOW,
            "lr": args.heal_lr,
            "steps_planned": args.heal_steps,
            "eval_tokens": {n: int(w.numel()) for n, w in windows.items()},
            "train_text": "Python docs .rst.txt outside library/ and whatsnew/ (benchmarks/real_texts.py), "
            "from token 0 (its first 8,192 tokens are also the down's calibration)",
            "machine": corpus.machine(),
            "date": datetime.date.today().isoformat(),
        }
        del original
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    per_step = args.heal_batch * real_eval.WINDOW
    model = real_eval.load(downed)
    res["params"] = params_of(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.heal_lr, weight_decay=0.0)
    state_path = os.path.join(work, "state.pt")
    step = 0
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"d.heal: resuming at step {step}")

    def lr_at(step):
        warm = min(1.0, (step + 1) / REWARM_STEPS)
        return corpus.Schedule(lr=args.heal_lr, warmup=0).at(step, args.heal_steps) * warm

    def record():
        model.train(False)
        res["steps"].append(step)
        res["tokens"].append(step * per_step)
        line = []
        for name, w in windows.items():
            ppl = corpus_ppl(model, w)
            res["ppl"][name].append(ppl)
            res["ppl_ratio"][name].append(ppl / res["original_ppl"][name])
            line.append(f"{name} ppl x{res['ppl_ratio'][name][-1]:.3f}")
        model.train(True)
        print(f"d.heal step {step} ({step * per_step:,} tokens): {', '.join(line)}", flush=True)

    def save(done):
        res["done"] = done
        res["tokens_to_target"] = {
            name: next((t for t, r in zip(res["tokens"], ratios) if r <= HEAL_TARGET), None)
            for name, ratios in res["ppl_ratio"].items()
        }
        write_json(result_path, res)

    if not res["steps"]:
        record()
        save(False)
    model.train(True)
    t0, c0, seconds0, cpu0, running = time.time(), time.process_time(), res["seconds"], res["cpu_seconds"], []
    while step < args.heal_steps and res["cpu_seconds"] < 60 * args.heal_minutes:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        start = (step * per_step) % (len(ids) - per_step - 1)
        x = torch.tensor(ids[start : start + per_step]).reshape(args.heal_batch, real_eval.WINDOW)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        step += 1
        res["seconds"], res["cpu_seconds"] = seconds0 + time.time() - t0, cpu0 + time.process_time() - c0
        if step % args.heal_eval_every == 0 or step in (5, 10) or step == args.heal_steps:
            res["train_loss"].append(sum(running) / len(running))
            running = []
            record()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            save(False)
        if study.out_of_time():
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)
            save(False)
            raise Paused(f"d.heal: stopped at step {step}; run again to resume")
    if res["steps"][-1] != step:
        record()
    save(True)
    return res


def corpus_ppl(model, windows) -> float:
    """Perplexity of `model` on fixed windows (batches of real_eval.BATCH), as real_eval measures it."""
    import math

    import real_eval

    nll = count = 0.0
    with torch.no_grad():
        for b in range(0, len(windows), real_eval.BATCH):
            x = windows[b : b + real_eval.BATCH]
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
            nll += float(-logp.gather(-1, x[:, 1:, None]).sum())
            count += x[:, 1:].numel()
    return math.exp(nll / count)


def stages(study: Study) -> list[tuple[str, object, str | None]]:
    """(name, function, round-robin group) in run order; a stage is done when results/growth/<name>.json
    says done. Training stages of one group advance together, --chunk-steps at a time, so that a stop at
    any moment leaves their curves measured to about the same number of tokens (the crossing pair first)."""

    def recipe(scale, r):
        return lambda: train_stage(study, recipe_run(study, scale, r))

    out = [("s1.expand", lambda: expand_stage(study, "s1"), None)]
    out += [(f"s1.{r}", recipe("s1", r), "s1a") for r in ("tabula", "iso-snr", "small")]
    out += [(f"s1.{r}", recipe("s1", r), "s1b") for r in ("pad", "iso")]
    out.append(("p.phase1", lambda: train_stage(study, progressive_runs(study)["p.phase1"]), None))
    out.append(("p.grow", lambda: p_grow(study), None))
    out.append(("s2.pretrain", lambda: pretrain_s2(study), None))
    out.append(("s2.expand", lambda: expand_stage(study, "s2"), None))
    out.append(("p.x4", lambda: p_oneshot_expand(study), None))
    out += [(f"s2.{r}", recipe("s2", r), "s2a") for r in ("tabula", "iso-snr", "small")]

    def phase2():
        run = progressive_runs(study)["p.phase2"]
        run.flops_before = read_json(os.path.join(study.stage_dir, "p.grow.json"))["from_flops"]
        return train_stage(study, run)

    out.append(("p.phase2", phase2, "p"))
    out.append(("p.oneshot", lambda: train_stage(study, progressive_runs(study)["p.oneshot"]), "p"))
    out += [(f"s2.{r}", recipe("s2", r), "s2b") for r in ("pad", "iso")]
    out.append(("d.s1.down", lambda: d_s1_down(study), None))
    out += [
        (name, (lambda name=name: train_stage(study, down_init_runs(study)[name])), "d")
        for name in ("d.s1.down-init", "d.s1.scratch")
    ]
    out.append(("d.heal", lambda: heal_stage(study), None))
    return out


def stage_outputs(name: str) -> list[str]:
    """Folders (under the work folder) a later stage reads: a stage whose results say done but whose
    outputs are missing (a fresh clone: work/ is not in git) is done again."""
    if name.endswith(".expand"):
        return [os.path.join(name.split(".")[0], e) for e in EXPANSIONS]
    return {
        "p.grow": [os.path.join("p", "x2x2")],
        "p.x4": [os.path.join("p", "x4")],
        "s2.pretrain": [os.path.join("s2.pretrain", "final")],
        "p.phase1": [os.path.join("p.phase1", "final")],
        "d.s1.down": [os.path.join("d", "s1-down")],
        **{f"s1.{r}": [os.path.join(f"s1.{r}", "final")] for r in ("tabula",)},
    }.get(name, [])


def stage_state(study: Study, name: str) -> str:
    path = os.path.join(study.stage_dir, f"{name}.json")
    if not os.path.exists(path):
        return "not started"
    res = read_json(path)
    if res.get("done"):
        missing = [o for o in stage_outputs(name) if not os.path.isdir(os.path.join(study.work, o))]
        return f"outputs missing ({', '.join(missing)}): to redo" if missing else "done"
    if "start_step" not in res:  # d.heal: steps until its CPU budget runs out
        return f"partial ({res['steps'][-1] if res['steps'] else 0} steps)"
    return f"partial ({res['steps'][-1] - res['start_step']} of {res['end_step'] - res['start_step']} steps)"


# ------------------------------------------------------------------------------------------ analysis


def crossing(xa, a, xb, b):
    """First x where curve a goes from above curve b to at-or-below it, or None. b is interpolated onto
    a's points (they may be sampled on different x, e.g. FLOPs of different sizes); between a's points the
    crossing is interpolated linearly too. With a = Recipe 1 and b = Recipe 2 this is the slides' N."""
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


def load_stage(study: Study, name: str):
    path = os.path.join(study.stage_dir, f"{name}.json")
    return read_json(path) if os.path.exists(path) else None


def curve(res: dict) -> dict:
    keys = (
        "params",
        "tokens",
        "val_loss",
        "flops_total",
        "lr",
        "done",
        "extra",
        "seconds",
        "cpu_seconds",
        "flops_before",
        "start_step",
        "end_step",
    )
    return {k: res[k] for k in keys}


def scale_summary(study: Study, scale: str) -> dict | None:
    expand = load_stage(study, f"{scale}.expand")
    runs = {r: load_stage(study, f"{scale}.{r}") for r in RECIPES}
    runs = {r: v for r, v in runs.items() if v}
    if not expand or not runs:
        return None
    steps = study.args.s1_steps if scale == "s1" else study.args.s2_steps
    small_params = runs["small"]["params"] if "small" in runs else params_of(load_model(scale_source(study, scale)[0]))
    large_params = expand["expansions"]["iso"]["params"]
    sizes = {r: v["params"] for r, v in runs.items() if r != "small"}
    assert all(p == large_params for p in sizes.values()), f"Recipe 1 and 2 sizes differ: {sizes}"
    pairs = {}
    for a, b in (
        ("tabula", "iso-snr"),
        ("tabula", "iso"),
        ("tabula", "pad"),
        ("tabula", "small"),
        ("iso-snr", "small"),
        ("iso", "small"),
        ("pad", "small"),
        ("small", "iso-snr"),
    ):
        if a in runs and b in runs:
            ra, rb = runs[a], runs[b]
            pairs[f"{a} reaches {b}"] = {
                "tokens": crossing(ra["tokens"], ra["val_loss"], rb["tokens"], rb["val_loss"]),
                "flops": crossing(ra["flops_total"], ra["val_loss"], rb["flops_total"], rb["val_loss"]),
                "measured_to_tokens": min(ra["tokens"][-1], rb["tokens"][-1]),
            }
    key = f"tabula reaches {RECIPE2}"
    both_done = all(runs.get(r, {}).get("done") for r in ("tabula", RECIPE2))
    return {
        "name": scale,
        "small_params": small_params,
        "large_params": large_params,
        "budget_tokens": study.tokens(steps),
        "recipe1": "tabula",
        "recipe2": RECIPE2,
        "crossing_tokens": pairs.get(key, {}).get("tokens"),
        "crossing_flops": pairs.get(key, {}).get("flops"),
        "complete": both_done and len(runs) == len(RECIPES),
        "crossings": pairs,
        "expansion": expand,
        "final_loss": {r: v["val_loss"][-1] for r, v in runs.items()},
        "curves": {r: curve(v) for r, v in runs.items()},
    }


def progressive_summary(study: Study) -> dict | None:
    parts = {n: load_stage(study, n) for n in ("p.phase1", "p.phase2", "p.oneshot", "s2.tabula")}
    if not any(parts.values()):
        return None
    out = {
        "budget_tokens": study.tokens(study.args.s2_steps),
        "switch_tokens": study.tokens(study.args.p_switch),
        "tabula_is": "s2.tabula",
        "curves": {},
    }
    if parts["p.phase1"]:
        prog = {k: list(parts["p.phase1"][k]) for k in ("tokens", "val_loss", "flops_total")}
        prog["done"] = bool(parts["p.phase2"] and parts["p.phase2"]["done"])
        if parts["p.phase2"]:
            for k in ("tokens", "val_loss", "flops_total"):
                prog[k] += parts["p.phase2"][k]
        out["curves"]["progressive"] = prog
    for key, name in (("oneshot", "p.oneshot"), ("tabula", "s2.tabula")):
        if parts[name]:
            out["curves"][key] = {k: parts[name][k] for k in ("tokens", "val_loss", "flops_total", "done")}
    x4 = load_stage(study, "p.x4")
    if x4:
        out["same_config_as_s2_large"] = x4.get("same_config_as_s2_large")
    # Loss at equal total compute: each curve interpolated at the FLOPs all of them reached.
    import numpy as np

    cs = out["curves"]
    if len(cs) >= 2:
        top = min(c["flops_total"][-1] for c in cs.values())
        low = max(c["flops_total"][0] for c in cs.values())
        out["equal_compute_flops"] = top
        out["loss_at_equal_compute"] = {
            k: float(np.interp(top, c["flops_total"], c["val_loss"])) for k, c in cs.items()
        }
        out["compared_from_flops"] = low
    return out


# --------------------------------------------------------------------------------------------- plots


def plot_scale(summary: dict, results: str) -> list[str]:
    """Per axis (tokens, total FLOPs): the whole range (log loss) and, on the right, a zoom on the
    pretrained recipes' range, where Recipe 2, top-left and the small model differ by hundredths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    name = summary["name"]
    pretrained = [c for r, c in summary["curves"].items() if r != "tabula"]
    measured = summary["crossings"].get(f"tabula reaches {RECIPE2}", {}).get("measured_to_tokens")
    for axis in ("tokens", "flops"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, zoom in zip(axes, (False, True)):
            for r, c in summary["curves"].items():
                x = c["tokens"] if axis == "tokens" else c["flops_total"]
                label = f"{RECIPES[r][2]}, {c['params'] / 1e6:.1f}M" + ("" if c["done"] else " (partial)")
                ax.plot(x, c["val_loss"], marker="o", ms=2.5, lw=1.3, color=COLORS[r], label=label)
            n = summary["crossing_tokens"] if axis == "tokens" else summary["crossing_flops"]
            if n is not None:
                ax.axvline(n, color="k", ls="--", lw=1)
                ax.annotate(
                    f"N = {n:,.0f} tokens" if axis == "tokens" else f"N = {n:.2e} FLOPs",
                    (n, 0.97),
                    xycoords=("data", "axes fraction"),
                    ha="right",
                    va="top",
                    fontsize=8,
                    rotation=90,
                )
            elif not zoom:
                where = f"{measured:,} tokens measured" if measured is not None else "nothing measured"
                ax.annotate(
                    f"no crossing (N) within the {where}\n(budget {summary['budget_tokens']:,})",
                    (0.98, 0.5),
                    xycoords="axes fraction",
                    ha="right",
                    va="center",
                    fontsize=8,
                )
            if axis == "flops":
                ax.set_xscale("log")
            if zoom and pretrained:
                lo = min(min(c["val_loss"]) for c in summary["curves"].values())
                hi = max(max(c["val_loss"]) for c in pretrained)
                ax.set_ylim(lo - 0.02, hi + 0.02)
                ax.set_title("zoom on the pretrained recipes")
            else:
                ax.set_yscale("log")
                ax.set_title(f"{name}: {summary['small_params'] / 1e6:.1f}M -> {summary['large_params'] / 1e6:.1f}M")
                ax.legend(fontsize=7.5)
            ax.set_xlabel(
                "training tokens after growth"
                if axis == "tokens"
                else "total FLOPs (6 x params x tokens, pretraining included)"
            )
            ax.set_ylabel("held-out loss (nats/token)")
            ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = os.path.join(results, f"growth_{name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _one_plot():
    """A 7.5 x 4.8 figure with one axis, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    return fig, ax


def _save_plot(fig, ax, xlabel: str, ylabel: str, title: str, path: str) -> str:
    """Labels, grid and legend as every plot of the study has them, then the PNG; returns its path."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_progressive(prog: dict, results: str) -> str:
    labels = {
        "progressive": "progressive 2.4M -> x2 -> x2 (29M)",
        "oneshot": "one-shot x4 (29M)",
        "tabula": "tabula rasa x4 (29M)",
    }
    fig, ax = _one_plot()
    for k, c in prog["curves"].items():
        ax.plot(
            c["flops_total"],
            c["val_loss"],
            marker="o",
            ms=2.5,
            color=COLORS[k],
            label=labels[k] + ("" if c["done"] else " (partial)"),
        )
    if "equal_compute_flops" in prog:
        ax.axvline(prog["equal_compute_flops"], color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return _save_plot(
        fig,
        ax,
        "total training FLOPs (pretraining of the 2.4M model included)",
        "held-out loss (nats/token)",
        "Progressive vs one-shot growth to x4",
        os.path.join(results, "growth_progressive.png"),
    )


def plot_down_init(summary: dict, results: str) -> str:
    labels = {"down-init": "init: `down` of the trained 8.06M (refit)", "scratch": "init: random (tabula rasa)"}
    colors = {"down-init": "tab:blue", "scratch": "tab:red"}
    fig, ax = _one_plot()
    for k, c in summary["curves"].items():
        ax.plot(
            c["tokens"],
            c["val_loss"],
            marker="o",
            ms=2.5,
            color=colors[k],
            label=labels[k] + ("" if c["done"] else " (partial)"),
        )
    if summary.get("scratch_catches_up_tokens"):
        ax.axvline(summary["scratch_catches_up_tokens"], color="k", ls=":", lw=1, label="scratch catches up")
    ax.set_yscale("log")
    return _save_plot(
        fig,
        ax,
        "tokens trained at 2.41M",
        "held-out loss (nats/token)",
        "Down as initialisation: the same 2.41M model, two starts",
        os.path.join(results, "growth_down_init.png"),
    )


def plot_healing(summary: dict, results: str) -> str:
    fig, ax = _one_plot()
    for name, ratios in summary["ppl_ratio"].items():
        ax.plot(summary["tokens"], ratios, marker="o", ms=2.5, label=f"held out: {name}")
    ax.axhline(summary["target_ratio"], color="k", ls=":", lw=1, label=f"within {summary['target_ratio'] - 1:.0%}")
    ax.set_yscale("log")
    return _save_plot(
        fig,
        ax,
        "tokens of continued training (Python docs outside the held-out library reference)",
        "perplexity / original's",
        "Healing SmolLM2-135M after a 25% `down`" + ("" if summary["done"] else " (partial)"),
        os.path.join(results, "growth_healing.png"),
    )


def table(summary: dict) -> str:
    lines = [
        "| recipe | params | start loss | end loss | tokens | total FLOPs | CPU s | done |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, c in summary["curves"].items():
        lines.append(
            f"| {RECIPES[r][2]} | {c['params'] / 1e6:.2f}M | {c['val_loss'][0]:.3f} | {c['val_loss'][-1]:.3f} | "
            f"{c['tokens'][-1]:,} | {c['flops_total'][-1]:.2e} | {c['cpu_seconds']:.0f} | "
            f"{'yes' if c['done'] else 'partial'} |"
        )
    return "\n".join(lines)


def down_init_summary(study: Study) -> dict | None:
    """The mirror experiment: the downed large model trained on against the same size from scratch, and
    where (if anywhere) scratch catches up: the tokens (and total FLOPs) at which its loss first matches."""
    down_path = os.path.join(study.stage_dir, "d.s1.down.json")
    if not os.path.exists(down_path):
        return None
    runs = {name: load_stage(study, f"d.s1.{name}") for name in ("down-init", "scratch")}
    out = {"down": read_json(down_path), "curves": {n: curve(r) for n, r in runs.items() if r}}
    if all(runs.values()):
        a, b = runs["scratch"], runs["down-init"]
        out["scratch_catches_up_tokens"] = crossing(a["tokens"], a["val_loss"], b["tokens"], b["val_loss"])
        out["scratch_catches_up_flops"] = crossing(a["flops_total"], a["val_loss"], b["flops_total"], b["val_loss"])
        out["final_loss"] = {n: r["val_loss"][-1] for n, r in runs.items()}
        out["complete"] = all(r.get("done") for r in runs.values())
    return out


def healing_summary(study: Study) -> dict | None:
    path = os.path.join(study.stage_dir, "d.heal.json")
    if not os.path.exists(path):
        return None
    res = read_json(path)
    return {
        k: res.get(k)
        for k in (
            "done",
            "level",
            "source_params",
            "params",
            "original_ppl",
            "target_ratio",
            "tokens_to_target",
            "steps",
            "tokens",
            "ppl_ratio",
            "cpu_seconds",
            "batch",
            "lr",
            "steps_planned",
            "eval_tokens",
            "train_text",
            "machine",
            "date",
        )
    }


def report(study: Study) -> dict:
    scales = [s for s in (scale_summary(study, "s1"), scale_summary(study, "s2")) if s]
    prog = progressive_summary(study)
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    a = study.args
    out = {
        "protocol": {
            "data": f"{a.batch} x {a.seq_len}-token windows per step, one order (data seed {a.data_seed}) indexed "
            "by global step, the same for every recipe",
            "continued_schedule": f"warm-up {REWARM_STEPS} steps to {CONTINUED_LR:g} (the small model's last lr), "
            "cosine to 10% of it at the end of the budget",
            "standard_schedule": f"lr {PRETRAIN['lr']:g}, warm-up {PRETRAIN['warmup']}, cosine to 10% at the end",
            "eval": f"{a.eval_windows} fixed held-out windows of {a.seq_len} tokens",
            "flops": "6 x params x tokens, summed over every phase (pretraining included)",
            "expansion": "tensorscale up (CLI) in float32; iso = clone, iso-snr = clone + "
            f"--snr-db {SNR_DB:g}, pad = --strategy pad",
            "recipe2": RECIPE2,
        },
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": corpus.machine(),
        "command": "python benchmarks/growth.py",
        "scales": scales,
        "progressive": prog,
        "down_init": down_init_summary(study),
        "healing": healing_summary(study),
        "stages": {n: stage_state(study, n) for n, _, _ in stages(study)},
    }
    write_json(os.path.join(a.results, "growth.json"), out)
    pngs = []
    try:
        for s in scales:
            pngs += plot_scale(s, a.results)
        if prog and prog["curves"]:
            pngs.append(plot_progressive(prog, a.results))
        if out["down_init"] and out["down_init"]["curves"]:
            pngs.append(plot_down_init(out["down_init"], a.results))
        if out["healing"] and out["healing"]["steps"]:
            pngs.append(plot_healing(out["healing"], a.results))
    except ImportError:
        print("matplotlib not importable: no plots written")
    for s in scales:
        print(
            f"\n{s['name']}: {s['small_params'] / 1e6:.2f}M -> {s['large_params'] / 1e6:.2f}M, "
            f"budget {s['budget_tokens']:,} tokens; N (tabula reaches {RECIPE2}) = "
            + (
                "none within the "
                f"{s['crossings'].get(f'tabula reaches {RECIPE2}', {}).get('measured_to_tokens') or 0:,} "
                "tokens measured"
                if s["crossing_tokens"] is None
                else f"{s['crossing_tokens']:,.0f} tokens"
            )
        )
        print(table(s))
        for k, v in s["crossings"].items():
            print(
                f"  {k}: "
                + ("-" if v["tokens"] is None else f"{v['tokens']:,.0f} tokens")
                + "; FLOPs: "
                + ("-" if v["flops"] is None else f"{v['flops']:.2e}")
                + f" (measured to {v['measured_to_tokens']:,})"
            )
    if prog and "loss_at_equal_compute" in prog:
        print(
            f"\nprogressive, loss at equal total compute {prog['equal_compute_flops']:.2e} FLOPs: "
            + ", ".join(f"{k} {v:.3f}" for k, v in prog["loss_at_equal_compute"].items())
        )
    print("results: " + os.path.join(a.results, "growth.json") + "".join(f", {p}" for p in pngs))
    return out


# ----------------------------------------------------------------------------------------------- main


def run_stages(study: Study, chosen: list) -> None:
    """Run the chosen stages in order; consecutive stages of one group take turns, a chunk each."""
    args = study.args
    i = 0
    while i < len(chosen):
        name, fn, group = chosen[i]
        members = [chosen[i]]
        while group and i + len(members) < len(chosen) and chosen[i + len(members)][2] == group:
            members.append(chosen[i + len(members)])
        i += len(members)
        while True:
            todo = [m for m in members if stage_state(study, m[0]) != "done"]
            if not todo:
                break
            for name, fn, _ in todo:
                print(f"\n=== {name}", flush=True)
                study.chunk = args.chunk_steps if group and len(todo) > 1 else None
                try:
                    fn()
                except Paused as e:
                    print(e)
                    if not study.chunk or study.out_of_time() or args.stop_after_steps:
                        report(study)
                        return
                except Pending as e:
                    print(f"{name}: pending: {e}")
                    members.remove((name, fn, _))
                if study.out_of_time():
                    report(study)
                    print("out of time (--max-minutes): stopping; run again to resume")
                    return
            report(study)  # results, plots and table after every round, so each can be committed


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:  # one log line per evaluation, not a progress bar per load
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    study = Study(args)
    all_stages = stages(study)
    if args.list:
        for name, _, group in all_stages:
            print(f"{name:14} {group or '':5} {stage_state(study, name)}")
        return None
    if not args.report:
        prefixes = [p.strip() for p in args.stages.split(",") if p.strip()]
        chosen = [st for st in all_stages if not prefixes or any(st[0].startswith(p) for p in prefixes)]
        run_stages(study, chosen)
    return report(study)


if __name__ == "__main__":
    main()
