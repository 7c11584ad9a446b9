"""``python -m sauce_export``: the CLI, so ``torchrun --nproc-per-node N -m sauce_export run ...`` works."""

import sys

from sauce_export.cli import main

sys.exit(main())
