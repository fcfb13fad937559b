"""`python -m shunter COMMAND ...`: the same as the `shunter` command, so torchrun can launch it
(`torchrun --nproc-per-node 4 -m shunter ...`)."""

import sys

from shunter.cli import main

if __name__ == "__main__":
    sys.exit(main())
