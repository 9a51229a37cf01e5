"""Offline CTR evaluation of a checkpoint; the same as `recsys eval` (see `--help`)."""

import sys

from recsys.eval.report import main

if __name__ == "__main__":
    sys.exit(main())
