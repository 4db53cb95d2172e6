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
  The KL is to the frozen SPT model (same depth) at the final step, run on the
  rollouts' own s_0 draws and dropout masks (``kl_reference: same_noise``; so
  KL(p_theta || p_SPT) = 0 while the weights are the SPT model's) or in eval
  mode (``eval``: fixed s_0, no dropout; then it is not 0 at RPT's start):
  ``k3`` (default) is Schulman's k3 estimator at the target item, as GRPO does
  at the sampled token (cheap: no [rows x items] matrix); ``exact`` is the full
  KL of the next-item distributions (materialises [G*B, items] logits).
* inference: s_0 is one fixed truncated-normal draw (``init_seed``), so scores
  are deterministic and ``plr evaluate`` reproduces a run's metrics.

Where the code is: the architecture here; the objectives (TLA, SLA, reward,
advantages, KLs) in plr/models/lares_objectives.py; the two phases' losses in
plr/models/lares_phases.py; TLA partner sampling in plr/data/partners.py; the
run logic (SPT then RPT, one run directory per phase) in plr/lares_training.py.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

import plr_kernels

from ..data.partners import SameTargetPartners
from ..transformer import TransformerBlock, causal_mask
from ..validation import check_positive_int, check_target
from . import lares_phases
from .base import PADDING, ModelOutput, SequentialRecommender
from .lares_objectives import REWARDS

ADAPTERS = ("add", "concat", "gate")
PHASES = ("spt", "rpt")
KL_KINDS = ("k3", "exact")
KL_REFERENCES = ("same_noise", "eval")


# -- the recurrence's random quantities (tests compare them with hand computations) ----


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
        kl_reference: how the frozen SPT model is run for the KL: ``same_noise`` (the
            default) on the rollouts' own s_0 draws and dropout masks, so the KL is 0 at
            RPT's start; ``eval`` in eval mode (fixed s_0, no dropout; this package's rule
            until 2026-12-07: a KL of 6-13 nats from the first step on Beauty).
    """

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_pre_layers: int = 1,
                 num_core_layers: int = 1, num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12, temperature: float = 0.07,
                 adapter: str = "concat", init_std: float = 1.0, init_truncation: float = 2.0, init_seed: int = 0,
                 mean_depth: float = 4.0, depth_std: float = 0.5, max_depth: int = 8, eval_depth: int = 4,
                 backprop_steps: Optional[int] = None, final_norm: bool = True, phase: str = "spt",
                 tla_weight: float = 0.1, sla_weight: float = 0.1, cl_temperature: float = 1.0,
                 tla_positives: str = "sampled", group_size: int = 4, reward: str = "ndcg@10",
                 kl_weight: float = 0.1, kl_kind: str = "k3", kl_reference: str = "same_noise",
                 advantage_eps: float = 1e-6, rpt_depth: Optional[int] = None, backend: str = "auto",
                 backbone: str = "sasrec", backbone_args: Optional[dict] = None):
        super().__init__(num_items, max_len, hidden_size, num_pre_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps, temperature, backend, backbone, backbone_args)
        self._config = dict(
            num_items=num_items, max_len=max_len, hidden_size=hidden_size, num_pre_layers=num_pre_layers,
            num_core_layers=num_core_layers, num_heads=num_heads, inner_size=inner_size, dropout=dropout,
            attn_dropout=attn_dropout, layer_norm_eps=layer_norm_eps, temperature=temperature, adapter=adapter,
            init_std=init_std, init_truncation=init_truncation, init_seed=init_seed, mean_depth=mean_depth,
            depth_std=depth_std, max_depth=max_depth, eval_depth=eval_depth, backprop_steps=backprop_steps,
            final_norm=final_norm, phase=phase, tla_weight=tla_weight, sla_weight=sla_weight,
            cl_temperature=cl_temperature, tla_positives=tla_positives, group_size=group_size, reward=reward,
            kl_weight=kl_weight, kl_kind=kl_kind, kl_reference=kl_reference, advantage_eps=advantage_eps,
            rpt_depth=rpt_depth, backend=backend, backbone=backbone, backbone_args=backbone_args,
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
                                     ("kl_reference", kl_reference, KL_REFERENCES),
                                     ("tla_positives", tla_positives, ("sampled", "batch"))):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")
        self.adapter_kind, self.phase, self.reward, self.kl_kind = adapter, phase, reward, kl_kind
        self.kl_reference = kl_reference
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
        # The frozen SPT model of the RPT phase (its KL reference; not a submodule: ``start_rpt``).
        self.spt_reference: Optional["LARESModel"] = None
        self.partners: Optional[SameTargetPartners] = None  # TLA positives (``attach_training_data``)

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
        self.partners = SameTargetPartners(samples, self.num_items)

    def draw_partners(self, item_seq: torch.Tensor, target: torch.Tensor):
        """For each row, a training sequence with the same target that differs from the row's
        own history (None if no target has another sequence). -> (seqs, targets) or None."""
        return self.partners.draw(item_seq, target)

    def cross_entropy(self, z: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Full-softmax next-item cross-entropy of ``z [N,d]`` at ``temperature`` (padding excluded)."""
        return plr_kernels.linear_cross_entropy(z, self.item_emb, target, temperature=self.temperature,
                                                exclude_index=PADDING, reduction=reduction, backend=self.backend)

    def spt_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """CE at the final step + w_tla L_TLA + w_sla L_SLA (plr/models/lares_phases.py)."""
        return lares_phases.spt_loss(self, item_seq, target)

    def start_rpt(self, spt_model: "LARESModel") -> None:
        """Start RPT from ``spt_model``: copy its weights and keep a frozen copy as the KL reference."""
        frozen = lares_phases.frozen_spt_model(self, spt_model)
        self.load_state_dict(spt_model.state_dict())
        object.__setattr__(self, "spt_reference", frozen)  # not a submodule: outside state_dict and parameters

    def rpt_loss(self, item_seq: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """GRPO with a KL to the frozen SPT model (plr/models/lares_phases.py)."""
        return lares_phases.rpt_loss(self, item_seq, target)

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
