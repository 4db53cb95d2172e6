"""The models of plr, by the name ``plr train --model NAME`` takes.

Each is a :class:`SequentialRecommender` on a pluggable backbone
(``plr.backbones``); classes are imported lazily from ``plr.registry.MODELS``.
"""

from ..registry import MODELS, model_class
from .base import ModelOutput, SequentialRecommender
from .plr import PLRModel
from .sasrec import SASRecModel

__all__ = ["MODELS", "ModelOutput", "PLRModel", "SASRecModel", "SequentialRecommender", "build_model",
           "model_class"]


def build_model(model_cfg: dict, num_items: int, max_len: int) -> SequentialRecommender:
    """Instantiate ``model_cfg["name"]`` with the other keys as keyword arguments."""
    args = dict(model_cfg)
    return model_class(args.pop("name"))(num_items, max_len=max_len, **args)
