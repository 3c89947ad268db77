"""`--format` and `--outtype`, shared by `up` and `down`: a safetensors folder (default) or one GGUF file."""

from __future__ import annotations

import click

from ..errors import TensorscaleError
from .options import with_options

FORMAT_OPTIONS = [
    click.option(
        "--format",
        "out_format",
        type=click.Choice(["safetensors", "gguf"]),
        default="safetensors",
        show_default=True,
        help="safetensors: a Hugging Face folder. gguf: one file llama.cpp loads (--output ends in .gguf).",
    ),
    click.option(
        "--outtype",
        type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
        default=None,
        help="Tensor type of a --format gguf output (default f16; 1-D tensors stay f32).",
    ),
]


def output_format_options(func):
    """--format and --outtype, shared by `up` and `down`."""
    return with_options(func, FORMAT_OPTIONS)


def converts_format(source: str, out_format: str) -> bool:
    """Whether the command converts between formats (a GGUF in, or GGUF out): then `up` with no size
    change is still a change (an import, or a re-encoding), not a no-op."""
    from ..reading.gguf_header import is_gguf_path
    from ..reading.source import local_path

    return out_format == "gguf" or (isinstance(source, str) and is_gguf_path(local_path(source)))


def write_output(plan, output, out_format: str, outtype: str | None, **options):
    """Execute the plan in the chosen format; the Result's `output` is the folder or the .gguf file."""
    from ..rewrite import execute_plan

    if out_format == "gguf":
        from ..gguf_export import execute_plan_as_gguf

        for flag in ("verify_files", "manifest"):
            if options.pop(flag, False):
                raise TensorscaleError(
                    f"--{flag.replace('_', '-')} checks a safetensors output; it does not combine with --format gguf"
                )
        return execute_plan_as_gguf(plan, output, outtype, **options)
    if outtype is not None:
        raise TensorscaleError("--outtype sets the tensor type of a GGUF output: add --format gguf (or use --dtype)")
    return execute_plan(plan, output, **options)
