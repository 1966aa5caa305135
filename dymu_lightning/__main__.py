"""`python -m dymu_lightning ...`: see dymu_lightning/cli.py."""

import sys

from dymu_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main())
