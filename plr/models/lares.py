"""LARES (Liu et al. 2025, "LARES: Latent Reasoning for Sequential Recommendation").

A depth-recurrent encoder in the style of Geiping et al. 2025 (prelude /
recurrent core), trained in two phases:

* architecture
    e   = Pre(E[items] + P)                       pre-blocks, run once (the backbone, causal)
    s_0 ~ TruncNormal(0, sigma^2, [-c sigma, c sigma])   random initial state, every position
    s_t = Core(adapter(s_{t-1}, e)),  t = 1..k    core blocks over ALL positions, causal
    z_t = LN(s_t[last])                           the user representation of step t
    score(v) = z_k . E_v / tau                    tied item table, temperature tau
  adapter: "add" s + e | "concat" W [s; e] + b | "gate" g*s + (1-g)*e, g = sigmoid(W_g [s; e] + b_g).
* depth: in training, per batch, r ~ LogNormal(log(mean_depth - 1) - s^2/2, s) and
  k = min(1 + Poisson(r), max_depth), so E[k] = mean_depth before the cap; at
  inference k = eval_depth. ``backprop_steps`` = n keeps the graph of the last n
  steps only (truncated backprop through the recurrence, as Geiping et al.);
  None backpropagates through every step.
* SPT (self-supervised pre-training): L = CE(z_k) + w_tla L_TLA + w_sla L_SLA
    L_TLA  trajectory-level alignment: InfoNCE between the final representations
           of DIFFERENT sequences with the same target item (``tla_loss``).
           Positives: for every row of the batch one other training sequence
           with the same target is drawn from the training data
           (``attach_training_data`` / ``draw_partners``, DuoRec-style supervised
           positives) and appended to the batch; then every pair (i != j) of
           the enlarged batch with equal targets is a positive, every other row
           a negative (multi-positive InfoNCE). Rows without any positive are
           left out; a batch without any positive pair gives L_TLA = 0.
           ``tla_positives: batch`` (or no attached data) uses in-batch pairs only.
    L_SLA  step-level alignment: symmetric InfoNCE between z_k and z_t of one
           intermediate step t < k (drawn uniformly per batch) of the same
           sequence, the other rows of the batch as negatives (``sla_loss``);
           0 when k = 1. Both on cosine similarity / ``cl_temperature``.
* RPT (reinforcement post-training, GRPO): G rollouts per sequence of fixed
  depth ``rpt_depth`` (default ``eval_depth``: the depth the policy is used at),
  stochastic through the random s_0 and dropout (train mode);
  reward r = Recall@10 or NDCG@10 of the target under z_k (full ranking),
  A_i = (r_i - mean_G r) / (std_G r + eps), population std  (``group_advantages``)
  L = -mean_i A_i sum_t log p(target | z_t) + beta KL(p_theta || p_SPT)   (``grpo_policy_loss``).
  The KL is to the frozen SPT model (eval mode, same depth) at the final step:
  ``k3`` (default) is Schulman's k3 estimator at the target item, as GRPO does
  at the sampled token (cheap: no [rows x items] matrix); ``exact`` is the full
  KL of the next-item distributions (materialises [G*B, items] logits).
* inference: s_0 is one fixed truncated-normal draw (``init_seed``), so scores
  are deterministic and ``plr evaluate`` reproduces a run's metrics.

The phase logic (SPT then RPT, frozen reference) is in ``plr.lares_training``.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import plr_kernels

from ..backbones import causal_mask
from ..transformer import TransformerBlock
from ..validation import check_positive_int, check_target
from .base import PADDING, ModelOutput, SequentialRecommender

ADAPTERS = ("add", "concat", "gate")
PHASES = ("spt", "rpt")
REWARDS = ("recall@10", "ndcg@10")
KL_KINDS = ("k3", "exact")
# Settings an RPT model must share with the SPT model it starts from.
ARCHITECTURE_KEYS = ("num_items", "max_len", "hidden_size", "num_pre_layers", "num_core_layers", "num_heads",
                     "inner_size", "adapter", "final_norm", "layer_norm_eps", "temperature", "backbone",
                     "backbone_args")


# -- small pure functions (tests compare them with hand computations) -------------------


def sample_depth(mean_depth: float, depth_std: float, max_depth: int, generator=None) -> int:
    """k = min(1 + Poisson(r), max_depth), r ~ LogNormal(log(mean_depth - 1) - s^2/2, s).

    E[r] = mean_depth - 1, so E[k] = mean_depth before the cap (Geiping et al.'s
    log-normal Poisson, shifted by one so that at least one step runs)."""
    mu = math.log(mean_depth - 1.0) - 0.5 * depth_std ** 2
    rate = torch.exp(mu + depth_std * torch.randn((), generator=generator, dtype=torch.float64))
    return int(min(1 + int(torch.poisson(rate, generator=generator)), max_depth))


def truncated_normal_state(shape, std: float, truncation: float, *, device=None, dtype=None,
                           generator=None) -> torch.Tensor:
    """s_0 ~ N(0, std^2) truncated to [-truncation*std, truncation*std] (resampled, not clipped)."""
    out = torch.empty(shape, device=device, dtype=dtype)
    if std == 0:
        return out.zero_()
    return nn.init.trunc_normal_(out, mean=0.0, std=std, a=-truncation * std, b=truncation * std,
                                 generator=generator)


def _supcon(sim: torch.Tensor, positive: torch.Tensor, candidate: torch.Tensor) -> Tuple[torch.Tensor, int]:
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
    return _supcon(sim, tla_positive_mask(target), not_self)


def sla_loss(z_final: torch.Tensor, z_step: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Step-level alignment: symmetric in-batch InfoNCE on cosine similarity between
    ``z_final [B,d]`` and ``z_step [B,d]`` (same row = positive, other rows = negatives)."""
    a, b = F.normalize(z_final, dim=-1), F.normalize(z_step, dim=-1)
    sim = a @ b.T / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


