"""Ablation and sensitivity as generated ``plr benchmark`` suites.

Both kinds write ``OUT/suite.yaml`` -- one PLR run per variant, all on the
same dataset with the same training protocol (the base config) -- and run it
with :func:`plr.benchmark.run_suite`, so finished variants are skipped and a
killed one resumes. The run directories are ``OUT/runs/<dataset>/<run>``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .. import config as config_mod
from ..errors import UserError
from .common import checkpoint_path

DATASET = "data"


def base_config(run: Optional[str], config_file: Optional[str], overrides: Sequence[str],
                data: Optional[str]) -> Dict[str, Any]:
    """The PLR config every variant starts from: a trained run's own config
    (``run``: a run directory or checkpoint) or ``plr/configs/plr.yaml`` <-
    ``config_file``; then ``overrides`` (``section.key=value``) and ``data``. A
    relative ``data.path`` is taken from the current directory, as ``plr train`` does."""
    if run is not None:
        if config_file is not None:
            raise UserError("--config: not together with --run (the run's own config is the base)",
                            "drop one of them; change keys with --set")
        path = Path(run)
        if path.is_dir() and (path / "config.yaml").is_file():
            cfg = config_mod.load_yaml(path / "config.yaml")
        else:
            from ..models import SequentialRecommender

            _, extra = SequentialRecommender.load_with_extra(str(checkpoint_path(path)))
            cfg = extra.get("run_config")
            if not cfg:
                raise UserError(f"--run: {run} holds no run config", "pass --config and --data instead")
        cfg = config_mod.merge(cfg, config_mod.parse_overrides(list(overrides)))
        if data is not None:
            cfg = config_mod.merge(cfg, {"data": {"path": str(data)}})
        cfg = config_mod.check(cfg)
        config_mod.check_model(cfg)
    else:
        cfg = config_mod.resolve("plr", config_file, list(overrides), data)
    if cfg["model"]["name"] != "plr":
        raise UserError(f"--run: the base run is a {cfg['model']['name']} run; this analysis varies PLR",
                        "name a PLR run (or no --run: the shipped PLR config)")
    if not cfg["data"].get("path"):
        raise UserError("--data: no dataset given", "pass --data PATH (or --run of a trained run)")
    if 20 not in cfg["eval"]["ks"]:
        raise UserError(f"eval.ks: the analysis reports @20, got ks {cfg['eval']['ks']}",
                        "add 20, e.g. --set eval.ks=[10,20]")
    return cfg


def write_suite(out: Path, name: str, cfg: Dict[str, Any], variants: List[Tuple[str, Dict[str, Any]]],
                baseline: str) -> Path:
    """``OUT/suite.yaml``: ``variants`` = [(run name, model keys)] over ``cfg``."""
    defaults = {k: v for k, v in cfg.items() if k != "data"}
    defaults["model"] = {k: v for k, v in cfg["model"].items() if k != "name"}
    ks = cfg["eval"]["ks"]
    metrics = [f"{m}@{k}" for k in (10, 20) if k in ks for m in ("recall", "ndcg")]
    data = {**cfg["data"], "path": os.path.abspath(cfg["data"]["path"])}  # the suite resolves against its folder
    suite = {"name": name, "out": "runs", "datasets": {DATASET: data}, "defaults": defaults,
             "runs": [{"name": run, "model": "plr", **({"config": {"model": keys}} if keys else {})}
                      for run, keys in variants],
             "table": {"baseline": baseline, "metrics": metrics, "significance": ["ndcg@20", "recall@20"]}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def run_variants(out: Path, name: str, cfg: Dict[str, Any], variants: List[Tuple[str, Dict[str, Any]]],
                 baseline: str):
    """Write and run the suite; returns ``(suite, {run: metrics.json})``."""
    import json

    from ..benchmark import load_suite, run_status, run_suite

    suite = load_suite(write_suite(out, name, cfg, variants, baseline))
    run_suite(suite)
    finished = {r.name: json.loads((r.run_dir / "metrics.json").read_text())
                for r in suite.runs if run_status(r) == "done"}
    return suite, finished
