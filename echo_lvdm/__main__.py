"""``python -m echo_lvdm …`` is ``echo-lvdm …`` (torchrun and SLURM launches use it)."""

import sys

from echo_lvdm.main import main

if __name__ == "__main__":
    sys.exit(main())
