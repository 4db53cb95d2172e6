"""The trials of a ``plr tune`` search as a Markdown table, read off their run
directories (finished or still training), validation only.

    python benchmarks/tuning_table.py runs/converged/tune [--copy-to benchmarks/results/converged-tuning]

Each trial directory holds ``config.yaml``, ``train.log`` and, once finished,
``metrics.json`` (plr/tuning.py). ``--copy-to`` also copies those three files
of every trial into ``DIR/<model>/<trial>/`` (and each search's ``best.yaml``,
``trials.csv``, ``history.png``) and the table into ``DIR/trials.md``, for
committing a search's state; the table then also lists the trials recorded in
``DIR`` by earlier machines. ``--checkpoints`` copies the checkpoints of each
unfinished trial too (and drops those of a trial that has finished), so that
``plr tune --add-trials DIR/<model>`` on a new machine resumes it; it also
keeps the best checkpoint (``best.pt``) of each search's best finished trial,
so that a new machine's final run on the search's dataset adopts that trial
(``plr.benchmark.find_reusable``) instead of training it again. A file
``STATE`` in an unfinished trial's record replaces its state in the table
(``{state}`` in it: the state read off its log), e.g. for a trial lost with its
machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import yaml

from plr.benchmark import epochs_cell
from plr.deprecations import LEGACY_MODEL_VALUES
from plr.tuning import load_space

# How a searched key is shown, in this order; a family shows the keys its space searches
# (benchmarks/spaces/<family>.yaml), so a trial's row names what its search drew.
LABELS = {"kl_weight": "lambda", "pl_weight": "lambda_pl", "tla_weight": "w_tla", "mean_depth": "depth",
          "num_streams": "M", "num_steps": "T", "dropout": "dropout"}
SPACES = Path(__file__).parent / "spaces"


def searched_keys(family: str) -> list[str]:
    """The model keys the family's space draws (``same_as`` keys copy another and are not shown)."""
    space = load_space(SPACES / f"{family}.yaml")  # validated as plr tune reads it
    drawn = {key.split(".", 1)[1] for key, spec in space.items()
             if key.startswith("model.") and not (isinstance(spec, dict) and "same_as" in spec)}
    unknown = drawn - set(LABELS)
    if unknown:
        raise SystemExit(f"{SPACES / (family + '.yaml')}: no label for the searched keys {sorted(unknown)}; "
                         f"add them to LABELS in {Path(__file__).name}")
    return [key for key in LABELS if key in drawn]


EPOCH = re.compile(r"epoch (\d+):.*valid ndcg@10=([0-9.]+)")


def trial_row(model: str, trial: Path) -> dict:
    config = yaml.safe_load((trial / "config.yaml").read_text()) if (trial / "config.yaml").exists() else {}
    family = config.get("model", {}).get("name", model)  # the folder may be named otherwise (plr-eq10)
    params = ", ".join(f"{LABELS[key]} {config['model'][key]:g}" for key in searched_keys(family)
                       if key in config.get("model", {}))
    if family == "plr":  # a config without the key predates it and ran as plr.deprecations says
        params += f", readout {config['model'].get('readout', LEGACY_MODEL_VALUES['plr']['readout'])}"
    # The trial's log, else (a LARES trial in training) its latest phase's: rpt/ once it exists, else spt/.
    logs = [p for p in (trial / "train.log", trial / "rpt" / "train.log", trial / "spt" / "train.log") if p.exists()]
    log = logs[0].read_text().splitlines() if logs else []
    phase = f"{logs[0].parent.name} " if logs and logs[0].parent != trial else ""
    epochs = [(int(m.group(1)), float(m.group(2))) for m in map(EPOCH.search, log) if m]
    row = dict(model=model, trial=trial.name, params=params, epochs_seen=len(epochs))
    if (trial / "metrics.json").exists():
        metrics = json.loads((trial / "metrics.json").read_text())
        row.update(state="finished", epochs=epochs_cell(metrics),  # a LARES trial: both phases
                   valid=metrics["valid"]["ndcg@10"], seconds=metrics["train_seconds"])
    else:
        last = epochs[-1] if epochs else None
        best = max((v for _, v in epochs), default=None)
        row.update(state=f"training ({phase}epoch {last[0]}, best so far {best:.4f})" if last else "started")
        if (trial / "STATE").exists():  # a note on an unfinished trial's record: abandoned, lost with its machine
            row["state"] = (trial / "STATE").read_text().strip().format(state=row["state"])
    return row


