"""`tensorscale down`: fold a model into a narrower one of the same architecture (cluster-fold)."""

from __future__ import annotations

import json

import click

from ..errors import TensorscaleError
from . import render
from .options import (
    ALLOW_NONFINITE,
    AS_JSON,
    DTYPE,
    FORCE,
    MANIFEST,
    MAX_SHARD_SIZE,
    OUTPUT,
    QUIET,
    RULES,
    VERIFY_FILES,
    model_input,
    parse_layer_list,
    seed_option,
    target_size_options,
    with_options,
)
from .output_format import output_format_options
from .revision import command_line, revision_option
from .writes import check_output_early, print_warnings


def down_target_options(func):
    """The ways to say how small: divisors (the mirror of up's multipliers), target sizes or a budget, passed on
    as `edd`, `upd`, `targets` (see target_size_options), `reduction` and `params`."""
    options = [
        click.option(
            "--embed-dim-divisor",
            "-edd",
            "edd",
            type=int,
            default=None,
            help="N: hidden size and head counts ÷N (the mirror of -edm).",
        ),
        click.option(
            "--up-proj-divisor", "-upd", "upd", type=int, default=None, help="M: FFN size ÷M (the mirror of -upm)."
        ),
        target_size_options("any the architecture allows", " (divides the heads)"),
        click.option(
            "--reduction",
            default=None,
            metavar="P%",
            help="A budget instead of sizes: this share fewer parameters (e.g. 25%); the cuts are chosen "
            "in the order that measured cheapest (FFN, then query heads, then hidden).",
        ),
        click.option(
            "--params",
            "params",
            default=None,
            metavar="N",
            help="A budget instead of sizes: this many parameters at most (e.g. 100M, 1.2B).",
        ),
        click.option(
            "--remove-layers",
            "remove_layers",
            type=int,
            default=0,
            metavar="K",
            help="Remove K layers (depth; counted in a budget). refit removes those of least block influence on "
            "the calibration text (ShortGPT) and re-solves the layers after them; with --at, those layers.",
        ),
        click.option(
            "--at",
            "remove_at",
            default=None,
            metavar="LAYERS",
            help="The source layers --remove-layers removes (e.g. 12,14); needed by --method fold.",
        ),
    ]
    return with_options(func, options)


def budget_targets(
    source, rules_path, targets: dict, reduction, params, edd, upd, announce: bool = True, remove_layers: int = 0
) -> dict:
    """`targets`, or with --reduction/--params the sizes the budget allocates (said on stderr); layers removed
    count towards the budget."""
    if reduction is None and params is None:
        return targets
    from ..folding.allocation import allocate_budget

    targets = allocate_budget(source, rules_path, targets, reduction, params, edd, upd, remove_layers=remove_layers)
    if announce:
        click.echo(
            "tensorscale: budget allocated as "
            + ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in targets.items()),
            err=True,
        )
    return targets


def down_options(edd, upd, targets: dict, seed, dtype, max_shard_size, remove_layers=0, remove_at=None):
    from ..planning.plan import DownOptions, parse_size

    chosen = {key: value for key, value in targets.items() if value is not None}
    at = parse_layer_list(remove_at)
    if at is not None and not remove_layers:
        raise TensorscaleError("--at says which layers --remove-layers removes; give --remove-layers K too")
    if not chosen and edd is None and upd is None and not remove_layers:
        raise TensorscaleError(
            "say how small: --embed-dim-divisor/--up-proj-divisor, --hidden-size/--intermediate-size/"
            "--num-attention-heads/--num-key-value-heads, a budget (--reduction/--params) or --remove-layers"
        )
    options = DownOptions(
        seed=seed,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        embed_dim_divisor=edd,
        up_proj_divisor=upd,
        targets=chosen,
        remove_layers=remove_layers,
        remove_at=at,
    )
    options.validate()  # before any download, sampling or analysis
    return options


def down_planning_options(func):
    """What shapes a down plan, for `down` and `plan down` alike."""
    return with_options(
        func,
        [
            OUTPUT,
            down_target_options,
            seed_option("of the clustering (k-means, sketches)"),
            DTYPE,
            RULES,
            MAX_SHARD_SIZE,
            AS_JSON,
        ],
    )


def fold_summary(plan) -> dict:
    folds = plan.down.folds.by_key.values() if plan.down.folds is not None else []
    return {
        "clusterings": len(folds),
        "exact_copies": sum(1 for fold in folds if fold.exact),
        "retied": plan.down.retied,
    }


