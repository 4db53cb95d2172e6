"""ReaRec (Tang et al. 2025, "Think before Recommend: Unleashing the Latent
Reasoning Power for Sequential Recommendation"): ERL and PRL on any backbone.

ReaRec feeds the last hidden state back into the encoder as a new input
token and re-encodes autoregressively for K reasoning steps (one stream):

    h_0     = H_enc[last]                                  encoder output
    x_k     = Dropout(LN(h_{k-1} + r_k))                   reasoning input, k = 1..K
    h_k     = f(x_k | items, x_1..x_k)                      all L layers, causal

This is :func:`plr.models.reasoning.stream_reasoning` with one stream (M = 1):
the prefix KV cache replaces re-encoding the extended sequence, same result.
The "step outputs" are ``o_0 = h_0, o_1 = h_1, ..., o_K = h_K`` (K + 1 vectors,
h_0 included, as the public code reads the last K + 1 positions of the
extended sequence). Scores are ``o E^T / tau`` on the tied item table, the
padding item excluded.

ERL (Ensemble Reasoning Learning)
    z   = 1/(K+1) sum_{k=0..K} o_k                         multi-step pooling
    L   = CE(z) - lambda * L_KL,  L_KL = mean_{i != j} KL(p_i || sg(p_j))
    (p_k = softmax(o_k E^T / tau); the diversity regulariser is *subtracted*
    and its target side log p_j carries no gradient). Inference scores with z.

PRL (Progressive Reasoning Learning)
    tau_k = tau * alpha^(K-k)                               progressive temperature
    L     = CE(o_K; tau) + w_pl * 1/K sum_{k<K} CE(o_k; tau_k) + w_cl * L_RCL
                                                            (annealing: early steps
                                                            softer, the last at tau)
    L_RCL: a second reasoning pass whose input tokens get Gaussian noise
    x~_k = x_k + gamma * eps; symmetric in-batch InfoNCE (cosine, temperature
    ``rcl_temperature``) between the clean h_k and the noisy h~_k, k = 1..K.
    Inference scores with the final step o_K.

Two crash bugs of the public code are avoided by construction: ERL has no
noise state at all (the public ERL reads an undefined noise attribute after
warm-up), and PRL with ``noise_std == 0`` does not run the noisy pass and its
contrastive term is exactly 0 (the public PRL leaves it undefined). Nothing
depends on the epoch.

As in the public ReaRec code: h_0 is one of the pooled / supervised step
outputs in both variants (the code reads the last K + 1 positions of the
extended sequence); ERL's ``kl_weight=0.05``; PRL's final-step CE plus
``pl_weight`` (1.0) times the mean CE of the earlier steps, ``alpha = 5``
(its ``temp_scale``), noise 0.01 and contrastive weight 1.0. Ours: the noise is
added after the reasoning LayerNorm, only to the extra noisy pass (the clean
pass, scored by the CE, is noise-free), from the first epoch (the public code
waits 2 warm-up epochs); the contrastive term is the symmetric cosine InfoNCE
of plr.losses with temperature 1 (the public code: one direction, dot
products / 0.07). The equations are written out, not cited by number.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import plr_kernels
from plr_kernels.reasoning_losses import reasoning_losses

from ..losses import grouped_contrastive_loss, reasoning_contrastive_loss
from ..validation import check_positive_int, check_probability, check_target
from .base import PADDING, ModelOutput, SequentialRecommender, position_major
from .reasoning import fused_reasoning, stream_reasoning, stream_reasoning_rows


def _check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> float:
    """A real number ``>= minimum`` (``> minimum`` if ``strict``); error names the argument."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if bad or (value <= minimum if strict else value < minimum) or value != value:
        op = ">" if strict else ">="
        raise ValueError(f"{name}: expected a number {op} {minimum:g}, got {value!r}")
    return float(value)


