"""Running the two training phases of LARES (plr.models.lares): SPT, then RPT from the best SPT model.

(The phases' losses are in plr/models/lares_phases.py; this module runs them into run directories.)

``model.phase`` chooses what one ``plr train --model lares`` runs:

* ``both`` (default): SPT into ``RUN/spt/``, then RPT initialised from
  ``RUN/spt/best.pt`` into ``RUN/rpt/`` (the SPT model validated first, as RPT's
  epoch -1: it stays the best where no RPT epoch beats it); ``RUN/best.pt``, ``RUN/metrics.json``
  and ``RUN/test_ranks.csv`` are copies of the RPT phase's (metrics.json adds the
  SPT phase's under ``"spt"``; its ``train_seconds`` is both phases'), so ``plr evaluate --checkpoint RUN/best.pt`` works;
* ``spt``: SPT only, ``RUN`` is an ordinary run directory;
* ``rpt``: RPT only, from ``model.init_from`` (a LARES checkpoint, e.g. the
  ``best.pt`` of an SPT run; ``plr train --init PATH``).

Every phase directory is an ordinary run directory of ``plr.training.Trainer``
(config.yaml, train.log, last.pt, best.pt, metrics.json, test_ranks.csv) and is
resumable with ``--resume``; in ``both`` mode a resumed run continues the phase
where it stopped (a finished SPT phase is only re-tested).

Model keys read here and removed before the model is built: ``phase``
(replaced by ``spt`` / ``rpt``), ``spt_epochs`` / ``rpt_epochs`` (default
``train.epochs``), ``rpt_lr`` (default ``train.lr``), ``init_from``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Optional

from . import config as config_mod
from .models.base import SequentialRecommender
from .models.lares import LARESModel
from .training import BEST, Trainer, check_run_dir, copy_file_atomic, write_json_atomic

RUN_PHASES = ("both", "spt", "rpt")
PHASE_KEYS = LARESModel.run_keys


def phase_config(cfg: Dict[str, Any], phase: str) -> Dict[str, Any]:
    """The config of one phase: the model section without the phase-control keys and
    with ``phase`` = ``spt`` | ``rpt``; ``train.epochs`` / ``train.lr`` of that phase."""
    out = copy.deepcopy(cfg)
    model = out["model"]
    control = {key: model.pop(key, None) for key in PHASE_KEYS}
    model["phase"] = phase
    epochs = control["spt_epochs"] if phase == "spt" else control["rpt_epochs"]
    if epochs is not None:
        out["train"]["epochs"] = epochs
    if phase == "rpt" and control["rpt_lr"] is not None:
        out["train"]["lr"] = control["rpt_lr"]
    return config_mod.check(out)


def run_phase(cfg: Dict[str, Any], dataset, run_dir: Path, *, init_from: Optional[str] = None,
              resume: bool = False, log_to_console: bool = True, test: bool = True) -> Dict[str, Any]:
    """One phase into ``run_dir`` (an ordinary run directory); ``test=False`` never reads the test split."""
    check_run_dir(run_dir, cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, run_dir / "config.yaml")
    trainer = Trainer(cfg, dataset, run_dir, log_to_console=log_to_console)
    if cfg["model"]["phase"] == "spt":
        trainer.model.attach_training_data(dataset.train)  # TLA partners with the same target
    else:
        # The weights start from the SPT model (a resumed run then loads last.pt over
        # them); the frozen SPT model stays the KL reference in any case.
        trainer.model.start_rpt(SequentialRecommender.load(str(init_from)))
        trainer.log(f"RPT from {init_from}")
    # RPT continues a trained model: the SPT model competes as its epoch -1, so a run
    # whose post-training only lowers validation keeps the SPT weights (early
    # stopping's rule: the best validated weights), and patience counts from them.
    return trainer.fit(resume=resume, test=test, validate_start=cfg["model"]["phase"] == "rpt")


def both_metrics(spt: Dict[str, Any], rpt: Dict[str, Any]) -> Dict[str, Any]:
    """``RUN/metrics.json`` of a ``both`` run from its phases' metrics: RPT's (its best
    epoch, possibly the SPT model as epoch -1), the training time of both, SPT's summary."""
    return {**rpt, "phase": "both", "train_seconds": round(spt["train_seconds"] + rpt["train_seconds"], 2),
            "spt": {k: spt[k] for k in ("valid", "test", "best_epoch", "epochs", "train_seconds")}}


def train_lares(cfg: Dict[str, Any], dataset, run_dir, *, resume: bool = False,
                log_to_console: bool = True, test: bool = True) -> Dict[str, Any]:
    """Run ``cfg["model"]["phase"]`` (``both`` | ``spt`` | ``rpt``) into ``run_dir``."""
    cfg = config_mod.check(cfg)
    run_dir = Path(run_dir)
    phase = cfg["model"].get("phase", "both")
    if phase not in RUN_PHASES:
        raise ValueError(f"model.phase: expected one of {list(RUN_PHASES)}, got {phase!r}")
    init_from = cfg["model"].get("init_from")
    if phase == "rpt":
        if not init_from:
            raise ValueError("model.init_from: phase=rpt needs the SPT checkpoint (plr train --init RUN/best.pt), "
                             f"got {init_from!r}")
        if not os.path.isfile(init_from):
            raise FileNotFoundError(f"model.init_from: no checkpoint at {init_from!r}")
    elif phase == "spt" and init_from:
        raise ValueError(f"model.init_from: only phase=rpt starts from a checkpoint, got phase={phase!r}")
    if phase != "both":
        return run_phase(phase_config(cfg, phase), dataset, run_dir, init_from=init_from, resume=resume,
                         log_to_console=log_to_console, test=test)

    for phase in ("spt", "rpt"):  # refuse before writing anything
        check_run_dir(run_dir / phase, phase_config(cfg, phase), resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(cfg, run_dir / "config.yaml")
    spt = run_phase(phase_config(cfg, "spt"), dataset, run_dir / "spt", resume=resume,
                    log_to_console=log_to_console, test=test)
    rpt = run_phase(phase_config(cfg, "rpt"), dataset, run_dir / "rpt", init_from=str(run_dir / "spt" / BEST),
                    resume=resume, log_to_console=log_to_console, test=test)
    for name in (BEST, "test_ranks.csv") if test else (BEST,):
        copy_file_atomic(run_dir / "rpt" / name, run_dir / name)
    metrics = both_metrics(spt, rpt)
    write_json_atomic(metrics, run_dir / "metrics.json")
    with open(run_dir / "train.log", "a") as f:
        f.write(f"spt: test {spt['test']} (log in spt/train.log)\nrpt: test {rpt['test']} (log in rpt/train.log)\n")
        if rpt["best_epoch"] == -1:
            f.write("rpt: no RPT epoch beat the SPT model on validation: best.pt holds the SPT weights\n")
    return metrics
