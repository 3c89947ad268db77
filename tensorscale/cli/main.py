"""The `tensorscale` command line.

Option names follow the seed tool dslm (--input/-i, --output/-o, --embed-dim-multiplier/-edm,
--up-proj-multiplier/-upm, --snr-db) so its users feel at home. A user's mistake is one line on stderr
and a nonzero exit, never a traceback. Heavy modules (torch, the engine) load inside the commands that
need them, so `desc` and `--help` stay instant.
"""

from __future__ import annotations

import json
import sys

from .. import __version__, interrupts

if __name__ == "__main__":  # `python -m tensorscale.cli.main`: take the signals before the rest loads
    interrupts.install(raising=False)

import click  # noqa: E402

from ..errors import TensorscaleError
from . import render
from .down_command import (
    budget_targets,
    calibration_options,
    calibration_summary,
    down,
    down_options,
    down_planning_options,
    read_calibration,
)
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
    add_to_every_command,
    model_input,
    parse_layer_list,
    seed_option,
    target_size_options,
    verbose_option,
    with_options,
)
from .output_format import output_format_options
from .revision import command_line, remember_arguments, revision_option
from .writes import check_output_early, print_warnings

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
NOTHING_TO_CHANGE = (
    "nothing to change: the output would equal the input; give a size: -edm/-upm, --hidden-size, "
    "--intermediate-size, --num-attention-heads, --num-key-value-heads, --add-layers or "
    "--duplicate-layers"
)


