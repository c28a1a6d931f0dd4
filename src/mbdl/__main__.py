"""``python -m mbdl``: the ``mbdl`` command line (also the entry point for ``torchrun -m mbdl``)."""

from __future__ import annotations

import sys

from mbdl.cli import main

if __name__ == "__main__":
    sys.exit(main())
