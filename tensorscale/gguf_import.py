"""A GGUF file as a Hugging Face safetensors checkpoint: the engine's identity rewrite of it.

`gen` and `verify` run the model with transformers, which loads safetensors folders; for a GGUF input they
use the checkpoint imported here (cached beside the GGUF's side folder, keyed by the file's identity). It is
exactly what `tensorscale up -i FILE.gguf -o OUT` writes with no multipliers: every tensor dequantized a row
span at a time, names and row order as Hugging Face has them, config and tokenizer from the metadata.
"""

from __future__ import annotations

import os

from .reading.gguf_source import cache_folder, open_gguf


def import_gguf(path: str, output: str, *, dtype: str = "keep", force: bool = True, show_progress: bool = False) -> str:
    """Write the GGUF at `path` as a safetensors checkpoint in `output` (float32 for quantized tensors
    unless `dtype` says otherwise); returns `output`."""
    from .planning.plan import UpOptions, build_plan
    from .rewrite import execute_plan
    from .rulebook.registry import resolve_rules

    source = open_gguf(path)
    plan = build_plan(source, resolve_rules(source.config, None), UpOptions(dtype=dtype))
    return execute_plan(plan, output, force=force, show_progress=show_progress).output


def imported_folder(path: str, *, dtype: str = "keep") -> str:
    """The cached import of a GGUF (written on first use), for the commands that run the model."""
    from .reading.gguf_header import read_gguf_header

    side = cache_folder(read_gguf_header(path))
    folder = f"{side}-imported" if dtype == "keep" else f"{side}-imported-{dtype}"
    if not (
        os.path.isfile(os.path.join(folder, "config.json"))
        and any(name.endswith(".safetensors") for name in os.listdir(folder))
    ):
        import_gguf(path, folder, dtype=dtype)
    return folder


def runnable_source(label: str):
    """A model input as a ModelSource that transformers can load: a local folder or hub id as it is (its
    headers checked, fetched without pickles), a GGUF file (or the side folder that describes one, as
    `up --verify` passes it) as its imported safetensors checkpoint.

    Here, not in inference/: importing a GGUF runs the engine (convert.py), and the engine's refit runs
    models through inference/, so inference must not import the engine back."""
    from .reading.gguf_source import side_folder_gguf
    from .reading.source import local_path, open_source

    path = local_path(label)
    gguf = (
        path
        if path.lower().endswith(".gguf") and os.path.isfile(path)
        else side_folder_gguf(path)
        if os.path.isdir(path)
        else None
    )
    return open_source(imported_folder(gguf) if gguf is not None else label)
