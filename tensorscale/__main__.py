"""`python -m tensorscale`, and the `tensorscale` script: the command line of tensorscale.cli.main.

The signal handlers are taken first, before the command line's modules load: a Ctrl-C in that time is
recorded and ends the run in main() like any other interrupt (one line, exit 130), not a traceback from
the middle of an import (tensorscale.interrupts)."""

from tensorscale import interrupts

interrupts.install(raising=False)

from tensorscale.cli.main import main  # noqa: E402

if __name__ == "__main__":
    main()
