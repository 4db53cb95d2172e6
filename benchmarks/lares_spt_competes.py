"""Re-select the best checkpoint of a finished two-phase LARES run trained before
the SPT model competed as RPT's epoch -1 (plr/lares_training.py, since 2026-12-07).

Early stopping keeps the best validated weights; RPT starts from the SPT model,
so the SPT model is a candidate too. Runs finished before that rule kept RPT's
best epoch even where every RPT epoch scored below the SPT model. For such a run
this script

1. validates ``RUN/spt/best.pt`` again (the start RPT would now validate) and
   checks that it reproduces the SPT phase's recorded validation metrics;
2. if no RPT epoch beat it, rewrites the run as the new rule selects it:
   ``rpt/metrics.json`` and ``metrics.json`` with the SPT model's validation
   metrics, ``best_epoch: -1`` and ``start_valid``; ``rpt/best.pt`` and
   ``best.pt`` = the SPT checkpoint. The history (every RPT epoch actually
   trained) and the training time are kept as they were; ``epochs_with_start``
   says where patience, counted from the start, would have stopped.

Validation only: a run that has read its test split is refused.

    python benchmarks/lares_spt_competes.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from plr import config as config_mod
from plr.data.loading import load_dataset
from plr.evaluation import evaluate
from plr.lares_training import both_metrics
from plr.models import SequentialRecommender
from plr.training import copy_file_atomic, write_json_atomic


def reselect(run: Path) -> str:
    spt = json.loads((run / "spt" / "metrics.json").read_text())
    rpt = json.loads((run / "rpt" / "metrics.json").read_text())
    if rpt.get("test") or spt.get("test"):
        raise SystemExit(f"{run}: it read its test split; re-selecting after that would choose on test")
    if "start_valid" in rpt:
        return f"{run}: its SPT model competed already (best epoch {rpt['best_epoch']})"
    cfg = config_mod.load_yaml(run / "rpt" / "config.yaml")
    ev = cfg["eval"]
    metric = ev["metric"]
    dataset = load_dataset(cfg["data"], parts=("valid",))
    model = SequentialRecommender.load(str(run / "spt" / "best.pt"))
    model.eval()
    start = evaluate(model, dataset.valid, ks=ev["ks"], batch_size=ev["batch_size"],
                     exclude_history=ev["exclude_history"], ties=ev["ties"]).metrics
    if not all(math.isclose(start[k], spt["valid"][k], rel_tol=1e-9) for k in spt["valid"]):
        raise SystemExit(f"{run}: spt/best.pt scores {start} on validation, not the SPT phase's {spt['valid']}")
    if rpt["valid"][metric] > start[metric]:
        return f"{run}: RPT's best epoch {rpt['best_epoch']} beat the SPT model ({rpt['valid'][metric]:.4f} > " \
               f"{start[metric]:.4f}): nothing to change"
    patience = cfg["train"]["patience"]
    rpt.update(valid=start, best_epoch=-1, start_valid=start, epochs_with_start=min(patience, rpt["epochs"]),
               reselected="no RPT epoch beat the SPT model (RPT's epoch -1): best.pt holds the SPT weights "
                          "(benchmarks/lares_spt_competes.py)")
    write_json_atomic(rpt, run / "rpt" / "metrics.json")
    for dest in (run / "rpt" / "best.pt", run / "best.pt"):
        copy_file_atomic(run / "spt" / "best.pt", dest)
    write_json_atomic(both_metrics(spt, rpt), run / "metrics.json")
    best_rpt = max(h[f"valid_{metric}"] for h in rpt["history"])
    for log in (run / "train.log", run / "rpt" / "train.log"):
        with open(log, "a") as f:
            f.write(f"re-selected: the SPT model (valid {metric}={start[metric]:.4f}) beats every RPT epoch "
                    f"(best {best_rpt:.4f}): best.pt holds the SPT weights\n")
    return f"{run}: valid {metric} {start[metric]:.4f} (the SPT model) replaces RPT's best"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    for run in parser.parse_args(argv).runs:
        print(reselect(run))


if __name__ == "__main__":
    main()
