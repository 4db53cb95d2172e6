"""The losses of LARES's two training phases (plr/models/lares.py).

* SPT: ``spt_loss`` = CE(z_k) + w_tla L_TLA + w_sla L_SLA, one sampled depth k
  per batch; the TLA positives are drawn from the training data
  (``plr.data.partners.SameTargetPartners``) and appended to the batch.
* RPT: ``frozen_spt_model`` copies the SPT model that RPT starts from and the KL
  is taken to; ``rpt_loss`` = GRPO over G rollouts of depth ``rpt_depth``.

The objectives are the pure functions of plr/models/lares_objectives.py; which
phase a run executes, and in which run directory, is plr/lares_training.py.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch

import plr_kernels

from .base import PADDING
from .lares_objectives import (exact_kl, group_advantages, grpo_policy_loss, k3_kl, ranking_reward, sla_loss,
                               tla_loss)

# Settings an RPT model must share with the SPT model it starts from.
ARCHITECTURE_KEYS = ("num_items", "max_len", "hidden_size", "num_pre_layers", "num_core_layers", "num_heads",
                     "inner_size", "adapter", "final_norm", "layer_norm_eps", "temperature", "backbone",
                     "backbone_args")


def spt_loss(model, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """CE at the final step + w_tla L_TLA + w_sla L_SLA (one sampled depth for the batch)."""
    b, depth = item_seq.shape[0], model.depth()
    all_seq, all_target = item_seq, target
    if model.tla_weight > 0 and model.tla_positives == "sampled" and model.partners is not None:
        partners = model.partners.draw(item_seq, target)
        if partners is not None:
            all_seq, all_target = torch.cat([item_seq, partners[0]]), torch.cat([target, partners[1]])
    reps = model.recur(all_seq, depth)[1]
    z = reps[:, -1]
    ce = model.cross_entropy(z[:b], target)
    zero = ce.new_zeros(())
    tla, pairs = (zero, 0)
    if model.tla_weight > 0:
        tla, pairs = tla_loss(z, all_target, model.cl_temperature)
    sla = zero
    if model.sla_weight > 0 and depth >= 2:
        step = int(torch.randint(depth - 1, ()))
        sla = sla_loss(z[:b], reps[:b, step], model.cl_temperature)
    loss = ce + model.tla_weight * tla + model.sla_weight * sla
    return loss, {"ce": ce.detach(), "tla": tla.detach(), "sla": sla.detach(),
                  "tla_anchors": torch.tensor(float(pairs)), "depth": torch.tensor(float(depth))}


def frozen_spt_model(model, spt_model):
    """Check that ``spt_model`` has ``model``'s architecture and return a frozen
    copy of it (eval mode, no gradients, on ``model``'s device): RPT's KL reference."""
    if not isinstance(spt_model, type(model)):
        raise TypeError(f"spt_model: expected a {type(model).__name__} checkpoint, got {type(spt_model).__name__}")
    mine, theirs = model.config(), spt_model.config()
    differ = {k: (theirs.get(k), mine.get(k)) for k in ARCHITECTURE_KEYS if theirs.get(k) != mine.get(k)}
    if differ:
        raise ValueError("spt_model: its architecture differs from this model's (checkpoint, config): "
                         + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in differ.items())
                         + "; give RPT the same model settings, e.g. --config SPT_RUN/config.yaml")
    frozen = copy.deepcopy(spt_model).to(model.item_emb.device).eval()
    frozen.requires_grad_(False)
    return frozen


def rng_state(device: torch.device):
    """The global RNG state that the next random draws on ``device`` come from."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def reference_final_state(spt, seq: torch.Tensor, depth: int, noise=None) -> torch.Tensor:
    """z_k ``[rows, d]`` of the frozen SPT model on the rollouts ``seq``.

    ``noise=None`` (``kl_reference: eval``): in eval mode, the fixed s_0 and no
    dropout -- a deterministic model that the stochastic policy never equals, so
    the KL is far from 0 even where the weights are the SPT model's.
    ``noise = rng_state(...)`` taken before the policy's rollouts
    (``kl_reference: same_noise``): in train mode, replaying the rollouts' own
    s_0 draws and dropout masks, so the KL compares the two models on the same
    rollouts and is 0 where their weights agree (at RPT's start). The global RNG
    is left where the policy's rollouts left it."""
    if noise is None:
        return spt.recur(seq, depth)[1][:, -1]
    cpu, cuda = noise
    with torch.random.fork_rng(devices=[seq.device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, seq.device)
        spt.train()
        try:
            return spt.recur(seq, depth)[1][:, -1]
        finally:
            spt.eval()


def rpt_loss(model, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO: G rollouts of depth ``rpt_depth`` (stochastic through s_0 and dropout),
    reward of the final step, group-normalised advantages, policy term over all
    steps' target log-probs, beta * KL to the frozen SPT model at the final step
    (``reference_final_state``: on the rollouts' own noise, or in eval mode)."""
    spt = model.spt_reference
    if model.kl_weight > 0 and spt is None:
        raise RuntimeError("phase=rpt: no reference model; call start_rpt(spt_model) (plr.lares_training does)")
    g, b, depth = model.group_size, item_seq.shape[0], model.rpt_depth
    seq, tgt = item_seq.repeat(g, 1), target.repeat(g)
    # kl_reference=same_noise: the rollouts' s_0 draws and dropout masks start here.
    replay = model.kl_weight > 0 and model.kl_reference == "same_noise"
    noise = rng_state(seq.device) if replay else None
    reps = model.recur(seq, depth)[1]  # [G*B, T, d]
    step_logp = -model.cross_entropy(reps.flatten(0, 1), tgt.repeat_interleave(depth),
                                     reduction="none").view(g, b, depth)
    z = reps[:, -1]
    with torch.no_grad():
        rank = plr_kernels.target_rank(z.detach(), model.item_emb.detach(), tgt, exclude_index=PADDING,
                                       backend=model.backend)
        rewards = ranking_reward(rank, model.reward).view(g, b).to(z.dtype)
        adv = group_advantages(rewards, model.advantage_eps)
    policy = grpo_policy_loss(step_logp, adv)
    kl = z.new_zeros(())
    if model.kl_weight > 0:
        with torch.no_grad():
            z_ref = reference_final_state(spt, seq, depth, noise)
        if model.kl_kind == "k3":
            with torch.no_grad():
                logp_ref = -spt.cross_entropy(z_ref, tgt, reduction="none")
            kl = k3_kl(step_logp[:, :, -1].reshape(-1), logp_ref).mean()
        else:
            kl = exact_kl(model.logits(z), spt.logits(z_ref)).mean()
    loss = policy + model.kl_weight * kl
    return loss, {"policy": policy.detach(), "kl": kl.detach(), "reward": rewards.mean(),
                  "logp": step_logp[:, :, -1].detach().mean()}
