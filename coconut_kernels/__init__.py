"""coconut_kernels: fused kernels, PyTorch ops and a thin model layer for continuous latent reasoning.

Importing the package loads the compiled op library, which registers `torch.ops.coconut.*`.
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, before _C)

from . import _C  # noqa: F401  (registers torch.ops.coconut.*)
from .backend import get_backend, set_backend
from .cache import KVCache
from .ops.latent_attention import latent_attention
from .ops.latent_feedback import latent_feedback, latent_feedback_

__version__ = "0.1.0"

__all__ = ["get_backend", "set_backend", "__version__"]
__all__ += ["KVCache", "latent_attention", "latent_feedback", "latent_feedback_"]
