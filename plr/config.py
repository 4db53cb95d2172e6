"""Run configuration: shipped YAML defaults per model, a user YAML file and
``--set section.key=value`` overrides, merged in that order and checked.

A config has four sections::

    model: {name: plr, hidden_size: 256, ...}   # name + keyword arguments of the model class
    data:  {path, format, max_len, split, ...}   # DataConfig
    train: {epochs, batch_size, lr, ...}         # TrainConfig
    eval:  {ks, exclude_history, ties, ...}      # EvalConfig

Each key of data/train/eval declares its type and range beside its default
(``name: int = key(10, Int(min=1))``, see ``plr.config_schema``); the model
section is checked against the model class's constructor (``check_model``).
Numbers are read as YAML 1.2 numbers in files and ``--set`` (``5e-4``, ``1E-3``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .config_schema import Bool, Choice, Float, Int, ListOf, Str, key, parse_section
from .deprecations import upgrade_config
from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
METRIC_KINDS = ("recall", "ndcg")


# Every key: its default and its check (plr/config_schema.py); one line per key.
@dataclass
class DataConfig:
    path: Optional[str] = key(None, Str(), nullable=True)
    format: str = key("auto", Choice("auto", "table", "sasrec", "sequences", "recbole", "seqrecbench",
                                     "movielens", "amazon2023"))
    max_len: int = key(50, Int(min=1))
    # "loo" (leave-one-out) | "time" (absolute time) | "auto": the file's own
    # split if it has one (Amazon 2023), else "loo"
    split: str = key("auto", Choice("auto", "loo", "time"))
    split_time: Optional[List[float]] = key(None, ListOf(Float(), min_len=2, max_len=2), nullable=True)
    min_rating: Optional[float] = key(None, Float(), nullable=True)
    k_core: Optional[int] = key(None, Int(min=1), nullable=True)
    encoding: str = key("utf-8", Str())  # text encoding of the data files (e.g. latin-1)


TRAIN_SAMPLES = ("auto", "sequence", "prefix")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: int = key(200, Int(min=1))
    batch_size: int = key(2048, Int(min=1))  # the global batch: split over the processes under torchrun
    lr: float = key(1e-3, Float(min=0.0, min_open=True))
    weight_decay: float = key(0.0, Float(min=0.0))
    patience: int = key(10, Int(min=1))  # epochs without a better validation metric before stopping
    seed: int = key(2024, Int(min=0))
    max_steps_per_epoch: Optional[int] = key(None, Int(min=1), nullable=True)  # cap for quick runs
    save_every_steps: int = key(200, Int(min=1))  # resumable checkpoint cadence inside an epoch
    grad_clip: Optional[float] = key(None, Float(min=0.0, min_open=True), nullable=True)
    progress: bool = key(True, Bool())
    # "auto" (cuda when available, else cpu) | "cpu" | "cuda" | "cuda:N"
    device: str = key("auto", Str())
    # Stop when |loss| or |a loss part| exceeds this (plr/guards.py); null: only non-finite values stop.
    divergence_limit: Optional[float] = key(1.0e4, Float(min=0.0, min_open=True), nullable=True)
    # "sequence": one encoder pass per training sequence trains on all its prefixes
    # (plr.data.SequenceSamples); "prefix": every prefix is its own sample; "auto":
    # sequence where the model supports it (model.supports_sequences()), else prefix.
    samples: str = key("auto", Choice(*TRAIN_SAMPLES))
    compile: bool = key(False, Bool())  # the training step's model forward + loss under torch.compile
    precision: str = key("fp32", Choice(*PRECISIONS))  # bf16: autocast; fp32 master weights and loss statistics


@dataclass
class EvalConfig:
    ks: List[int] = key(spec=ListOf(Int(min=1), min_len=1, unique=True), default_factory=lambda: [5, 10, 20, 50])
    metric: str = key("ndcg@10", Str())  # early stopping and best checkpoint: recall@K | ndcg@K | mrr, K in ks
    exclude_history: bool = key(False, Bool())  # paper protocol: no history masking
    ties: str = key("optimistic", Choice("optimistic", "pessimistic"))
    batch_size: int = key(1024, Int(min=1))


def _check_train(values: Dict[str, Any]) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", values["device"]):
        raise UserError(f"train.device: expected auto, cpu, cuda or cuda:N, got {values['device']!r}",
                        "e.g. --set train.device=cpu")


def _check_eval(values: Dict[str, Any]) -> None:
    metric, ks = values["metric"], values["ks"]
    allowed = [f"{m}@{k}" for k in ks for m in METRIC_KINDS] + ["mrr"]
    if metric not in allowed:
        raise UserError(f"eval.metric: expected one of {allowed} (recall@K, ndcg@K with K in eval.ks, or mrr), "
                        f"got {metric!r}", "fix eval.metric or add its K to eval.ks")


SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}
def _check_data(values: Dict[str, Any]) -> None:
    from .data.readers import check_encoding

    try:
        check_encoding(values["encoding"])
    except ValueError as exc:
        raise UserError(str(exc), "fix data.encoding in the config or with --set data.encoding=...") from None


SECTION_CHECKS = {"data": _check_data, "train": _check_train, "eval": _check_eval}


def shipped_config(model_name: str) -> Dict[str, Any]:
    """The YAML shipped in plr/configs for ``model_name``."""
    path = CONFIG_DIR / f"{model_name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise UserError(f"--model: expected one of {names}, got {model_name!r}")
    return load_yaml(path)


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 numbers: ``5e-4``, ``1E-3``, ``.5`` are floats (YAML 1.1
    reads exponents without a dot or sign as strings)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def yaml_value(text: str):
    """One YAML scalar or collection, with YAML 1.2 numbers."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader) or {}
    except FileNotFoundError:
        raise UserError(f"--config: no such file {path}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config {path}: not valid UTF-8 YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; ``update`` wins (renamed model keys read under their
    new names first, ``plr.deprecations``)."""
    out = copy.deepcopy(upgrade_config(base))
    update = upgrade_config(update)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: Sequence[str]) -> Dict[str, Any]:
    """``["train.lr=5e-4", "model.num_streams=4"]`` -> nested dict (values parsed as YAML 1.2)."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set: expected section.key=value, got {item!r}", "e.g. --set train.lr=5e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise UserError(f"--set: expected a key of the form section.key, got {key!r}", "e.g. --set train.lr=5e-4")
        try:
            value = yaml_value(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"--set {key}: cannot read {raw!r} as a YAML value ({' '.join(str(exc).split())})") from None
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def resolve(model_name: str, config_file: Optional[str] = None, overrides: Sequence[str] = (),
            data_path: Optional[str] = None) -> Dict[str, Any]:
    """Shipped defaults <- config file <- overrides <- data path; every key
    checked (``check``, ``check_model``) before any data is read."""
    cfg = shipped_config(model_name)
    if config_file:
        cfg = merge(cfg, load_yaml(config_file))
    cfg = merge(cfg, parse_overrides(overrides))
    cfg.setdefault("model", {})["name"] = cfg.get("model", {}).get("name", model_name)
    if data_path is not None:
        cfg.setdefault("data", {})["path"] = data_path
    cfg = check(cfg)
    check_model(cfg)
    return cfg


