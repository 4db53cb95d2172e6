"""Renamed keys, still read under their old names where old files come in.

A config file, a run directory's ``config.yaml`` / ``last.pt`` or a checkpoint
written before a key was renamed keeps working: at those boundaries
(``plr.config.merge`` / ``plr.config.check`` for configs,
``SequentialRecommender.load_with_extra`` for checkpoints) the old name is
read as the new one, with a one-line ``FutureWarning``. Everything past the
boundary sees the new names only.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict

from .errors import UserError

# old model key -> new model key
RENAMED_MODEL_KEYS = {"kernels": "backend"}  # models say ``backend`` as the plr_kernels ops do

# Model keys added after run configs were written without them, with the value
# that reproduces what such a run did (the behaviour before the key existed)
# where today's default differs: a saved config that lacks the key meant this.
LEGACY_MODEL_VALUES = {"plr": {"rcl_view": "full", "reg_rows": "all", "readout": "final"},
                       "lares": {"kl_reference": "eval"}}


def upgrade_model_args(args: Dict[str, Any], where: str = "model") -> Dict[str, Any]:
    """``args`` (a model section or a model's constructor arguments) with every
    renamed key under its new name; ``where`` names the section in messages.
    Both names with different values is an error."""
    if not any(old in args for old in RENAMED_MODEL_KEYS):
        return args
    out = dict(args)
    for old, new in RENAMED_MODEL_KEYS.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out and out[new] != value:
            raise UserError(f"{where}: both {where}.{old}={value!r} (the old name) and {where}.{new}={out[new]!r} "
                            f"given", f"keep only {where}.{new}")
        out[new] = value
        warnings.warn(f"{where}.{old} is deprecated, read as {where}.{new}={value!r}; rename it to {new}",
                      FutureWarning, stacklevel=3)
    return out


def upgrade_config(cfg: Any) -> Any:
    """A run config (sections as mappings) with its model section upgraded by
    ``upgrade_model_args``; anything else is returned as is."""
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model = upgrade_model_args(cfg["model"])
        if model is not cfg["model"]:
            return {**cfg, "model": model}
    return cfg


def fill_legacy_model_values(cfg: Any) -> Any:
    """A saved run config with the model keys it predates (``LEGACY_MODEL_VALUES``)
    set to what the run did, so it compares equal to a config that pins them."""
    if not (isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)):
        return cfg
    legacy = LEGACY_MODEL_VALUES.get(cfg["model"].get("name"), {})
    missing = {k: v for k, v in legacy.items() if k not in cfg["model"]}
    return {**cfg, "model": {**cfg["model"], **missing}} if missing else cfg