def calibration_options(func):
    """Where refit's calibration text comes from and how much of it, for `down` and `plan down --predict`."""
    return with_options(
        func,
        [
            click.option(
                "--calibration",
                type=click.Path(dir_okay=False),
                multiple=True,
                metavar="FILE",
                help="refit: text to calibrate on; repeat it for several kinds of text, each then gives an equal "
                "share of the tokens (the broader the text, the better the model keeps working on other text); "
                "without it the model calibrates on text it samples itself (data-free).",
            ),
            click.option(
                "--calibration-tokens",
                type=int,
                default=8192,
                show_default=True,
                help="refit: tokens to calibrate on (windows of 256).",
            ),
        ],
    )


def read_calibration(paths) -> str | list[str] | None:
    """The --calibration files' text: one string for one file, a list (an equal share each) for several, None
    for none (data-free: the model samples its own)."""
    if not paths:
        return None
    from ..folding.calibration import read_calibration_text

    text = [read_calibration_text(path) for path in paths]
    return text[0] if len(text) == 1 else text


def calibration_summary(report: dict, text) -> dict:
    """What refit's report says about the damage, as `down --json` and `plan down --predict` show it."""
    return {
        "source": "file" if text is not None else "self-generated",
        "kl": report["calibration_kl"],
        "ppl_ratio": report["calibration_ppl_ratio"],
        "held_out": report["calibration_held_out"],
        "massive_dimensions": report.get("massive", []),
        # how the residual stream was narrowed (None: it was not), and the share of its normalised
        # energy the kept directions hold
        "hidden_cut": report.get("hidden_cut"),
        "hidden_energy_kept": report.get("hidden_energy_kept"),
        "hidden_cut_reason": report.get("hidden_cut_reason"),  # why a stream was not rotated
        # what each reader reproduces: the original layer from the original stream (cross) or the
        # original weights on the small stream's own inputs (self)
        "target": report.get("target"),
    }


@click.command()
@model_input()
@down_planning_options
@click.option(
    "--method",
    type=click.Choice(["auto", "fold", "refit"]),
    default="auto",
    show_default=True,
    help="fold: merge copies (exact on a HyperCloned model, data-free, no transformers); refit: keep the "
    "units that matter and re-solve their readers layer by layer (any trained model; needs "
    "transformers); auto: fold where every space holds copies, else refit.",
)
@calibration_options
@FORCE
@VERIFY_FILES
@MANIFEST
@QUIET
@ALLOW_NONFINITE
@revision_option
@output_format_options
def down(
    source,
    output,
    edd,
    upd,
    targets,
    reduction,
    params,
    remove_layers,
    remove_at,
    seed,
    dtype,
    rules_path,
    max_shard_size,
    as_json,
    method,
    calibration,
    calibration_tokens,
    force,
    verify_files,
    manifest,
    quiet,
    allow_nonfinite,
    out_format,
    outtype,
):
    """Make a narrower model of the same architecture.

    On a HyperCloned model the copies are found and merged: an exact inverse of `up`. On any other
    trained model the units that matter are kept and every reader is re-solved, layer by layer, to
    reproduce the original layer on calibration text (yours with --calibration, else text the model
    samples itself). That is not exact: the estimate of the damage is printed, and the model needs
    continued training to heal.

    \b
    Example:
      tensorscale down tiny-llama-x2 -o tiny-llama-again -edd 2 -upd 2
      tensorscale down my-model --hidden-size 1536 --intermediate-size 4096 \\
        --num-attention-heads 12 --num-key-value-heads 4
    """
    from .output_format import write_output

    check_output_early(output, source, force)
    targets = budget_targets(
        source, rules_path, targets, reduction, params, edd, upd, announce=not as_json, remove_layers=remove_layers
    )
    options = down_options(edd, upd, targets, seed, dtype, max_shard_size, remove_layers, remove_at)
    text = read_calibration(calibration)  # plan_down_by_method refuses it with --method fold, before any work
    show = not quiet and not as_json
    from ..convert import plan_down_by_method, refit_workspace

    with refit_workspace(output) as spill:
        plan, report = plan_down_by_method(
            source, options, rules_path, method, text, calibration_tokens, spill, show_progress=show
        )
        result = write_output(
            plan,
            output,
            out_format,
            outtype,
            force=force,
            show_progress=show,
            verify_files=verify_files,
            manifest=manifest,
            command=command_line(),
            allow_nonfinite=allow_nonfinite,
        )
    print_warnings(result)
    summary = result.summary()
    summary.update(fold_summary(plan))
    summary["method"] = "refit" if report is not None else "fold"
    summary["targets"] = dict(options.targets)
    summary["removed_layers"] = list(report["removed_layers"]) if report is not None else list(options.remove_at or ())
    if report is not None:
        summary["calibration"] = calibration_summary(report, text)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render.down_summary(summary))
        if report is not None:
            click.echo(render.damage_note(summary["calibration"]), err=True)
