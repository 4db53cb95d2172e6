"""The objectives of LARES (plr/models/lares.py), as pure functions of tensors.

SPT (self-supervised pre-training):

* ``tla_loss`` -- trajectory-level alignment: multi-positive InfoNCE between
  the final representations of different sequences with the same target;
* ``sla_loss`` -- step-level alignment: the symmetric in-batch InfoNCE of
  ``plr.losses.reasoning_contrastive_loss`` (PLR Eq. 8's loss, one state per row)
  between z_k and one intermediate z_t.

RPT (reinforcement post-training, GRPO):

* ``ranking_reward`` -- the evaluation metric itself (``plr.evaluation.per_user_metric``);
* ``group_advantages``, ``grpo_policy_loss`` -- group-normalised advantages and
  the policy-gradient term;
* ``k3_kl``, ``exact_kl`` -- the KL to the frozen SPT model.

How the phases combine them is in ``plr/models/lares_phases.py``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..evaluation import per_user_metric
from ..losses import reasoning_contrastive_loss

REWARDS = ("recall@10", "ndcg@10")


def supervised_contrastive(sim: torch.Tensor, positive: torch.Tensor, candidate: torch.Tensor
                           ) -> Tuple[torch.Tensor, int]:
    """``sim [B,N]`` logits, ``positive``/``candidate [B,N]`` bool (positive implies candidate).

    loss_i = mean_{j: positive_ij} [ logsumexp_{l: candidate_il} sim_il - sim_ij ];
    mean over anchors with at least one positive; 0 * sim.sum() if there are none."""
    has_pos = positive.any(dim=1)
    count = int(has_pos.sum())
    if count == 0:
        return sim.sum() * 0.0, 0
    log_den = torch.logsumexp(sim.masked_fill(~candidate, float("-inf")), dim=1, keepdim=True)
    per_pair = (log_den - sim).masked_fill(~positive, 0.0)
    per_anchor = per_pair.sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    return per_anchor[has_pos].mean(), count


def tla_positive_mask(target: torch.Tensor) -> torch.Tensor:
    """``target [B]`` -> ``[B,B]`` bool: True where i != j and target_i == target_j."""
    same = target[:, None] == target[None, :]
    return same & ~torch.eye(target.shape[0], dtype=torch.bool, device=target.device)


def tla_loss(z: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, int]:
    """Trajectory-level alignment: ``z [B,d]`` final representations, ``target [B]``.

    Positives of anchor i: the other rows with the same target (``tla_positive_mask``);
    candidates: every other row (in-batch negatives). -> (loss, number of anchors with
    a positive); a batch without any positive pair gives loss 0 and count 0."""
    zn = F.normalize(z, dim=-1)
    sim = zn @ zn.T / temperature
    not_self = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    return supervised_contrastive(sim, tla_positive_mask(target), not_self)


def sla_loss(z_final: torch.Tensor, z_step: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Step-level alignment: symmetric in-batch InfoNCE on cosine similarity between
    ``z_final [B,d]`` and ``z_step [B,d]`` (same row = positive, other rows = negatives):
    ``plr.losses.reasoning_contrastive_loss`` with one state (T = M = 1) per row."""
    return reasoning_contrastive_loss(z_final[:, None, None], z_step[:, None, None], temperature=temperature)


def ranking_reward(rank: torch.Tensor, metric: str = "ndcg@10") -> torch.Tensor:
    """Reward from 1-based ranks ``[N]``: the evaluation metric of each rank
    (``plr.evaluation.per_user_metric``: ``recall@10`` = [rank <= 10], ``ndcg@10`` =
    1/log2(rank + 1) if rank <= 10 else 0), float64 on ``rank``'s device."""
    if metric not in REWARDS:
        raise ValueError(f"reward: expected one of {list(REWARDS)}, got {metric!r}")
    values = per_user_metric(rank.detach().cpu().numpy(), metric)
    return torch.from_numpy(values).to(rank.device)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages over the G rollouts of each sequence: ``rewards [G,B]`` ->
    ``A = (r - mean_G r) / (std_G r + eps)`` with the population std (divide by G);
    a group whose rewards are all equal gets A = 0."""
    mean = rewards.mean(dim=0, keepdim=True)
    std = rewards.std(dim=0, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + eps)


def grpo_policy_loss(step_logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """``step_logp [G,B,T]`` log p_theta(target | z_t), ``advantages [G,B]`` (no grad) ->
    -mean_{g,b} A_{g,b} * sum_t step_logp_{g,b,t}."""
    return -(advantages.detach() * step_logp.sum(dim=-1)).mean()


def k3_kl(logp_policy: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(p_theta || p_ref) at one item (as GRPO):
    exp(d) - d - 1 with d = log p_ref - log p_theta; >= 0, elementwise."""
    d = logp_ref - logp_policy
    return torch.exp(d) - d - 1.0


def exact_kl(logits_policy: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """KL(p_theta || p_ref) = sum_v p_theta(v) (log p_theta(v) - log p_ref(v)) per row of
    ``[B,V]`` logits (padding already masked out by the caller with -inf)."""
    logp = torch.log_softmax(logits_policy, dim=-1)
    logq = torch.log_softmax(logits_ref, dim=-1)
    p = logp.exp()
    return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(dim=-1)
