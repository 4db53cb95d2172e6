"""What every sequential recommender of plr shares: a backbone (plr.backbones),
input checks, scoring against the tied item table, top-K, checkpoints."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import plr_kernels

from ..deprecations import upgrade_config, upgrade_model_args
from ..registry import backbone_class, model_class_named
from ..validation import check_item_seq, check_positive_int, check_probability, check_sequence_target

PADDING = 0
# v2: the SASRec backbone counts positions from the first real item; a v1
# checkpoint (positions over the left-padded array) loads with positions="end".
CHECKPOINT_FORMAT = "plr-checkpoint-v2"
LEGACY_FORMATS = ("plr-checkpoint-v1",)


@dataclass
class ModelOutput:
    h0: torch.Tensor  # [B,d] encoder output at the last item
    z_final: torch.Tensor  # [B,d] the vector inference scores with
    states: Optional[torch.Tensor] = None  # [B,T,M,d] reasoning states h_{t,m}
    gate: Optional[torch.Tensor] = None  # [B,M] MoRS weights (PLR Eq. 9)
    z_rea: Optional[torch.Tensor] = None  # [B,d] the vector training scores with


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``forward_prepared`` and ``compute_loss``."""

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12,
                 temperature: float = 0.07, backend: str = "auto", backbone: str = "sasrec",
                 backbone_args: Optional[Dict[str, Any]] = None):
        super().__init__()
        check_positive_int("num_items", num_items)
        check_positive_int("max_len", max_len)
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_heads", num_heads)
        check_positive_int("inner_size", inner_size)
        check_probability("dropout", dropout)
        attn_dropout = dropout if attn_dropout is None else check_probability("attn_dropout", attn_dropout)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        if backend not in plr_kernels.BACKENDS:
            raise ValueError(f"backend: expected one of {list(plr_kernels.BACKENDS)}, got {backend!r}")
        self.num_items = num_items
        self.max_len = max_len
        self.temperature = float(temperature)
        self.backend = backend
        if backbone_args is not None and not isinstance(backbone_args, dict):
            raise TypeError(f"backbone_args: expected a dict or None, got {type(backbone_args).__name__}")
        self.backbone_name = backbone
        self.backbone = backbone_class(backbone)(num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
                                                 dropout, attn_dropout, layer_norm_eps, **(backbone_args or {}))

    # -- configuration and weights -------------------------------------------------

    def _legacy_positions(self) -> None:
        """A plr-checkpoint-v1 model: its SASRec backbone counted positions over
        the left-padded array; keep that (and in its config, for a re-save)."""
        from ..backbones.sasrec import SASRecBackbone

        if type(self.backbone) is SASRecBackbone:
            self.backbone.positions = "end"
            self.backbone.causal_sequences = False
            self._config["backbone_args"] = {**(self._config.get("backbone_args") or {}), "positions": "end"}

    def _init_weights(self) -> None:
        """N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorm."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.backbone.reset_padding()

    @property
    def device(self) -> torch.device:
        """Where the weights live (without computing ``item_emb``, which a text
        backbone derives from item text on every call)."""
        return next(self.parameters()).device

    @property
    def item_emb(self) -> torch.Tensor:
        """The tied item table ``E [num_items + 1, d]`` (row 0 = padding)."""
        return self.backbone.item_table()

    # -- inference -----------------------------------------------------------------

    def prepare(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Check histories and left-pad them to ``max_len``."""
        return check_item_seq(item_seq, self.num_items, self.max_len).to(self.device)

    def forward(self, item_seq: torch.Tensor) -> ModelOutput:
        """``item_seq [B, L]`` left-padded ids (L <= max_len) -> ModelOutput."""
        return self.forward_prepared(self.prepare(item_seq))

    def forward_prepared(self, item_seq: torch.Tensor) -> ModelOutput:
        """``forward`` on histories already checked and padded by ``prepare``
        (no input checks, so no host syncs: for training and evaluation loops)."""
        raise NotImplementedError

    def inference_vector(self, out: ModelOutput) -> torch.Tensor:
        """The ``[B,d]`` vector that ranking and top-K score (``z_final``; PLR
        overrides it with its ``readout`` option)."""
        return out.z_final

    @torch.no_grad()
    def recommend(self, item_seq: torch.Tensor, k: int = 10, exclude_history=False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items for each history, scored with ``inference_vector`` (``z_final``) in eval mode.

        ``item_seq [B, L]`` left-padded ids -> ``(scores [B,k], item ids [B,k])``.
        The padding item is never recommended; with ``exclude_history`` neither
        is any item of the history (a bool for all rows, or a ``[B]`` bool
        tensor choosing per row). A row left with fewer than ``k`` candidates
        ends in ``(-inf, -1)`` entries.

        A model in training mode is switched to eval for the call and back
        after it; one in eval mode (``model.eval()`` sets every submodule) is
        left as it is, which saves two walks over the module tree per call
        (~0.1 ms, 5% of a batch-1 call at the default size).
        """
        was_training = self.training
        if was_training:
            self.eval()
        try:
            item_seq = self.prepare(item_seq)
            exclude = _history_exclusion(item_seq, exclude_history)
            z = self.inference_vector(self.forward_prepared(item_seq))
            return plr_kernels.topk(
                z, self.item_emb, k, exclude_index=PADDING, exclude_items=exclude, backend=self.backend,
            )
        finally:
            if was_training:
                self.train()

    # -- sequence training mode ------------------------------------------------------

    def supports_sequences(self) -> bool:
        """Whether ``compute_sequence_loss`` is exact here: the model implements
        ``sequence_loss`` and its backbone is causal with start-anchored
        positions (``backbone.causal_sequences``)."""
        return (type(self).sequence_loss is not SequentialRecommender.sequence_loss
                and bool(getattr(self.backbone, "causal_sequences", False)))

    def compute_sequence_loss(self, item_seq: torch.Tensor, target: torch.Tensor
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of every prefix of a batch of sequences from one encoder pass.

        ``item_seq [B, L]`` left-padded sequences (L <= max_len), ``target [B, L]``
        the next item after each position (0 = none). Under causal attention
        with start-anchored positions, the encoder output at position n is
        ``h_0`` of the prefix ``0..n`` and its keys/values cut at n are that
        prefix's KV cache, so this equals ``compute_loss`` on the R samples
        (prefix ``0..n`` of row b, ``target[b, n]``) for the R nonzero targets,
        taken in row-major order (b, then n), and means over them.
        """
        return self.sequence_loss(*self.prepare_sequences(item_seq, target))

    def prepare_sequences(self, item_seq: torch.Tensor, target: torch.Tensor):
        """Checks of ``compute_sequence_loss`` -> the arguments of ``sequence_loss``:
        ``(item_seq [B, max_len], rows = (b [R], n [R]), target [R])``."""
        if not self.supports_sequences():
            raise ValueError(f"train.samples: 'sequence' needs a causal backbone with start-anchored positions and "
                             f"a model that implements it (sasrec, erl, prl, plr on the sasrec backbone); got "
                             f"{type(self).__name__} on {type(self.backbone).__name__}; use 'prefix'")
        target = check_sequence_target(target, item_seq, self.num_items)
        item_seq = self.prepare(item_seq)
        target = torch.nn.functional.pad(target.to(item_seq.device), (item_seq.shape[1] - target.shape[1], 0))
        rows = target.nonzero(as_tuple=True)
        return item_seq, rows, target[rows]

    def sequence_loss(self, item_seq: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor], target: torch.Tensor
                      ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``compute_sequence_loss`` on checked inputs: ``item_seq [B, max_len]``,
        ``rows = (b [R], n [R])`` the prefix ends, ``target [R]`` (no host syncs)."""
        raise NotImplementedError

    # -- checkpoints ---------------------------------------------------------------

    def config(self) -> Dict[str, Any]:
        return dict(self._config)

    def save(self, path: str, extra: Optional[Dict[str, Any]] = None) -> None:
        """Write config + weights (+ ``extra``: plain data such as the run's
        config and item vocabulary) to ``path`` atomically (temp file + rename)."""
        payload = {"format": CHECKPOINT_FORMAT, "class": type(self).__name__,
                   "config": self.config(), "state_dict": self.state_dict(), "extra": extra or {}}
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str, map_location: Any = "cpu") -> "SequentialRecommender":
        """Rebuild a model saved with ``save``; ``cls`` must match the saved class
        (or be ``SequentialRecommender`` to accept any)."""
        return cls.load_with_extra(path, map_location)[0]

    @classmethod
    def load_with_extra(cls, path: str, map_location: Any = "cpu") -> Tuple["SequentialRecommender", Dict[str, Any]]:
        """``load`` that also returns the ``extra`` dict given to ``save``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path: no checkpoint at {path!r}")
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # truncated, foreign or pickled with arbitrary objects
            raise ValueError(f"path: {path!r} is not a readable plr checkpoint ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split()[:12])}); expected a {CHECKPOINT_FORMAT} file "
                             "written by model.save (e.g. RUN_DIR/best.pt)") from None
        keys = ("class", "config", "state_dict")
        if not isinstance(payload, dict) or payload.get("format") not in (CHECKPOINT_FORMAT, *LEGACY_FORMATS) or \
                any(k not in payload for k in keys):
            raise ValueError(f"path: expected a {CHECKPOINT_FORMAT} file written by model.save, got {path!r}")
        # A registered model (plr.registry.MODELS), else a subclass defined by the user and imported.
        saved = model_class_named(payload["class"]) or imported_subclass(SequentialRecommender, payload["class"])
        if saved is None:
            raise ValueError(f"path: checkpoint holds unknown model class {payload['class']!r}")
        if not issubclass(saved, cls):
            raise TypeError(f"path: checkpoint holds a {payload['class']}, not a {cls.__name__}")
        model = saved(**upgrade_model_args(payload["config"], "checkpoint config"))
        if payload["format"] in LEGACY_FORMATS:
            model._legacy_positions()
        model.load_state_dict(payload["state_dict"])
        extra = dict(payload.get("extra") or {})
        if "run_config" in extra:
            extra["run_config"] = upgrade_config(extra["run_config"])
        return model, extra

    def non_finite_weights(self) -> list:
        """Names of the parameters and buffers holding NaN or infinite values."""
        tensors = list(self.named_parameters()) + list(self.named_buffers())
        return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def position_major(rows: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The order of the sequence-mode rows ``(b [R], n [R])`` (row-major) by
    position n, then sequence b: groups of consecutive rows then mix sequences."""
    b_idx, n_idx = rows
    return torch.argsort(n_idx * (int(b_idx.shape[0]) + 1) + b_idx)


def _history_exclusion(item_seq: torch.Tensor, exclude_history) -> Optional[torch.Tensor]:
    """``recommend``'s ``exclude_history`` (bool, or ``[B]`` bool per row) -> the
    ``exclude_items`` of plr_kernels.topk (negative ids are ignored there)."""
    if isinstance(exclude_history, torch.Tensor):
        if exclude_history.dtype != torch.bool or exclude_history.shape != item_seq.shape[:1]:
            raise ValueError(f"exclude_history: expected a bool or a bool tensor of shape [{item_seq.shape[0]}], "
                             f"got a {exclude_history.dtype} tensor of shape {list(exclude_history.shape)}")
        return item_seq.masked_fill(~exclude_history.to(item_seq.device)[:, None], -1)
    if not isinstance(exclude_history, bool):
        raise TypeError(f"exclude_history: expected a bool or a [B] bool tensor, got {type(exclude_history).__name__}")
    return item_seq if exclude_history else None


def imported_subclass(base: type, class_name: str) -> Optional[type]:
    """The subclass of ``base`` (at any depth, among those imported) named ``class_name``, or None."""
    for sub in base.__subclasses__():
        found = sub if sub.__name__ == class_name else imported_subclass(sub, class_name)
        if found is not None:
            return found
    return None


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename, so a
    crash never leaves a half-written checkpoint at ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
