"""The command line of the R1 trainer, run from a checkout: `[torchrun ...] python train.py ...`.

Everything lives in the `r1train` package: r1train/cli.py has the commands and their usage
(`python train.py --help`). Installed, the same commands are `r1-train` and `python -m r1train`.
"""
from r1train.cli import main

if __name__ == "__main__":
    main()
