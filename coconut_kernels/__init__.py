"""coconut_kernels: fused kernels, PyTorch ops and a thin model layer for continuous latent reasoning.

Importing the package loads the compiled op library, which registers `torch.ops.coconut.*`.
"""
from . import _C  # noqa: F401  (registers torch.ops.coconut.*)
from .backend import get_backend, set_backend
from .ops.soft_embedding import soft_embedding

__version__ = "0.1.0"

__all__ = ["get_backend", "set_backend", "__version__", "soft_embedding"]
