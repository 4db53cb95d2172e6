"""``plr benchmark SUITE.yaml``: a suite of (model, dataset, config) runs, one
Markdown table with paired t-tests, and the validation curves.

A suite file::

    out: ../runs/main            # run directories go to OUT/<dataset>/<run> (relative to the suite file)
    datasets:                    # name -> path, or {path: ..., <data keys, e.g. max_len>}
      beauty: ../../../shared/data/amazon2014-beauty_seqrecbench
    defaults:                    # config sections merged over every run's shipped config
      train: {epochs: 200, patience: 10}
    reuse: [../runs/tune]        # optional: folders of finished runs to adopt (see below)
    runs:
      - name: sasrec             # unique; the run directory's name
        model: sasrec            # a model of plr.models.MODELS
        config_file: best/sasrec.yaml   # optional, merged over the defaults (relative to the suite file)
        config: {model: {hidden_size: 64}}   # optional, merged last
        datasets: [beauty]       # optional; default: every dataset of the suite
      - name: plr-h0             # no training: the best checkpoint of run "plr",
        from: plr                # evaluated with these model keys changed
        config: {model: {readout: h0}}
    table:
      baseline: sasrec           # every run is t-tested against this one ...
      proposed: [plr]            # ... and these also against the best other trained run
      controls: [sasrec-prefix]  # optional: ablations of a baseline, never the "best other"
      metrics: [recall@10, ndcg@10, recall@20, ndcg@20]
      significance: [ndcg@10, recall@20]

The merge order of a run's config is: the model's shipped YAML <- ``defaults``
<- ``config_file`` <- ``config`` <- the dataset entry's data keys and path.
Everything is checked before any training starts (unknown keys, models,
datasets, metrics, a run directory holding another config), and each error
names the suite entry. A finished run (``metrics.json`` with test metrics) is
skipped, a killed one resumed from its ``last.pt``; the test split is read
once per run. A run whose training diverges (``plr.guards``) is recorded as
such (``DIVERGED`` in its directory, listed in the report) and the suite goes
on with the other runs. A new run whose config (model, data, train and eval keys) is
that of a finished run under a ``reuse`` folder, trained with the test split
withheld (a ``plr tune`` trial, say), adopts it instead of training again: its
best checkpoint, curves and wall time are copied and the test split is read
once (``metrics.json`` names the source under ``"adopted_from"``); a relative
``data.path`` of such a run is read from the current directory, as ``plr tune``
wrote it. ``--only`` checks only the named runs' config files, so one part of
a suite can run while another part's ``config_file`` (from a search still
running) is not written yet. Results: ``OUT/RESULTS.md``, ``OUT/results.json``
one figure of validation curves per dataset, ``OUT/curves-<dataset>.png``, and
one of every run's test gain over the baseline with its 95% interval,
``OUT/gains.png`` (the numbers are in ``results.json``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import yaml

from . import config as config_mod
from .evaluation import metric_names

SUITE_KEYS = {"name", "description", "out", "datasets", "defaults", "reuse", "runs", "table"}
RUN_KEYS = {"name", "model", "from", "config", "config_file", "datasets"}
TABLE_KEYS = {"baseline", "proposed", "controls", "metrics", "significance"}
DEFAULT_METRICS = ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]
DEFAULT_SIGNIFICANCE = ["ndcg@10", "recall@20"]
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SuiteError(ValueError):
    """A suite file that cannot run; the message names the entry."""


@dataclass
class RunSpec:
    name: str
    dataset: str
    cfg: Dict[str, Any]
    run_dir: Path
    source: Optional[str] = None  # "from": evaluate that run's best checkpoint instead of training


@dataclass
class Suite:
    path: Path
    name: str
    out: Path
    datasets: Dict[str, Dict[str, Any]]  # name -> data section overrides (with path)
    runs: List[RunSpec]
    baseline: Optional[str]
    proposed: List[str]
    metrics: List[str]
    significance: List[str]
    run_names: List[str] = field(default_factory=list)
    reuse: List[Path] = field(default_factory=list)  # folders of finished runs to adopt
    controls: List[str] = field(default_factory=list)  # ablations, left out of "best other"


def _mapping(value, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
    return value


def _unknown(given, allowed, where: str) -> None:
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise SuiteError(f"{where}: unknown key(s) {extra}; expected some of {sorted(allowed)}")


def load_suite(path, out=None, only: Optional[List[str]] = None) -> Suite:
    """Read and check a suite file (``out`` replaces its ``out``); raises
    :class:`SuiteError` naming the bad entry. With ``only``, a run outside it
    whose ``config_file`` does not exist yet is left out of ``runs``."""
    from .models import MODELS

    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"suite: no suite file at {str(path)!r}")
    where = f"suite {path}"
    try:
        raw = config_mod.load_yaml(path)
    except (ValueError, yaml.YAMLError) as err:
        raise SuiteError(f"{where}: not a YAML mapping ({err})") from None
    _unknown(raw, SUITE_KEYS, where)
    base = path.resolve().parent
    name = str(raw.get("name") or path.stem)
    out = Path(out) if out is not None else Path(os.path.normpath(base / str(raw.get("out") or f"runs/{name}")))

    datasets: Dict[str, Dict[str, Any]] = {}
    for ds_name, entry in _mapping(raw.get("datasets"), f"{where}: datasets").items():
        ds_where = f"{where}: datasets.{ds_name}"
        if not NAME.match(str(ds_name)):
            raise SuiteError(f"{ds_where}: expected a name of letters, digits and _.+-, got {ds_name!r}")
        entry = {"path": entry} if isinstance(entry, str) else dict(_mapping(entry, ds_where))
        if "path" not in entry:
            raise SuiteError(f"{ds_where}: expected a path")
        data_path = Path(entry["path"])
        data_path = Path(os.path.normpath(data_path if data_path.is_absolute() else base / data_path))
        if not data_path.exists():
            raise SuiteError(f"{ds_where}: no dataset at {str(data_path)!r}")
        entry["path"] = str(data_path)
        datasets[str(ds_name)] = entry
    if not datasets:
        raise SuiteError(f"{where}: datasets: expected at least one dataset")

    defaults = _mapping(raw.get("defaults"), f"{where}: defaults")
    reuse = raw.get("reuse") or []
    if not isinstance(reuse, list) or not all(isinstance(d, str) for d in reuse):
        raise SuiteError(f"{where}: reuse: expected a list of folders, got {reuse!r}")
    reuse = [Path(os.path.normpath(Path(d) if Path(d).is_absolute() else base / d)) for d in reuse]
    for folder in reuse:
        if not folder.is_dir():
            raise SuiteError(f"{where}: reuse: no folder at {str(folder)!r}")
    entries = raw.get("runs")
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{where}: runs: expected a non-empty list of runs")
    runs: List[RunSpec] = []
    by_name: Dict[str, Dict[str, Any]] = {}
    resolved: Dict[str, Dict[str, Any]] = {}  # run name -> its config before the dataset keys
    pending = set()  # runs outside ``only`` whose config_file is not written yet
    for i, entry in enumerate(entries):
        entry = _mapping(entry, f"{where}: runs[{i}]")
        run_name = entry.get("name")
        run_where = f"{where}: runs[{i}] ({run_name!r})"
        _unknown(entry, RUN_KEYS, run_where)
        if not isinstance(run_name, str) or not NAME.match(run_name):
            raise SuiteError(f"{run_where}: name: expected letters, digits and _.+-, got {run_name!r}")
        if run_name in by_name:
            raise SuiteError(f"{run_where}: name: {run_name!r} is used twice")
        source = entry.get("from")
        if source is not None and source in pending:
            by_name[run_name] = entry
            pending.add(run_name)
            continue
        if source is not None:
            if source not in by_name or by_name[source].get("from") is not None:
                raise SuiteError(f"{run_where}: from: expected an earlier trained run, got {source!r}")
            model = by_name[source]["model"]
            if entry.get("model", model) != model:
                raise SuiteError(f"{run_where}: model: a run evaluated from {source!r} is a {model}, "
                                 f"got {entry['model']!r}")
            extra = set(_mapping(entry.get("config"), f"{run_where}: config")) - {"model"}
            if extra or entry.get("config_file"):
                raise SuiteError(f"{run_where}: a run evaluated from another one changes model keys only, "
                                 f"got {sorted(extra) or 'config_file'}")
            entry = {**entry, "model": model, "datasets": entry.get("datasets", by_name[source].get("datasets"))}
        model = entry.get("model")
        if model not in MODELS:
            raise SuiteError(f"{run_where}: model: expected one of {sorted(MODELS)}, got {model!r}")
        ds_names = entry.get("datasets") or list(datasets)
        if not isinstance(ds_names, list) or any(d not in datasets for d in ds_names):
            raise SuiteError(f"{run_where}: datasets: expected a list of {sorted(datasets)}, got {ds_names!r}")
        if source is not None:
            missing = set(ds_names) - set(by_name[source].get("datasets") or datasets)
            if missing:
                raise SuiteError(f"{run_where}: datasets: run {source!r} is not trained on {sorted(missing)}")
        # A "from" run is its source's config with some model keys changed.
        cfg = config_mod.merge(config_mod.shipped_config(model), defaults) if source is None else resolved[source]
        if entry.get("config_file"):
            file = Path(entry["config_file"])
            file = file if file.is_absolute() else base / file
            if not file.is_file() and only is not None and run_name not in only:
                by_name[run_name] = entry
                pending.add(run_name)
                continue
            if not file.is_file():
                raise SuiteError(f"{run_where}: config_file: no file at {str(file)!r}")
            cfg = config_mod.merge(cfg, config_mod.load_yaml(file))
        cfg = config_mod.merge(cfg, _mapping(entry.get("config"), f"{run_where}: config"))
        cfg.setdefault("model", {})["name"] = model
        by_name[run_name], resolved[run_name] = entry, cfg
        for ds_name in ds_names:
            run_cfg = config_mod.merge(cfg, {"data": datasets[ds_name]})
            try:
                run_cfg = config_mod.check(run_cfg)
                config_mod.check_model(run_cfg)
            except (ValueError, TypeError) as err:
                raise SuiteError(f"{run_where} on {ds_name}: {err}") from None
            runs.append(RunSpec(run_name, ds_name, run_cfg, out / ds_name / run_name, source))

    table = _mapping(raw.get("table"), f"{where}: table")
    _unknown(table, TABLE_KEYS, f"{where}: table")
    names = list(by_name)
    baseline = table.get("baseline", names[0])
    if baseline not in by_name:
        raise SuiteError(f"{where}: table.baseline: expected one of the runs {names}, got {baseline!r}")
    proposed = table.get("proposed") or []
    if not isinstance(proposed, list) or any(p not in by_name for p in proposed):
        raise SuiteError(f"{where}: table.proposed: expected a list of runs among {names}, got {proposed!r}")
    controls = table.get("controls") or []
    if (not isinstance(controls, list) or any(c not in by_name for c in controls)
            or set(controls) & ({baseline} | set(proposed))):
        raise SuiteError(f"{where}: table.controls: expected a list of runs among {names}, other than the "
                         f"baseline and the proposed runs, got {controls!r}")
    metrics = table.get("metrics") or DEFAULT_METRICS
    significance = table.get("significance") or DEFAULT_SIGNIFICANCE
    for key, values in (("metrics", metrics), ("significance", significance)):
        for run in runs:
            known = metric_names(run.cfg["eval"]["ks"])
            bad = [m for m in values if m not in known] if isinstance(values, list) else values
            if bad:
                raise SuiteError(f"{where}: table.{key}: expected metrics among {known} (eval.ks of run "
                                 f"{run.name!r}), got {bad!r}")
    suite = Suite(path, name, out, datasets, runs, baseline, list(proposed), list(metrics), list(significance),
                  names, reuse, list(controls))
    _check_run_dirs(suite)
    return suite


def _check_run_dirs(suite: Suite) -> None:
    """A run directory that holds a run of another config would be skipped or
    resumed wrongly: refuse it before anything starts."""
    for run in suite.runs:
        saved = run.run_dir / "config.yaml"
        if saved.is_file():
            try:
                from .training import same_config

                old = same_config(config_mod.load_yaml(saved))
            except (ValueError, TypeError, yaml.YAMLError):
                old = None
            if old != run.cfg:
                raise SuiteError(f"suite {suite.path}: run {run.name!r} on {run.dataset}: {run.run_dir} holds a run "
                                 f"with another config; delete that directory or rename the run")


# Written into a run directory whose training diverged (plr.guards): the reason. The run
# is skipped from then on, and reported without a test result; delete the file to retry.
DIVERGED = "DIVERGED"


def run_status(run: RunSpec) -> str:
    """``done`` (metrics.json with test metrics), ``diverged`` (its training stopped on a
    diverging or non-finite loss: ``DIVERGED``), ``partial`` (last.pt) or ``new``."""
    metrics = run.run_dir / "metrics.json"
    if metrics.is_file():
        try:
            if json.loads(metrics.read_text()).get("test"):
                return "done"
        except json.JSONDecodeError:
            pass
    if (run.run_dir / DIVERGED).is_file():
        return "diverged"
    if (run.run_dir / "last.pt").is_file() or any(run.run_dir.glob("*/last.pt")):
        return "partial"
    return "new"


def _eval_kwargs(run: RunSpec) -> Dict[str, Any]:
    """``plr.evaluation.evaluate``'s settings from the run's ``eval`` section."""
    e = run.cfg["eval"]
    return dict(ks=e["ks"], batch_size=e["batch_size"], exclude_history=e["exclude_history"], ties=e["ties"])


def evaluate_from(run: RunSpec, source_dir: Path, dataset) -> Dict[str, Any]:
    """A run without training: the best checkpoint of ``source_dir`` with the model
    keys of ``run.cfg`` applied, evaluated on validation and test."""
    from .evaluation import evaluate
    from .models.base import SequentialRecommender
    from .training import BEST, save_ranks, write_json_atomic

    saved, extra = SequentialRecommender.load_with_extra(str(source_dir / BEST))
    changed = {k: v for k, v in run.cfg["model"].items() if k != "name" and saved.config().get(k, v) != v}
    model = type(saved)(**{**saved.config(), **changed})
    model.load_state_dict(saved.state_dict())
    kw = _eval_kwargs(run)
    valid = evaluate(model, dataset.valid, **kw).metrics
    result = evaluate(model, dataset.test, **kw)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    config_mod.save(run.cfg, run.run_dir / "config.yaml")
    model.save(str(run.run_dir / BEST), extra=extra)
    save_ranks(run.run_dir / "test_ranks.csv", result.users, result.ranks)
    source_metrics = json.loads((source_dir / "metrics.json").read_text())
    metrics = {"valid": valid, "test": result.metrics, "from": str(source_dir), "changed": changed,
               "best_epoch": source_metrics.get("best_epoch"), "epochs": source_metrics.get("epochs"),
               "train_seconds": source_metrics.get("train_seconds"), "model": run.cfg["model"]["name"],
               "dataset": dataset.name, "history": []}
    write_json_atomic(metrics, run.run_dir / "metrics.json")
    return metrics


def _same_dataset(saved_path, path) -> bool:
    saved, path = Path(str(saved_path)), Path(path)
    try:
        return saved.exists() and os.path.samefile(saved, path)
    except OSError:
        return False


def find_reusable(run: RunSpec, folders: List[Path]) -> Optional[Path]:
    """A finished run directory under ``folders`` of the same config as ``run``
    (same dataset, every other key equal), with its best checkpoint; or None."""
    from .training import BEST, same_config

    want = {**run.cfg, "data": {k: v for k, v in run.cfg["data"].items() if k != "path"}}
    for folder in folders:
        for saved in sorted(folder.rglob("config.yaml")):
            source = saved.parent
            if source.resolve() == run.run_dir.resolve() or not (source / BEST).is_file():
                continue
            try:
                metrics = json.loads((source / "metrics.json").read_text())
                cfg = same_config(config_mod.load_yaml(saved))
            except (OSError, ValueError, TypeError, yaml.YAMLError):
                continue  # unfinished (no metrics.json yet) or not a run of plr
            data = dict(cfg.get("data") or {})
            if not metrics.get("valid") or not _same_dataset(data.pop("path", ""), run.cfg["data"]["path"]):
                continue
            if {**cfg, "data": data} == want:
                return source
    return None


def adopt_run(run: RunSpec, source_dir: Path, dataset) -> Dict[str, Any]:
    """Make ``source_dir`` (a finished run of ``run.cfg``) this run: copy its best
    checkpoint, log and curves, and read the test split once (unless the source
    already did)."""
    import shutil

    from .evaluation import evaluate
    from .models.base import SequentialRecommender
    from .training import BEST, save_ranks, write_json_atomic

    metrics = json.loads((source_dir / "metrics.json").read_text())
    run.run_dir.mkdir(parents=True, exist_ok=True)
    for name in (BEST, "train.log", "test_ranks.csv"):
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, run.run_dir / name)
    config_mod.save(run.cfg, run.run_dir / "config.yaml")
    if not metrics.get("test"):
        best = SequentialRecommender.load(str(run.run_dir / BEST))
        result = evaluate(best, dataset.test, **_eval_kwargs(run))
        save_ranks(run.run_dir / "test_ranks.csv", result.users, result.ranks)
        metrics["test"] = result.metrics
    metrics["adopted_from"] = str(source_dir)
    write_json_atomic(metrics, run.run_dir / "metrics.json")
    return metrics


def run_suite(suite: Suite, *, only: Optional[List[str]] = None, log=print, skip_busy: bool = False) -> Path:
    """Run every unfinished run of ``suite`` (or of ``only``), then write the report.
    Each run holds its directory's lock (``plr.run_lock``); one that another
    process holds raises ``RunDirBusy``, or with ``skip_busy`` is left to it, so
    that several processes can share one suite."""
    from .run_lock import RunDirBusy, run_dir_lock

    todo = [r for r in suite.runs if only is None or r.name in only]
    loaded: Dict[str, Any] = {}
    for i, run in enumerate(todo, start=1):
        tag = f"[{i}/{len(todo)}] {run.name} on {run.dataset}"
        try:
            with run_dir_lock(run.run_dir):
                _run_one(suite, run, tag, loaded, log)
        except RunDirBusy as err:
            if not skip_busy:
                raise
            log(f"{tag}: left to another process ({err.what})")
    return write_report(suite)


def _run_one(suite: Suite, run: RunSpec, tag: str, loaded: Dict[str, Any], log) -> None:
    """One run of ``run_suite``, under its directory's lock."""
    from .data import load_dataset
    from .guards import TrainingDiverged
    from .training import train_run

    status = run_status(run)  # read under the lock: another process may have just finished it
    if status == "done":
        log(f"{tag}: finished before, skipped")
        return
    if status == "diverged":
        log(f"{tag}: diverged before, skipped (delete {run.run_dir / DIVERGED} to train it again)")
        return
    key = json.dumps(run.cfg["data"], sort_keys=True)
    if key not in loaded:
        loaded.clear()  # one dataset in memory at a time
        loaded[key] = load_dataset(run.cfg["data"])
    dataset = loaded[key]
    started = time.perf_counter()
    if run.source is not None and (run.run_dir.parent / run.source / DIVERGED).is_file():
        _mark_diverged(run, f"its source run {run.source!r} diverged")
        log(f"{tag}: skipped, its source run {run.source!r} diverged")
        return
    if run.source is not None:
        log(f"{tag}: evaluating the best checkpoint of {run.source!r}")
        metrics = evaluate_from(run, run.run_dir.parent / run.source, dataset)
    elif status == "new" and (source := find_reusable(run, suite.reuse)) is not None:
        log(f"{tag}: adopting {source} (a finished run of the same config); reading its test split")
        metrics = adopt_run(run, source, dataset)
    else:
        log(f"{tag}: {'resuming' if status == 'partial' else 'training'} in {run.run_dir}")
        run.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            metrics = train_run(run.cfg, dataset, run.run_dir, resume=status == "partial", log_to_console=False)
        except TrainingDiverged as exc:
            # An outcome of this config on this dataset: recorded, and the suite goes on.
            _mark_diverged(run, exc.what)
            log(f"{tag}: diverged, no test result ({exc.what}); the suite goes on")
            return
    log(f"{tag}: test " + " ".join(f"{m}={metrics['test'][m]:.4f}" for m in suite.metrics)
        + f" ({time.perf_counter() - started:.0f} s)")


