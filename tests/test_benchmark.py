"""`plr benchmark` (suites of runs -> one table) and `plr tune` (Optuna on validation)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from plr import config
from plr.benchmark import SuiteError, find_reusable, load_suite, run_status, run_suite
from plr.cli import main
from plr.tuning import SpaceError, load_space, tune

from conftest import benchmark_script, cli_error

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suites" / "ci-tiny.yaml"
DATA = ROOT.parent / "shared" / "data" / "ml-100k_recbole"
PNG = b"\x89PNG\r\n\x1a\n"


def suite_copy(tmp_path, edit=None):
    """The CI suite with absolute dataset paths, edited by ``edit(raw)``, written to tmp_path."""
    raw = yaml.safe_load(SUITE.read_text())
    raw["datasets"] = {"ml100k": str(DATA)}
    raw["out"] = str(tmp_path / "out")
    if edit:
        edit(raw)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["benchmark", str(SUITE), "--out", str(out)]) == 0
    return out


def test_the_ci_suite_runs_end_to_end_and_writes_the_table(finished):
    report = (finished / "RESULTS.md").read_text()
    for run in ("sasrec", "plr", "plr-h0"):
        assert f"| {run} |" in report
        metrics = json.loads((finished / "ml100k" / run / "metrics.json").read_text())
        assert 0 <= metrics["test"]["ndcg@10"] <= metrics["test"]["recall@10"] <= 1
    assert "vs sasrec ndcg@10" in report and "vs best other recall@20" in report
    figure = (finished / "curves-ml100k.png").read_bytes()
    assert figure.startswith(PNG) and len(figure) > 5000
    results = json.loads((finished / "results.json").read_text())
    history = results["datasets"]["ml100k"]["runs"]["plr"]["history"]
    assert [h["epoch"] for h in history] == [0, 1] and all("valid_ndcg@10" in h for h in history)
    # the gains figure and its numbers: every run but the baseline, per significance metric
    assert "![test gains over sasrec](gains.png)" in report
    assert (finished / "gains.png").read_bytes().startswith(PNG)
    gains = results["datasets"]["ml100k"]["vs_baseline"]
    assert set(gains) == {"plr", "plr-h0"} and all(set(g) == {"ndcg@10", "recall@20"} for g in gains.values())
    for g in (v for by_metric in gains.values() for v in by_metric.values()):
        low, high = g["ci95_pct"]
        assert low <= g["relative_pct"] <= high and g["users"] > 0
        assert (g["p"] < 0.05) == (low > 0 or high < 0)  # the interval excludes 0 exactly when p < 0.05
        row = f"{g['relative_pct']:+.1f}% (p={g['p']:.2g})"
        assert row in report


def test_the_paired_test_gives_the_95_percent_interval_of_the_mean_difference():
    from scipy import stats

    from plr.evaluation import per_user_metric
    from plr.significance import paired_test

    rng = np.random.default_rng(3)
    a = {u: int(rng.integers(1, 40)) for u in range(1, 400)}
    b = {u: max(1, r - int(rng.integers(-3, 8))) for u, r in a.items()}
    b[1000] = 1  # a user only one run ranks: left out
    res = paired_test(a, b, "ndcg@10")
    ma, mb = (per_user_metric(np.array([x[u] for u in sorted(a)]), "ndcg@10") for x in (a, b))
    d = mb - ma
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert res.users == len(a) and res.diff > 0
    assert res.ci_low == pytest.approx(d.mean() - half) and res.ci_high == pytest.approx(d.mean() + half)
    low, high = res.relative_ci
    assert low == pytest.approx((d.mean() - half) / ma.mean() * 100) and low < res.relative < high
    same = paired_test(a, a, "ndcg@10")
    assert (same.p, same.ci_low, same.ci_high, same.relative_ci) == (1.0, 0.0, 0.0, (0.0, 0.0))


def test_every_dataset_table_has_its_columns_in_one_order(tmp_path):
    """A baseline run listed before the proposed one used to put all the "vs
    sasrec" columns first on one dataset and interleave them on another."""
    from plr.benchmark import report_columns

    suite = load_suite(suite_copy(tmp_path))
    metrics = {m: 0.1 for m in suite.metrics}
    sig = suite.significance
    baseline_first = [
        {"run": "sasrec", "model": "sasrec", **metrics, "epochs (best)": "2 (1)", "train min": "0.1"},
        {"run": "erl", "model": "erl", **metrics, "epochs (best)": "2 (1)", "train min": "0.1",
         **{f"vs sasrec {m}": "+1%" for m in sig}},
        {"run": "plr", "model": "plr", **metrics, "epochs (best)": "2 (1)", "train min": "0.1",
         **{k: "+1%" for m in sig for k in (f"vs sasrec {m}", f"vs best other {m}")}},
    ]
    want = ["run", "model", *suite.metrics, "epochs (best)", "train min"]
    want += [k for m in sig for k in (f"vs sasrec {m}", f"vs best other {m}")]
    assert len(sig) >= 2
    assert report_columns(suite, baseline_first) == want
    assert report_columns(suite, baseline_first[::-1]) == want
    assert report_columns(suite, baseline_first[:2]) == [c for c in want if "best other" not in c]
    with pytest.raises(ValueError, match="stray"):
        report_columns(suite, [{"run": "x", "stray": 1}])


def _with_a_control(raw):
    raw["runs"].insert(1, {"name": "sasrec-prefix", "model": "sasrec", "config": {"train": {"samples": "prefix"}}})
    raw["table"]["controls"] = ["sasrec-prefix"]


def test_a_control_is_tested_against_the_baseline_but_is_never_the_best_other(tmp_path, monkeypatch):
    """A control (an untuned ablation of a baseline) with the best test score
    must not become the "best other" a proposed run is judged against."""
    import plr.significance
    from plr.benchmark import dataset_table

    suite = load_suite(suite_copy(tmp_path, _with_a_control))
    assert suite.controls == ["sasrec-prefix"]
    tested = []

    class Test:
        relative, p = 1.0, 0.5

    def fake_compare(a, b, metric):
        tested.append((Path(a).name, Path(b).name, metric))
        return Test()

    monkeypatch.setattr(plr.significance, "compare_runs", fake_compare)
    score = {"sasrec": 0.2, "sasrec-prefix": 0.9, "plr": 0.3}
    finished = {n: {"model": "sasrec" if n != "plr" else "plr", "test": {m: v for m in suite.metrics},
                    "epochs": 2, "best_epoch": 1, "train_seconds": 6.0} for n, v in score.items()}
    rows = {r["run"]: r for r in dataset_table(suite, "ml100k", finished)}
    for metric in suite.significance:
        assert rows["plr"][f"vs best other {metric}"].startswith("sasrec: ")
        assert rows["sasrec-prefix"][f"vs sasrec {metric}"] == "+1.0% (p=0.5)"
        assert ("sasrec", "sasrec-prefix", metric) in tested and ("sasrec-prefix", "plr", metric) not in tested
    # without the control mark the same numbers pick the ablation
    monkeypatch.setattr(suite, "controls", [])
    rows = {r["run"]: r for r in dataset_table(suite, "ml100k", finished)}
    assert rows["plr"]["vs best other ndcg@10"].startswith("sasrec-prefix: ")


