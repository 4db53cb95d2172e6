"""The trainer's per-step guard: a non-finite or diverging loss stops the run.

``check_step`` runs on every training step before the backward pass and the
optimiser step, so when it raises, the model and optimiser still hold the
last good state (``plr.training.Trainer`` saves it to ``last.pt``; ``best.pt``
is untouched). It checks the total loss and every part returned by
``compute_loss``: a NaN or infinite value, or (with ``train.divergence_limit``
set, default 1e4) an absolute value above the limit, raises
:class:`TrainingDiverged` naming the term, the epoch, the step and the value.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch


class TrainingDiverged(RuntimeError):
    """A training run stopped on a non-finite or diverging loss term."""

    def __init__(self, term: str, epoch: int, step: int, value: float, limit: Optional[float] = None):
        self.term, self.epoch, self.step, self.value, self.limit = term, epoch, step, value, limit
        if limit is None:
            what = f"training stopped: loss term {term!r} is {value} at epoch {epoch}, step {step}"
            hint = "lower train.lr (e.g. --set train.lr=1e-4) or set train.grad_clip"
        else:
            what = (f"training stopped: loss term {term!r} = {value:.6g} exceeds train.divergence_limit = "
                    f"{limit:g} in absolute value at epoch {epoch}, step {step}")
            hint = ("lower train.lr or set train.grad_clip; raise the limit with --set train.divergence_limit=..., "
                    "or disable it with --set train.divergence_limit=null")
        super().__init__(f"{what} — {hint}")
        self.what, self.hint = what, hint


def check_step(loss: torch.Tensor, parts: Mapping[str, torch.Tensor], *, epoch: int, step: int,
               limit: Optional[float]) -> Dict[str, float]:
    """``{"loss": float, part: float, ...}`` of one step; raises ``TrainingDiverged``
    on a non-finite value or one whose absolute value exceeds ``limit``."""
    values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
    for term, value in values.items():
        if not math.isfinite(value):
            raise TrainingDiverged(term, epoch, step, value)
    for term, value in values.items():
        if limit is not None and abs(value) > limit:
            raise TrainingDiverged(term, epoch, step, value, limit)
    return values
