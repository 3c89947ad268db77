"""What `up` and `down` do around writing an output: refuse a bad OUT before any work, report what the write left."""

from __future__ import annotations

import os

import click


def check_output_early(output, source, force) -> None:
    """Refuse a bad OUT before any work (planning, analysis), not after it."""
    if output is not None:
        from ..reading.source import local_path
        from ..writing.output_folder import check_output_path

        path = local_path(source)  # a folder, a .gguf file (pkg:NAME resolved), or a hub id
        check_output_path(output, path if os.path.exists(path) else None, force)


def print_warnings(result) -> None:
    for name in result.stale_removed:
        click.echo(f"tensorscale: removed {name}, left by a run that was killed", err=True)
    for warning in result.warnings or ():
        click.echo(f"tensorscale: warning: {warning}", err=True)