@pytest.mark.parametrize("controls", [["nope"], ["sasrec"], ["plr"], "sasrec-prefix"])
def test_a_bad_control_list_is_refused_before_training(tmp_path, controls):
    def edit(raw):
        _with_a_control(raw)
        raw["table"]["controls"] = controls

    with pytest.raises(SuiteError, match="table.controls: expected a list of runs"):
        load_suite(suite_copy(tmp_path, edit))


def test_a_run_from_a_checkpoint_is_that_checkpoint_with_the_changed_readout(finished):
    from plr.data import load_dataset
    from plr.evaluation import evaluate
    from plr.models import SequentialRecommender

    suite = load_suite(SUITE, out=finished)
    model = SequentialRecommender.load(str(finished / "ml100k" / "plr" / "best.pt"))
    model.readout = "h0"
    run = next(r for r in suite.runs if r.name == "plr-h0")
    want = evaluate(model, load_dataset(run.cfg["data"]).test, ks=run.cfg["eval"]["ks"]).metrics
    got = json.loads((finished / "ml100k" / "plr-h0" / "metrics.json").read_text())
    assert got["test"] == pytest.approx(want, abs=0, rel=1e-12)
    assert got["changed"] == {"readout": "h0"}
    ranks = np.loadtxt(finished / "ml100k" / "plr-h0" / "test_ranks.csv", delimiter=",", skiprows=1)
    assert ranks.shape[1] == 2 and (ranks[:, 1] >= 1).all()


