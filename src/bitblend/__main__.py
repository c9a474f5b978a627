"""`python -m bitblend` (what `torchrun -m bitblend train RECIPE` starts on every rank)."""

import sys

from bitblend.cli import main

if __name__ == "__main__":
    sys.exit(main())
