"""``plr tune``: hyperparameter search on the validation split with Optuna.

A search space file maps ``section.key`` to a distribution::

    model.kl_weight: [0.001, 0.01, 0.1, 1.0]          # a list: one of these values
    model.dropout: {low: 0.1, high: 0.6, step: 0.1}   # a float range (step, log optional)
    model.num_streams: {low: 1, high: 5, type: int}   # an integer range
    model.attn_dropout: {same_as: model.dropout}      # tied to another parameter

Every trial is an ordinary, resumable run directory ``OUT/trials/<id>``
(``<id>`` derives from the trial's parameters) trained with ``test=False``:
the test split is never read while tuning. The objective is the best
validation value of ``eval.metric``. The study lives in ``OUT/study.db``
(SQLite), so a killed search continues where it stopped: a trial that was
running is run again with the same parameters and resumes its directory.
``--trials N`` is the total number of finished trials, each with a distinct
parameter set (a draw that repeats a finished one is pruned and drawn again).
A trial whose training diverges (``plr.guards``) fails, with the reason in
``trials.csv``; it does not count, and its parameters are not drawn again.
``add_trials`` (``plr tune --add-trials DIR``) adds the finished trials of an
earlier search of the same space, kept as run directories (``config.yaml`` and
``metrics.json``: e.g. the committed records of a search whose ``study.db`` was
lost with its machine), as finished trials of this study. Results:
``OUT/best.yaml`` (the whole config of the best trial, usable as
``--config`` or a suite's ``config_file``), ``OUT/trials.csv`` and
``OUT/history.png``. One process per study (no parallel workers).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from . import config as config_mod

RANGE_KEYS = {"low", "high", "step", "log", "type"}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter."""


def load_space(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"space: no search space file at {str(path)!r}")
    try:
        raw = config_mod.load_yaml(path)
    except (ValueError, yaml.YAMLError) as err:
        raise SpaceError(f"space {path}: not a YAML mapping ({err})") from None
    if not raw:
        raise SpaceError(f"space {path}: expected at least one parameter")
    for name, spec in raw.items():
        where = f"space {path}: {name}"
        parts = str(name).split(".")
        if len(parts) != 2 or not all(parts):
            raise SpaceError(f"{where}: expected a parameter of the form section.key")
        if isinstance(spec, list):
            if not spec:
                raise SpaceError(f"{where}: expected a non-empty list of values")
        elif isinstance(spec, dict) and set(spec) == {"same_as"}:
            if spec["same_as"] not in raw or isinstance(raw[spec["same_as"]], dict) and "same_as" in raw[spec["same_as"]]:
                raise SpaceError(f"{where}: same_as: expected another searched parameter, got {spec['same_as']!r}")
        elif isinstance(spec, dict):
            extra = set(spec) - RANGE_KEYS
            if extra or "low" not in spec or "high" not in spec:
                raise SpaceError(f"{where}: expected a list of values, {{low, high[, step, log, type]}} or "
                                 f"{{same_as}}, got {spec!r}")
            if spec.get("type", "float") not in ("float", "int"):
                raise SpaceError(f"{where}: type: expected float or int, got {spec['type']!r}")
            try:
                low, high = float(spec["low"]), float(spec["high"])
            except (TypeError, ValueError):
                raise SpaceError(f"{where}: low/high: expected numbers, got {spec['low']!r}, {spec['high']!r}") from None
            if not low < high:
                raise SpaceError(f"{where}: expected low < high, got low={low}, high={high}")
        else:
            raise SpaceError(f"{where}: expected a list of values or a range mapping, got {spec!r}")
    return raw


def suggest(trial, space: Dict[str, Any]) -> Dict[str, Any]:
    """The parameters of one trial (``same_as`` copies after the others)."""
    params: Dict[str, Any] = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            params[name] = trial.suggest_categorical(name, spec)
        elif "same_as" not in spec:
            if spec.get("type", "float") == "int":
                params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                                 step=int(spec.get("step", 1)), log=bool(spec.get("log", False)))
            else:
                step = spec.get("step")
                params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                                   step=None if step is None else float(step),
                                                   log=bool(spec.get("log", False)))
    for name, spec in space.items():
        if isinstance(spec, dict) and "same_as" in spec:
            params[name] = params[spec["same_as"]]
    return params