def test_finished_runs_are_skipped(finished, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished.glob("ml100k/*/metrics.json")}
    assert main(["benchmark", str(SUITE), "--out", str(finished)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == 3
    assert before == {p: p.stat().st_mtime_ns for p in finished.glob("ml100k/*/metrics.json")}


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    import plr.evaluation

    path = suite_copy(tmp_path, lambda raw: raw.update(runs=raw["runs"][:1], table={"baseline": "sasrec"}))
    suite = load_suite(path)
    real, calls = plr.evaluation.evaluate, []  # the trainer's validation calls it (through plr.distributed)

    def dies_in_the_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(plr.evaluation, "evaluate", dies_in_the_second_validation)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, log=lambda msg: None)
    monkeypatch.setattr(plr.evaluation, "evaluate", real)
    assert run_status(suite.runs[0]) == "partial"
    lines = []
    run_suite(load_suite(path), log=lines.append)
    assert any("resuming" in line for line in lines)
    resumed = json.loads((suite.runs[0].run_dir / "metrics.json").read_text())
    fresh = load_suite(path, out=tmp_path / "fresh")
    run_suite(fresh, log=lambda msg: None)
    uninterrupted = json.loads((fresh.runs[0].run_dir / "metrics.json").read_text())
    assert resumed["test"] == uninterrupted["test"] and resumed["valid"] == uninterrupted["valid"]


def test_a_diverged_run_is_reported_and_the_suite_goes_on(tmp_path, capsys):
    """A run stopped by plr.guards: DIVERGED in its directory (the reason), the other runs
    train, a run evaluated from its checkpoint is skipped too, the report lists both, and
    the next call skips them (exit 0; the diverged runs are named on stderr)."""
    def edit(raw):
        raw["runs"][1]["config"]["train"] = {"divergence_limit": 0.5}  # L_NIP starts near ln(1682) = 7.4

    path = suite_copy(tmp_path, edit)
    lines = []
    run_suite(load_suite(path), log=lines.append)
    suite = load_suite(path)
    assert [run_status(r) for r in suite.runs] == ["done", "diverged", "diverged"]
    plr, h0 = suite.runs[1], suite.runs[2]
    assert "exceeds train.divergence_limit = 0.5" in (plr.run_dir / "DIVERGED").read_text()
    assert (plr.run_dir / "last.pt").is_file()  # the last good state, as after any stop
    assert "its source run 'plr' diverged" in (h0.run_dir / "DIVERGED").read_text()
    assert any("diverged, no test result" in line and "the suite goes on" in line for line in lines)
    report = (suite.out / "RESULTS.md").read_text()
    assert "Diverged (training stopped by `plr.guards`; no test result):" in report
    assert "- plr on ml100k: training stopped: loss term" in report and "- plr-h0 on ml100k: its source" in report
    capsys.readouterr()
    assert main(["benchmark", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("diverged before, skipped (delete ") == 2
    assert "2 run(s) diverged, without a test result (see the report): plr on ml100k, plr-h0 on ml100k" \
        in captured.err
    assert main(["benchmark", str(path), "--check"]) == 0
    assert "diverged" in capsys.readouterr().out


BAD_SUITES = [
    (lambda raw: raw["runs"][0].update(model="sasrekt"), r"runs\[0\] \('sasrec'\): model: expected one of"),
    (lambda raw: raw.update(datasets={"ml100k": "/nonexistent/data"}), r"datasets.ml100k: no dataset at"),
    (lambda raw: raw["runs"][1].update(config={"train": {"epoch": 3}}), r"runs\[1\] \('plr'\).*unknown key.*'epoch'"),
    (lambda raw: raw["runs"][1].update(config={"model": {"num_stream": 3}}),
     r"runs\[1\] \('plr'\).*unknown key.*'model.num_stream'"),
    (lambda raw: raw.update(extra=1), r"unknown key\(s\) \['extra'\]"),
    (lambda raw: raw["runs"][2].update({"from": "plr2"}), r"runs\[2\] \('plr-h0'\): from: expected an earlier"),
    (lambda raw: raw["runs"][2].update(config={"train": {"lr": 0.1}}), r"runs\[2\].*changes model keys only"),
    (lambda raw: raw["runs"][0].update(datasets=["beauty"]), r"runs\[0\] \('sasrec'\): datasets: expected"),
    (lambda raw: raw["runs"].append({"name": "sasrec", "model": "sasrec"}), r"runs\[3\].*used twice"),
    (lambda raw: raw["table"].update(baseline="bert"), r"table.baseline: expected one of the runs"),
    (lambda raw: raw["table"].update(metrics=["ndcg@100"]), r"table.metrics: expected metrics among"),
    (lambda raw: raw.update(reuse="runs"), r"reuse: expected a list of folders"),
    (lambda raw: raw.update(reuse=["/nonexistent/runs"]), r"reuse: no folder at '/nonexistent/runs'"),
]


@pytest.mark.parametrize("edit, message", BAD_SUITES)
def test_bad_suites_fail_before_any_training_naming_the_entry(tmp_path, edit, message, capsys):
    import re

    path = suite_copy(tmp_path, edit)
    line = cli_error(capsys, ["benchmark", path])
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_a_run_directory_of_another_config_is_refused(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "ml100k" / "sasrec", out / "ml100k" / "sasrec")
    path = suite_copy(tmp_path, lambda raw: raw["defaults"]["train"].update(lr=0.002))
    with pytest.raises(SuiteError, match=r"run 'sasrec' on ml100k: .* holds a run with another config"):
        load_suite(path)


def test_a_finished_run_of_the_same_config_is_adopted_and_its_test_read_once(tmp_path, monkeypatch, capsys):
    """A run trained with the test split withheld (as `plr tune` trains its trials),
    under a `reuse` folder, becomes the suite's run: no training, the test split
    read once from its best checkpoint, its curves and wall time kept; a run of
    another config is not adopted."""
    import plr.training
    from plr.data import load_dataset
    from plr.evaluation import evaluate
    from plr.models import SequentialRecommender
    from plr.training import train_run

    def only_sasrec(raw):
        raw.update(runs=raw["runs"][:1], table={"baseline": "sasrec"}, reuse=[str(tmp_path / "search")])

    (tmp_path / "search").mkdir()
    suite = load_suite(suite_copy(tmp_path, only_sasrec))
    cfg = json.loads(json.dumps(suite.runs[0].cfg))
    dataset = load_dataset(cfg["data"])
    monkeypatch.chdir(DATA.parent)  # the trial's data path is relative to where the search ran
    cfg["data"]["path"] = DATA.name
    trial = tmp_path / "search" / "trials" / "abc"
    withheld = train_run(cfg, dataset, trial, test=False, log_to_console=False)
    assert withheld["test"] is None
    other = json.loads(json.dumps(cfg))
    other["train"]["lr"] = 0.01
    train_run(other, dataset, tmp_path / "search" / "trials" / "other", test=False, log_to_console=False)

    def no_training(*args, **kwargs):
        raise AssertionError("an adopted run must not train")

    monkeypatch.setattr(plr.training, "train_run", no_training)
    assert main(["benchmark", str(suite.path), "--check"]) == 0
    assert f"new, adopts {trial}" in capsys.readouterr().out
    lines = []
    run_suite(suite, log=lines.append)
    assert any(f"adopting {trial}" in line for line in lines), lines
    got = json.loads((suite.runs[0].run_dir / "metrics.json").read_text())
    best = SequentialRecommender.load(str(trial / "best.pt"))
    want = evaluate(best, dataset.test, ks=cfg["eval"]["ks"], batch_size=cfg["eval"]["batch_size"]).metrics
    assert got["test"] == pytest.approx(want, abs=0, rel=1e-12)
    assert got["adopted_from"] == str(trial)
    assert got["valid"] == withheld["valid"] and got["history"] == withheld["history"]
    assert got["train_seconds"] == withheld["train_seconds"]
    assert (suite.runs[0].run_dir / "test_ranks.csv").is_file()
    assert json.loads((trial / "metrics.json").read_text())["test"] is None  # the source is left as it was

    # another learning rate: the trial of lr 0.01 is not this run, so it trains
    def lr_002(raw):
        only_sasrec(raw)
        raw["out"] = str(tmp_path / "out2")
        raw["defaults"]["train"]["lr"] = 0.002

    other_suite = load_suite(suite_copy(tmp_path, lr_002))
    assert find_reusable(other_suite.runs[0], other_suite.reuse) is None


def test_two_processes_share_a_suite_with_skip_busy(tmp_path, capsys):
    """A run whose directory another process holds (plr.run_lock) stops a plain
    `plr benchmark` with an error naming it; `--skip-busy` leaves it to the
    holder, trains the rest and exits 3; once it is free, a rerun trains it."""
    import subprocess
    import sys

    suite = suite_copy(tmp_path)
    busy = tmp_path / "out" / "ml100k" / "sasrec"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom plr.run_lock import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)", str(busy)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = cli_error(capsys, ["benchmark", str(suite), "--only", "sasrec", "plr"])
        assert f"run_dir: {busy} is being trained by pid {holder.pid}" in line
        assert main(["benchmark", str(suite), "--only", "sasrec", "plr", "--skip-busy"]) == 3
        out = capsys.readouterr().out
        assert "sasrec on ml100k: left to another process" in out
        assert "1 run(s) left to other processes: sasrec on ml100k" in out
        assert json.loads((tmp_path / "out" / "ml100k" / "plr" / "metrics.json").read_text())["test"]
        assert not (busy / "metrics.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert main(["benchmark", str(suite), "--only", "sasrec", "plr", "--skip-busy"]) == 0
    out = capsys.readouterr().out
    assert "plr on ml100k: finished before, skipped" in out and "sasrec on ml100k: training" in out
    assert json.loads((busy / "metrics.json").read_text())["test"]


def test_only_checks_the_config_files_of_its_runs(tmp_path):
    """A suite whose config_file comes from a search still running can run its
    other part with --only; without --only it is refused, naming the entry."""
    def pending(raw):
        raw["runs"][1]["config_file"] = str(tmp_path / "not-yet" / "best.yaml")

    path = suite_copy(tmp_path, pending)
    with pytest.raises(SuiteError, match=r"runs\[1\] \('plr'\): config_file: no file at"):
        load_suite(path)
    suite = load_suite(path, only=["sasrec"])
    assert [r.name for r in suite.runs] == ["sasrec"]
    assert suite.run_names == ["sasrec", "plr", "plr-h0"]
    with pytest.raises(SuiteError, match=r"runs\[1\] \('plr'\): config_file: no file at"):
        load_suite(path, only=["plr"])


# -- plr tune --------------------------------------------------------------------------


TINY = ["model.hidden_size=16", "model.inner_size=32", "data.max_len=10", "train.epochs=1", "train.batch_size=256",
        "train.max_steps_per_epoch=2", "train.progress=false", "train.seed=3"]


@pytest.fixture(scope="module")
def dataset():
    from plr.data import load_dataset

    return load_dataset(config.resolve("sasrec", None, TINY, str(DATA))["data"])


def write_space(tmp_path, space):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def test_tune_searches_on_validation_only_and_resumes(tmp_path, dataset):
    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.3], "model.attn_dropout": {"same_as":
                                              "model.dropout"}, "train.lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    best = tune(cfg, dataset, space, tmp_path / "study", 2, log=lambda msg: None)
    trials = list((tmp_path / "study" / "trials").iterdir())
    assert len(trials) == 2
    for run_dir in trials:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test"] is None and not (run_dir / "test_ranks.csv").exists()  # the test split is never read
        saved = config.load_yaml(run_dir / "config.yaml")
        assert saved["model"]["attn_dropout"] == saved["model"]["dropout"]
    values = [json.loads((d / "metrics.json").read_text())["valid"]["ndcg@10"] for d in trials]
    assert best["value"] == max(values)
    best_cfg = config.check(config.load_yaml(tmp_path / "study" / "best.yaml"))
    assert best_cfg["model"]["dropout"] == best["params"]["model.dropout"]
    assert best_cfg["train"]["lr"] == pytest.approx(best["params"]["train.lr"])
    assert (tmp_path / "study" / "history.png").read_bytes().startswith(PNG)
    # A resumed study counts its finished trials: one more to reach 3.
    log = []
    tune(cfg, dataset, space, tmp_path / "study", 3, log=log.append)
    assert sum("valid ndcg@10" in line for line in log) == 1
    rows = (tmp_path / "study" / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and rows[0].startswith("trial,state,model.dropout,model.attn_dropout,train.lr")


def test_tune_trials_are_distinct_parameter_sets(tmp_path, dataset):
    """A two-point space: two trials train both points (repeated draws are
    drawn again, never trained twice); a third cannot exist."""
    from plr.tuning import SpaceError

    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.3]}))
    log = []
    tune(cfg, dataset, space, tmp_path / "study", 2, log=log.append)
    trained = [json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "study" / "trials").iterdir()]
    assert len(trained) == 2 and sum("valid ndcg@10" in line for line in log) == 2
    saved = sorted(config.load_yaml(d / "config.yaml")["model"]["dropout"]
                   for d in (tmp_path / "study" / "trials").iterdir())
    assert saved == [0.1, 0.3]
    with pytest.raises(SpaceError, match=r"only 2 distinct parameter sets, 2 finished, fewer than --trials 3"):
        tune(cfg, dataset, space, tmp_path / "study", 3, log=log.append)


