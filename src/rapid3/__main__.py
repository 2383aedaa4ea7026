"""``python -m rapid3 ...``, and so ``torchrun --nproc_per_node N -m rapid3 train ...``: the ``rapid3`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