def apply(cfg: Dict[str, Any], params: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` with ``{"section.key": value}`` set, checked."""
    update: Dict[str, Dict[str, Any]] = {}
    for name, value in params.items():
        section, key = name.split(".")
        update.setdefault(section, {})[key] = value
    return config_mod.check(config_mod.merge(cfg, update))


def _corners(space: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Parameter sets that exercise every value of every list and both ends of every range."""
    out = []
    base = {n: (s[0] if isinstance(s, list) else s.get("low")) for n, s in space.items() if "same_as" not in s}
    for name, spec in space.items():
        values = spec if isinstance(spec, list) else ([] if "same_as" in spec else [spec["low"], spec["high"]])
        for value in values:
            params = {**base, name: value}
            for other, ospec in space.items():
                if isinstance(ospec, dict) and "same_as" in ospec:
                    params[other] = params[ospec["same_as"]]
            out.append(params)
    return out


def check_space(cfg: Dict[str, Any], space: Dict[str, Any]) -> None:
    """Every searched key must exist and every value be accepted, before any training."""
    for params in _corners(space):
        try:
            config_mod.check_model(apply(cfg, params))
        except (ValueError, TypeError) as err:
            raise SpaceError(f"space: parameters {params} give an invalid config: {err}") from None


def distributions(space: Dict[str, Any]) -> Dict[str, Any]:
    """The Optuna distribution of every drawn parameter (``same_as`` ones are not
    drawn), as ``suggest`` draws them."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            out[name] = CategoricalDistribution(spec)
        elif "same_as" in spec:
            continue
        elif spec.get("type", "float") == "int":
            out[name] = IntDistribution(int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                        log=bool(spec.get("log", False)))
        else:
            step = spec.get("step")
            out[name] = FloatDistribution(float(spec["low"]), float(spec["high"]),
                                          step=None if step is None else float(step), log=bool(spec.get("log", False)))
    return out


def _first_difference(a: Any, b: Any, where: str = "") -> Optional[str]:
    """The dotted key at which two nested mappings first differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if a == b else f"{where} ({a!r} here, {b!r} there)"


def add_trials(study, cfg: Dict[str, Any], space: Dict[str, Any], sources: Sequence, out: Path, *,
               log=print) -> int:
    """Add each finished run directory under ``sources`` (a folder holding
    ``config.yaml`` and ``metrics.json``, or a folder of such folders) to
    ``study`` as a finished trial: its parameters read from its config, its
    value the validation ``eval.metric`` it recorded; the directory is copied to
    ``out/trials/<id>``. An unfinished one that holds its checkpoint (``last.pt``)
    is copied too and its parameters enqueued, so that it runs first and
    resumes; one without is skipped. Refused: a run whose config differs from ``cfg`` in a
    key that is not searched, a value outside the space, a run that read the
    test split. Returns how many trials were added (one already in the study is
    skipped)."""
    import shutil

    import optuna

    from .benchmark import _same_dataset
    from .training import LAST, same_config

    metric = cfg["eval"]["metric"]
    dists = distributions(space)
    have = {trial_id(suggest(optuna.trial.FixedTrial(t.params), space))
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    added = 0
    for source in sources:
        source = Path(source)
        if not source.is_dir():
            raise SpaceError(f"add-trials: no directory at {str(source)!r}")
        runs = [source] if (source / "config.yaml").is_file() else sorted(
            d for d in source.iterdir() if (d / "config.yaml").is_file())
        if not runs:
            raise SpaceError(f"add-trials: {source} holds no run directory (a folder with config.yaml)")
        for run in runs:
            unfinished = not (run / "metrics.json").is_file()
            if unfinished and not any(run.rglob(LAST)):
                log(f"add-trials: {run} is unfinished (no metrics.json) and has no checkpoint: not added")
                continue
            saved = same_config(config_mod.load_yaml(run / "config.yaml"))
            metrics = {"valid": {metric: float("nan")}} if unfinished else json.loads((run / "metrics.json").read_text())
            if metrics.get("test"):
                raise SpaceError(f"add-trials: {run} read the test split: not a trial of a search on validation")
            try:
                params = {name: saved[name.split(".")[0]][name.split(".")[1]] for name in dists}
                value = float(metrics["valid"][metric])
            except (KeyError, TypeError) as err:
                raise SpaceError(f"add-trials: {run}: no {err} in its config.yaml / metrics.json") from None
            try:
                full = suggest(optuna.trial.FixedTrial(params), space)
            except ValueError as err:  # a value outside the space
                raise SpaceError(f"add-trials: {run}: outside the search space: {err}") from None
            expect = apply(cfg, full)
            differs = _first_difference({**expect, "data": {k: v for k, v in expect["data"].items() if k != "path"}},
                                        {**saved, "data": {k: v for k, v in saved["data"].items() if k != "path"}})
            if differs is None and not _same_dataset(saved["data"]["path"], cfg["data"]["path"]):
                differs = f"data.path ({cfg['data']['path']!r} here, {saved['data']['path']!r} there)"
            if differs:
                raise SpaceError(f"add-trials: {run} is a run of another config: {differs}")
            tid = trial_id(full)
            target = out / "trials" / tid
            if tid in have or unfinished and target.exists():
                continue  # in the study already (an unfinished one: running, or enqueued by an earlier call)
            if unfinished:
                # Killed mid-training on a lost machine: its parameters run first and resume the checkpoint.
                shutil.copytree(run, target)
                study.enqueue_trial(params)
                log(f"add-trials: {run} (unfinished, with its checkpoint) -> trial {tid}: resumes first")
                continue
            try:
                trial = optuna.trial.create_trial(params=params, distributions=dists, value=value,
                                                  user_attrs={"run_dir": str(target), "added_from": str(run)})
            except ValueError as err:  # a value outside the space
                raise SpaceError(f"add-trials: {run}: outside the search space: {err}") from None
            if target.resolve() != run.resolve():
                if target.exists():
                    raise SpaceError(f"add-trials: {target} exists already; it would be overwritten by {run}")
                shutil.copytree(run, target)
            study.add_trial(trial)
            have.add(tid)
            added += 1
            log(f"add-trials: {run} -> trial {tid} (valid {metric} = {value:.4f})")
    return added


def trial_id(params: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]


def tune(cfg: Dict[str, Any], dataset, space: Dict[str, Any], out, trials: int, *, log=print,
         seed: Optional[int] = None, add_from: Sequence = ()) -> Dict[str, Any]:
    """Search ``space`` around ``cfg`` for ``trials`` finished trials; returns the best
    trial's ``{"params", "value", "config"}`` and writes the files of the module doc."""
    try:
        import optuna
        from optuna.trial import TrialState
    except ImportError:
        raise ImportError("plr tune needs Optuna: pip install 'plr[tune]' (or pip install optuna)") from None

    from .guards import TrainingDiverged
    from .training import train_run

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: expected a positive integer, got {trials!r}")
    check_space(cfg, space)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric = cfg["eval"]["metric"]
    optuna.logging.set_verbosity(logging.WARNING)
    study = optuna.create_study(
        study_name="plr-tune", storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg["train"]["seed"] if seed is None else seed),
    )
    saved_space = study.user_attrs.get("space")
    if saved_space is not None and saved_space != json.loads(json.dumps(space)):
        raise SpaceError(f"out: {out} holds a study of another search space; use a new --out")
    study.set_user_attr("space", json.loads(json.dumps(space)))
    if add_from:
        add_trials(study, cfg, space, add_from, out, log=log)
    # A resumed study must not replay the random draws of the first session: the
    # sampler's seed moves on with the number of trials already in the study.
    study.sampler = optuna.samplers.TPESampler(seed=(cfg["train"]["seed"] if seed is None else seed) + len(study.trials))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Killed mid-trial: run the same parameters again (their directory resumes).
        study.enqueue_trial(stale.params)
        study.tell(stale.number, state=TrialState.FAIL)

    def finished_ids() -> set:
        return {trial_id(suggest(optuna.trial.FixedTrial(t.params), space))
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}

    def tried_ids() -> set:  # finished, or diverged (training it again would diverge again)
        diverged = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                    if "diverged" in t.user_attrs]
        return finished_ids() | {trial_id(suggest(optuna.trial.FixedTrial(t.params), space)) for t in diverged}

    def objective(trial) -> float:
        params = suggest(trial, space)
        if trial_id(params) in tried_ids():
            # A parameter set already trained would count twice against the
            # budget of distinct trials: draw again.
            log(f"trial {trial.number}: {params} already tried, drawing again")
            raise optuna.TrialPruned("duplicate parameters")
        run_dir = out / "trials" / trial_id(params)
        trial.set_user_attr("run_dir", str(run_dir))
        run_cfg = apply(cfg, params)
        resume = (run_dir / "last.pt").is_file() or any(run_dir.glob("*/last.pt"))
        log(f"trial {trial.number}: {params} -> {run_dir}" + (" (resuming)" if resume else ""))
        try:
            metrics = train_run(run_cfg, dataset, run_dir, resume=resume, log_to_console=False, test=False)
        except KeyboardInterrupt:
            # Stopped (Ctrl-C, SIGTERM): Optuna records the trial as failed, so the same
            # parameters go first in the queue and the next call resumes its last.pt.
            study.enqueue_trial(trial.params)
            raise
        except TrainingDiverged as exc:
            # A parameter set whose objective runs away is an outcome of the search, not
            # an error of it: the trial fails (trials.csv says why), the search goes on.
            trial.set_user_attr("diverged", exc.what)
            log(f"trial {trial.number}: diverged ({exc.what}); it does not count, drawing another")
            raise
        value = float(metrics["valid"][metric])
        log(f"trial {trial.number}: valid {metric} = {value:.4f}")
        return value

    draws = 0
    while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < trials:
        if draws >= 50 * trials:
            found, done = len(tried_ids()), len(finished_ids())
            which = f" ({found - done} of them diverged)" if found > done else ""
            raise SpaceError(f"space: {draws} draws found only {found} distinct parameter sets{which}, "
                             f"{done} finished, fewer than --trials {trials}; widen the space or lower --trials")
        study.optimize(objective, n_trials=1, catch=(TrainingDiverged,))
        draws += 1
    best = study.best_trial
    best_params = suggest(optuna.trial.FixedTrial(best.params), space)
    best_cfg = apply(cfg, best_params)
    config_mod.save(best_cfg, out / "best.yaml")
    write_trials(study, space, metric, out)
    return {"params": best_params, "value": best.value, "config": best_cfg, "trial": best.number,
            "run_dir": best.user_attrs.get("run_dir")}


def write_trials(study, space: Dict[str, Any], metric: str, out: Path) -> None:
    """``trials.csv`` (every trial trained: number, state, parameters, value, and why
    a diverged one failed; not the draws pruned as repeats) and ``history.png``."""
    from optuna.trial import TrialState

    names = list(space)
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)):
        params = {n: t.params.get(space[n]["same_as"] if isinstance(space[n], dict) and "same_as" in space[n]
                                  else n) for n in names}
        rows.append({"trial": t.number, "state": t.state.name, **params, f"valid_{metric}": t.value,
                     "run_dir": t.user_attrs.get("run_dir", ""), "note": t.user_attrs.get("diverged", "")})
    tmp = out / ".tmp-trials.csv"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", "state", *names, f"valid_{metric}", "run_dir", "note"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "trials.csv")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return
    xs = [t.number for t in complete]
    ys = [t.value for t in complete]
    best = [max(ys[: i + 1]) for i in range(len(ys))]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(xs, ys, "o", label="trial")
    ax.step(xs, best, where="post", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png")
    plt.close(fig)


def format_best(best: Dict[str, Any], metric: str, out: Path) -> Sequence[str]:
    return [f"best trial {best['trial']}: valid {metric} = {best['value']:.4f} with {best['params']}",
            f"config: {out / 'best.yaml'} (trials: {out / 'trials.csv'}, {out / 'history.png'})"]