def test_a_trial_killed_while_running_is_run_again_with_its_parameters(tmp_path, dataset):
    import optuna

    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.3]}))
    (tmp_path / "study").mkdir()
    study = optuna.create_study(study_name="plr-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}",
                                direction="maximize")
    study.set_user_attr("space", space)
    stale = study.ask()
    stale.suggest_categorical("model.dropout", [0.1, 0.3])  # the process died here
    log = []
    tune(cfg, dataset, space, tmp_path / "study", 1, log=log.append)
    study = optuna.load_study(study_name="plr-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params


def test_a_trial_stopped_by_a_signal_is_run_again_first(tmp_path, dataset, monkeypatch):
    """Ctrl-C or SIGTERM in a trial (KeyboardInterrupt): Optuna records it as failed; the
    next call trains the same parameters first (resuming the trial's directory), not a new draw."""
    import optuna
    import plr.training as training

    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}))
    original, stopped = training.train_run, []

    def stops(cfg, dataset, run_dir, **kw):
        stopped.append(run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train_run", stops)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, dataset, space, tmp_path / "study", 1, log=lambda msg: None)
    trained = []
    monkeypatch.setattr(training, "train_run", lambda cfg, ds, run_dir, **kw: trained.append(run_dir)
                        or original(cfg, ds, run_dir, **kw))
    tune(cfg, dataset, space, tmp_path / "study", 1, log=lambda msg: None)
    assert trained == stopped
    study = optuna.load_study(study_name="plr-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].params == study.trials[0].params


def test_a_diverged_trial_fails_and_the_search_goes_on_without_it(tmp_path, dataset, monkeypatch):
    """A trial stopped by plr.guards (its objective ran away) is recorded as failed with
    the reason, does not count towards --trials, and its parameters are not drawn again."""
    import optuna
    import plr.training as training
    from plr.guards import TrainingDiverged

    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.2, 0.3]}))
    original, calls = training.train_run, []

    def first_diverges(cfg, ds, run_dir, **kw):
        calls.append(cfg["model"]["dropout"])
        if len(calls) == 1:
            raise TrainingDiverged("kl", 3, 17, 2e4, 1e4)
        return original(cfg, ds, run_dir, **kw)

    monkeypatch.setattr(training, "train_run", first_diverges)
    log = []
    best = tune(cfg, dataset, space, tmp_path / "study", 2, log=log.append)
    assert len(calls) == 3 and len(set(calls)) == 3  # the diverged value is not trained again
    assert best["params"]["model.dropout"] != calls[0]
    assert any("diverged" in line and "'kl' = 20000" in line for line in log)
    study = optuna.load_study(study_name="plr-tune", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    trained = [t for t in study.trials if t.state.name != "PRUNED"]
    assert [t.state.name for t in trained] == ["FAIL", "COMPLETE", "COMPLETE"]
    rows = {r.split(",")[0]: r for r in (tmp_path / "study" / "trials.csv").read_text().strip().splitlines()[1:]}
    assert "exceeds train.divergence_limit" in rows[str(trained[0].number)]
    # Resumed, the study does not train it again either: a third finished trial cannot exist.
    calls.clear()
    with pytest.raises(SpaceError, match=r"only 3 distinct parameter sets \(1 of them diverged\), 2 finished, "
                                         r"fewer than --trials 3"):
        tune(cfg, dataset, space, tmp_path / "study", 3, log=log.append)
    assert calls == []


def test_a_lost_study_is_rebuilt_from_its_trial_records(tmp_path, dataset):
    """`--add-trials`: the records of finished trials (config.yaml, metrics.json,
    no checkpoints), copied out of a study whose study.db was then lost, count
    as finished trials of a new study, which trains only the rest."""
    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.2, 0.3, 0.4]}))
    tune(cfg, dataset, space, tmp_path / "lost", 2, log=lambda msg: None)
    records = tmp_path / "records"
    for run_dir in (tmp_path / "lost" / "trials").iterdir():
        (records / run_dir.name).mkdir(parents=True)
        for name in ("config.yaml", "metrics.json", "train.log"):
            shutil.copy2(run_dir / name, records / run_dir.name / name)
    finished = sorted(records.iterdir())
    (records / "unfinished").mkdir()
    shutil.copy2(finished[0] / "config.yaml", records / "unfinished" / "config.yaml")
    log = []
    best = tune(cfg, dataset, space, tmp_path / "new", 3, log=log.append, add_from=[records])
    assert sum("valid ndcg@10 =" in line and line.startswith("trial") for line in log) == 1  # only the third trained
    assert sum(line.startswith("add-trials:") and "-> trial" in line for line in log) == 2
    assert any("unfinished" in line and "not added" in line for line in log)
    new_dirs = {d.name for d in (tmp_path / "new" / "trials").iterdir()}
    assert {d.name for d in (tmp_path / "lost" / "trials").iterdir()} < new_dirs  # same ids, records copied
    values = [json.loads((tmp_path / "new" / "trials" / d / "metrics.json").read_text())["valid"]["ndcg@10"]
              for d in new_dirs]
    assert best["value"] == max(values)
    rows = (tmp_path / "new" / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3
    # Adding them again (a resumed search that repeats its command) adds nothing.
    log = []
    tune(cfg, dataset, space, tmp_path / "new", 3, log=log.append, add_from=[records])
    assert not any("-> trial" in line or "valid ndcg@10 =" in line for line in log)


def test_a_recorded_unfinished_trial_with_its_checkpoint_resumes_first(tmp_path, dataset, monkeypatch):
    """A trial killed mid-training on a lost machine, recorded with its last.pt:
    the new study runs its parameters first and resumes that checkpoint."""
    import plr.training as training

    cfg = config.resolve("sasrec", None, [*TINY[:4], "train.epochs=2"] + TINY[5:], str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.2, 0.3, 0.4]}))
    tune(cfg, dataset, space, tmp_path / "lost", 1, log=lambda msg: None)
    run_dir = next((tmp_path / "lost" / "trials").iterdir())
    record = tmp_path / "records" / run_dir.name
    record.mkdir(parents=True)
    for name in ("config.yaml", "train.log", "last.pt", "best.pt"):
        shutil.copy2(run_dir / name, record / name)  # as if killed after its last epoch, before metrics.json
    calls = []
    original = training.train_run
    monkeypatch.setattr(training, "train_run", lambda *a, **k: calls.append(k["resume"]) or original(*a, **k))
    log = []
    tune(cfg, dataset, space, tmp_path / "new", 1, log=log.append, add_from=[tmp_path / "records"])
    assert calls == [True]
    assert any("resumes first" in line for line in log) and any("(resuming)" in line for line in log)
    assert (tmp_path / "new" / "trials" / run_dir.name / "metrics.json").is_file()