def _mark_diverged(run: RunSpec, reason: str) -> None:
    run.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run.run_dir / f".tmp-{DIVERGED}"
    tmp.write_text(reason + "\n")
    tmp.replace(run.run_dir / DIVERGED)


# -- the report ----------------------------------------------------------------------


def _collect(suite: Suite) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{dataset: {run: metrics.json}} of the finished runs."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for run in suite.runs:
        if run_status(run) == "done":
            out.setdefault(run.dataset, {})[run.name] = json.loads((run.run_dir / "metrics.json").read_text())
    return out


def epochs_cell(m: Dict[str, Any]) -> str:
    """``epochs (best epoch)`` of a run's metrics.json; a two-phase run (LARES) gives
    both phases, ``SPT + RPT``, and RPT's best epoch -1 (no RPT epoch beat the SPT
    model, whose weights it keeps) reads ``spt``."""
    def one(phase):
        best = phase.get("best_epoch")
        return f"{phase.get('epochs')} ({'spt' if best == -1 and 'spt' in m else best})"
    return f"{one(m['spt'])} + {one(m)}" if isinstance(m.get("spt"), dict) else one(m)


def _significance_cell(test) -> str:
    return f"{test.relative:+.1f}% (p={test.p:.2g})"


def baseline_tests(suite: Suite, ds_name: str, finished: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``{run: {metric: PairedTest}}``: every finished run but the baseline
    against it, per significance metric (empty without a finished baseline)."""
    from .significance import compare_runs

    if suite.baseline not in finished:
        return {}
    folder = suite.out / ds_name
    return {name: {metric: compare_runs(folder / suite.baseline, folder / name, metric)
                   for metric in suite.significance}
            for name in finished if name != suite.baseline}


def dataset_table(suite: Suite, ds_name: str, finished: Dict[str, Dict[str, Any]],
                  tests: Optional[Dict[str, Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Rows of one dataset's table, with the t-tests against the baseline
    (``tests``, from :func:`baseline_tests` when not given) and, for proposed
    runs, against the best other trained run of each metric (a control, an
    ablation of another model, is never that run)."""
    from .significance import compare_runs

    if tests is None:
        tests = baseline_tests(suite, ds_name, finished)
    folder = suite.out / ds_name
    sources = {r.name: r.source for r in suite.runs}
    rows = []
    for name, m in finished.items():
        row: Dict[str, Any] = {"run": name, "model": m["model"]}
        row.update({metric: m["test"][metric] for metric in suite.metrics})
        minutes = (m.get("train_seconds") or 0.0) / 60
        row["epochs (best)"] = epochs_cell(m)
        row["train min"] = (f"{minutes:.1f}" + (f" (of {sources[name]})" if sources.get(name) else "")
                            + (" (adopted)" if m.get("adopted_from") else ""))
        for metric in suite.significance:
            if name in tests:
                row[f"vs {suite.baseline} {metric}"] = _significance_cell(tests[name][metric])
            if name in suite.proposed:
                others = {o: om["test"][metric] for o, om in finished.items()
                          if o not in suite.proposed and o not in suite.controls and not sources.get(o)}
                if others:
                    best = max(others, key=others.get)
                    row[f"vs best other {metric}"] = (
                        f"{best}: " + _significance_cell(compare_runs(folder / best, folder / name, metric)))
        rows.append(row)
    return rows


def report_columns(suite: Suite, rows: List[Dict[str, Any]]) -> List[str]:
    """The columns of a dataset's table, in one order for every dataset: run,
    model, the metrics, epochs, time, then per significance metric the test
    against the baseline and against the best other run. Only columns some row
    fills are kept (a table without a proposed run has no "vs best other")."""
    order = ["run", "model", *suite.metrics, "epochs (best)", "train min"]
    for metric in suite.significance:
        order += [f"vs {suite.baseline} {metric}", f"vs best other {metric}"]
    present = {k for r in rows for k in r}
    unknown = present - set(order)
    if unknown:
        raise ValueError(f"report_columns: row keys {sorted(unknown)} have no place in the table's columns {order}")
    return [c for c in order if c in present]


def plot_curves(suite: Suite, ds_name: str, finished: Dict[str, Dict[str, Any]], metric: str) -> Optional[Path]:
    """Validation ``metric`` per epoch of every trained run of one dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = {n: [h.get(f"valid_{metric}") for h in m.get("history", [])] for n, m in finished.items()}
    curves = {n: c for n, c in curves.items() if c and all(v is not None for v in c)}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"{suite.name}: {ds_name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, suite.out / f"curves-{ds_name}.png")


def _save_figure(fig, path: Path) -> Path:
    """``fig`` to ``path`` atomically (two processes may write the report), then closed."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    plt.close(fig)
    return path


def plot_gains(suite: Suite, tests: Dict[str, Dict[str, Dict[str, Any]]]) -> Optional[Path]:
    """``OUT/gains.png``: every run against the baseline on every dataset, one
    panel per significance metric: the relative difference of the test means
    with its 95% interval (paired over users; filled where p < 0.05).
    ``tests``: ``{dataset: {run: {metric: PairedTest}}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(ds, run) for ds, by_run in tests.items() for run in by_run]
    if not rows:
        return None
    runs = list(dict.fromkeys(run for _, run in rows))
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    metrics = suite.significance
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 1.0 + 0.32 * len(rows)),
                             dpi=100, sharey=True, squeeze=False)
    y = list(range(len(rows)))[::-1]  # the first dataset's first run on top
    for ax, metric in zip(axes[0], metrics):
        for yi, (ds, run) in zip(y, rows):
            test = tests[ds][run][metric]
            low, high = test.relative_ci
            filled = test.p < 0.05
            ax.errorbar([test.relative], [yi], xerr=[[test.relative - low], [high - test.relative]],
                        fmt="o", color=colours[run], mfc=colours[run] if filled else "white", capsize=3)
        for yi, (prev, cur) in zip(y[1:], zip(rows, rows[1:])):
            if prev[0] != cur[0]:  # a line between two datasets
                ax.axhline(yi + 0.5, color="grey", linewidth=0.6)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"test {metric} vs {suite.baseline} (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(y, [f"{ds}: {run}" for ds, run in rows])
    fig.suptitle(f"{suite.name}: against {suite.baseline}, 95% interval (filled: p < 0.05)", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, suite.out / "gains.png")


def _gains_json(tests: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """One dataset's ``{run: {metric: PairedTest}}`` as results.json holds it."""
    return {run: {metric: {"relative_pct": t.relative, "ci95_pct": list(t.relative_ci), "p": t.p,
                           "users": t.users}
                  for metric, t in by_metric.items()}
            for run, by_metric in tests.items()}


def write_report(suite: Suite) -> Path:
    """``OUT/RESULTS.md``, ``OUT/results.json`` and the figures (curves, gains) from the finished runs."""
    from .reporting import markdown_table
    from .training import write_json_atomic

    suite.out.mkdir(parents=True, exist_ok=True)
    finished = _collect(suite)
    lines = [f"# {suite.name}", "",
             f"Suite `{suite.path}`; {sum(len(v) for v in finished.values())} of {len(suite.runs)} runs finished; "
             f"written {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'} "
             f"({platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}).",
             "Test metrics of the checkpoint with the best validation metric; paired t-tests over test users "
             "(relative difference, p).", ""]
    diverged = [r for r in suite.runs if run_status(r) == "diverged"]
    if diverged:
        lines += ["Diverged (training stopped by `plr.guards`; no test result):", ""]
        lines += [f"- {r.name} on {r.dataset}: {(r.run_dir / DIVERGED).read_text().strip()}" for r in diverged]
        lines.append("")
    report: Dict[str, Any] = {"suite": str(suite.path), "datasets": {}}
    tests = {ds_name: baseline_tests(suite, ds_name, runs) for ds_name, runs in finished.items()}
    gains = plot_gains(suite, tests)
    if gains is not None:
        lines += [f"![test gains over {suite.baseline}]({gains.name})", ""]
    for ds_name, runs in finished.items():
        rows = dataset_table(suite, ds_name, runs, tests[ds_name])
        columns = report_columns(suite, rows)
        lines += [f"## {ds_name}", "", markdown_table(rows, columns), ""]
        metric = next(r.cfg["eval"]["metric"] for r in suite.runs if r.dataset == ds_name)
        figure = plot_curves(suite, ds_name, runs, metric)
        if figure is not None:
            lines += [f"![validation curves]({figure.name})", ""]
        report["datasets"][ds_name] = {"rows": rows, "vs_baseline": _gains_json(tests[ds_name]), "runs": runs}
    path = suite.out / "RESULTS.md"
    tmp = path.with_name(f".tmp-{os.getpid()}-RESULTS.md")  # two processes may write the report
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    write_json_atomic(report, suite.out / "results.json")
    return path
