"""`python -m r1train ...`: the same commands as `train.py` and `r1-train`."""
from r1train.cli import main

main()
