"""plr_kernels: fused kernels for Parallel Latent Reasoning, usable on their own.

Every op takes ``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``;
``plr_kernels.reference`` holds the pure-PyTorch truth of each op with the
same signature. The README lists the ops.
"""

from . import reference
from ._dispatch import BACKENDS, BackendUnavailableError
from ._extension import extension_error
from .linear_cross_entropy import linear_cross_entropy
from .multi_pair_kl import multi_pair_kl
from .reasoning_losses import reasoning_losses
from .reasoning_steps import reasoning_steps
from .stream_attention import stream_attention
from .target_rank import target_rank
from .topk import topk

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "extension_error",
    "linear_cross_entropy",
    "multi_pair_kl",
    "reasoning_losses",
    "reasoning_steps",
    "reference",
    "stream_attention",
    "target_rank",
    "topk",
]
