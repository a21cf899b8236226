import os

import torch

# Triton kernels run in the CPU interpreter where there is no GPU. This must be set before any module
# that defines a @triton.jit kernel is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
