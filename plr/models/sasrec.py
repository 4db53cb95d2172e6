"""SASRec (Kang & McAuley 2018): the backbone alone, no reasoning.

Scores ``h_0 E^T / tau``, trained with full-softmax cross-entropy over all
items -- the base model PLR is compared with on the same backbone code.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

import plr_kernels

from ..validation import check_target
from .base import PADDING, ModelOutput, SequentialRecommender


class SASRecModel(SequentialRecommender):
    def __init__(self, num_items: int, **backbone_args):
        super().__init__(num_items, **backbone_args)
        self._config = dict(num_items=num_items, **backbone_args)
        self._init_weights()

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        h0 = self.backbone.encode(item_seq).hidden[:, -1]
        return ModelOutput(h0=h0, z_final=h0)

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        out = self(item_seq)
        target = check_target(target, out.h0.shape[0], self.num_items, out.h0.device)
        nip = plr_kernels.linear_cross_entropy(
            out.h0, self.item_emb, target, temperature=self.temperature, exclude_index=PADDING, backend=self.backend
        )
        return nip, {"nip": nip.detach()}

    def sequence_loss(self, item_seq, rows, target):
        """CE of ``h_0`` of every prefix end ``rows`` of one encoder pass (SASRec's own training)."""
        h0 = self.backbone.encode(item_seq).hidden[rows]
        nip = plr_kernels.linear_cross_entropy(
            h0, self.item_emb, target, temperature=self.temperature, exclude_index=PADDING, backend=self.backend
        )
        return nip, {"nip": nip.detach()}
