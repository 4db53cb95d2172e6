"""The one registry of plr: model and backbone names -> classes.

``plr train --model NAME``, ``model.backbone`` and checkpoint loading (a
checkpoint stores its class name) all look classes up here. Classes are
imported on first use, so importing plr stays cheap and the model modules
may import the backbones without a cycle.
"""

from __future__ import annotations

import importlib
from typing import Optional

# name -> (module, class)
MODELS = {
    "sasrec": ("plr.models.sasrec", "SASRecModel"),
    "bert4rec": ("plr.models.bert4rec", "BERT4RecModel"),
    "unisrec": ("plr.models.unisrec", "UniSRecModel"),
    "erl": ("plr.models.rearec", "ReaRecERLModel"),
    "prl": ("plr.models.rearec", "ReaRecPRLModel"),
    "lares": ("plr.models.lares", "LARESModel"),
    "plr": ("plr.models.plr", "PLRModel"),
}

# name -> (module, class)
BACKBONES = {
    "sasrec": ("plr.backbones.sasrec", "SASRecBackbone"),
    "bert4rec": ("plr.backbones.bert4rec", "BERT4RecBackbone"),
    "unisrec": ("plr.backbones.unisrec", "UniSRecBackbone"),
}


def lazy_class(table: dict, name: str, argument: str) -> type:
    """The class registered as ``name`` in ``table`` (name -> (module, class)),
    imported on first use; an unknown name is an error naming ``argument``."""
    if name not in table:
        raise ValueError(f"{argument}: expected one of {sorted(table)}, got {name!r}")
    module, cls = table[name]
    return getattr(importlib.import_module(module), cls)


def model_class(name: str) -> type:
    """The model class of ``plr train --model name``."""
    return lazy_class(MODELS, name, "model.name")


def backbone_class(name: str) -> type:
    """The backbone class of ``model.backbone = name``."""
    return lazy_class(BACKBONES, name, "backbone")


def model_class_named(class_name: str) -> Optional[type]:
    """The registered model class whose Python name is ``class_name`` (what a
    checkpoint stores), or None."""
    for name, (_, cls) in MODELS.items():
        if cls == class_name:
            return model_class(name)
    return None
