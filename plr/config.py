"""Run configuration: shipped YAML defaults per model, a user YAML file and
``--set section.key=value`` overrides, merged in that order and checked.

A config has four sections::

    model: {name: plr, hidden_size: 256, ...}   # name + keyword arguments of the model class
    data:  {path, format, max_len, split, ...}   # DataConfig
    train: {epochs, batch_size, lr, ...}         # TrainConfig
    eval:  {ks, exclude_history, ties, ...}      # EvalConfig
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class DataConfig:
    path: Optional[str] = None
    format: str = "auto"
    max_len: int = 50
    # "loo" (leave-one-out) | "time" (absolute time) | "auto": the file's own
    # split if it has one (Amazon 2023), else "loo"
    split: str = "auto"
    split_time: Optional[List[float]] = None
    min_rating: Optional[float] = None
    k_core: Optional[int] = None


TRAIN_SAMPLES = ("auto", "sequence", "prefix")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation metric before stopping
    seed: int = 2024
    max_steps_per_epoch: Optional[int] = None  # cap for quick runs (None = the whole epoch)
    save_every_steps: int = 200  # resumable checkpoint cadence inside an epoch
    grad_clip: Optional[float] = None
    progress: bool = True
    device: str = "auto"  # "auto" (cuda when available, else cpu) | "cpu" | "cuda" | "cuda:N"
    # "sequence": one encoder pass per training sequence trains on all its prefixes
    # (plr.data.SequenceSamples); "prefix": every prefix is its own sample; "auto":
    # sequence where the model supports it (model.supports_sequences()), else prefix.
    samples: str = "auto"
    compile: bool = False  # run the training step's model forward + loss under torch.compile
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; fp32 master weights, fp32 loss statistics)

    def __post_init__(self):
        if self.samples not in TRAIN_SAMPLES:
            raise ValueError(f"train.samples: expected one of {list(TRAIN_SAMPLES)}, got {self.samples!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"train.compile: expected true or false, got {self.compile!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision: expected one of {list(PRECISIONS)}, got {self.precision!r}")


@dataclass
class EvalConfig:
    ks: List[int] = field(default_factory=lambda: [5, 10, 20, 50])
    metric: str = "ndcg@10"  # early stopping and best checkpoint
    exclude_history: bool = False  # paper protocol: no history masking
    ties: str = "optimistic"
    batch_size: int = 1024


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def shipped_config(model_name: str) -> Dict[str, Any]:
    """The YAML shipped in plr/configs for ``model_name``."""
    path = CONFIG_DIR / f"{model_name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ValueError(f"model: expected one of {names}, got {model_name!r}")
    return load_yaml(path)


def load_yaml(path) -> Dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr=5e-4", "model.num_streams=4"]`` -> nested dict (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set: expected section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--set: expected a key of the form section.key, got {key!r}")
        out.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(raw)
    return out


def resolve(model_name: str, config_file: Optional[str] = None, overrides: Sequence[str] = (),
            data_path: Optional[str] = None) -> Dict[str, Any]:
    """Shipped defaults <- config file <- overrides <- data path; checked."""
    cfg = shipped_config(model_name)
    if config_file:
        cfg = merge(cfg, load_yaml(config_file))
    cfg = merge(cfg, parse_overrides(overrides))
    cfg.setdefault("model", {})["name"] = cfg.get("model", {}).get("name", model_name)
    if data_path is not None:
        cfg.setdefault("data", {})["path"] = data_path
    return check(cfg)


def check(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Fill every section's defaults and reject unknown sections and keys."""
    unknown = set(cfg) - set(SECTIONS) - {"model"}
    if unknown:
        raise ValueError(f"config: unknown section(s) {sorted(unknown)}; expected model, data, train, eval")
    out = {"model": dict(cfg.get("model") or {})}
    if "name" not in out["model"]:
        raise ValueError("config: model.name is missing")
    for name, cls in SECTIONS.items():
        given = cfg.get(name) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(given) - known
        if extra:
            raise ValueError(f"config: unknown key(s) {sorted(extra)} in section {name!r}; expected {sorted(known)}")
        out[name] = dataclasses.asdict(cls(**given))
    return out


def section(cfg: Dict[str, Any], name: str):
    """The dataclass of section ``name``."""
    return SECTIONS[name](**cfg[name])


def save(cfg: Dict[str, Any], path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
