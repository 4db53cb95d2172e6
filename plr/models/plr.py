"""Parallel Latent Reasoning (PLR, Tang et al.) on any backbone of plr.backbones.

Equation numbers are the PLR paper's:

* Eq. 3   h_{0,m} = h_0 + tau_m                      learnable trigger tokens
* Eq. 4-5 h_{t,m} = f(h_{t-1,m} + r_t | prefix KV, (1..t, m))
                                                    stream-isolated reasoning
* Eq. 6   z_m = mean_t h_{t,m}                       step pooling
* Eq. 7   L_KL = mean_{i != j} KL(p_i || p_j)        diversity of the K = T*M states
* Eq. 8   L_RCL                                      two dropout views, InfoNCE
* Eq. 9   g = softmax(W_g h_0 + b_g)                 mixture of reasoning streams
* Eq. 10  z_final = h_0 + z_rea                      dual-process inference
* Eq. 11  L = L_NIP + w_rcl L_RCL - lambda L_KL      training objective

The diversity term. Eq. 11 subtracts lambda * L_KL, and a KL divergence is
unbounded above: the model can lower the loss without limit by sharpening or
separating the streams' item distributions (scaling the states up), whatever
that does to L_NIP. ``kl_form="literal"`` keeps that paper-literal objective.
The default, ``kl_form="bounded"``, subtracts a saturating divergence per user,
``c * tanh(L_KL / c)`` with ``c = kl_margin`` nats: for L_KL << c it is the
literal term (same gradient), beyond c the reward for more diversity vanishes,
and the total loss is bounded below by ``-lambda * c`` (L_NIP, L_RCL >= 0).
``kl_temperature`` is Eq. 7's own softmax temperature (the equation as printed
has none, i.e. 1); the scoring temperature of L_NIP stays ``temperature``.

The readout. Eq. 11 trains L_NIP on z_rea alone, and Eq. 10 scores
z_final = h_0 + z_rea at inference: a vector no loss term ever scored. At a
short budget the two rank alike; trained to convergence they do not: on
Beauty's validation split two converged checkpoints of the tuning study score
NDCG@10 0.0436 / 0.0449 with z_final and 0.0466 / 0.0496 with z_rea, on
Steam-100k's the shipped defaults 0.0304 vs 0.0374 (benchmarks/RESULTS.md,
issue 11). The default therefore scores what training
scored: ``readout="rea"`` (with ``nip_readout="rea"``, Eq. 11 as printed).
``readout="final"`` is the paper-literal dual-process inference of Eq. 10;
``nip_readout="final"`` instead trains L_NIP on z_final, so that Eq. 10's
vector is the trained one.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn

import plr_kernels
from plr_kernels.reasoning_losses import reasoning_losses

from ..losses import grouped_contrastive_loss, reasoning_contrastive_loss
from ..transformer import PrefixEncoding
from ..validation import check_positive_int, check_probability, check_target
from .base import PADDING, ModelOutput, SequentialRecommender, position_major
from .reasoning import fused_reasoning, reasoning_step, rows_as_batch, step_prefix_cache

KL_OBJECTIVES = ("diversity", "consistency")
KL_FORMS = ("bounded", "literal")
READOUTS = ("final", "rea", "h0")
NIP_READOUTS = ("rea", "final")
RCL_VIEWS = ("full", "reasoning")
REG_ROWS = ("all", "batch")
MIXTURES = ("gate", "mean")


class PLRModel(SequentialRecommender):
    """A backbone encoder (SASRec by default) + M parallel latent reasoning streams of T steps.

    Args (beyond the backbone's ``max_len, hidden_size, num_layers, num_heads,
    inner_size, dropout, attn_dropout, layer_norm_eps, temperature, backend``):
        num_streams: M, reasoning streams (>= 1).
        num_steps: T, latent steps per stream (>= 1).
        kl_weight: lambda of Eq. 11.
        kl_objective: ``"diversity"`` subtracts the KL term (the paper's text;
            ReaRec-ERL), ``"consistency"`` adds lambda*L_KL (bounded below by 0).
        kl_form: for ``"diversity"``: ``"bounded"`` subtracts
            ``lambda * c * tanh(L_KL / c)`` per user (the default: the loss is
            bounded below), ``"literal"`` subtracts ``lambda * L_KL`` (Eq. 11 as
            printed; unbounded below, can run away). See the module docstring.
        kl_margin: c of the bounded form, in nats (> 0).
        kl_temperature: the softmax temperature of Eq. 7 (as printed: 1);
            ``None`` uses the scoring ``temperature``.
        kl_detach_target: stop the gradient through log p_j in Eq. 7 (ReaRec-ERL).
        rcl_weight: w_rcl of Eq. 11; 0 disables the second dropout view (and
            its cost). 1 (the paper's) by default. It acts as a regulariser:
            it kept the shipped d=256 model from overfitting on Steam-100k,
            while a tuned d=64 model scored higher without it on every
            dataset tried (benchmarks/RESULTS.md, issue 11); tune it in {0, 1}.
        rcl_temperature: the InfoNCE temperature of Eq. 8 on cosine similarities.
        rcl_view: how the second dropout view of Eq. 8 is drawn: ``"reasoning"``
            (the default) the first pass's prefix encoding (h_0 and KV cache)
            reused, dropout redrawn in the reasoning tokens only (no second
            encoder pass; the views differ in the reasoning, which is what Eq. 8
            regularises), ``"full"`` a second forward pass (encoder and
            reasoning). See benchmarks/RESULTS.md (issue 11's diagnosis).
        reasoning_dropout: dropout on each new reasoning input token (ReaRec: 0.2).
        readout: the vector inference scores with: ``"rea"`` = z_rea (the
            default: the vector L_NIP trains), ``"final"`` = h_0 + z_rea (Eq. 10,
            dual process; paper-literal), ``"h0"`` = h_0. See the module docstring.
        nip_readout: the vector L_NIP of Eq. 11 scores in training: ``"rea"``
            (the default, Eq. 11 as printed) z_rea, so h_0 is trained only
            through the reasoning streams; ``"final"`` z_final = h_0 + z_rea,
            the vector Eq. 10's inference (``readout="final"``) scores (as in
            ReaRec-ERL, whose pooled vector holds h_0 and is what it scores).
        reg_rows: the rows of a sequence-mode batch (``train.samples:
            sequence``; B sequences, R >= B prefix ends) that the regularisers
            L_KL (Eq. 7) and L_RCL (Eq. 8) are taken over: ``"all"`` every
            prefix end, ``"batch"`` (the default) B of them drawn uniformly without
            replacement each step -- as many as a prefix-mode batch of B samples
            regularises, an unbiased estimate of the mean over all rows at ~B/R
            of the cost (the K = T*M states' pass over the item table is most of
            a PLR step). L_NIP is over every row either way; prefix mode
            (R = B) is unaffected.
        mixture: how the streams are mixed into z_rea: ``"gate"`` the MoRS gate
            of Eq. 9, ``"mean"`` the uniform mean over the M streams (the
            paper's "w/o MoRS" ablation; the model then has no gate weights).
    """

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12,
                 num_streams: int = 2, num_steps: int = 2, temperature: float = 0.07,
                 kl_weight: float = 0.1, kl_objective: str = "diversity", kl_form: str = "bounded",
                 kl_margin: float = 1.0, kl_temperature: Optional[float] = None, kl_detach_target: bool = False,
                 rcl_weight: float = 1.0, rcl_temperature: float = 1.0, rcl_view: str = "reasoning",
                 reasoning_dropout: float = 0.2,
                 readout: str = "rea", nip_readout: str = "rea", reg_rows: str = "batch",
                 mixture: str = "gate", backend: str = "auto",
                 backbone: str = "sasrec", backbone_args: Optional[dict] = None):
        super().__init__(num_items, max_len, hidden_size, num_layers, num_heads, inner_size, dropout,
                         attn_dropout, layer_norm_eps, temperature, backend, backbone, backbone_args)
        self._config = dict(
            num_items=num_items, max_len=max_len, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, inner_size=inner_size, dropout=dropout, attn_dropout=attn_dropout,
            layer_norm_eps=layer_norm_eps, num_streams=num_streams, num_steps=num_steps,
            temperature=temperature, kl_weight=kl_weight, kl_objective=kl_objective, kl_form=kl_form,
            kl_margin=kl_margin, kl_temperature=kl_temperature, kl_detach_target=kl_detach_target,
            rcl_weight=rcl_weight, rcl_temperature=rcl_temperature, rcl_view=rcl_view,
            reasoning_dropout=reasoning_dropout,
            readout=readout, nip_readout=nip_readout, reg_rows=reg_rows, mixture=mixture, backend=backend,
            backbone=backbone,
            backbone_args=backbone_args,
        )
        self.num_streams = check_positive_int("num_streams", num_streams)
        self.num_steps = check_positive_int("num_steps", num_steps)
        for name, value in (("kl_weight", kl_weight), ("rcl_weight", rcl_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if kl_objective not in KL_OBJECTIVES:
            raise ValueError(f"kl_objective: expected one of {list(KL_OBJECTIVES)}, got {kl_objective!r}")
        if kl_form not in KL_FORMS:
            raise ValueError(f"kl_form: expected one of {list(KL_FORMS)}, got {kl_form!r}")
        if rcl_view not in RCL_VIEWS:
            raise ValueError(f"rcl_view: expected one of {list(RCL_VIEWS)}, got {rcl_view!r}")
        if reg_rows not in REG_ROWS:
            raise ValueError(f"reg_rows: expected one of {list(REG_ROWS)}, got {reg_rows!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout: expected one of {list(READOUTS)}, got {readout!r}")
        if nip_readout not in NIP_READOUTS:
            raise ValueError(f"nip_readout: expected one of {list(NIP_READOUTS)}, got {nip_readout!r}")
        if mixture not in MIXTURES:
            raise ValueError(f"mixture: expected one of {list(MIXTURES)}, got {mixture!r}")
        for name, value in (("kl_margin", kl_margin), ("rcl_temperature", rcl_temperature),
                            ("kl_temperature", temperature if kl_temperature is None else kl_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        self.kl_weight = float(kl_weight)
        self.kl_sign = -1.0 if kl_objective == "diversity" else 1.0
        self.kl_bounded = kl_objective == "diversity" and kl_form == "bounded"
        self.kl_margin = float(kl_margin)
        self.kl_temperature = float(temperature if kl_temperature is None else kl_temperature)
        self.kl_detach_target = bool(kl_detach_target)
        self.rcl_weight = float(rcl_weight)
        self.rcl_temperature = float(rcl_temperature)
        self.rcl_view = rcl_view
        self.readout = readout
        self.nip_readout = nip_readout
        self.reg_rows = reg_rows
        self.mixture = mixture

        # Eq. 3: one learnable trigger token tau_m per stream.
        self.trigger_tokens = nn.Parameter(torch.empty(num_streams, hidden_size))
        # r_t: reasoning position embedding of step t (shared by all streams).
        self.reasoning_position = nn.Embedding(num_steps, hidden_size)
        self.reasoning_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.reasoning_dropout = nn.Dropout(check_probability("reasoning_dropout", reasoning_dropout))
        # Eq. 9: the MoRS gate W_g, b_g (none with mixture="mean": no unused weights).
        self.gate = nn.Linear(hidden_size, num_streams) if mixture == "gate" else None
        self._init_weights()
        nn.init.normal_(self.trigger_tokens, mean=0.0, std=0.02)

    # -- reasoning -----------------------------------------------------------------

    def reasoning_input(self, h_prev: torch.Tensor, step: int) -> torch.Tensor:
        """The input token of step ``step`` (0-based) of every stream: ``h_{t-1,m} + r_t``,
        then LayerNorm and dropout as in ReaRec. ``h_prev [B,M,d]``."""
        return self.reasoning_dropout(self.reasoning_norm(h_prev + self.reasoning_position.weight[step]))

    def reason(self, prefix: PrefixEncoding, h0: Optional[torch.Tensor] = None, rows=None) -> torch.Tensor:
        """PLR Eq. 3-5 over the shared prefix KV cache -> the states ``h_{t,m}`` ``[B,T,M,d]``.

        ``h0`` defaults to ``prefix.hidden[:, -1]``; with ``rows = (b [R], n [R])``
        (sequence mode) ``h0 [R,d]`` are the h_0 of the R prefix ends and the
        result is ``[R,T,M,d]``. One step, ``reasoning_step``, is Eq. 4-5 (its
        docstring writes them out; plr/models/reasoning.py)."""
        h0 = prefix.hidden[:, -1] if h0 is None else h0
        h = h0[:, None, :] + self.trigger_tokens[None]  # Eq. 3: h_{0,m} = h_0 + tau_m   [B,M,d]
        if rows is None:  # inference on a CPU: all steps in one fused call (plr/models/reasoning.py)
            fused = fused_reasoning(self, prefix, h, self.reasoning_position.weight, self.reasoning_norm)
            if fused is not None:
                return fused
        keys, values = (prefix.keys, prefix.values) if rows is not None else \
            step_prefix_cache(prefix, self.num_steps, self.backend)
        key_mask = prefix.key_mask
        packed = None if rows is None else rows_as_batch(prefix, rows, self.num_streams)
        if packed is not None:  # the R prefix ends as a batch of their own (plr/models/reasoning.py)
            (keys, values, key_mask), rows = packed, None
        caches = [None] * len(self.backbone.layers)  # each stream's own keys/values, per layer
        states = []
        for t in range(self.num_steps):
            x = self.reasoning_input(h, t)  # the step's input token: h_{t-1,m} + r_t (LN, dropout)
            # Eq. 4-5: stream-isolated attention to the prefix and the stream's own tokens, all L layers.
            h = reasoning_step(self.backbone.layers, x, keys, values, key_mask, caches, self.backend, rows)
            states.append(h)
        return torch.stack(states, dim=1)

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        return self._reason_last(self.backbone.encode(item_seq))

    def _reason_last(self, prefix) -> ModelOutput:
        return self._aggregate(prefix.hidden[:, -1], self.reason(prefix))

    def forward_rows(self, item_seq: torch.Tensor, rows) -> ModelOutput:
        """Sequence mode: the ModelOutput of the R prefixes ``0..n_r`` of
        sequences ``b_r`` (``rows = (b [R], n [R])``) from one encoder pass over
        ``item_seq [B, max_len]``; each row equals ``forward_prepared`` of that
        prefix alone (causal backbone, start-anchored positions)."""
        return self._reason_rows(self.backbone.encode(item_seq), rows)

    def _reason_rows(self, prefix, rows) -> ModelOutput:
        h0 = prefix.hidden[rows]  # [R,d]: h_0 of every prefix
        return self._aggregate(h0, self.reason(prefix, h0, rows))

    def _aggregate(self, h0: torch.Tensor, states: torch.Tensor) -> ModelOutput:
        """Eq. 6, 9, 10 from ``h0 [R,d]`` and the states ``[R,T,M,d]``."""
        z_streams = states.mean(dim=1)  # Eq. 6: z_m = mean_t h_{t,m}   [R,M,d]
        if self.gate is not None:
            gate = torch.softmax(self.gate(h0), dim=-1)  # Eq. 9         [R,M]
        else:  # mixture="mean" (w/o MoRS): uniform weights 1/M instead of Eq. 9
            gate = h0.new_full((h0.shape[0], self.num_streams), 1.0 / self.num_streams)
        z_rea = (gate[..., None] * z_streams).sum(dim=1)
        z_final = h0 + z_rea  # Eq. 10: dual-process inference
        return ModelOutput(h0=h0, z_final=z_final, states=states, gate=gate, z_rea=z_rea)

    def inference_vector(self, out: ModelOutput) -> torch.Tensor:
        """What ``readout`` scores at inference: z_final (Eq. 10), z_rea or h_0."""
        return {"final": out.z_final, "rea": out.z_rea, "h0": out.h0}[self.readout]

    # -- training ------------------------------------------------------------------

    def compute_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                     ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 11 for a batch of (history, next item) samples.

        ``item_seq [B, L]``, ``target [B]`` ids in ``[1, num_items]`` ->
        ``(loss, {"nip", "kl", "rcl"})`` (the parts detached). L_NIP scores
        ``z_rea`` (``nip_readout: rea``, Eq. 11) or ``z_final`` (``final``); the
        padding item is in no softmax.
        """
        item_seq = self.prepare(item_seq)
        prefix = self.backbone.encode(item_seq)
        out = self._reason_last(prefix)
        target = check_target(target, out.h0.shape[0], self.num_items, out.h0.device)
        if self.rcl_view == "reasoning":  # Eq. 8's second view: reasoning dropout redrawn
            return self._loss(out, target, lambda: self._reason_last(prefix).states)
        return self._loss(out, target, lambda: self.forward_prepared(item_seq).states)

    def sequence_loss(self, item_seq, rows, target):
        """Eq. 11 over every prefix end ``rows`` of one encoder pass (see
        ``compute_sequence_loss``): L_NIP and L_KL per row, meaned over the R
        rows. L_RCL (Eq. 8) is the in-batch InfoNCE over the rows, in groups of
        B rows (B = sequences in the batch; ``plr.losses.grouped_contrastive_loss``):
        rows ordered by position, then sequence, so a group holds prefixes of
        different sequences and costs what a prefix batch of B samples does. With
        R <= B it equals prefix mode on a batch made of exactly these R prefix
        samples; the second view is a second pass over the sequences."""
        prefix = self.backbone.encode(item_seq)
        out = self._reason_rows(prefix, rows)
        batch, pick, reg = item_seq.shape[0], None, rows
        if self.reg_rows == "batch" and rows[0].shape[0] > batch:
            # B of the R rows, uniformly without replacement, for L_KL and L_RCL.
            pick = torch.randperm(rows[0].shape[0], device=rows[0].device)[:batch]
            reg = (rows[0][pick], rows[1][pick])
        second_view = (lambda: self._reason_rows(prefix, reg).states) if self.rcl_view == "reasoning" else \
            (lambda: self.forward_rows(item_seq, reg).states)
        return self._loss(out, target, second_view, rcl_groups=(position_major(reg), batch), pick=pick)

    def _kl_and_nip(self, states: torch.Tensor, z_rea: torch.Tensor, target: torch.Tensor,
                    pick: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(nip + kl term, nip, kl)``, means over the rows: Eq. 7 over the K = T*M
        states of each row (of the rows ``pick`` only, if given) and L_NIP of
        ``z_rea`` over every row; with ``pick`` None from one pass over the item
        table (plr_kernels.reasoning_losses)."""
        if not (self.kl_weight > 0 and self.num_steps * self.num_streams >= 2):
            nip = self._nip(z_rea, target)
            return nip, nip, torch.zeros((), dtype=nip.dtype, device=nip.device)
        # The pass scores every row at ``temperature``; feeding the states scaled
        # by temperature / kl_temperature gives Eq. 7 at kl_temperature exactly.
        states = states.flatten(1, 2)
        if self.kl_temperature != self.temperature:
            states = states * (self.temperature / self.kl_temperature)
        if pick is None:
            kl, nip = reasoning_losses(
                states, z_rea, self.item_emb, target, temperature=self.temperature,
                exclude_index=PADDING, detach_target=self.kl_detach_target, backend=self.backend,
            )
            nip = nip.mean()
        else:
            nip = self._nip(z_rea, target)
            kl = plr_kernels.multi_pair_kl(states[pick], self.item_emb, temperature=self.temperature,
                                           exclude_index=PADDING, detach_target=self.kl_detach_target,
                                           backend=self.backend)
        # The diversity term, per user: c tanh(KL / c) (bounded) or KL (literal).
        term = self.kl_margin * torch.tanh(kl / self.kl_margin) if self.kl_bounded else kl
        return nip + self.kl_sign * self.kl_weight * term.mean(), nip, kl.mean()

    def _nip(self, z_rea: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L_NIP of Eq. 11: the mean cross-entropy of ``z_rea`` over the item table."""
        return plr_kernels.linear_cross_entropy(z_rea, self.item_emb, target, temperature=self.temperature,
                                                exclude_index=PADDING, backend=self.backend)

    def _loss(self, out: ModelOutput, target: torch.Tensor, second_view: Callable[[], torch.Tensor],
              rcl_groups=None, pick: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Eq. 11 from the output of one pass; ``second_view()`` runs the second
        dropout view of the states (of the rows ``pick``, if given) for L_RCL;
        ``rcl_groups = (order, size)`` takes its negatives within groups of rows
        (sequence mode); ``pick`` selects the rows of L_KL and L_RCL."""
        z_nip = out.z_final if self.nip_readout == "final" else out.z_rea
        loss, nip, kl = self._kl_and_nip(out.states, z_nip, target, pick)
        states = out.states if pick is None else out.states[pick]
        rcl = torch.zeros((), dtype=nip.dtype, device=nip.device)
        if self.rcl_weight > 0 and self.training:
            # Eq. 8: a second pass draws independent dropout masks.
            if rcl_groups is None:
                rcl = reasoning_contrastive_loss(states, second_view(), temperature=self.rcl_temperature)
            else:
                rcl = grouped_contrastive_loss(states, second_view(), *rcl_groups,
                                               temperature=self.rcl_temperature)
            loss = loss + self.rcl_weight * rcl
        return loss, {"nip": nip.detach(), "kl": kl.detach(), "rcl": rcl.detach()}
