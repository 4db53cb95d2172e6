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

from ..backbones import backbone_class
from ..validation import check_item_seq, check_positive_int, check_probability

PADDING = 0
CHECKPOINT_FORMAT = "plr-checkpoint-v1"
_REGISTRY: Dict[str, type] = {}


@dataclass
class ModelOutput:
    h0: torch.Tensor  # [B,d] encoder output at the last item
    z_final: torch.Tensor  # [B,d] the vector inference scores with
    states: Optional[torch.Tensor] = None  # [B,T,M,d] reasoning states h_{t,m}
    gate: Optional[torch.Tensor] = None  # [B,M] MoRS weights (Eq. 9)
    z_rea: Optional[torch.Tensor] = None  # [B,d] the vector training scores with


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement ``forward_prepared`` and ``compute_loss``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    def __init__(self, num_items: int, max_len: int = 50, hidden_size: int = 256, num_layers: int = 2,
                 num_heads: int = 2, inner_size: int = 300, dropout: float = 0.5,
                 attn_dropout: Optional[float] = None, layer_norm_eps: float = 1e-12,
                 temperature: float = 0.07, kernels: str = "auto", backbone: str = "sasrec",
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
        if kernels not in plr_kernels.BACKENDS:
            raise ValueError(f"kernels: expected one of {list(plr_kernels.BACKENDS)}, got {kernels!r}")
        self.num_items = num_items
        self.max_len = max_len
        self.temperature = float(temperature)
        self.kernels = kernels
        if backbone_args is not None and not isinstance(backbone_args, dict):
            raise TypeError(f"backbone_args: expected a dict or None, got {type(backbone_args).__name__}")
        self.backbone_name = backbone
        self.backbone = backbone_class(backbone)(num_items, max_len, hidden_size, num_layers, num_heads, inner_size,
                                                 dropout, attn_dropout, layer_norm_eps, **(backbone_args or {}))

    # -- configuration and weights -------------------------------------------------

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

    @torch.no_grad()
    def recommend(self, item_seq: torch.Tensor, k: int = 10, exclude_history=False
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` items for each history, scored with ``z_final`` in eval mode.

        ``item_seq [B, L]`` left-padded ids -> ``(scores [B,k], item ids [B,k])``.
        The padding item is never recommended; with ``exclude_history`` neither
        is any item of the history (a bool for all rows, or a ``[B]`` bool
        tensor choosing per row). A row left with fewer than ``k`` candidates
        ends in ``(-inf, -1)`` entries.
        """
        was_training = self.training
        self.eval()
        try:
            item_seq = self.prepare(item_seq)
            exclude = _history_exclusion(item_seq, exclude_history)
            z = self.forward_prepared(item_seq).z_final
            return plr_kernels.topk(
                z, self.item_emb, k, exclude_index=PADDING, exclude_items=exclude, backend=self.kernels,
            )
        finally:
            self.train(was_training)

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
        payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"path: expected a {CHECKPOINT_FORMAT} file written by model.save, got {path!r}")
        saved = _REGISTRY.get(payload["class"]) or _import_model_class(payload["class"])
        if saved is None:
            raise ValueError(f"path: checkpoint holds unknown model class {payload['class']!r}")
        if not issubclass(saved, cls):
            raise TypeError(f"path: checkpoint holds a {payload['class']}, not a {cls.__name__}")
        model = saved(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        return model, payload.get("extra", {})


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


def _import_model_class(class_name: str) -> Optional[type]:
    """Models are imported lazily (plr.models.MODELS): import the one named."""
    from . import MODELS, model_class

    for name, (_, cls) in MODELS.items():
        if cls == class_name:
            return model_class(name)
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