class _Group(click.Group):
    def list_commands(self, ctx):
        return list(self.commands)  # the order they were added in: the workflow's order, not the alphabet's

    def main(self, *args, **kwargs):
        kwargs.setdefault("standalone_mode", True)
        remember_arguments(args[0] if args else kwargs.get("args"))
        try:
            return super().main(
                *args, standalone_mode=False, **{k: v for k, v in kwargs.items() if k != "standalone_mode"}
            )
        except TensorscaleError as exc:
            click.echo(f"tensorscale: error: {exc}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except (click.exceptions.Abort, KeyboardInterrupt):
            exit_interrupted()
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            sys.exit(0)
        except Exception:
            if interrupts.received():  # e.g. an import cut short by Ctrl-C fails on its retry: still an interrupt
                exit_interrupted()
            raise


def exit_interrupted():
    """The one line an interrupt ends with, and exit status 130; a further signal is only recorded now."""
    interrupts.hold()
    click.echo(f"tensorscale: {interrupted_message()}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def interrupted_message() -> str:
    """What an interrupt leaves: nothing, or outputs that were already moved into place (complete)."""
    from ..writing.output_folder import committed_outputs

    done = committed_outputs()
    if not done:
        return "interrupted; nothing was written"
    states = "; ".join(
        f"{out} holds the complete new model" + (" (the old one was replaced)" if replaced else "")
        for out, replaced in done
    )
    return f"interrupted after the output was written: {states}; nothing else was written"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="tensorscale")
@verbose_option()
def cli():
    """Resize transformer language models by rewriting their safetensors checkpoints.

    Every command takes the model as MODEL or --input/-i MODEL: a folder, or a Hugging Face hub id.
    Results and --json go to stdout; progress, notes and -v logs go to stderr.
    """


def _input_option(func):
    """MODEL or --input MODEL, and --revision REV for a hub id (folded into the input as org/name@REV)."""
    return model_input()(revision_option(func))


def _up_options(func):
    """What shapes an up plan, for `up` and `plan up` alike: passed on as keyword arguments, the four target
    sizes together as `targets`."""
    options = [
        OUTPUT,
        click.option(
            "--embed-dim-multiplier",
            "-edm",
            "edm",
            type=int,
            default=1,
            show_default=True,
            help="n: hidden size and attention/kv head counts grow ×n (head_dim kept).",
        ),
        click.option(
            "--up-proj-multiplier",
            "-upm",
            "upm",
            type=int,
            default=1,
            show_default=True,
            help="m: FFN (intermediate) size grows ×m.",
        ),
        target_size_options("any larger value", ""),
        click.option(
            "--snr-db",
            type=float,
            default=None,
            metavar="DB",
            help="Add function-preserving symmetry-breaking noise at this signal-to-noise ratio.",
        ),
        seed_option("for --snr-db noise (reproducible)"),
        click.option(
            "--untie-embeddings",
            is_flag=True,
            help="Write a separate lm_head instead of keeping tied embeddings (tie kept by default).",
        ),
        DTYPE,
        RULES,
        MAX_SHARD_SIZE,
        AS_JSON,
        click.option(
            "--strategy",
            type=click.Choice(["clone", "pad"]),
            default="clone",
            show_default=True,
            help="clone: HyperCloning (copies; any width by cloning a subset of units). pad: the source in "
            "the top-left block, zeros elsewhere (RMSNorm models; gains rescaled).",
        ),
        click.option(
            "--add-layers",
            type=int,
            default=0,
            metavar="K",
            help="Insert K identity layers (residual writers zeroed): same function, deeper model.",
        ),
        click.option(
            "--at",
            "insert_at",
            default=None,
            metavar="POSITIONS",
            help="Where --add-layers inserts, as source layer indices (e.g. 4,8): before that layer; "
            "default: spread evenly.",
        ),
        click.option(
            "--duplicate-layers",
            default=None,
            metavar="START:END",
            help="Copy source layers START..END-1 and insert the copy after END-1 (SOLAR-style depth "
            "up-scaling; not function-preserving).",
        ),
    ]
    return _input_option(with_options(func, options))


def up_options(
    edm,
    upm,
    targets,
    snr_db,
    seed,
    untie_embeddings,
    dtype,
    max_shard_size,
    strategy,
    add_layers,
    insert_at,
    duplicate_layers,
):
    """The UpOptions the command line asks for (--max-shard-size parsed, --at split into layer indices)."""
    from ..planning.plan import UpOptions, parse_size

    for flag, value in (("--embed-dim-multiplier", edm), ("--up-proj-multiplier", upm)):
        if value < 1:
            raise TensorscaleError(f"{flag} must be a whole number >= 1, got {value}")
    positions = parse_layer_list(insert_at)
    chosen = {key: value for key, value in targets.items() if value is not None}
    return UpOptions(
        edm,
        upm,
        snr_db=snr_db,
        seed=seed,
        untie_embeddings=untie_embeddings,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        targets=chosen,
        strategy=strategy,
        add_layers=add_layers,
        insert_at=positions,
        duplicate_layers=duplicate_layers,
    )


@cli.command(short_help="Grow a model wider or deeper (HyperCloning: the same logits).")
@_up_options
@FORCE
@VERIFY_FILES
@MANIFEST
@QUIET
@ALLOW_NONFINITE
@click.option(
    "--verify",
    "verify_logits",
    is_flag=True,
    help="Then run `tensorscale verify SRC OUT` (needs transformers); exit status 1 if it fails "
    "(--duplicate-layers changes the logits on purpose: the change is reported, not failed).",
)
@click.option(
    "--tolerance",
    type=float,
    default=None,
    metavar="X",
    help="--verify's pass mark on the relative logit error [default: 1e-4; 1e-2 where 16-bit storage "
    "rounds the function].",
)
@output_format_options
def up(
    source,
    output,
    as_json,
    rules_path,
    force,
    verify_files,
    manifest,
    quiet,
    allow_nonfinite,
    verify_logits,
    tolerance,
    out_format,
    outtype,
    **asked,
):
    """Widen a model by HyperCloning: hidden and heads ×n, FFN ×m, same logits.

    \b
    Example:
      tensorscale up examples/tiny-llama -o tiny-llama-x2 -edm 2 -upm 2
    """
    from ..convert import asks_for_a_change, plan_changes_nothing, plan_conversion
    from .output_format import converts_format, write_output

    if tolerance is not None and not verify_logits:
        raise TensorscaleError("--tolerance is the pass mark of --verify; add --verify or leave it out")
    check = None
    if verify_logits:  # transformers must import before anything is written
        from .inference_commands import UpVerification

        check = UpVerification(tolerance)
    options = up_options(**asked)
    converting = converts_format(source, out_format)  # GGUF in or out: a new file even at the same size
    if not converting and not asks_for_a_change(options):
        raise TensorscaleError(NOTHING_TO_CHANGE)  # before a hub download, not after
    check_output_early(output, source, force)
    plan = plan_conversion(source, options, rules_path)
    if not converting and plan_changes_nothing(plan):
        raise TensorscaleError(NOTHING_TO_CHANGE)
    if check is not None:
        note = check.prepare(plan)
        if note:
            click.echo(f"tensorscale: {note}", err=True)
    result = write_output(
        plan,
        output,
        out_format,
        outtype,
        force=force,
        show_progress=not quiet and not as_json,
        verify_files=verify_files,
        manifest=manifest,
        command=command_line(),
        check=check,
        allow_nonfinite=allow_nonfinite,
    )
    print_warnings(result)
    summary = result.summary()
    for note in summary["notes"]:
        click.echo(f"tensorscale: note: {note}", err=True)  # stdout carries only the result
    if check is not None:
        check.finish(result.output)
        summary["verify"] = check.report.to_dict()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(render.up_summary(summary))
    if check is not None:
        if not as_json:
            click.echo(check.text())
        if check.failed:
            sys.exit(1)


cli.add_command(down)


class _PlanGroup(click.Group):
    """`plan up ...` and `plan down ...`; a plain `plan MODEL ...` is `plan up MODEL ...` (the dry run of the
    default command), and an option of the other direction is one line naming the command that takes it."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["up", *args]
        return super().parse_args(ctx, args)


class _PlanCommand(click.Command):
    def parse_args(self, ctx, args):
        given = list(args)  # click's parser consumes the list
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption:
            other = "down" if self.name == "up" else "up"
            theirs = _option_names(plan.commands[other]) - _option_names(self)
            for flag in (arg.split("=", 1)[0] for arg in given):  # click names "-e" for -edd: find the flag
                if flag in theirs:
                    raise TensorscaleError(
                        f"{flag} is an option of `plan {other}`, not `plan {self.name}`: "
                        f"tensorscale plan {other} MODEL {flag} ..."
                    ) from None
            raise


def _option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in getattr(param, "opts", ())}


@cli.group(cls=_PlanGroup, short_help="Show what up or down would do, tensor by tensor; writes nothing.")
def plan():
    """Dry run of `up` or `down`, with the same options: every tensor's rule, op chain, shapes and dtypes,
    and the shard layout. Writes nothing. A plain `tensorscale plan MODEL ...` means `plan up MODEL ...`.

    \b
    Example:
      tensorscale plan up examples/tiny-llama -edm 2 -upm 2
      tensorscale plan down tiny-llama-x2 -edd 2 -upd 2
    """


@plan.command("up", cls=_PlanCommand)
@_up_options
def plan_up(source, output, as_json, rules_path, **asked):
    """Dry run of `up`; reads headers only."""
    from ..convert import plan_conversion

    _show_plan(plan_conversion(source, up_options(**asked), rules_path, headers_only=True), output, as_json)


@plan.command("down", cls=_PlanCommand)
@_input_option
@down_planning_options
@click.option(
    "--predict",
    is_flag=True,
    help="Also predict the damage: run the refit `down` would run (the same sizes, calibration text and "
    "tokens) with a temporary folder, and report its estimate on calibration windows the refit does not "
    "see. Takes as long as the refit itself; the plan shown is then the refit's.",
)
@calibration_options
def plan_down(
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
    predict,
    calibration,
    calibration_tokens,
):
    """Dry run of `down` by folding (its clusters depend on the weights, so this reads them once). Where the
    fold would not be exact (no copies to merge: any model not made by `up`), it says that `down` would refit
    instead, at the same sizes; with --predict it runs that refit and reports the damage to expect."""
    if calibration and not predict:
        raise TensorscaleError("--calibration is the text --predict refits on: add --predict to use it")
    targets = budget_targets(
        source, rules_path, targets, reduction, params, edd, upd, remove_layers=remove_layers
    )  # as `down` allocates it
    options = down_options(edd, upd, targets, seed, dtype, max_shard_size, remove_layers, remove_at)
    if predict:
        the_plan, prediction = _predicted_down(source, options, rules_path, calibration, calibration_tokens, as_json)
    else:
        the_plan, prediction = _folding_plan(source, options, rules_path), None
    _show_plan(the_plan, output, as_json, prediction)


def _folding_plan(source, options, rules_path):
    """The fold's plan, with a note where the fold is not exact and `down` would refit instead."""
    from ..convert import plan_down
    from ..errors import CannotFold

    try:
        the_plan = plan_down(source, options, rules_path)
    except CannotFold as exc:
        raise TensorscaleError(
            f"{exc} (plan shows folds only; `down` --method auto would refit this model at these sizes; "
            "`plan down --predict` runs that refit)"
        ) from None
    if the_plan.down is not None and not the_plan.down.exact:
        the_plan.notes.append(
            "these units are not copies, so `down` (--method auto) would refit this model instead of folding "
            "it: the same sizes, the units that matter kept and every reader re-solved on calibration text; "
            "--predict runs that refit and reports the damage to expect (the ops above are the fold's)"
        )
    return the_plan


def _predicted_down(source, options, rules_path, calibration, tokens, as_json):
    """What `down` --method auto would do, done with a temporary folder: its plan and the damage it costs
    (exactly none where the fold merges copies; else the refit's estimate on held-out calibration windows,
    the same estimate `down` prints)."""
    from ..convert import plan_down_by_method, refit_workspace

    text = read_calibration(calibration)
    with refit_workspace(None) as spill:
        the_plan, report = plan_down_by_method(
            source, options, rules_path, "auto", text, tokens, spill, show_progress=not as_json
        )
    if report is None:
        return the_plan, {"method": "fold", "exact": True, "kl": 0.0, "ppl_ratio": 1.0}
    return the_plan, {
        "method": "refit",
        "exact": False,
        "calibration_tokens": tokens,
        **calibration_summary(report, text),
    }


def _show_plan(the_plan, output, as_json, prediction=None) -> None:
    from ..rewrite import default_output

    data = render.plan_data(the_plan, output or default_output(the_plan.source, the_plan))
    if prediction is not None:
        data["predicted_damage"] = prediction
    click.echo(json.dumps(data, indent=2) if as_json else render.plan_text(data))


@cli.command(short_help="Describe a checkpoint from config.json and safetensors headers.")
@_input_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts (includes total_parameters).")
def desc(source, as_json):
    """Describe a checkpoint: architecture, key config, parameters by component, dtypes, shards.

    Reads config.json and safetensors headers only, so it is instant at any size.
    """
    from ..reading.describe import describe
    from ..reading.source import open_source

    data = describe(open_source(source, headers_only=True))
    click.echo(json.dumps(data, indent=2) if as_json else render.desc_text(data))


@cli.group()
def rules():
    """List, show and check architecture rules files, or scaffold one for a new architecture."""


@rules.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def rules_list(as_json):
    """The shipped rules files and the model types they detect."""
    from ..rulebook.registry import shipped_rules

    rows = [
        {
            "name": name,
            "model_types": list(rule_set.detect_model_types),
            "architectures": list(rule_set.detect_architectures),
            "description": rule_set.description,
        }
        for name, rule_set in shipped_rules().items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(render.rules_list_text(rows))


@rules.command("show")
@click.argument("arch")
@click.option(
    "--resolved", is_flag=True, help="Merge in the file's `extends:` base: the complete rules the engine reads."
)
def rules_show(arch, resolved):
    """Print a shipped rules file (a good start for your own)."""
    from ..rulebook.registry import resolved_text, shipped_text

    click.echo((resolved_text(arch) if resolved else shipped_text(arch)).rstrip("\n"))


@rules.command("check")
@_input_option
@click.option(
    "--rules",
    "rules_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Check this rules file instead of the shipped one.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def rules_check(source, rules_path, as_json):
    """Match rules against a checkpoint: tensors no rule matches, and rules that match nothing."""
    from ..planning.rules_check import check_rules
    from ..reading.source import open_source

    report = check_rules(open_source(source, headers_only=True), rules_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render.check_text(report))
    if report["unmatched_tensors"] or report.get("error"):
        sys.exit(1)


@rules.command("new")
@_input_option
@click.option("--name", default=None, help="The rules file's name (default: the config's model_type).")
def rules_new(source, name):
    """Write a starting rules file for a new architecture to stdout, from config.json and the safetensors
    headers (no tensor data); `# DECIDE:` comments mark the guesses to confirm.

    \b
    Example:
      tensorscale rules new ./my-model > rules/mymodel.yaml
    """
    from ..reading.source import open_source
    from ..rulebook.scaffold import scaffold_rules

    model = open_source(source, headers_only=True)
    click.echo(scaffold_rules(model.config, model.tensors, source=model.label, name=name), nl=False)


from .batch_command import batch  # noqa: E402  (the engine and Ray load inside it)
from .inference_commands import gen, verify  # noqa: E402  (torch and transformers load inside them)

cli.add_command(gen)
cli.add_command(verify)
cli.add_command(batch)
# The one-line summaries of `tensorscale --help` (click would cut the docstrings' first sentences short).
for _command, _summary in (
    ("down", "Narrow a model: undo up exactly, or refit a trained one."),
    ("rules", "List, show, check and scaffold (rules new) architecture rules files."),
    ("gen", "Complete a prompt with a model (needs transformers)."),
    ("verify", "Prove two checkpoints compute the same logits (needs transformers)."),
    ("batch", "Run a jobs file of up/down conversions in parallel; rerun to resume."),
):
    cli.commands[_command].short_help = _summary
add_to_every_command(cli, verbose_option)  # -v after the command name too: `tensorscale up -v ...`


def main():
    """SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C (a temporary output is removed on the way). One whose
    KeyboardInterrupt Python swallowed (interrupts.py) still ends the run: at the engine's next safe point,
    or here, where a command that finished anyway exits 130 with the interrupt's one line."""
    interrupts.install()
    status, interrupted = 1, False
    try:
        interrupts.check()  # one that came while the command line loaded
        from ..progress import quiet_hub_bars_in_logs

        quiet_hub_bars_in_logs()
        from ..heap import keep_freed_chunks

        keep_freed_chunks()
        cli(prog_name="tensorscale")
        status = 0
    except SystemExit as exc:
        status = exc.code
    except KeyboardInterrupt:  # one that came while an error was being reported
        interrupted = True
    finally:
        interrupts.hold()  # the exit status is decided: later signals (e.g. during atexit) are only recorded
    if (interrupted or interrupts.received()) and status != EXIT_INTERRUPTED:
        click.echo(f"tensorscale: {interrupted_message()}", err=True)
        status = EXIT_INTERRUPTED
    sys.exit(status)


if __name__ == "__main__":
    main()
