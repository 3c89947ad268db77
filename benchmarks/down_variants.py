#!/usr/bin/env python
"""Compare variants of `down`'s layer-wise refit on the real model, one target shape at a time.

    python benchmarks/down_variants.py intermediate_size=1280 target=self tokens=4096 eval=2048
    python benchmarks/down_variants.py hidden_size=540 intermediate_size=1408 target=cross ridge=0.01

Keys: the four target sizes (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads),
target (cross: reproduce the original layer from the original stream; self: plain OBS compensation on
the small stream's own inputs), prior (1: the ridge pulls towards the original weights; 0: towards zero),
ridge, tokens (calibration tokens of the Python docs outside library/), eval (held-out tokens per domain),
remove_layers (layers of least block influence removed, as `down --remove-layers`), calibration (pydoc:
the Python docs, the default; mixed: alternating blocks of them and GNU manuals, real_texts.py; pydoc+self:
half the Python docs, half text the model samples itself; self: only text the model samples itself, what
`down` calibrates on without --calibration: data-free), top_p (the nucleus the model samples its own text
from, 1: all of it), hidden_cut (rotate: the residual stream projected
onto its principal directions, the default; select: the dimensions readers use most), rotated_ridge (the
ridge of readers of a rotated stream, at least `ridge`), gnu (1: a third held-out domain, GNU manuals).
It drives folding.layerwise directly (the CLI takes only the defaults) and prints the held-out ppl ratio,
KL and top-1 on the domains of real_texts.py. The model and texts: see real_model.py, real_texts.py.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def main(argv: list[str]) -> int:
    import real_eval
    from real_model import real_model_folder
    from real_texts import calibration_text, eval_texts, mixed_calibration_text
    from transformers import AutoTokenizer

    from tensorscale.convert import working_targets
    from tensorscale.folding import layerwise
    from tensorscale.folding.analysis import match_all
    from tensorscale.folding.calibration import calibration_ids
    from tensorscale.folding.layerwise import LayerwiseDown
    from tensorscale.planning import depth
    from tensorscale.planning.plan import DownOptions, evaluate_env, pin_head_dim, rewrite_config
    from tensorscale.reading.source import open_source
    from tensorscale.rulebook.compile import resolve_spaces
    from tensorscale.rulebook.registry import resolve_rules
    from tensorscale.writing.spill import SpillFolder

    args = dict(a.split("=", 1) for a in argv)
    targets = {k: int(v) for k, v in args.items() if k in SIZES}
    folder = real_model_folder("float32")
    source = open_source(folder)
    rules = resolve_rules(source.config, None)
    options = DownOptions(targets=targets)
    env = evaluate_env(rules, source.config, options)
    new_config = rewrite_config(rules, source.config, env, options)
    working = DownOptions(targets=working_targets(rules, source.config, options))
    working_config = rewrite_config(rules, source.config, evaluate_env(rules, source.config, working), working)
    for config in (new_config, working_config):
        pin_head_dim(config, env)
    kind = args.get("calibration", "pydoc")
    tokens = int(args.get("tokens", 8192))
    text = mixed_calibration_text() if kind == "mixed" else calibration_text()
    if kind in ("pydoc+self", "self"):  # text the model samples itself: half the tokens, or all (data-free)
        from tensorscale.folding.calibration import self_generated_ids

        own = self_generated_ids(
            folder,
            folder,
            source.config,
            tokens if kind == "self" else tokens // 2,
            top_p=float(args.get("top_p", 1.0)),
        )
        ids = own if kind == "self" else torch.cat([calibration_ids(folder, folder, text, tokens - own.numel()), own])
    else:
        ids = calibration_ids(folder, folder, text, tokens)
    started = time.time()
    engine = LayerwiseDown(
        source,
        resolve_spaces(rules, env),
        new_config,
        working_config,
        match_all(source, rules, env),
        "layer",
        ids,
        ridge=float(args.get("ridge", 1e-2)),
        target=args.get("target", "auto"),
        prior=args.get("prior", "1") == "1",
        remove_layers=int(args.get("remove_layers", 0)),
        hidden_cut=args.get("hidden_cut", "rotate"),
        rotated_ridge=float(args.get("rotated_ridge", layerwise.ROTATED_RIDGE)),
        selection_ridge=float(args["selection_ridge"]) if "selection_ridge" in args else None,
    )
    with tempfile.TemporaryDirectory(dir=os.path.join(HERE, "work")) as out:
        spill = SpillFolder(out)
        report = engine.run(lambda name, tensor, source_name: spill.add(name, tensor))
        if report["removed_layers"]:
            layers = depth.removal_layers(rules, source.config, report["removed_layers"])
            depth.rewrite_config(rules, source.config, new_config, layers)
        spill.finish(new_config)
        for name in os.listdir(folder):
            if name.startswith("tokenizer") or name == "generation_config.json":
                os.symlink(os.path.join(folder, name), os.path.join(out, name))
        seconds = time.time() - started
        tokenizer = AutoTokenizer.from_pretrained(folder)
        reference_model = real_eval.load(folder)
        before = sum(p.numel() for p in reference_model.parameters())
        windows = real_eval.domain_windows(
            tokenizer, eval_texts(gnu=args.get("gnu", "0") == "1"), int(args.get("eval", 4096))
        )
        reference = real_eval.Reference(reference_model, windows)
        small = real_eval.load(out)
        after = sum(p.numel() for p in small.parameters())
        measured = reference.compare(small)
    print(
        f"{argv}: params cut {1 - after / before:.3f}, removed layers {report['removed_layers']}, "
        f"refit {seconds:.0f} s, calibration estimate "
        f"KL {report['calibration_kl']:.3f} ppl x{report['calibration_ppl_ratio']:.3f}, "
        f"hidden cut {report.get('hidden_cut', '-')} (energy kept {report.get('hidden_energy_kept', 1.0):.4f})"
    )
    for domain, row in measured.items():
        print(f"  {domain:14s} ppl ratio x{row['ppl_ratio']:.3f}  KL {row['kl']:.3f}  top-1 {row['top1']:.3f}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    raise SystemExit(main(sys.argv[1:]))
