"""`python -m tensorscale`: the same command line as the `tensorscale` script, for environments whose
scripts folder is not on PATH."""

from tensorscale.cli.main import main

if __name__ == "__main__":
    main()
