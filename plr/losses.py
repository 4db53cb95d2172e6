"""Auxiliary losses of PLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reasoning_contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reasoning contrastive learning, PLR Eq. 8.

    ``view_a, view_b [B,T,M,d]``: the reasoning states of two forward passes
    with independent dropout. For every (t, m) the B x B cosine similarities
    between the views feed a symmetric in-batch InfoNCE (the same user is the
    positive, the other users of the batch the negatives); the result is the
    mean over all (t, m).
    """
    a = F.normalize(view_a.flatten(1, 2).transpose(0, 1), dim=-1)  # [T*M, B, d]
    b = F.normalize(view_b.flatten(1, 2).transpose(0, 1), dim=-1)
    sim = torch.matmul(a, b.transpose(1, 2)) / temperature  # [T*M, B, B]
    labels = torch.arange(sim.shape[1], device=sim.device).expand(sim.shape[0], -1)
    forward = F.cross_entropy(sim.flatten(0, 1), labels.flatten())
    backward = F.cross_entropy(sim.transpose(1, 2).flatten(0, 1), labels.flatten())
    return 0.5 * (forward + backward)