def started(trial: Path) -> str:
    """When the trial started: its log's first timestamp ("" for none)."""
    log = trial / "train.log"
    first = log.read_text().split("\n", 1)[0] if log.exists() else ""
    return first[:19] if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", first) else ""


def copy_run(run: Path, dest: Path, names, finished: bool, checkpoints: bool, keep=()) -> None:
    """Record ``names`` of a run directory (and of its phase directories) in ``dest``; its checkpoints too if
    ``checkpoints`` and it is unfinished (a recorded one is dropped once finished,
    except the checkpoints named in ``keep``, recorded if ``checkpoints``)."""
    dest.mkdir(parents=True, exist_ok=True)
    # A run in phases (LARES: spt/, rpt/) keeps each phase directory's files too.
    phases = [d.name for d in sorted(run.iterdir()) if d.is_dir() and (d / "config.yaml").is_file()]
    for where in ("", *phases):
        (dest / where).mkdir(parents=True, exist_ok=True)
        for name in names:
            if (run / where / name).is_file():
                shutil.copy2(run / where / name, dest / where / name)
    for old in dest.rglob("*.pt"):  # a checkpoint recorded while it was training
        if (finished and old.name not in keep) or not (run / old.relative_to(dest)).exists():
            old.unlink()
    if checkpoints:
        for ckpt in run.rglob("*.pt"):
            if not finished or ckpt.name in keep:
                (dest / ckpt.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ckpt, dest / ckpt.relative_to(run))


def copy_trial(trial: Path, dest: Path, checkpoints: bool, best: bool = False) -> None:
    """``best``: the search's best finished trial, whose best checkpoint is kept."""
    copy_run(trial, dest, ("config.yaml", "train.log", "metrics.json"), (trial / "metrics.json").exists(),
             checkpoints, keep=("best.pt",) if best else ())


def best_trial(trials) -> Path | None:
    """The finished trial of the highest validation NDCG@10 (what ``plr tune`` chose)."""
    scored = [(json.loads((t / "metrics.json").read_text())["valid"]["ndcg@10"], t.name, t)
              for t in trials if (t / "metrics.json").is_file()]
    return max(scored)[2] if scored else None


def table(rows) -> str:
    out = ["| model | trial | parameters | state | epochs (best) | valid N@10 | train s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        done = r["state"] == "finished"
        out.append(f"| {r['model']} | {r['trial']} | {r['params']} | {r['state']} | "
                   f"{r['epochs'] if done else ''} | "
                   f"{format(r['valid'], '.4f') if done else ''} | {round(r['seconds']) if done else ''} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tune_dir", type=Path, help="the --out of plr tune runs: one folder per model")
    p.add_argument("--copy-to", type=Path, default=None)
    p.add_argument("--checkpoints", action="store_true",
                   help="with --copy-to: the unfinished trials' checkpoints too, and the best checkpoint of "
                        "each search's best finished trial")
    args = p.parse_args(argv)
    if not args.tune_dir.is_dir():
        raise SystemExit(f"tune_dir: expected a folder of plr tune outputs, got {args.tune_dir}")
    trials = {}
    for model_dir in sorted(d for d in args.tune_dir.iterdir() if (d / "trials").is_dir()):
        here = [t for t in (model_dir / "trials").iterdir() if t.is_dir()]
        best = best_trial(here)
        for trial in here:
            trials[model_dir.name, trial.name] = trial
            if args.copy_to:
                copy_trial(trial, args.copy_to / model_dir.name / trial.name, args.checkpoints, trial == best)
        for name in ("best.yaml", "trials.csv", "history.png"):
            if args.copy_to and (model_dir / name).exists():
                shutil.copy2(model_dir / name, args.copy_to / model_dir.name / name)
    if args.copy_to and args.copy_to.is_dir():  # trials recorded by earlier machines (named as plr.tuning.trial_id)
        for model_dir in (d for d in args.copy_to.iterdir() if d.is_dir()):
            for trial in model_dir.iterdir():
                if re.fullmatch(r"[0-9a-f]{10}", trial.name) and (trial / "config.yaml").exists():
                    trials.setdefault((model_dir.name, trial.name), trial)
    order = sorted(trials, key=lambda k: (k[0], started(trials[k]), k[1]))  # in the order they were started
    text = table([trial_row(model, trials[model, name]) for model, name in order])
    print(text)
    if args.copy_to:
        (args.copy_to / "trials.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
