"""How a command was invoked: `--revision REV` folded into the input, and the exact command line.

`--revision` is folded into the input as `org/name@REV`: the command bodies see only the input string, so a
revision reaches the reader (and the manifest) the same way whether it was typed as `org/name@rev` or as
`--revision rev`. The command line that the model card and manifest record is the argument list the
group was invoked with (sys.argv for a user, the list given when called from Python or a test).
"""

from __future__ import annotations

import functools
import sys

import click

_invoked: list[str] | None = None


def remember_arguments(args) -> None:
    """Called by the group's main() with the arguments it parses (None: sys.argv[1:])."""
    global _invoked
    _invoked = list(args) if args is not None else sys.argv[1:]


def command_line() -> list[str]:
    """The exact command, as `tensorscale ARGS...`."""
    return ["tensorscale", *(_invoked if _invoked is not None else sys.argv[1:])]


def revision_option(func, param: str = "source"):
    """Add `--revision` to a command whose model input is the keyword argument `param`."""

    @functools.wraps(func)
    def command(*args, revision=None, **kwargs):
        if revision:
            from ..reading.source import with_revision

            kwargs[param] = with_revision(kwargs[param], revision)
        return func(*args, **kwargs)

    return click.option(
        "--revision",
        default=None,
        metavar="REV",
        help="Hub revision (branch, tag or commit) of a hub-id input; same as org/name@REV.",
    )(command)