def test_trial_records_of_another_config_or_that_read_test_are_refused(tmp_path, dataset):
    cfg = config.resolve("sasrec", None, TINY, str(DATA))
    space = load_space(write_space(tmp_path, {"model.dropout": [0.1, 0.3]}))
    tune(cfg, dataset, space, tmp_path / "study", 1, log=lambda msg: None)
    record = next((tmp_path / "study" / "trials").iterdir())
    other = config.resolve("sasrec", None, TINY + ["model.hidden_size=32"], str(DATA))
    with pytest.raises(SpaceError, match=r"run of another config: model.hidden_size \(32 here, 16 there\)"):
        tune(other, dataset, space, tmp_path / "other", 2, log=lambda msg: None, add_from=[record])
    wider = load_space(write_space(tmp_path, {"model.dropout": [0.2, 0.4]}))
    with pytest.raises(SpaceError, match=r"add-trials: .*outside the search space"):
        tune(cfg, dataset, wider, tmp_path / "wider", 2, log=lambda msg: None, add_from=[record])
    metrics = json.loads((record / "metrics.json").read_text())
    (record / "metrics.json").write_text(json.dumps({**metrics, "test": {"ndcg@10": 0.1}}))
    with pytest.raises(SpaceError, match=r"read the test split"):
        tune(cfg, dataset, space, tmp_path / "tested", 2, log=lambda msg: None, add_from=[record])
    with pytest.raises(SpaceError, match=r"add-trials: no directory at"):
        tune(cfg, dataset, space, tmp_path / "none", 2, log=lambda msg: None, add_from=[tmp_path / "missing"])


@pytest.mark.parametrize("space, message", [
    ({"model.drop": [0.1]}, r"unknown key.*'model.drop'"),
    ({"train.batch_size": {"low": 8, "high": 4, "type": "int"}}, r"expected low < high"),
    ({"lr": [0.1]}, r"section.key"),
    ({"model.dropout": {"same_as": "model.x"}}, r"same_as: expected another searched parameter"),
    ({"model.dropout": []}, r"non-empty list"),
])
def test_bad_spaces_fail_before_any_training(tmp_path, space, message, capsys):
    import re

    path = write_space(tmp_path, space)
    line = cli_error(capsys, ["tune", "--model", "sasrec", "--data", DATA, "--space", path, "--trials", "1",
                              "--out", tmp_path / "study", *sum((["--set", s] for s in TINY), [])])
    assert re.search(message, line), line
    assert not (tmp_path / "study").exists()


def test_bad_space_file_errors_name_the_parameter(tmp_path):
    with pytest.raises(SpaceError, match=r"model.dropout: expected a list of values"):
        load_space(write_space(tmp_path, {"model.dropout": 0.5}))