def check(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Fill every section's defaults, check every key's type and range and
    reject unknown sections and keys (``UserError`` naming the key)."""
    if not isinstance(cfg, dict):
        raise UserError(f"config: expected a mapping of sections, got {type(cfg).__name__}")
    cfg = upgrade_config(cfg)  # old key names (plr.deprecations)
    unknown = set(cfg) - set(SECTIONS) - {"model"}
    if unknown:
        raise UserError(f"config: unknown section(s) {sorted(unknown)}; expected model, data, train, eval",
                        "fix the section names in the config or --set")
    for name in ("model", *SECTIONS):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise UserError(f"config: section {name!r} must be a mapping of keys, got {cfg[name]!r}")
    out = {"model": dict(cfg.get("model") or {})}
    if "name" not in out["model"]:
        raise UserError("config: model.name is missing", "pass --model NAME")
    for name, cls in SECTIONS.items():
        given = cfg.get(name) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = set(given) - known
        if extra:
            raise UserError(f"config: unknown key(s) {sorted(extra)} in section {name!r}; expected {sorted(known)}",
                            "fix the spelling in the config or --set")
        values = parse_section(cls, name, given)
        if name in SECTION_CHECKS:
            SECTION_CHECKS[name](values)
        out[name] = values
    return out


def check_model(cfg: Dict[str, Any]) -> None:
    """Check the model section against the model class before any data is read:
    unknown keys (the constructor's keyword arguments are the accepted ones)
    and, by building the model once on a tiny item table, the constructor's
    own value checks. Errors name the key as ``model.<key>``."""
    import torch

    from .models import model_class

    model_cfg = dict(cfg["model"])
    name = model_cfg.pop("name")
    try:
        cls = model_class(name)
    except ValueError as exc:
        raise UserError(str(exc), "pass --model NAME with a known model") from None
    run_keys = set(getattr(cls, "run_keys", ()))
    accepted = constructor_keys(cls) | run_keys
    extra = sorted(set(model_cfg) - accepted)
    if extra:
        raise UserError(f"model: unknown key(s) {['model.' + k for k in extra]} for model {name!r}; "
                        f"accepted: {sorted(accepted)}", "fix the model section of the config or --set")
    try:
        kwargs = cls.trial_kwargs(model_cfg) if hasattr(cls, "trial_kwargs") else \
            {k: v for k, v in model_cfg.items() if k not in run_keys}
        with torch.random.fork_rng(devices=[]):
            cls(8, max_len=cfg["data"]["max_len"], **kwargs)
    except (ValueError, TypeError) as exc:
        msg = " ".join(str(exc).split())
        raise UserError(f"model.{msg}" if msg.split(":")[0] in model_cfg else f"model {name!r}: {msg}",
                        "fix the model section of the config or --set") from None


def constructor_keys(cls) -> set:
    """Keyword arguments of ``cls.__init__`` (following ``**kwargs`` up the MRO), less num_items and max_len."""
    keys = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keys |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return keys - {"self", "num_items", "max_len"}


def section(cfg: Dict[str, Any], name: str):
    """The dataclass of section ``name``."""
    return SECTIONS[name](**cfg[name])


def save(cfg: Dict[str, Any], path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
