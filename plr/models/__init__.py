from .base import ModelOutput, SequentialRecommender
from .plr import PLRModel
from .sasrec import SASRecModel

__all__ = ["MODELS", "ModelOutput", "PLRModel", "SASRecModel", "SequentialRecommender", "build_model"]

MODELS = {"sasrec": SASRecModel, "plr": PLRModel}


def build_model(model_cfg: dict, num_items: int, max_len: int) -> SequentialRecommender:
    """Instantiate ``model_cfg["name"]`` with the other keys as keyword arguments."""
    args = dict(model_cfg)
    name = args.pop("name")
    if name not in MODELS:
        raise ValueError(f"model.name: expected one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](num_items, max_len=max_len, **args)