@pytest.mark.parametrize("space", sorted((ROOT / "benchmarks" / "spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_spaces_are_valid_for_their_model(space):
    """``MODEL.yaml`` or ``MODEL-VARIANT.yaml`` (e.g. plr-rcl: PLR's space plus rcl_weight)."""
    from plr.tuning import check_space

    check_space(config.resolve(space.stem.split("-")[0], None, [], str(DATA)), load_space(space))


@pytest.mark.parametrize("suite", sorted((ROOT / "benchmarks" / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_are_valid(suite, tmp_path):
    """A suite whose config files are written by `plr tune` (benchmarks/converged.sh)
    is checked with each missing one replaced by the model's shipped config."""
    raw = yaml.safe_load(suite.read_text())
    base = suite.parent
    missing = [r for r in raw["runs"] if r.get("config_file") and not (base / r["config_file"]).is_file()]
    absent = [d for d in raw.get("reuse", []) if not (base / d).is_dir()]
    if absent:  # folders of finished runs that a search writes
        raw["reuse"] = [str(tmp_path / f"reuse{i}") for i in range(len(raw["reuse"]))]
        for d in raw["reuse"]:
            Path(d).mkdir()
    elif "reuse" in raw:  # the suite may be rewritten into tmp_path: the folders it names, absolute
        raw["reuse"] = [str((base / d).resolve()) for d in raw["reuse"]]
    if missing or absent:
        for name, spec in raw["datasets"].items():
            path = spec if isinstance(spec, str) else spec["path"]
            resolved = str((base / path).resolve())
            raw["datasets"][name] = resolved if isinstance(spec, str) else {**spec, "path": resolved}
        for r in missing:
            r["config_file"] = str(tmp_path / f"{r['name']}.yaml")
            config.save(config.resolve(r["model"], None, []), r["config_file"])
        for r in raw["runs"]:  # the ones a search has written (this checkout ran it): found from tmp_path too
            if r.get("config_file") and r not in missing:
                r["config_file"] = str((base / r["config_file"]).resolve())
        suite = tmp_path / suite.name
        suite.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load_suite(suite, out=tmp_path / "out").runs


def _tuning_table():
    return benchmark_script("tuning_table")


def test_tuning_table_names_what_each_family_searched(tmp_path):
    """A trial's row shows the keys its family's space draws (benchmarks/spaces), not a fixed list."""
    tuning_table = _tuning_table()
    prl = tmp_path / "prl"
    lares = tmp_path / "lares"
    for trial, model in ((prl, {"name": "prl", "pl_weight": 0.5, "num_steps": 3, "dropout": 0.2,
                                "rcl_weight": 1.0, "noise_std": 0.01}),
                         (lares, {"name": "lares", "mean_depth": 3.0, "tla_weight": 0.1, "dropout": 0.4,
                                  "num_steps": 2})):
        trial.mkdir()
        (trial / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    # pl_weight is PRL's searched weight; rcl_weight and noise_std are fixed, so they are not shown.
    assert tuning_table.trial_row("prl", prl)["params"] == "lambda_pl 0.5, T 3, dropout 0.2"
    assert tuning_table.trial_row("lares", lares)["params"] == "w_tla 0.1, depth 3, dropout 0.4"
    # A space drawing a key without a label is refused, naming the key.
    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "prl.yaml").write_text("model.new_weight: [0.1, 1.0]\nmodel.dropout: [0.1, 0.2]\n"
                                     "model.attn_dropout: {same_as: model.dropout}\n")
    tuning_table.SPACES = spaces
    with pytest.raises(SystemExit, match="new_weight"):
        tuning_table.trial_row("prl", prl)


def test_the_records_of_a_run_in_phases_keep_each_phase_directory(tmp_path):
    """LARES's runs log each phase in its own directory (spt/, rpt/): a record without them
    would keep neither the phases' curves nor their metrics."""
    tuning_table = _tuning_table()
    run = tmp_path / "run"
    for where in ("", "spt", "rpt"):
        (run / where).mkdir(parents=True, exist_ok=True)
        (run / where / "config.yaml").write_text(f"phase: {where or 'both'}\n")
        (run / where / "train.log").write_text(f"log {where}\n")
    (run / "spt" / "last.pt").write_bytes(b"state")
    (run / "notes").mkdir()  # a folder without config.yaml is not a phase
    (run / "notes" / "train.log").write_text("not recorded\n")
    dest = tmp_path / "record"
    tuning_table.copy_run(run, dest, ("config.yaml", "train.log"), finished=False, checkpoints=True)
    assert (dest / "train.log").read_text() == "log \n" and (dest / "spt" / "train.log").read_text() == "log spt\n"
    assert (dest / "rpt" / "config.yaml").read_text() == "phase: rpt\n"
    assert (dest / "spt" / "last.pt").read_bytes() == b"state" and not (dest / "notes").exists()


def test_tuning_table_reports_finished_and_running_trials_and_copies_their_records(tmp_path):
    """benchmarks/tuning_table.py: a finished trial's metrics.json, a running one's last epoch."""
    tuning_table = _tuning_table()
    done = tmp_path / "tune" / "plr" / "trials" / "aaa"
    running = tmp_path / "tune" / "plr-eq10" / "trials" / "bbb"  # a folder named otherwise: the config says plr
    for trial, m, extra in ((done, 1, {"readout": "rea"}), (running, 4, {})):
        trial.mkdir(parents=True)
        (trial / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "plr", "kl_weight": 0.01,
                                                                     "num_streams": m, "num_steps": 2,
                                                                     "dropout": 0.3, **extra}}))
        (trial / "train.log").write_text("model plr\nepoch 0: loss=9.1 | valid ndcg@10=0.0100 *\n"
                                         "epoch 1: loss=8.2 | valid ndcg@10=0.0250 *\n")
    (done / "metrics.json").write_text(json.dumps({"best_epoch": 1, "epochs": 2, "valid": {"ndcg@10": 0.025},
                                                   "train_seconds": 12.4, "test": None}))
    out = tmp_path / "record"
    tuning_table.main([str(tmp_path / "tune"), "--copy-to", str(out)])
    table = (out / "trials.md").read_text().splitlines()
    assert table[2] == ("| plr | aaa | lambda 0.01, M 1, T 2, dropout 0.3, readout rea | finished | 2 (1) | 0.0250 "
                        "| 12 |")
    assert table[3].startswith("| plr-eq10 | bbb | lambda 0.01, M 4, T 2, dropout 0.3, readout final | training "
                               "(epoch 1, best so far 0.0250) |")
    # A trial in phases (LARES) has no log of its own until it ends: its latest phase's is read.
    phased = tmp_path / "tune" / "lares" / "trials" / "ccc"
    (phased / "spt").mkdir(parents=True)
    (phased / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "lares", "tla_weight": 0.1}}))
    (phased / "spt" / "train.log").write_text("epoch 0: loss=9.1 | valid ndcg@10=0.0300 *\n")
    assert tuning_table.trial_row("lares", phased)["state"] == "training (spt epoch 0, best so far 0.0300)"
    (phased / "rpt").mkdir()
    (phased / "rpt" / "train.log").write_text("epoch 0: loss=-0.2 | valid ndcg@10=0.0280\n")
    assert tuning_table.trial_row("lares", phased)["state"] == "training (rpt epoch 0, best so far 0.0280)"
    shutil.rmtree(phased.parent.parent)
    assert sorted(p.name for p in (out / "plr" / "aaa").iterdir()) == ["config.yaml", "metrics.json", "train.log"]
    assert not (out / "plr-eq10" / "bbb" / "metrics.json").exists()
    # --checkpoints: a training trial's checkpoints are recorded, and dropped once it has finished; the
    # search's best finished trial keeps its best.pt (for a new machine's final run to adopt it), another
    # finished trial keeps none.
    (running / "last.pt").write_bytes(b"state")
    (done / "last.pt").write_bytes(b"state")
    (done / "best.pt").write_bytes(b"best")
    worse = done.parent / "ddd"
    shutil.copytree(done, worse)
    (worse / "metrics.json").write_text(json.dumps({**json.loads((done / "metrics.json").read_text()),
                                                    "valid": {"ndcg@10": 0.02}}))
    tuning_table.main([str(tmp_path / "tune"), "--copy-to", str(out), "--checkpoints"])
    assert (out / "plr-eq10" / "bbb" / "last.pt").read_bytes() == b"state"
    assert sorted(p.name for p in (out / "plr" / "aaa").glob("*.pt")) == ["best.pt"]
    assert (out / "plr" / "aaa" / "best.pt").read_bytes() == b"best"
    assert not list((out / "plr" / "ddd").glob("*.pt"))
    # Once another trial is better, the record of the old best drops its checkpoint.
    (worse / "metrics.json").write_text(json.dumps({**json.loads((done / "metrics.json").read_text()),
                                                    "valid": {"ndcg@10": 0.03}}))
    tuning_table.main([str(tmp_path / "tune"), "--copy-to", str(out), "--checkpoints"])
    assert not list((out / "plr" / "aaa").glob("*.pt"))
    assert (out / "plr" / "ddd" / "best.pt").read_bytes() == b"best"
    shutil.rmtree(worse)
    shutil.rmtree(out / "plr" / "ddd")
    (running / "metrics.json").write_text((done / "metrics.json").read_text())
    tuning_table.main([str(tmp_path / "tune"), "--copy-to", str(out), "--checkpoints"])
    assert not (out / "plr-eq10" / "bbb" / "last.pt").exists()
    # A new machine's search (without ccc) keeps the rows recorded by the earlier one, named as trial ids;
    # a STATE note replaces an unfinished trial's state.
    shutil.copytree(running, out / "plr-eq10" / "ccccc00000")
    (out / "plr-eq10" / "ccccc00000" / "metrics.json").unlink()
    (out / "plr-eq10" / "ccccc00000" / "STATE").write_text("lost with its machine ({state})\n")
    (out / "plr-eq10" / "not-a-trial").mkdir()
    shutil.copy2(running / "config.yaml", out / "plr-eq10" / "not-a-trial" / "config.yaml")
    shutil.rmtree(running.parents[1])
    tuning_table.main([str(tmp_path / "tune"), "--copy-to", str(out)])
    rows = (out / "trials.md").read_text().splitlines()[2:]
    assert [line.split(" | ")[:2] for line in rows] == [["| plr", "aaa"], ["| plr-eq10", "ccccc00000"]]
    assert "| lost with its machine (training (epoch 1, best so far 0.0250)) |" in rows[1]


