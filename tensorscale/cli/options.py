"""Click options that several commands share: how they are stacked, how the model is given, and -v.

Every command that reads one model takes it the way mergekit, llama.cpp's converter and `hf download`
do, as a positional MODEL, and also as `--input/-i MODEL` (the seed tool's spelling). One helper declares
both, so each command's signature keeps a single `source` parameter.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from ..errors import TensorscaleError
from ..rulebook.targets import TARGET_KEYS  # the order of the four flags below

MODEL_HELP = "Model folder, or a Hugging Face hub id (org/name)."


# up, down (and batch jobs' allow_nonfinite) share this flag and its wording.
ALLOW_NONFINITE = click.option(
    "--allow-nonfinite",
    is_flag=True,
    help="Write the output even if input weights hold NaN or Inf (refused by default).",
)


def with_options(func, options: list):
    """Decorate `func` with click options so that they show in `--help` in the order listed."""
    for option in reversed(options):
        func = option(func)
    return func


def model_input(help_text: str = MODEL_HELP):
    """The model as MODEL or as --input/-i MODEL (exactly one of them), passed on as `source`."""

    def decorate(func):
        @functools.wraps(func)
        def command(*args, model=None, source=None, **kwargs):
            return func(*args, source=chosen_model(model, source), **kwargs)

        return with_options(
            command,
            [
                click.argument("model", required=False, metavar="MODEL"),
                click.option(
                    "--input",
                    "-i",
                    "source",
                    default=None,
                    metavar="MODEL",
                    help=f"{help_text} The same as giving MODEL.",
                ),
            ],
        )

    return decorate


def chosen_model(positional: str | None, option: str | None) -> str:
    command = click.get_current_context().command_path
    if positional is not None and option is not None:
        raise TensorscaleError(
            f"the model is given twice ({positional!r} and --input {option!r}); give it once: "
            f"{command} MODEL, or {command} --input MODEL"
        )
    if positional is None and option is None:
        raise TensorscaleError(f"which model? {command} MODEL (a folder or a hub id like org/name), or --input MODEL")
    return positional if positional is not None else option


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (click's test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("tensorscale: %(message)s"))


def _set_verbosity(ctx, param, count):
    """-v may come before the command and after it; the callbacks of both add up, per invocation."""
    root = ctx.find_root()
    total = root.meta.get("tensorscale.verbose", 0) + (count or 0)
    root.meta["tensorscale.verbose"] = total
    logger = logging.getLogger("tensorscale")
    if total:
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.setLevel(logging.INFO)
    else:
        logger.removeHandler(_HANDLER)
        logger.setLevel(logging.NOTSET)
    return count


def verbose_option():
    return click.option(
        "--verbose",
        "-v",
        count=True,
        expose_value=False,
        is_eager=True,
        callback=_set_verbosity,
        help="Log each step to stderr: the model opened, its rules, the plan, each shard, the commit.",
    )


def add_to_every_command(group: click.Group, make_option) -> None:
    """Give every command of `group`, nested groups included, the option `make_option()` builds."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            add_to_every_command(command, make_option)
        else:
            make_option()(command)  # click appends the option to an existing Command's params


# Options that up, down and their `plan` dry runs share, declared once (the same flag, default and wording).
OUTPUT = click.option(
    "--output",
    "-o",
    "output",
    default=None,
    metavar="OUT",
    help="Output folder (default: <source name>-<size> in the current folder).",
)
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Print a JSON summary for scripts.")
DTYPE = click.option(
    "--dtype",
    type=click.Choice(["keep", "float32", "bfloat16", "float16"]),
    default="keep",
    show_default=True,
    help="Storage dtype of the output's float tensors.",
)
RULES = click.option(
    "--rules",
    "rules_path",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="A rules file for an architecture tensorscale does not ship.",
)
MAX_SHARD_SIZE = click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Largest output shard, e.g. 5GB, 500MB."
)
FORCE = click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
VERIFY_FILES = click.option(
    "--verify-files", is_flag=True, help="Re-read every tensor and compare its sha256 with what was streamed."
)
MANIFEST = click.option(
    "--manifest", is_flag=True, help="Write tensorscale-manifest.json: source and output hashes, command, version."
)
QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")


def seed_option(what: str):
    """--seed, which seeds what each direction draws at random (up's noise, down's clustering)."""
    return click.option("--seed", type=int, default=0, show_default=True, help=f"Seed {what}.")


def target_size_options(hidden: str, kv_heads: str):
    """--hidden-size, --intermediate-size, --num-attention-heads, --num-key-value-heads, passed on together as
    `targets` (rulebook.targets.TARGET_KEYS key -> the size given, or None); `hidden` and `kv_heads` end
    their help."""

    def decorate(func):
        @functools.wraps(func)
        def command(
            *args,
            hidden_size=None,
            intermediate_size=None,
            num_attention_heads=None,
            num_key_value_heads=None,
            **kwargs,
        ):
            sizes = (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads)
            return func(*args, targets=dict(zip(TARGET_KEYS, sizes)), **kwargs)

        return with_options(
            command,
            [
                click.option("--hidden-size", type=int, default=None, help=f"Target hidden size ({hidden})."),
                click.option("--intermediate-size", type=int, default=None, help="Target FFN size."),
                click.option("--num-attention-heads", type=int, default=None, help="Target attention head count."),
                click.option("--num-key-value-heads", type=int, default=None, help=f"Target kv head count{kv_heads}."),
            ],
        )

    return decorate


def parse_layer_list(text) -> tuple[int, ...] | None:
    """--at's layer indices, "4,8" -> (4, 8); None when not given."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise TensorscaleError(f"--at takes layer indices separated by commas (e.g. 4,8), got {text!r}") from None
