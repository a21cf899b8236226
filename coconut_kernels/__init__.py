"""coconut_kernels: fused kernels, PyTorch ops and a thin model layer for continuous latent reasoning.

Importing the package loads the compiled op library, which registers `torch.ops.coconut.*`.
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, before _C)

from . import _C  # noqa: F401  (registers torch.ops.coconut.*)
from .backend import cpu_isa, get_backend, set_backend, set_cpu_isa
from .cache import KVCache
from .errors import CheckpointError, CheckpointNotFoundError, CoconutError, ConfigError
from .feedback import Feedback
from .markers import LatentIds, add_latent_tokens
from .latent import GenerateOutput, LatentLM, LatentOutput
from .loss import linear_cross_entropy
from .ops.gelu import gelu_tanh
from .ops.latent_attention import latent_attention
from .ops.latent_feedback import latent_feedback, latent_feedback_
from .ops.skinny_linear import skinny_linear
from .ops.soft_embedding import soft_embedding

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "CoconutError", "ConfigError", "Feedback", "GenerateOutput",
    "KVCache", "LatentIds", "LatentLM", "LatentOutput", "add_latent_tokens", "cpu_isa", "gelu_tanh", "get_backend",
    "latent_attention", "latent_feedback", "latent_feedback_", "linear_cross_entropy", "set_backend", "set_cpu_isa",
    "skinny_linear", "soft_embedding",
    "__version__",
]
