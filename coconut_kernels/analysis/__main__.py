"""``python -m coconut_kernels.analysis``: the same as ``coconut-analyze``."""
import sys

from .cli import main

sys.exit(main())