def test_converged_records_keep_finished_and_unfinished_final_runs_across_machines(tmp_path):
    """benchmarks/converged_records.py: a finished run is recorded with its test ranks
    and, with --checkpoints, its best.pt only; an unfinished one with its checkpoints;
    the runs of OUT/exclude likewise; restore puts them back on a new machine and
    overwrites nothing."""
    records = benchmark_script("converged_records")
    out = tmp_path / "runs"
    done, running = out / "final" / "beauty" / "sasrec", out / "final" / "steam" / "plr"
    for run_dir in (done, running):
        run_dir.mkdir(parents=True)
        (run_dir / "config.yaml").write_text("model: {name: sasrec}\n")
        (run_dir / "last.pt").write_bytes(b"state")
    (done / "best.pt").write_bytes(b"best")
    excluded = out / "exclude" / "beauty" / "sasrec"
    excluded.mkdir(parents=True)
    (excluded / "config.yaml").write_text("model: {name: sasrec}\neval: {exclude_history: true}\n")
    (excluded / "last.pt").write_bytes(b"x-state")
    (done / "metrics.json").write_text(json.dumps({"test": {"ndcg@10": 0.05}}))
    (done / "test_ranks.csv").write_text("user,rank\n1,3\n")
    (out / "final" / "RESULTS.md").write_text("| table |\n")
    (out / "final" / "gains.png").write_bytes(PNG)
    seeded = out / "seeds" / "2025" / "steam" / "sasrec"  # one suite per seed
    seeded.mkdir(parents=True)
    (seeded / "config.yaml").write_text("model: {name: sasrec}\ntrain: {seed: 2025}\n")
    (seeded / "last.pt").write_bytes(b"seed-state")
    (out / "driver.log").write_text("machine 2\n")
    (tmp_path / "results" / "converged-tuning").mkdir(parents=True)
    (tmp_path / "results" / "converged-tuning" / "driver.log").write_text("machine 1\n")
    ablation = out / "ablation" / "steam-plr-norcl"  # a run trained by hand: config, log, metrics recorded
    ablation.mkdir(parents=True)
    for name, text in (("config.yaml", "model: {name: plr}\n"), ("train.log", "epoch 0\n"),
                       ("metrics.json", json.dumps({"valid": {"ndcg@10": 0.05}, "test": None}))):
        (ablation / name).write_text(text)
    (ablation / "best.pt").write_bytes(b"best")
    rec = tmp_path / "results" / "converged-final"
    records.main(["save", str(out), str(tmp_path / "results")])
    rec_a = tmp_path / "results" / "converged-tuning" / "ablation" / "steam-plr-norcl"
    assert sorted(p.name for p in rec_a.iterdir()) == ["config.yaml", "metrics.json", "train.log"]
    assert not (rec / "steam" / "plr" / "last.pt").exists()  # checkpoints only with --checkpoints
    assert not (rec / "beauty" / "sasrec" / "best.pt").exists()
    assert (tmp_path / "results" / "converged-tuning" / "driver.log").read_text() == "machine 1\nmachine 2\n"
    (out / "driver.log").write_text("machine 2\nmore\n")
    records.main(["save", str(out), str(tmp_path / "results"), "--checkpoints"])
    assert (tmp_path / "results" / "converged-tuning" / "driver.log").read_text() == "machine 1\nmachine 2\nmore\n"
    assert sorted(p.name for p in (rec / "beauty" / "sasrec").iterdir()) == ["best.pt", "config.yaml",
                                                                             "metrics.json", "test_ranks.csv"]
    rec_x = tmp_path / "results" / "converged-exclude" / "beauty" / "sasrec"
    assert (rec_x / "last.pt").read_bytes() == b"x-state" and "exclude_history" in (rec_x / "config.yaml").read_text()
    assert (rec / "steam" / "plr" / "last.pt").read_bytes() == b"state"
    assert (rec / "RESULTS.md").is_file() and (rec / "gains.png").read_bytes() == PNG
    rec_s = tmp_path / "results" / "converged-seeds" / "2025" / "steam" / "sasrec"
    assert (rec_s / "last.pt").read_bytes() == b"seed-state"
    new = tmp_path / "new"
    (new / "final" / "steam" / "plr").mkdir(parents=True)  # already here: kept as it is
    records.main(["restore", str(tmp_path / "results"), str(new)])
    assert (new / "final" / "beauty" / "sasrec" / "test_ranks.csv").read_text() == "user,rank\n1,3\n"
    assert (new / "final" / "beauty" / "sasrec" / "best.pt").read_bytes() == b"best"
    assert (new / "exclude" / "beauty" / "sasrec" / "last.pt").read_bytes() == b"x-state"
    assert (new / "seeds" / "2025" / "steam" / "sasrec" / "last.pt").read_bytes() == b"seed-state"
    assert not any((new / "final" / "steam" / "plr").iterdir())
    # Once it has finished, the unfinished run's recorded checkpoint goes.
    (running / "metrics.json").write_text(json.dumps({"test": {"ndcg@10": 0.04}}))
    records.main(["save", str(out), str(tmp_path / "results"), "--checkpoints"])
    assert not (rec / "steam" / "plr" / "last.pt").exists()
    # A diverged run is recorded with its reason and without checkpoints (it is not trained again).
    diverged = out / "final" / "steam" / "erl"
    diverged.mkdir()
    (diverged / "config.yaml").write_text("model: {name: erl}\n")
    (diverged / "last.pt").write_bytes(b"state")
    (diverged / "DIVERGED").write_text("training stopped: loss term 'kl' ...\n")
    records.main(["save", str(out), str(tmp_path / "results"), "--checkpoints"])
    assert sorted(p.name for p in (rec / "steam" / "erl").iterdir()) == ["DIVERGED", "config.yaml"]


def test_ab_builds_times_both_checkouts_and_names_a_foreign_import(tmp_path, capsys):
    """benchmarks/ab_builds.py: the same steps with checkout A and B (here both
    the tree of the loaded build), one line per model with the two medians and A/B; a checkout
    whose plr_kernels does not come from its own tree is refused."""
    import re

    from plr_kernels import _extension

    if _extension.extension() is None:
        pytest.skip(f"no compiled plr_kernels._C: {_extension.extension_error()}")
    # The tree that holds the loaded build: this checkout (an in-place build) or site-packages (pip install .).
    tree = Path(_extension.extension().__file__).resolve().parents[1]
    ab = benchmark_script("ab_builds")
    tiny = ["--set", "model.hidden_size=16", "--set", "model.inner_size=32", "--set", "data.max_len=10",
            "--set", "train.batch_size=64", "--set", "train.progress=false"]
    assert ab.main(["--a", str(tree), "--b", str(tree), "--data", str(DATA), "--model", "sasrec",
                    "--steps", "1", "--warmup", "0", "--rounds", "1", *tiny]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"sasrec: A [0-9.]+ ms/step, B [0-9.]+ ms/step, A/B [0-9.]+ \(1 steps each, 1 rounds interleaved\)",
                        line), line
    with pytest.raises(SystemExit, match=r"checkout A: plr_kernels._C came from .*, not from"):
        ab.main(["--a", str(tmp_path), "--b", str(tree), "--data", str(DATA), "--model", "sasrec",
                 "--steps", "1", "--warmup", "0", "--rounds", "1", *tiny])


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("setsid", "ps", "awk", "flock")),
                    reason="needs setsid, ps, awk, flock")
def test_converged_stop_ends_the_driver_with_every_training_state_saved(tmp_path):
    """`benchmarks/converged.sh --stop`: SIGTERM to the driver's process group. Its bash
    workers end, and a training run in the background (so ignoring SIGINT, as under the
    real driver) saves its state and exits, before --stop returns."""
    import os
    import subprocess
    import sys
    import time

    import torch

    def stop():
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "converged.sh"), "--stop"],
                              env={**os.environ, "OUT": str(out)}, capture_output=True, text=True, timeout=120)

    out, run = tmp_path / "converged", tmp_path / "run"
    out.mkdir()
    train = [sys.executable, "-m", "plr.cli", "train", "--model", "sasrec", "--data", str(DATA), "--out", str(run),
             "--set", "model.hidden_size=16", "--set", "model.inner_size=32", "--set", "data.max_len=10",
             "--set", "train.epochs=1000", "--set", "train.patience=1000", "--set", "train.progress=false",
             "--set", "train.save_every_steps=1000000"]
    script = f"{' '.join(train)} 2> {tmp_path / 'train.err'} &\nsleep 300 &\nwait\n"
    driver = subprocess.Popen(["setsid", "bash", "-c", script], stdout=subprocess.DEVNULL)
    try:
        (out / "driver.pid").write_text(f"{driver.pid}\n")
        deadline = time.time() + 300
        while not (run / "last.pt").is_file() and time.time() < deadline:  # its first epoch is saved
            time.sleep(0.2)
        assert (run / "last.pt").is_file(), (tmp_path / "train.err").read_text()[-2000:]
        stopped = stop()
        assert stopped.returncode == 0, stopped.stderr
        assert driver.wait(timeout=10) != 0  # the driver's bash ended by the signal
    finally:
        if driver.poll() is None:
            driver.kill()
    assert "interrupted" in (tmp_path / "train.err").read_text()
    state = torch.load(run / "last.pt", weights_only=True)["state"]
    assert f"interrupted at epoch {state['epoch']}, step {state['step_in_epoch']}" in (run / "train.log").read_text()
    assert "stopped by --stop" in (out / "driver.log").read_text()
    again = stop()
    assert again.returncode == 0 and "no driver running" in again.stdout


