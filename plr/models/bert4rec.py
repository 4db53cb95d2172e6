"""BERT4Rec (Sun et al. 2019): a bidirectional encoder trained with the Cloze
objective, predicting the next item from a [MASK] appended to the history.

Training (Cloze). Each training sample of plr is a (history -> next item)
pair (``plr.training``: every prefix of a user's sequence). From it we build
the sequence ``s = history + [target]`` of ``max_len`` tokens (the oldest
history item dropped), hide every real item of ``s`` independently with
probability ``mask_ratio`` behind the [MASK] token (at least one per sample),
and predict each hidden item from the encoder output at its position by a
full softmax over all items (padding excluded, scores ``h E^T / tau``)::

    L_cloze = mean over masked positions (b, i) of  CE(H_enc[b, i], s[b, i])

The mean runs over all masked positions of the batch (as RecBole). With
probability ``last_item_prob`` a sample instead hides only its last item, the
target -- RecBole's fine-tuning style step (its ``ft_ratio``) that matches
inference exactly. The default is 0: the pure Cloze task of the paper. The
target still takes part: it is the last token of ``s`` and is hidden with
probability ``mask_ratio`` like any item, and since the samples are all
prefixes every item is the last token of some sample.

Positions (see ``plr.backbones.bert4rec``) are right-aligned, so the last
token of ``s`` sits at the position the appended [MASK] takes at inference.

Inference: ``h_0`` = the output at the [MASK] appended after the history,
scored with the tied item table (``z_final = h_0``). In eval mode
``compute_loss`` returns that next-item cross-entropy (deterministic, and what
evaluation ranks with) instead of the random Cloze loss.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

import plr_kernels

from ..validation import check_target
from .base import PADDING, ModelOutput, SequentialRecommender


def _check_ratio(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
    return float(value)


def cloze_mask(seq: torch.Tensor, mask_token: int, mask_ratio: float, last_item_prob: float = 0.0,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hide items of left-padded sequences behind the [MASK] token (BERT4Rec's Cloze task).

    Args:
        seq: ``[B, L]`` item ids, ``0`` = padding; every row ends with a real item.
        mask_token: the [MASK] id (``num_items + 1``).
        mask_ratio: each real item is hidden independently with this probability;
            a row left with none hides one real item chosen uniformly.
        last_item_prob: with this probability a row hides only its last item.
        generator: optional RNG (on ``seq``'s device) for reproducible masks.

    Returns:
        ``(tokens, labels)``, both ``[B, L]``: ``tokens`` is ``seq`` with the
        hidden items replaced by ``mask_token``; ``labels`` holds the hidden
        item ids at the hidden positions and ``0`` everywhere else. Padding is
        never hidden.
    """
    if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.shape[1] == 0:
        got = list(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
        raise ValueError(f"seq: expected a tensor of shape [batch, length >= 1], got {got}")
    mask_ratio = _check_ratio("mask_ratio", mask_ratio)
    last_item_prob = _check_ratio("last_item_prob", last_item_prob)
    b, length = seq.shape
    valid = seq != PADDING
    draw = torch.rand(b, length, generator=generator, device=seq.device)
    hidden = (draw < mask_ratio) & valid
    # At least one per row: a uniformly chosen real position where none was drawn.
    pick = torch.where(valid, torch.rand(b, length, generator=generator, device=seq.device), -1.0).argmax(dim=1)
    none = ~hidden.any(dim=1)
    hidden = hidden | (F.one_hot(pick, length).bool() & none[:, None])
    if last_item_prob > 0:
        last_only = torch.rand(b, generator=generator, device=seq.device) < last_item_prob
        last = torch.zeros_like(hidden)
        last[:, -1] = valid[:, -1]
        hidden = torch.where(last_only[:, None], last, hidden)
    tokens = seq.masked_fill(hidden, mask_token)
    labels = seq.masked_fill(~hidden, PADDING)
    return tokens, labels


class BERT4RecModel(SequentialRecommender):
    """BERT4Rec on the ``bert4rec`` backbone (bidirectional, [MASK] token).

    Args (beyond the backbone's ``max_len, hidden_size, num_layers, num_heads,
    inner_size, dropout, attn_dropout, layer_norm_eps, temperature, backend``):
        mask_ratio: probability of hiding each item in the Cloze task (RecBole: 0.2).
        last_item_prob: probability that a sample hides only its last item.
    """

    def __init__(self, num_items: int, *, mask_ratio: float = 0.2, last_item_prob: float = 0.0, **backbone_args):
        backbone = backbone_args.pop("backbone", "bert4rec")
        if backbone != "bert4rec":
            raise ValueError(f"backbone: BERT4RecModel runs on the 'bert4rec' backbone only, got {backbone!r}")
        super().__init__(num_items, backbone="bert4rec", **backbone_args)
        self.mask_ratio = _check_ratio("mask_ratio", mask_ratio)
        self.last_item_prob = _check_ratio("last_item_prob", last_item_prob)
        self._config = dict(num_items=num_items, mask_ratio=mask_ratio, last_item_prob=last_item_prob,
                            **backbone_args)
        self._init_weights()

    @property
    def mask_token(self) -> int:
        return self.backbone.mask_token

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        h0 = self.backbone.encode(item_seq).hidden[:, -1]  # the appended [MASK]'s output
        return ModelOutput(h0=h0, z_final=h0)

    def cloze_batch(self, item_seq: torch.Tensor, target: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``s = history + [target]`` (oldest history slot dropped, ``max_len``
        tokens), masked by :func:`cloze_mask` -> ``(tokens, labels)`` ``[B, max_len]``."""
        seq = torch.cat([item_seq[:, 1:], target[:, None]], dim=1)
        return cloze_mask(seq, self.mask_token, self.mask_ratio, self.last_item_prob, generator)

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``item_seq [B, L]``, ``target [B]`` -> ``(loss, {"nip": loss detached})``.

        Training mode: the Cloze loss (module docstring). Eval mode: the
        next-item cross-entropy of ``h_0`` against ``target``.
        """
        item_seq = self.prepare(item_seq)
        target = check_target(target, item_seq.shape[0], self.num_items, item_seq.device)
        if self.training:
            tokens, labels = self.cloze_batch(item_seq, target)
            hidden_positions = labels != PADDING
            h = self.backbone.encode_tokens(tokens).hidden[hidden_positions]  # [P, d]
            labels = labels[hidden_positions]
        else:
            h, labels = self.forward_prepared(item_seq).h0, target
        loss = plr_kernels.linear_cross_entropy(
            h, self.item_emb, labels, temperature=self.temperature, exclude_index=PADDING, backend=self.backend
        )
        return loss, {"nip": loss.detach()}
