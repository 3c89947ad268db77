"""`up`/`down` with `--format gguf`: the plan is written as usual (a safetensors checkpoint, in a temporary
folder beside OUT), then streamed header-first into one GGUF file, which is renamed into place only when
complete. The temporary checkpoint is removed whatever happens (success, error, Ctrl-C)."""

from __future__ import annotations

import os
import secrets
import shutil

from . import interrupts
from .errors import TensorscaleError

DEFAULT_OUTTYPE = "f16"  # llama.cpp's convert_hf_to_gguf.py default


def gguf_output_path(output: str | None, default_folder: str, force: bool, input_path: str | None = None) -> str:
    out = os.path.abspath(output or f"{default_folder}.gguf")
    if input_path is not None and os.path.realpath(out) == os.path.realpath(input_path):
        raise TensorscaleError(
            f"output {output or out} is the input file; tensorscale never replaces its input: choose another --output"
        )
    if not out.lower().endswith(".gguf"):
        raise TensorscaleError(f"--format gguf writes one file: give --output a name ending in .gguf (got {output})")
    if os.path.isdir(out):
        raise TensorscaleError(f"{out} is a folder; --format gguf writes a file, choose another --output")
    if os.path.exists(out) and not force:
        raise TensorscaleError(f"{out} exists; pass --force to replace it (only once the new file is complete)")
    if not os.path.isdir(os.path.dirname(out)):
        raise TensorscaleError(f"the folder of {out} does not exist; create it first")
    return out


def execute_plan_as_gguf(
    plan, output: str | None, outtype: str | None, *, force: bool = False, show_progress: bool = True, **options
):
    """Write `plan` as one GGUF file; returns the Result of the safetensors pass with `output` set to the file."""
    from .rewrite import default_output, execute_plan
    from .writing.gguf_writer import gguf_architecture, write_gguf
    from .writing.output_folder import record_committed

    gguf_architecture(plan.config)  # refuse an architecture we cannot write before any work
    out = gguf_output_path(output, default_output(plan.source, plan), force, plan.source.input_path)
    # PID plus a random suffix: two runs with the same PID (PID 1 of two containers) never share it (issue 14)
    folder = os.path.join(
        os.path.dirname(out), f".{os.path.basename(out)}.tensorscale-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    )
    partial = f"{folder}.gguf"
    try:
        result = execute_plan(plan, folder, force=True, show_progress=show_progress, **options)
        write_gguf(
            folder,
            partial,
            outtype or DEFAULT_OUTTYPE,
            getattr(plan.source, "gguf", None),
            name=os.path.splitext(os.path.basename(out))[0],
        )
        interrupts.check()  # a swallowed signal stops the run before the file is moved into place
        with interrupts.deferred():  # one during the move waits until the record agrees with OUT
            replaced = os.path.lexists(out)
            os.replace(partial, out)
            record_committed(out, replaced)
    finally:
        with interrupts.deferred():  # a second Ctrl-C does not leave the temporary checkpoint half removed
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.exists(partial):
                os.remove(partial)
    result.output = out
    return result
