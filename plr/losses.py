"""The contrastive losses of plr: PLR Eq. 8 (``reasoning_contrastive_loss``, and
``grouped_contrastive_loss`` for sequence mode), also used by ReaRec-PRL
(plr/models/rearec.py) and by LARES's step-level alignment
(plr/models/lares_objectives.py)."""

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


def grouped_contrastive_loss(view_a: torch.Tensor, view_b: torch.Tensor, order: torch.Tensor, group_size: int,
                             temperature: float = 1.0) -> torch.Tensor:
    """:func:`reasoning_contrastive_loss` with in-batch negatives taken within
    groups of at most ``group_size`` rows, for the R rows of a sequence batch.

    Rows are taken in the order ``order [R]`` and cut into consecutive groups
    of ``group_size`` (the last one may be smaller); each group is the batch of
    one symmetric InfoNCE; the result is the mean over all rows (and (t, m)).
    So the cost is O(R * group_size), not O(R^2), and with ``R <= group_size``
    it is exactly ``reasoning_contrastive_loss`` of the R rows (any order).
    """
    r = view_a.shape[0]
    groups = (r + group_size - 1) // group_size
    pad = groups * group_size - r
    a = F.normalize(view_a.flatten(1, 2), dim=-1)[order]  # [R, T*M, d]
    b = F.normalize(view_b.flatten(1, 2), dim=-1)[order]
    a = F.pad(a, (0, 0, 0, 0, 0, pad)).view(groups, group_size, *a.shape[1:]).permute(2, 0, 1, 3)
    b = F.pad(b, (0, 0, 0, 0, 0, pad)).view(groups, group_size, *b.shape[1:]).permute(2, 0, 1, 3)
    sim = torch.matmul(a, b.transpose(-1, -2)) / temperature  # [T*M, groups, G, G]
    valid = torch.arange(groups * group_size, device=sim.device).view(groups, group_size) < r
    # Padded rows are no negatives in either direction; their own diagonal stays
    # open (a finite 0 loss, masked out below).
    eye = torch.eye(group_size, dtype=torch.bool, device=sim.device)
    pair = (valid[:, :, None] & valid[:, None, :]) | eye
    sim = sim.masked_fill(~pair[None], float("-inf"))
    diag = torch.diagonal(sim, dim1=-2, dim2=-1)
    forward = torch.logsumexp(sim, dim=-1) - diag
    backward = torch.logsumexp(sim, dim=-2) - diag
    per_row = (0.5 * (forward + backward)).masked_fill(~valid[None], 0.0)
    return per_row.sum() / (r * sim.shape[0])
