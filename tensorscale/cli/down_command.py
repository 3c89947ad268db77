"""`tensorscale down`: fold a model into a narrower one of the same architecture (cluster-fold)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import TensorscaleError
from . import render

TARGET_OPTIONS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")


def down_target_options(func):
    """The ways to say how small: divisors (the mirror of up's multipliers) or target sizes."""
    options = [
        click.option("--embed-dim-divisor", "-edd", "edd", type=int, default=None,
                     help="N: hidden size and head counts ÷N (the mirror of -edm)."),
        click.option("--up-proj-divisor", "-upd", "upd", type=int, default=None,
                     help="M: FFN size ÷M (the mirror of -upm)."),
        click.option("--hidden-size", type=int, default=None, help="Target hidden size (any the architecture allows)."),
        click.option("--intermediate-size", type=int, default=None, help="Target FFN size."),
        click.option("--num-attention-heads", type=int, default=None, help="Target attention head count."),
        click.option("--num-key-value-heads", type=int, default=None, help="Target kv head count (divides the heads)."),
        click.option("--reduction", default=None, metavar="P%",
                     help="A budget instead of sizes: this share fewer parameters (e.g. 25%); down allocates the cuts."),
        click.option("--params", "params_budget", default=None, metavar="N",
                     help="A budget instead of sizes: about N parameters in all (e.g. 100M); down allocates the cuts."),
        click.option("--remove-layers", type=int, default=0, metavar="K",
                     help="Also drop the K layers of least block influence (ShortGPT), renumbering the rest."),
    ]
    return with_options(func, options)


def with_options(func, options: list):
    """Decorate `func` with click options so that they show in `--help` in the order listed."""
    for option in reversed(options):
        func = option(func)
    return func


def wants_down(edd, upd, targets: dict, budget=None, remove_layers=0) -> bool:
    return (edd is not None or upd is not None or any(v is not None for v in targets.values()) or budget is not None
            or bool(remove_layers))


def down_options(edd, upd, targets: dict, seed, dtype, max_shard_size, remove_layers: int = 0):
    from ..planning.plan import Options, parse_size

    chosen = {key: value for key, value in targets.items() if value is not None}
    if not chosen and edd is None and upd is None and not remove_layers:
        raise TensorscaleError(
            "say how small: --reduction P% or --params N, --embed-dim-divisor/--up-proj-divisor, or --hidden-size/"
            "--intermediate-size/--num-attention-heads/--num-key-value-heads (and/or --remove-layers K)"
        )
    if isinstance(remove_layers, bool) or not isinstance(remove_layers, int) or remove_layers < 0:
        raise TensorscaleError(f"--remove-layers must be a whole number >= 0, got {remove_layers!r}")
    return Options(seed=seed, dtype=dtype, max_shard_size=parse_size(max_shard_size), mode="down",
                   embed_dim_divisor=edd, up_proj_divisor=upd, targets=chosen, remove_layer_count=remove_layers)


def fold_summary(plan) -> dict:
    folds = plan.folds.by_key.values() if plan.folds else []
    return {
        "clusterings": len(folds),
        "exact_copies": sum(1 for fold in folds if fold.exact),
        "retied": plan.retied,
    }


@click.command()
@click.option("--input", "-i", "source", required=True, metavar="SRC", help="Model folder, or a hub id (org/name).")
@click.option("--output", "-o", "output", default=None, metavar="OUT",
              help="Output folder (default: <source name>-<size> in the current folder).")
@down_target_options
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Text to run the model on: its activations choose the units to keep and refit their readers "
                   "(default: text the model writes itself). Needs transformers.")
@click.option("--calibration-tokens", type=int, default=8192, show_default=True, help="Tokens of FILE to use.")
@click.option("--fold-only", is_flag=True,
              help="Weight clustering everywhere, no forward pass (exact on HyperCloned models, poor on others).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the clustering (k-means, sketches).")
@click.option("--dtype", type=click.Choice(["keep", "float32", "bfloat16", "float16"]), default="keep", show_default=True)
@click.option("--rules", "rules_path", type=click.Path(dir_okay=False), default=None, metavar="FILE")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--verify-files", is_flag=True, help="Re-read every tensor and compare its sha256 with what was streamed.")
@click.option("--manifest", is_flag=True, help="Write tensorscale-manifest.json.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def down(source, output, edd, upd, hidden_size, intermediate_size, num_attention_heads, num_key_value_heads,
         reduction, params_budget, remove_layers, calibration, calibration_tokens, fold_only, seed, dtype, rules_path, max_shard_size, force, verify_files, manifest,
         as_json, quiet):
    """Make a narrower model of the same architecture.

    Exactly undoes `up` (a HyperCloned model's copies are found and merged). Where a space holds no copies,
    its most important units are kept and the matrices that read them are refitted by least squares, from
    activations on --calibration text, or, data-free, on text the model writes itself. Prints the damage
    measured on that text (a ppl ratio) and warns when the model needs healing (continued training).

    \b
    Example:
      tensorscale down -i tiny-llama-x2 -o tiny-llama-again -edd 2 -upd 2
      tensorscale down -i my-model --hidden-size 1536 --intermediate-size 4096 --num-attention-heads 12 --num-key-value-heads 4
    """
    from ..convert import execute_plan, plan_down

    targets = dict(zip(TARGET_OPTIONS, (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)))
    if reduction is not None or params_budget is not None:
        from ..planning.allocation import allocate_budget

        targets, remove_layers = allocate_budget(source, rules_path, targets, reduction, params_budget, remove_layers,
                                                 edd=edd, upd=upd)
    calibration_data = "fold" if fold_only else None
    if calibration is not None and fold_only:
        raise TensorscaleError("--fold-only makes no use of --calibration; give one of them")
    if calibration is not None:
        from ..folding.calibration import read_calibration_text

        calibration_data = (read_calibration_text(calibration), calibration_tokens)
    plan = plan_down(source, down_options(edd, upd, targets, seed, dtype, max_shard_size, remove_layers), rules_path,
                     calibration=calibration_data)
    result = execute_plan(plan, output, force=force, show_progress=not quiet and not as_json, verify_files=verify_files,
                          manifest=manifest, command=["tensorscale", *sys.argv[1:]])
    for name in result.stale_removed:
        click.echo(f"tensorscale: removed {name}, left by a run that was killed", err=True)
    summary = result.summary()
    summary.update(fold_summary(plan))
    damage = damage_estimate(plan, result.output, show_progress=not quiet and not as_json)
    if damage is not None:
        summary["calibration_ppl_ratio"] = damage
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render.down_summary(summary))
        for note in plan.notes:
            click.echo(f"note: {note}")
        if damage is not None:
            click.echo(f"damage on the calibration text: ppl ratio x{damage:.3f} (small / original)")
            if damage > DAMAGE_WARNING:
                click.echo(f"warning: the model lost much of its quality (ppl x{damage:.2f} on the calibration text); "
                           "it needs healing (continued training) before use", err=True)


DAMAGE_WARNING = 1.5  # ppl ratio on the calibration text above which down warns


def damage_estimate(plan, output: str, show_progress: bool) -> float | None:
    """Ppl ratio small/original on the calibration tokens, where the down was not an exact fold."""
    folds = plan.folds
    ids = getattr(folds, "calibration_ids", None)
    if ids is None:
        return None
    from ..folding.statistics import ppl_ratio

    return ppl_ratio(plan.source.folder, output, plan.source.label, ids, show_progress)
