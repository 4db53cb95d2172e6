"""Same-target partners: for a batch of training samples, other training
sequences with the same next item (the supervised positives of LARES's
trajectory-level alignment, DuoRec-style; plr/models/lares_objectives.py)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class SameTargetPartners:
    """``samples`` (``plr.data.TrainSamples``) indexed by target item.

    ``draw(item_seq, target)`` gives, for every row whose target has at least
    two training sequences, one of them chosen uniformly at random that is not
    the row's own history."""

    def __init__(self, samples, num_items: int):
        target = samples.target.cpu().long()
        self.samples = samples
        self.order = torch.argsort(target, stable=True)  # sample ids sorted by target
        self.counts = torch.bincount(target, minlength=num_items + 1)  # samples per target
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # first position of each target in order

    def draw(self, item_seq: torch.Tensor, target: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``item_seq [B,L]``, ``target [B]`` -> ``(partner sequences [B',L], their targets [B'])``
        for the B' rows that have a partner, or None if no row has one."""
        tgt = target.cpu()
        count = self.counts[tgt]
        keep = (count >= 2).nonzero().squeeze(1)
        if keep.numel() == 0:
            return None
        tgt, count = tgt[keep], count[keep]
        pick = (torch.rand(keep.numel()) * count).long().clamp_max(count - 1)
        seqs, _ = self.samples.gather(self.order[self.starts[tgt] + pick])
        seqs = seqs.to(item_seq.device)
        same = (seqs == item_seq[keep.to(item_seq.device)]).all(dim=1).cpu()
        if bool(same.any()):  # drew the row itself: take the next sequence of that target
            pick = torch.where(same, (pick + 1) % count, pick)
            seqs = self.samples.gather(self.order[self.starts[tgt] + pick])[0].to(item_seq.device)
        return seqs, tgt.to(target.device)