class _ReaRecBase(SequentialRecommender):
    """The backbone + ReaRec's single-stream autoregressive reasoning.

    Uses only the backbone interface of :mod:`plr.backbones` (``encode``,
    ``layers``, ``item_table``), so it runs on any registered backbone.
    """

    def __init__(self, num_items: int, max_len: int, hidden_size: int, num_layers: int, num_heads: int,
                 inner_size: int, dropout: float, attn_dropout: Optional[float], layer_norm_eps: float,
                 num_steps: int, temperature: float, reasoning_dropout: float, backend: str, backbone: str,
                 backbone_args: Optional[dict]):
        super().__init__(num_items, max_len, hidden_size, num_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps, temperature, backend, backbone, backbone_args)
        self.num_steps = check_positive_int("num_steps", num_steps)
        # r_k: reasoning position embedding of step k (ReaRec's "reasoning PE").
        self.reasoning_position = nn.Embedding(num_steps, hidden_size)
        self.reasoning_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.reasoning_dropout = nn.Dropout(check_probability("reasoning_dropout", reasoning_dropout))

    def reasoning_input(self, h_prev: torch.Tensor, step: int, noise_std: float = 0.0) -> torch.Tensor:
        """Input token of step ``step`` (0-based): ``x = Dropout(LN(h_{k-1} + r_k))``.

        With ``noise_std > 0`` and in training only, PRL's noisy view
        ``x + noise_std * eps``, ``eps ~ N(0, I)`` (added after the LayerNorm,
        so ``noise_std`` is relative to unit-scale features). ``h_prev [B,1,d]``.
        """
        x = self.reasoning_dropout(self.reasoning_norm(h_prev + self.reasoning_position.weight[step]))
        if noise_std > 0 and self.training:
            x = x + noise_std * torch.randn_like(x)
        return x

    def reason(self, prefix, noise_std: float = 0.0) -> torch.Tensor:
        """K steps from ``h_0`` over the prefix KV cache -> ``h_1..h_K`` as ``[B,K,1,d]``."""
        h_start = prefix.hidden[:, -1:, :]  # [B,1,d]: one stream, starting at h_0
        fused = fused_reasoning(self, prefix, h_start, self.reasoning_position.weight, self.reasoning_norm)
        if fused is not None:  # inference on a CPU: all steps in one call (noise and dropout are training-only)
            return fused
        return stream_reasoning(self.backbone.layers, prefix, h_start, self.num_steps,
                                lambda h, step: self.reasoning_input(h, step, noise_std), self.backend)

    def reason_rows(self, prefix, rows, noise_std: float = 0.0) -> torch.Tensor:
        """Sequence mode: ``reason`` for the R prefix ends ``rows`` of one pass -> ``[R,K,1,d]``."""
        h_start = prefix.hidden[rows][:, None, :]  # [R,1,d]
        return stream_reasoning_rows(self.backbone.layers, prefix, rows, h_start, self.num_steps,
                                     lambda h, step: self.reasoning_input(h, step, noise_std), self.backend)

    @staticmethod
    def step_outputs(h0: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """``o_0..o_K`` = ``[h_0, h_1, ..., h_K]`` as ``[B, K+1, d]``."""
        return torch.cat([h0[:, None, :], states[:, :, 0]], dim=1)


class ReaRecERLModel(_ReaRecBase):
    """ReaRec-ERL: mean of the K + 1 step outputs, diversity KL subtracted.

    Args (beyond the backbone's ``max_len, hidden_size, num_layers, num_heads,
    inner_size, dropout, attn_dropout, layer_norm_eps, temperature, backend``):
        num_steps: K reasoning steps (ReaRec's sweet spot: 2).
        kl_weight: lambda of the multi-step diversity regulariser (>= 0).
        kl_detach_target: stop the gradient through log p_j (the public code does).
        reasoning_dropout: dropout on each reasoning input token.
    """

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12, num_steps: int = 2,
                 temperature: float = 0.07, kl_weight: float = 0.05, kl_detach_target: bool = True,
                 reasoning_dropout: float = 0.2, backend: str = "auto", backbone: str = "sasrec",
                 backbone_args: Optional[dict] = None):
        super().__init__(num_items, max_len, hidden_size, num_layers, num_heads, inner_size, dropout, attn_dropout,
                         layer_norm_eps, num_steps, temperature, reasoning_dropout, backend, backbone, backbone_args)
        self._config = dict(
            num_items=num_items, max_len=max_len, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, inner_size=inner_size, dropout=dropout, attn_dropout=attn_dropout,
            layer_norm_eps=layer_norm_eps, num_steps=num_steps, temperature=temperature, kl_weight=kl_weight,
            kl_detach_target=kl_detach_target, reasoning_dropout=reasoning_dropout, backend=backend,
            backbone=backbone, backbone_args=backbone_args,
        )
        self.kl_weight = _check_number("kl_weight", kl_weight)
        if not isinstance(kl_detach_target, bool):
            raise ValueError(f"kl_detach_target: expected true or false, got {kl_detach_target!r}")
        self.kl_detach_target = kl_detach_target
        self._init_weights()

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        prefix = self.backbone.encode(item_seq)
        h0 = prefix.hidden[:, -1]
        states = self.reason(prefix)  # [B,K,1,d]
        z = self.step_outputs(h0, states).mean(dim=1)  # ensemble: mean of o_0..o_K
        return ModelOutput(h0=h0, z_final=z, states=states, z_rea=z)

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``CE(z) - lambda * L_KL`` -> ``(loss, {"nip", "kl"})`` (parts detached)."""
        item_seq = self.prepare(item_seq)
        out = self.forward_prepared(item_seq)
        target = check_target(target, out.h0.shape[0], self.num_items, out.h0.device)
        return self._loss(out, target)

    def sequence_loss(self, item_seq, rows, target):
        """The ERL loss of every prefix end ``rows`` of one encoder pass, meaned over the rows."""
        prefix = self.backbone.encode(item_seq)
        h0 = prefix.hidden[rows]
        states = self.reason_rows(prefix, rows)  # [R,K,1,d]
        z = self.step_outputs(h0, states).mean(dim=1)
        return self._loss(ModelOutput(h0=h0, z_final=z, states=states, z_rea=z), target)

    def _loss(self, out: ModelOutput, target: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        if self.kl_weight > 0:
            # KL over the K+1 step distributions and CE of their mean from one pass over E.
            kl, nip = reasoning_losses(
                self.step_outputs(out.h0, out.states), out.z_final, self.item_emb, target,
                temperature=self.temperature, exclude_index=PADDING, detach_target=self.kl_detach_target,
                backend=self.backend,
            )
            kl, nip = kl.mean(), nip.mean()
            loss = nip - self.kl_weight * kl  # diversity: subtracted
        else:
            nip = plr_kernels.linear_cross_entropy(out.z_final, self.item_emb, target, temperature=self.temperature,
                                                   exclude_index=PADDING, backend=self.backend)
            kl = torch.zeros((), dtype=nip.dtype, device=nip.device)
            loss = nip
        return loss, {"nip": nip.detach(), "kl": kl.detach()}


class ReaRecPRLModel(_ReaRecBase):
    """ReaRec-PRL: final step at inference, per-step CE with progressive
    temperature annealing, reasoning-aware contrastive learning.

    Args (beyond the backbone's):
        num_steps: K reasoning steps (ReaRec's sweet spot: 2).
        temperature_decay: alpha of ``tau_k = tau * alpha^(K-k)`` (> 0; > 1
            anneals: the final step gets ``tau``, earlier steps softer).
        pl_weight: weight of the earlier steps' mean CE (progressive learning).
        noise_std: gamma, std of the Gaussian noise on the reasoning input
            tokens of the noisy view (>= 0; 0 disables the contrastive term).
        rcl_weight: weight of the contrastive term (>= 0; 0 disables it).
        rcl_temperature: temperature of its InfoNCE on cosine similarity.
        reasoning_dropout: dropout on each reasoning input token.
    """

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12, num_steps: int = 2,
                 temperature: float = 0.07, temperature_decay: float = 5.0, pl_weight: float = 1.0,
                 noise_std: float = 0.01, rcl_weight: float = 1.0, rcl_temperature: float = 1.0,
                 reasoning_dropout: float = 0.2,
                 backend: str = "auto", backbone: str = "sasrec", backbone_args: Optional[dict] = None):
        super().__init__(num_items, max_len, hidden_size, num_layers, num_heads, inner_size, dropout, attn_dropout,
                         layer_norm_eps, num_steps, temperature, reasoning_dropout, backend, backbone, backbone_args)
        self._config = dict(
            num_items=num_items, max_len=max_len, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, inner_size=inner_size, dropout=dropout, attn_dropout=attn_dropout,
            layer_norm_eps=layer_norm_eps, num_steps=num_steps, temperature=temperature,
            temperature_decay=temperature_decay, pl_weight=pl_weight, noise_std=noise_std, rcl_weight=rcl_weight,
            rcl_temperature=rcl_temperature, reasoning_dropout=reasoning_dropout, backend=backend,
            backbone=backbone, backbone_args=backbone_args,
        )
        self.temperature_decay = _check_number("temperature_decay", temperature_decay, strict=True)
        self.pl_weight = _check_number("pl_weight", pl_weight)
        self.noise_std = _check_number("noise_std", noise_std)
        self.rcl_weight = _check_number("rcl_weight", rcl_weight)
        self.rcl_temperature = _check_number("rcl_temperature", rcl_temperature, strict=True)
        self._init_weights()

    def step_temperatures(self) -> List[float]:
        """``[tau_0, ..., tau_K]`` with ``tau_k = tau * alpha^(K-k)``: the last step gets tau."""
        k_total = self.num_steps
        return [self.temperature * self.temperature_decay ** (k_total - k) for k in range(k_total + 1)]

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        prefix = self.backbone.encode(item_seq)
        h0 = prefix.hidden[:, -1]
        states = self.reason(prefix)  # [B,K,1,d], clean (no noise)
        z = states[:, -1, 0]  # inference: the final step h_K
        return ModelOutput(h0=h0, z_final=z, states=states, z_rea=z)

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``CE(o_K; tau) + w_pl mean_{k<K} CE(o_k; tau_k) + w_cl L_RCL`` -> ``(loss, {"nip", "pl", "rcl"})``."""
        item_seq = self.prepare(item_seq)
        prefix = self.backbone.encode(item_seq)
        h0 = prefix.hidden[:, -1]
        target = check_target(target, h0.shape[0], self.num_items, h0.device)
        return self._loss(h0, self.reason(prefix), target, lambda: self.reason(prefix, self.noise_std))

    def sequence_loss(self, item_seq, rows, target):
        """The PRL loss of every prefix end ``rows`` of one encoder pass, meaned
        over the rows; the contrastive term takes its in-batch negatives within
        groups of B rows ordered by position, then sequence
        (``plr.losses.grouped_contrastive_loss``, as PLR's L_RCL). With R <= B it is
        prefix mode on a batch of exactly these R prefixes (with the same generator
        state the noise is the same, row r drawing what sample r does)."""
        prefix = self.backbone.encode(item_seq)
        return self._loss(prefix.hidden[rows], self.reason_rows(prefix, rows), target,
                          lambda: self.reason_rows(prefix, rows, self.noise_std),
                          rcl_groups=(position_major(rows), item_seq.shape[0]))

    def _loss(self, h0, states, target, noisy_view: Callable[[], torch.Tensor], rcl_groups=None
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        outputs = self.step_outputs(h0, states)  # [B,K+1,d]
        # Progressive temperature annealing: CE of step k at tau_k; the final step
        # at tau is the prediction, the earlier ones the progressive-learning term.
        ces = [plr_kernels.linear_cross_entropy(outputs[:, k], self.item_emb, target, temperature=tau_k,
                                                exclude_index=PADDING, backend=self.backend)
               for k, tau_k in enumerate(self.step_temperatures())]
        nip, pl = ces[-1], sum(ces[:-1]) / self.num_steps
        loss = nip + self.pl_weight * pl
        rcl = torch.zeros((), dtype=nip.dtype, device=nip.device)
        if self.training and self.noise_std > 0 and self.rcl_weight > 0:
            # Reasoning-aware contrastive learning: the noisy view re-runs only the
            # reasoning steps over the same prefix cache; InfoNCE clean vs noisy h_k.
            if rcl_groups is None:
                rcl = reasoning_contrastive_loss(states, noisy_view(), temperature=self.rcl_temperature)
            else:
                rcl = grouped_contrastive_loss(states, noisy_view(), *rcl_groups, temperature=self.rcl_temperature)
            loss = loss + self.rcl_weight * rcl
        return loss, {"nip": nip.detach(), "pl": pl.detach(), "rcl": rcl.detach()}
