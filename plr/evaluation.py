"""Full-ranking evaluation (the protocol of the PLR paper).

Every item of the catalogue is a candidate; the rank of each user's target
comes from ``plr_kernels.target_rank``, so no ``[users x items]`` score
matrix is ever built. Recall@K = [rank <= K], NDCG@K = 1/log2(rank + 1) for
rank <= K (one relevant item, so IDCG = 1), MRR = 1/rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import plr_kernels

from .models.base import PADDING


class NonFiniteScores(ValueError):
    """The model produced NaN or infinite scores: it cannot be evaluated."""


@dataclass
class EvalResult:
    metrics: Dict[str, float]
    users: np.ndarray  # [U] user ids
    ranks: np.ndarray  # [U] int64 1-based ranks of the targets


def metric_names(ks: Sequence[int]):
    return [f"{m}@{k}" for k in ks for m in ("recall", "ndcg")] + ["mrr"]


def per_user_metric(ranks, name: str) -> np.ndarray:
    """One metric per user from ranks: ``recall@K``, ``ndcg@K`` or ``mrr``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if name == "mrr":
        return 1.0 / ranks
    kind, _, k = name.partition("@")
    if kind not in ("recall", "ndcg") or not k.isdigit():
        raise ValueError(f"metric: expected recall@K, ndcg@K or mrr, got {name!r}")
    hit = ranks <= int(k)
    if kind == "recall":
        return hit.astype(np.float64)
    return np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)


def metrics_from_ranks(ranks, ks: Sequence[int] = (5, 10, 20, 50)) -> Dict[str, float]:
    return {name: float(per_user_metric(ranks, name).mean()) for name in metric_names(ks)}


def target_in_history_share(samples) -> float:
    """The share of ``samples`` (``.item_seq [N, L]``, ``.target [N]``) whose target is
    an item of its visible history: at 0, excluding the history from the
    candidates (``exclude_history``) can never hide a target."""
    seq, target = samples.item_seq, samples.target
    if len(target) == 0:
        return 0.0
    return float(((seq == target[:, None]) & (seq != PADDING)).any(dim=1).double().mean())


@torch.no_grad()
def rank_targets(model, item_seq: torch.Tensor, target: torch.Tensor, *, batch_size: int = 1024,
                 exclude_history: bool = False, ties: str = "optimistic", progress: bool = False,
                 desc: str = "evaluate") -> torch.Tensor:
    """Ranks ``[U]`` of ``target`` among all items for the histories ``item_seq [U, L]``,
    scored with the model's inference vector (``model.inference_vector``: ``z_final``, PLR
    PLR Eq. 10). Raises ``NonFiniteScores`` if any of them is NaN or infinite."""
    was_training = model.training
    model.eval()
    device = model.device
    out = []
    try:
        for start in tqdm(range(0, len(target), batch_size), desc=desc, disable=None if progress else True, leave=False):
            seq = model.prepare(item_seq[start:start + batch_size].to(device))
            z = model.inference_vector(model.forward_prepared(seq))
            if not bool(torch.isfinite(z).all()):  # a score, never: NaN would rank targets arbitrarily
                raise NonFiniteScores(f"{desc}: the model's scores are non-finite (NaN or inf) for "
                                      f"{int((~torch.isfinite(z)).any(dim=1).sum())} of the users "
                                      f"{start}..{start + len(seq) - 1}; the model has diverged")
            out.append(plr_kernels.target_rank(
                z, model.item_emb, target[start:start + batch_size].to(device), exclude_index=PADDING,
                exclude_items=seq if exclude_history else None, ties=ties,
                backend=model.backend).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def evaluate(model, samples, *, ks: Sequence[int] = (5, 10, 20, 50), batch_size: int = 1024,
             exclude_history: bool = False, ties: str = "optimistic", progress: bool = False,
             desc: str = "evaluate") -> EvalResult:
    """Full-ranking metrics of ``model`` on ``samples`` (``.item_seq``, ``.target``, ``.user``)."""
    ranks = rank_targets(model, samples.item_seq, samples.target, batch_size=batch_size,
                         exclude_history=exclude_history, ties=ties, progress=progress, desc=desc).numpy()
    return EvalResult(metrics_from_ranks(ranks, ks), np.asarray(samples.user), ranks)


@torch.no_grad()
def popularity_ranks(popularity, samples, *, exclude_history: bool = False, ties: str = "optimistic") -> np.ndarray:
    """Ranks under the most-popular baseline: every user gets the items ordered
    by training count. Uses ``target_rank`` with one-dimensional embeddings
    (score of item v = count(v))."""
    pop = torch.as_tensor(np.asarray(popularity), dtype=torch.float64)[:, None]
    z = torch.ones(len(samples.target), 1, dtype=torch.float64)
    exclude = samples.item_seq if exclude_history else None
    return plr_kernels.target_rank(z, pop, samples.target, exclude_index=PADDING, exclude_items=exclude,
                                   ties=ties).numpy()