def test_seed_table_pairs_each_run_with_the_baseline_of_its_own_seed(tmp_path, capsys):
    """benchmarks/seed_table.py: per seed the t-test is against that seed's baseline,
    and the summary row is the mean and sample standard deviation over seeds, with
    Welch's test of the per-seed means against the baseline's."""
    from plr.evaluation import per_user_metric
    from plr.training import save_ranks

    from scipy import stats

    seed_table = benchmark_script("seed_table")
    rng = np.random.default_rng(5)
    users = np.arange(1, 301)
    folders, ranks = [], {}
    for seed in (7, 8):
        folder = tmp_path / f"s{seed}" / "ml100k"
        for run in ("sasrec", "plr"):
            r = rng.integers(1, 30, size=users.size)
            ranks[seed, run] = r
            run_dir = folder / run
            run_dir.mkdir(parents=True)
            save_ranks(run_dir / "test_ranks.csv", users, r)
            test = {m: float(per_user_metric(r, m).mean()) for m in ("ndcg@10", "recall@20")}
            (run_dir / "metrics.json").write_text(json.dumps({"test": test}))
            (run_dir / "config.yaml").write_text(yaml.safe_dump({"train": {"seed": seed}}))
        folders.append(folder)
    (tmp_path / "s8" / "ml100k" / "erl").mkdir()  # unfinished: left out
    (tmp_path / "s8" / "ml100k" / "erl" / "metrics.json").write_text(json.dumps({"test": None}))
    rows = seed_table.seed_rows(folders, ["sasrec", "plr", "erl"], "sasrec", ["ndcg@10"])
    assert [(r["run"], r["seed"]) for r in rows] == [
        ("sasrec", "7"), ("sasrec", "8"), ("**sasrec**", "mean of 2"),
        ("plr", "7"), ("plr", "8"), ("**plr**", "mean of 2")]
    rel = []
    for row, seed in zip(rows[3:5], (7, 8)):
        a, b = (per_user_metric(ranks[seed, run], "ndcg@10").mean() for run in ("sasrec", "plr"))
        rel.append((b - a) / a * 100)
        assert row["vs sasrec ndcg@10"].startswith(f"{rel[-1]:+.1f}% (p=")
    nd = [per_user_metric(ranks[s, "plr"], "ndcg@10").mean() for s in (7, 8)]
    assert rows[5]["ndcg@10"] == f"{np.mean(nd):.4f} ± {np.std(nd, ddof=1):.4f}"
    base = [per_user_metric(ranks[s, "sasrec"], "ndcg@10").mean() for s in (7, 8)]
    welch = stats.ttest_ind(nd, base, equal_var=False).pvalue
    assert rows[5]["vs sasrec ndcg@10"] == f"{np.mean(rel):+.1f}% (mean); across seeds p={welch:.2g}"
    assert "vs sasrec ndcg@10" not in rows[2]  # the baseline's own summary
    seed_table.main([str(f) for f in folders] + ["--runs", "sasrec", "plr"])
    assert "| **plr** | mean of 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        seed_table.main([str(tmp_path / "nope"), "--runs", "sasrec"])
    assert "expected a suite's dataset folder" in capsys.readouterr().err


def test_bar_table_counts_a_dataset_only_when_every_metric_wins(tmp_path, capsys):
    """benchmarks/bar_table.py: a dataset is won when every metric is higher than the
    baseline's with p < alpha; a lower metric with a small p, or a higher one with a
    large p, does not win it; a dataset without the run's result counts neither way
    and leaves the verdict open while it could still reach the bar."""
    bar_table = benchmark_script("bar_table")

    def t(rel, p):
        return {"relative_pct": rel, "p": p, "ci95_pct": [rel - 1, rel + 1], "users": 100}

    report = {"suite": "s.yaml", "datasets": {
        "a": {"vs_baseline": {"plr": {"ndcg@10": t(5.0, 0.01), "recall@20": t(2.0, 0.049)},
                              "erl": {"ndcg@10": t(4.0, 0.001), "recall@20": t(1.0, 0.2)}}},
        "b": {"vs_baseline": {"plr": {"ndcg@10": t(9.0, 1e-5), "recall@20": t(-3.0, 1e-4)},
                              "erl": {"ndcg@10": t(3.0, 0.04), "recall@20": t(3.0, 0.03)}}},
        "c": {"vs_baseline": {"plr": {"ndcg@10": t(1.0, 0.001), "recall@20": t(1.0, 0.002)}}},
    }}
    rows = {r["run"]: r for r in bar_table.bar_rows(report, ["ndcg@10", "recall@20"], 0.05, 2)}
    assert list(rows) == ["plr", "erl"]
    assert rows["plr"]["a"].startswith("**won**: ndcg@10 +5.0% (p=0.01); recall@20 +2.0% (p=0.049)")
    assert not rows["plr"]["b"].startswith("**won**")  # recall@20 significantly lower
    assert rows["plr"]["datasets won"] == "2 of 3 with a result: meets the bar"
    assert not rows["erl"]["a"].startswith("**won**")  # recall@20 higher but p = 0.2
    assert rows["erl"]["c"] == "no result"
    assert rows["erl"]["datasets won"] == "1 of 2 with a result: open (1 without a result)"
    assert bar_table.bar_rows(report, ["ndcg@10"], 0.05, 3, runs=["erl"])[0]["datasets won"] == (
        "2 of 2 with a result: open (1 without a result)")
    strict = bar_table.bar_rows(report, ["ndcg@10", "recall@20"], 0.01, 2, runs=["plr"])
    assert [r["datasets won"] for r in strict] == ["1 of 3 with a result: below the bar"]
    (tmp_path / "results.json").write_text(json.dumps(report))
    bar_table.main([str(tmp_path), "--need", "1"])
    out = capsys.readouterr().out
    assert "| run | a | b | c | datasets won |" in out and "1 of 2 with a result: meets the bar" in out
    with pytest.raises(SystemExit):
        bar_table.main([str(tmp_path / "nope")])
    assert "expected a folder holding results.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bar_table.main([str(tmp_path), "--metrics", "ndcg@20"])
    assert "--metrics: expected metrics the report tested (ndcg@10, recall@20), got ndcg@20" in capsys.readouterr().err
