"""`--revision REV` for every command that takes a model: folded into the input as `org/name@REV`.

The command bodies see only the input string, so a revision reaches the reader (and the manifest) the same
way whether it was typed as `org/name@rev` or as `--revision rev`.
"""

from __future__ import annotations

import functools

import click


def revision_option(func, param: str = "source"):
    """Add `--revision` to a command whose model input is the keyword argument `param`."""

    @functools.wraps(func)
    def command(*args, revision=None, **kwargs):
        if revision:
            from ..reading.source import with_revision

            kwargs[param] = with_revision(kwargs[param], revision)
        return func(*args, **kwargs)

    return click.option("--revision", default=None, metavar="REV",
                        help="Hub revision (branch, tag or commit) of a hub-id input; same as org/name@REV.")(command)
