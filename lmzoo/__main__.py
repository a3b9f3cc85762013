"""`python -m lmzoo ...` (and `torchrun -m lmzoo ...`) run the same CLI as the `lmzoo` script."""

from lmzoo.cli import main

main()