def ranking_reward(rank: torch.Tensor, metric: str = "ndcg@10") -> torch.Tensor:
    """Reward from 1-based ranks: ``recall@10`` = [rank <= 10], ``ndcg@10`` =
    1/log2(rank + 1) if rank <= 10 else 0 (plr.evaluation.per_user_metric)."""
    if metric not in REWARDS:
        raise ValueError(f"reward: expected one of {list(REWARDS)}, got {metric!r}")
    rank = rank.to(torch.float64)
    hit = rank <= 10
    if metric == "recall@10":
        return hit.to(torch.float64)
    return torch.where(hit, 1.0 / torch.log2(rank + 1.0), torch.zeros_like(rank))


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


# -- the model ------------------------------------------------------------------------


class LARESModel(SequentialRecommender):
    """Pre-blocks (the backbone, ``num_pre_layers``) + ``num_core_layers`` core blocks
    applied for k recurrent steps to all positions.

    Args beyond the backbone's (``hidden_size, num_heads, inner_size, dropout, ...``):
        num_pre_layers / num_core_layers: blocks run once / at every step.
        adapter: ``add`` | ``concat`` | ``gate`` (module docstring).
        init_std, init_truncation: s_0 ~ N(0, init_std^2) truncated at +-init_truncation*init_std;
            in eval mode s_0 is one fixed draw (seeded by ``init_seed``) so inference is deterministic.
        mean_depth, depth_std, max_depth: training depth distribution (``sample_depth``).
        eval_depth: k at inference (and for RPT rollouts unless ``rpt_depth``).
        backprop_steps: truncated backprop through the last n steps (None = all).
        final_norm: LayerNorm on the state before scoring.
        phase: ``spt`` | ``rpt`` -- which loss ``compute_loss`` computes.
        tla_weight, sla_weight, cl_temperature: SPT weights and InfoNCE temperature.
        tla_positives: ``sampled`` (one partner with the same target drawn from the training
            data attached by ``attach_training_data``, plus in-batch pairs; in-batch only until
            data is attached) | ``batch`` (in-batch only).
        group_size, reward, kl_weight, kl_kind, advantage_eps, rpt_depth: GRPO (G, reward metric,
            beta, ``k3`` (at the target, final step) | ``exact`` (full next-item distributions,
            materialises [G*B, V] logits), eps, rollout depth).
    """

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_pre_layers: int = 1,
                 num_core_layers: int = 1, num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12, temperature: float = 0.07,
                 adapter: str = "concat", init_std: float = 1.0, init_truncation: float = 2.0, init_seed: int = 0,
                 mean_depth: float = 4.0, depth_std: float = 0.5, max_depth: int = 8, eval_depth: int = 4,
                 backprop_steps: Optional[int] = None, final_norm: bool = True, phase: str = "spt",
                 tla_weight: float = 0.1, sla_weight: float = 0.1, cl_temperature: float = 1.0,
                 tla_positives: str = "sampled", group_size: int = 4, reward: str = "ndcg@10",
                 kl_weight: float = 0.1, kl_kind: str = "k3", advantage_eps: float = 1e-6,
                 rpt_depth: Optional[int] = None, kernels: str = "auto", backbone: str = "sasrec",
                 backbone_args: Optional[dict] = None):
        super().__init__(num_items, max_len, hidden_size, num_pre_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps, temperature, kernels, backbone, backbone_args)
        self._config = dict(
            num_items=num_items, max_len=max_len, hidden_size=hidden_size, num_pre_layers=num_pre_layers,
            num_core_layers=num_core_layers, num_heads=num_heads, inner_size=inner_size, dropout=dropout,
            attn_dropout=attn_dropout, layer_norm_eps=layer_norm_eps, temperature=temperature, adapter=adapter,
            init_std=init_std, init_truncation=init_truncation, init_seed=init_seed, mean_depth=mean_depth,
            depth_std=depth_std, max_depth=max_depth, eval_depth=eval_depth, backprop_steps=backprop_steps,
            final_norm=final_norm, phase=phase, tla_weight=tla_weight, sla_weight=sla_weight,
            cl_temperature=cl_temperature, tla_positives=tla_positives, group_size=group_size, reward=reward,
            kl_weight=kl_weight, kl_kind=kl_kind, advantage_eps=advantage_eps, rpt_depth=rpt_depth,
            kernels=kernels, backbone=backbone, backbone_args=backbone_args,
        )
        check_positive_int("num_core_layers", num_core_layers)
        self.max_depth = check_positive_int("max_depth", max_depth)
        self.eval_depth = check_positive_int("eval_depth", eval_depth)
        self.group_size = check_positive_int("group_size", group_size)
        self.backprop_steps = None if backprop_steps is None else check_positive_int("backprop_steps", backprop_steps)
        self.rpt_depth = self.eval_depth if rpt_depth is None else check_positive_int("rpt_depth", rpt_depth)
        for name, value, lo in (("init_std", init_std, 0.0), ("init_truncation", init_truncation, 1e-9),
                                ("depth_std", depth_std, 0.0), ("tla_weight", tla_weight, 0.0),
                                ("sla_weight", sla_weight, 0.0), ("cl_temperature", cl_temperature, 1e-9),
                                ("kl_weight", kl_weight, 0.0), ("advantage_eps", advantage_eps, 0.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo:
                raise ValueError(f"{name}: expected a number >= {lo:g}, got {value!r}")
        if isinstance(mean_depth, bool) or not isinstance(mean_depth, (int, float)) or not 1 < mean_depth <= max_depth:
            raise ValueError(f"mean_depth: expected a number in (1, max_depth={max_depth}], got {mean_depth!r}")
        for name, value, allowed in (("adapter", adapter, ADAPTERS), ("phase", phase, PHASES),
                                     ("reward", reward, REWARDS), ("kl_kind", kl_kind, KL_KINDS),
                                     ("tla_positives", tla_positives, ("sampled", "batch"))):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
        self.adapter_kind, self.phase, self.reward, self.kl_kind = adapter, phase, reward, kl_kind
        self.tla_positives = tla_positives
        self.init_std, self.init_truncation = float(init_std), float(init_truncation)
        self.mean_depth, self.depth_std = float(mean_depth), float(depth_std)
        self.tla_weight, self.sla_weight = float(tla_weight), float(sla_weight)
        self.cl_temperature = float(cl_temperature)
        self.kl_weight, self.advantage_eps = float(kl_weight), float(advantage_eps)

        self.core = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, inner_size, dropout,
                             dropout if attn_dropout is None else attn_dropout, layer_norm_eps)
            for _ in range(num_core_layers)
        )
        self.adapter = None if adapter == "add" else nn.Linear(2 * hidden_size, hidden_size)
        self.final_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps) if final_norm else nn.Identity()
        self._init_weights()
        # The fixed inference start state (not a parameter: a deterministic function of init_seed).
        gen = torch.Generator().manual_seed(int(init_seed))
        self.register_buffer("eval_state", truncated_normal_state((max_len, hidden_size), self.init_std,
                                                                  self.init_truncation, generator=gen),
                             persistent=False)
        self._reference: Optional["LARESModel"] = None  # frozen SPT model of the RPT phase (not a submodule)
        self._partners = None  # (train samples, sample ids sorted by target, start offset per target)

    # Model keys of the phase logic (plr.lares_training), not constructor arguments.
    run_keys = ("spt_epochs", "rpt_epochs", "rpt_lr", "init_from")

    @classmethod
    def trial_kwargs(cls, model_cfg: dict) -> dict:
        """Constructor arguments of a config's model section, for checking it before
        the data is read (plr.config.check_model); phase ``both`` builds as ``spt``."""
        from ..lares_training import RUN_PHASES

        kwargs = {k: v for k, v in model_cfg.items() if k not in cls.run_keys}
        phase = kwargs.get("phase", "both")
        if phase not in RUN_PHASES:
            raise ValueError(f"phase: expected one of {list(RUN_PHASES)}, got {phase!r}")
        kwargs["phase"] = "spt" if phase == "both" else phase
        return kwargs

    @staticmethod
    def run_training(cfg, dataset, run_dir, *, resume: bool = False, log_to_console: bool = True,
                     test: bool = True):
        """``plr.training.train_run`` for LARES: the phases of ``model.phase`` (plr.lares_training)."""
        from ..lares_training import train_lares

        return train_lares(cfg, dataset, run_dir, resume=resume, log_to_console=log_to_console, test=test)

    # -- architecture ----------------------------------------------------------------

    def combine(self, state: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The adapter: the core's input from the state ``s`` and the pre-block output ``e``."""
        if self.adapter_kind == "add":
            return state + e
        joint = self.adapter(torch.cat([state, e], dim=-1))
        if self.adapter_kind == "concat":
            return joint
        gate = torch.sigmoid(joint)
        return gate * state + (1.0 - gate) * e

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """s_0 for every position: a fresh truncated-normal draw in training, the fixed
        ``eval_state`` in eval mode."""
        if self.training:
            return truncated_normal_state(e.shape, self.init_std, self.init_truncation, device=e.device, dtype=e.dtype)
        return self.eval_state.to(e.dtype)[-e.shape[1]:].expand_as(e)

    def depth(self) -> int:
        return sample_depth(self.mean_depth, self.depth_std, self.max_depth) if self.training else self.eval_depth

    def recur(self, item_seq: torch.Tensor, depth: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the pre-blocks once and the core ``depth`` times -> (``e`` at the last
        position ``[B,d]``, per-step representations ``z_t [B,depth,d]``)."""
        prefix = self.backbone.encode(item_seq)
        e, mask = prefix.hidden, causal_mask(prefix.key_mask)
        state = self.initial_state(e)
        no_grad_steps = 0 if self.backprop_steps is None else max(0, depth - self.backprop_steps)
        reps = []
        for step in range(depth):
            with torch.set_grad_enabled(torch.is_grad_enabled() and step >= no_grad_steps):
                x = self.combine(state, e)
                for block in self.core:
                    x = block.forward_full(x, mask)[0]
                state = x
                reps.append(self.final_norm(state[:, -1]))
        return e[:, -1], torch.stack(reps, dim=1)

    def forward_prepared(self, item_seq: torch.Tensor, depth: Optional[int] = None) -> ModelOutput:
        """``depth`` defaults to a sampled depth in training, ``eval_depth`` in eval mode.
        ``states [B,k,1,d]`` holds z_1..z_k; ``z_final`` = z_k."""
        h0, reps = self.recur(item_seq, self.depth() if depth is None else check_positive_int("depth", depth))
        return ModelOutput(h0=h0, z_final=reps[:, -1], states=reps[:, :, None], z_rea=reps[:, -1])

    # -- training --------------------------------------------------------------------

    def attach_training_data(self, samples) -> None:
        """Index ``samples`` (``plr.data.TrainSamples``) by target so SPT can draw, for each
        sequence, another training sequence with the same target (TLA positives)."""
        target = samples.target.cpu().long()
        order = torch.argsort(target, stable=True)
        counts = torch.bincount(target, minlength=self.num_items + 1)
        starts = torch.cumsum(counts, 0) - counts
        self._partners = (samples, order, starts, counts)

    def draw_partners(self, item_seq: torch.Tensor, target: torch.Tensor):
        """For each row, a training sequence with the same target that differs from the row's
        own history (None if no target has another sequence). -> (seqs, targets) or None."""
        samples, order, starts, counts = self._partners
        tgt = target.cpu()
        count = counts[tgt]
        keep = (count >= 2).nonzero().squeeze(1)
        if keep.numel() == 0:
            return None
        tgt, count = tgt[keep], count[keep]
        pick = (torch.rand(keep.numel()) * count).long().clamp_max(count - 1)
        seqs, _ = samples.gather(order[starts[tgt] + pick])
        seqs = seqs.to(item_seq.device)
        same = (seqs == item_seq[keep.to(item_seq.device)]).all(dim=1).cpu()
        if bool(same.any()):  # drew the row itself: take the next sequence of that target
            pick = torch.where(same, (pick + 1) % count, pick)
            seqs = samples.gather(order[starts[tgt] + pick])[0].to(item_seq.device)
        return seqs, tgt.to(target.device)

    def _ce(self, z: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return plr_kernels.linear_cross_entropy(z, self.item_emb, target, temperature=self.temperature,
                                                exclude_index=PADDING, reduction=reduction, backend=self.kernels)

    def spt_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """CE at the final step + w_tla L_TLA + w_sla L_SLA (one sampled depth for the batch)."""
        b, depth = item_seq.shape[0], self.depth()
        all_seq, all_target = item_seq, target
        if self.tla_weight > 0 and self.tla_positives == "sampled" and self._partners is not None:
            partners = self.draw_partners(item_seq, target)
            if partners is not None:
                all_seq, all_target = torch.cat([item_seq, partners[0]]), torch.cat([target, partners[1]])
        reps = self.recur(all_seq, depth)[1]
        z = reps[:, -1]
        ce = self._ce(z[:b], target)
        zero = ce.new_zeros(())
        tla, pairs = (zero, 0)
        if self.tla_weight > 0:
            tla, pairs = tla_loss(z, all_target, self.cl_temperature)
        sla = zero
        if self.sla_weight > 0 and depth >= 2:
            step = int(torch.randint(depth - 1, ()))
            sla = sla_loss(z[:b], reps[:b, step], self.cl_temperature)
        loss = ce + self.tla_weight * tla + self.sla_weight * sla
        return loss, {"ce": ce.detach(), "tla": tla.detach(), "sla": sla.detach(),
                      "tla_anchors": torch.tensor(float(pairs)), "depth": torch.tensor(float(depth))}

    def start_rpt(self, spt_model: "LARESModel") -> None:
        """Start RPT from ``spt_model``: copy its weights and keep a frozen copy as the KL reference."""
        if not isinstance(spt_model, LARESModel):
            raise TypeError(f"spt_model: expected a LARESModel checkpoint, got {type(spt_model).__name__}")
        mine, theirs = self.config(), spt_model.config()
        differ = {k: (theirs.get(k), mine.get(k)) for k in ARCHITECTURE_KEYS if theirs.get(k) != mine.get(k)}
        if differ:
            raise ValueError("spt_model: its architecture differs from this model's (checkpoint, config): "
                             + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in differ.items())
                             + "; give RPT the same model settings, e.g. --config SPT_RUN/config.yaml")
        self.load_state_dict(spt_model.state_dict())
        reference = copy.deepcopy(spt_model).to(self.item_emb.device).eval()
        reference.requires_grad_(False)
        object.__setattr__(self, "_reference", reference)  # not a submodule: outside state_dict and parameters

    def rpt_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """GRPO: G rollouts of depth ``rpt_depth`` (stochastic through s_0 and dropout),
        reward of the final step, group-normalised advantages, policy term over all
        steps' target log-probs, beta * KL to the frozen SPT model at the final step."""
        if self.kl_weight > 0 and self._reference is None:
            raise RuntimeError("phase=rpt: no reference model; call start_rpt(spt_model) (plr.lares_training does)")
        g, b, depth = self.group_size, item_seq.shape[0], self.rpt_depth
        seq, tgt = item_seq.repeat(g, 1), target.repeat(g)
        reps = self.recur(seq, depth)[1]  # [G*B, T, d]
        step_logp = -self._ce(reps.flatten(0, 1), tgt.repeat_interleave(depth), reduction="none").view(g, b, depth)
        z = reps[:, -1]
        with torch.no_grad():
            rank = plr_kernels.target_rank(z.detach(), self.item_emb.detach(), tgt, exclude_index=PADDING,
                                           backend=self.kernels)
            rewards = ranking_reward(rank, self.reward).view(g, b).to(z.dtype)
            adv = group_advantages(rewards, self.advantage_eps)
        policy = grpo_policy_loss(step_logp, adv)
        kl = z.new_zeros(())
        if self.kl_weight > 0:
            with torch.no_grad():
                z_ref = self._reference.recur(seq, depth)[1][:, -1]
            if self.kl_kind == "k3":
                with torch.no_grad():
                    logp_ref = -self._reference._ce(z_ref, tgt, reduction="none")
                kl = k3_kl(step_logp[:, :, -1].reshape(-1), logp_ref).mean()
            else:
                kl = exact_kl(self.logits(z), self._reference.logits(z_ref)).mean()
        loss = policy + self.kl_weight * kl
        return loss, {"policy": policy.detach(), "kl": kl.detach(), "reward": rewards.mean(),
                      "logp": step_logp[:, :, -1].detach().mean()}

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Materialised ``[B, V+1]`` scores z E^T / tau with the padding item at -inf."""
        scores = z @ self.item_emb.T / self.temperature
        return scores.index_fill(-1, torch.tensor([PADDING], device=z.device), float("-inf"))

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of the current ``phase``: ``spt_loss`` or ``rpt_loss``."""
        item_seq = self.prepare(item_seq)
        target = check_target(target, item_seq.shape[0], self.num_items, item_seq.device)
        return self.spt_loss(item_seq, target) if self.phase == "spt" else self.rpt_loss(item_seq, target)
