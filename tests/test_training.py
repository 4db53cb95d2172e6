"""Trainer, run directory, resumption after a kill, and the command line on top."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import cli_error, poll_training_state
from plr import config
from plr.cli import main
from plr.data import build_dataset, read_interactions
from plr.demo import synthetic_histories, write_sequences
from plr.evaluation import per_user_metric, popularity_ranks
from plr.models import SequentialRecommender
from plr.training import Trainer, train_run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = ["model.hidden_size=16", "model.inner_size=32", "model.dropout=0.2", "data.max_len=12",
        "data.format=sequences", "train.batch_size=64", "train.progress=false", "train.seed=7"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "synthetic.txt"
    write_sequences(synthetic_histories(300, 60, num_interests=6, min_len=5, max_len=14, seed=1), path)
    return path


def tiny_cfg(model, path, *extra):
    return config.resolve(model, None, TINY + list(extra), str(path))


def dataset_for(cfg):
    d = cfg["data"]
    return build_dataset(read_interactions(d["path"], fmt=d["format"]), max_len=d["max_len"], split=d["split"])


def test_run_directory_and_cli_round_trip(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", "plr", "--data", str(synthetic), "--out", str(out), "--set", "train.epochs=2",
                 *sum((["--set", s] for s in TINY), [])])
    assert code == 0
    for name in ("config.yaml", "train.log", "metrics.json", "best.pt", "last.pt", "test_ranks.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and set(metrics) >= {"valid", "test", "best_epoch", "train_seconds"}
    assert set(metrics["test"]) == {"recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20",
                                    "recall@50", "ndcg@50", "mrr"}
    resolved = config.load_yaml(out / "config.yaml")
    assert resolved["model"]["name"] == "plr" and resolved["train"]["epochs"] == 2
    capsys.readouterr()
    # `plr evaluate` on the best checkpoint reproduces the test metrics of the run.
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(synthetic)]) == 0
    printed = capsys.readouterr().out
    assert f"{metrics['test']['ndcg@10']:.4f}" in printed
    # --readout scores a PLR checkpoint with another vector: the metrics of that readout.
    from plr.evaluation import evaluate

    model = SequentialRecommender.load(str(out / "best.pt"))
    valid = dataset_for(tiny_cfg("plr", synthetic)).valid
    default = evaluate(model, valid).metrics["ndcg@10"]
    model.readout = "h0"
    want = evaluate(model, valid).metrics["ndcg@10"]
    assert f"{want:.4f}" != f"{default:.4f}"  # else the check below could not tell the readouts apart
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(synthetic), "--split", "valid",
                 "--readout", "h0"]) == 0
    assert f"{want:.4f}" in capsys.readouterr().out
    # `plr recommend` maps raw ids both ways and never returns the padding item.
    assert main(["recommend", "--checkpoint", str(out / "best.pt"), "--history", "3 4 5", "--k", "5"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 5 and all(1 <= int(r.split()[1]) <= 60 for r in rows)
    assert "unknown to the checkpoint" in cli_error(capsys, ["recommend", "--checkpoint", out / "best.pt",
                                                             "--history", "3 99999"])
    # A finished run directory is not overwritten by accident.
    with pytest.raises(FileExistsError, match="--resume"):
        train_run(tiny_cfg("plr", synthetic, "train.epochs=2"), dataset_for(tiny_cfg("plr", synthetic)), out,
                  log_to_console=False)


class _SplitNotToRead:
    """Stands for a split that must not be read: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


def test_train_no_test_never_reads_the_test_split(synthetic, tmp_path, capsys, monkeypatch):
    import plr.cli

    real_load = plr.cli.load_dataset

    def load_without_test(data_cfg, *args, **kwargs):
        dataset = real_load(data_cfg, *args, **kwargs)
        dataset.test = _SplitNotToRead()
        return dataset

    monkeypatch.setattr(plr.cli, "load_dataset", load_without_test)
    out = tmp_path / "run"
    assert main(["train", "--model", "sasrec", "--data", str(synthetic), "--out", str(out), "--no-test",
                 "--set", "train.epochs=2", *sum((["--set", s] for s in TINY), [])]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] is None and metrics["epochs"] == 2 and metrics["valid"]["ndcg@10"] > 0
    assert (out / "best.pt").is_file() and not (out / "test_ranks.csv").exists()
    rows = capsys.readouterr().out.splitlines()
    assert any(r.split()[:1] == ["valid"] for r in rows) and not any(r.split()[:1] == ["test"] for r in rows)
    # Without --no-test the same guard trips: the check above can fail.
    with pytest.raises(AssertionError, match="the test split was read"):
        main(["train", "--model", "sasrec", "--data", str(synthetic), "--out", str(tmp_path / "with-test"),
              "--set", "train.epochs=1", *sum((["--set", s] for s in TINY), [])])


def test_validate_start_lets_the_starting_weights_compete_as_epoch_minus_one(synthetic, tmp_path, monkeypatch):
    cfg = tiny_cfg("sasrec", synthetic, "train.epochs=10", "train.patience=2", "train.max_steps_per_epoch=2")
    trainer = Trainer(cfg, dataset_for(cfg), tmp_path / "run", log_to_console=False)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # Scripted validation: the start scores best, every epoch after it less.
    scores = iter([0.30, 0.20, 0.25, 0.10])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"ndcg@10": next(scores), "recall@10": 0.5})
    metrics = trainer.fit(test=False, validate_start=True)
    assert metrics["best_epoch"] == -1 and metrics["valid"]["ndcg@10"] == 0.30
    assert metrics["start_valid"]["ndcg@10"] == 0.30
    assert metrics["epochs"] == 2  # patience 2 counted from the start: epochs 0 and 1, no third
    assert [h["valid_ndcg@10"] for h in metrics["history"]] == [0.20, 0.25]
    best = SequentialRecommender.load(str(tmp_path / "run" / "best.pt")).state_dict()
    assert all(torch.equal(best[k], start[k]) for k in start)  # best.pt: the starting weights
    assert not all(torch.equal(trainer.model.state_dict()[k], start[k]) for k in start)  # it did train
    assert "epoch -1 (the starting weights" in (tmp_path / "run" / "train.log").read_text()
    # Without the option the start does not compete: the best epoch is a trained one.
    scores = iter([0.20, 0.25, 0.10, 0.05])
    plain = Trainer(cfg, dataset_for(cfg), tmp_path / "plain", log_to_console=False).fit(test=False)
    assert plain["best_epoch"] == 1 and "start_valid" not in plain


def test_compare_prints_a_paired_t_test(synthetic, tmp_path, capsys):
    ds = dataset_for(tiny_cfg("sasrec", synthetic))
    for name in ("sasrec", "plr"):
        train_run(tiny_cfg(name, synthetic, "train.epochs=1"), ds, tmp_path / name, log_to_console=False)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "sasrec"), str(tmp_path / "plr")]) == 0
    out = capsys.readouterr().out
    assert "paired t-test over" in out and "p = " in out
    low, high = (float(x) for x in re.search(r"95% interval \[(\S+), (\S+)\]", out).groups())
    diff = float(re.search(r"B - A = (\S+) ", out).group(1))
    assert low <= diff <= high


def _kill_when_checkpointed(cmd, state_path, min_step, timeout=300):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        state = poll_training_state(proc, state_path, lambda st: st["global_step"] >= min_step and not st["finished"],
                                    timeout, interval=0.05)
        if state is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return state
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode is None:
        raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")
    raise AssertionError(f"training ended (rc={proc.returncode}) before it could be killed: "
                         f"{proc.stderr.read().decode()[-2000:]}")


def test_resume_after_kill_gives_the_same_result(synthetic, tmp_path):
    extra = ["train.epochs=4", "train.save_every_steps=1", "train.patience=100"]
    cfg = tiny_cfg("plr", synthetic, *extra)
    ds = dataset_for(cfg)
    steps_per_epoch = Trainer(cfg, ds, tmp_path / "probe", log_to_console=False).steps_per_epoch()
    assert steps_per_epoch >= 4
    full = train_run(cfg, ds, tmp_path / "full", log_to_console=False)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "plr.cli", "train", "--model", "plr", "--data", str(synthetic), "--out", str(out)]
    cmd += sum((["--set", s] for s in TINY + extra), [])
    killed_at = _kill_when_checkpointed(cmd, out / "last.pt", min_step=steps_per_epoch + 2)
    assert 0 < killed_at["step_in_epoch"] < steps_per_epoch  # killed mid-epoch
    resumed = train_run(cfg, ds, out, resume=True, log_to_console=False)

    assert resumed["test"] == full["test"] and resumed["best_epoch"] == full["best_epoch"]
    a = SequentialRecommender.load(str(tmp_path / "full" / "best.pt")).state_dict()
    b = SequentialRecommender.load(str(out / "best.pt")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_a_background_training_with_its_state_saved(synthetic, tmp_path):
    """A job started with ``cmd &`` from a script ignores SIGINT; SIGTERM stops ``plr train``
    as Ctrl-C does: exit 130, the state at the signal saved in last.pt, and the command to resume."""
    out = tmp_path / "run"
    extra = ["train.epochs=1000", "train.patience=1000", "train.save_every_steps=1000000"]
    cmd = [sys.executable, "-m", "plr.cli", "train", "--model", "plr", "--data", str(synthetic), "--out", str(out)]
    cmd += sum((["--set", s] for s in TINY + extra), [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        # Past the first epoch's end (its state is saved there), then stopped mid-way through the next ones.
        state = poll_training_state(proc, out / "last.pt", lambda st: st["epoch"] >= 1, timeout=300)
        assert state is not None, f"no epoch finished: {proc.stderr.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert rc == 130, err[-2000:]
    assert "interrupted — training state saved in" in err and "--resume" in err
    saved = torch.load(out / "last.pt", weights_only=True)["state"]
    assert not saved["finished"] and saved["global_step"] >= state["global_step"]
    log = (out / "train.log").read_text()
    assert f"interrupted at epoch {saved['epoch']}, step {saved['step_in_epoch']}" in log


@pytest.mark.skipif(sys.platform == "win32", reason="no advisory file locks")
def test_a_run_directory_is_trained_by_one_process_at_a_time(synthetic, tmp_path):
    """While another process trains into a run directory (holds its lock), a
    second train_run there is refused before it writes anything, naming the
    directory and the holder; once the holder is gone the run trains."""
    cfg = tiny_cfg("sasrec", synthetic, "train.epochs=1")
    ds = dataset_for(cfg)
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom plr.run_lock import run_dir_lock\n"
         "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=rf"run_dir: {run_dir} is being trained by pid {holder.pid} on "):
            train_run(cfg, ds, run_dir, resume=True, log_to_console=False)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
        lares = tiny_cfg("lares", synthetic, "model.spt_epochs=1", "model.rpt_epochs=0")
        with pytest.raises(ValueError, match=rf"run_dir: {run_dir} is being trained by pid {holder.pid}"):
            train_run(lares, dataset_for(lares), run_dir, log_to_console=False)
    finally:
        holder.kill()
        holder.wait()
    metrics = train_run(cfg, ds, run_dir, log_to_console=False)  # the lock died with its holder
    assert metrics["test"] is not None


@pytest.mark.skipif(not (DATA / "amazon2014-beauty_seqrecbench").is_dir(), reason="shared data not present")
def test_short_training_on_real_data_beats_most_popular(tmp_path):
    """150 steps of SASRec on Amazon Beauty (22k users, 12k items, full ranking)
    against most-popular: at least 1.5x its NDCG@10, significant in a paired
    t-test over the test users."""
    cfg = config.resolve("sasrec", None, [
        "model.hidden_size=32", "model.inner_size=64", "model.dropout=0.2", "data.max_len=20", "train.epochs=1",
        "train.batch_size=256", "train.lr=0.003", "train.max_steps_per_epoch=150", "train.progress=false",
        "eval.batch_size=4096",
    ], str(DATA / "amazon2014-beauty_seqrecbench"))
    ds = dataset_for(cfg)
    metrics = train_run(cfg, ds, tmp_path / "beauty", log_to_console=False)
    model_ranks = np.loadtxt(tmp_path / "beauty" / "test_ranks.csv", delimiter=",", skiprows=1, dtype=np.int64)
    pop_ranks = popularity_ranks(ds.item_popularity, ds.test)
    assert np.array_equal(model_ranks[:, 0], ds.test.user.numpy())
    model_ndcg, pop_ndcg = per_user_metric(model_ranks[:, 1], "ndcg@10"), per_user_metric(pop_ranks, "ndcg@10")
    assert metrics["test"]["ndcg@10"] == pytest.approx(model_ndcg.mean())
    assert model_ndcg.mean() > 1.5 * pop_ndcg.mean(), (model_ndcg.mean(), pop_ndcg.mean())
    assert stats.ttest_rel(model_ndcg, pop_ndcg, alternative="greater").pvalue < 1e-3


def test_the_log_notes_when_no_target_is_in_its_history_and_the_history_competes(tmp_path):
    """A log without repeats, evaluated over every item, gets a note in train.log
    (history items then compete with every target); with the history excluded, or
    on data whose targets recur in their histories, it does not."""
    rng = np.random.default_rng(0)
    distinct = [list(rng.choice(np.arange(1, 41), size=8, replace=False)) for _ in range(60)]
    # leave-one-out: the second-to-last item is the validation target; here it repeats the first
    repeated = [h[:-2] + [h[0], h[-1]] for h in distinct]
    note = "note: no validation target is an item of its history"
    for name, histories, extra, expected in (("distinct", distinct, [], True),
                                             ("excluded", distinct, ["eval.exclude_history=true"], False),
                                             ("repeated", repeated, [], False)):
        path = tmp_path / f"{name}.txt"
        write_sequences(histories, path)
        cfg = tiny_cfg("sasrec", path, "train.epochs=1", "train.max_steps_per_epoch=1", *extra)
        train_run(cfg, dataset_for(cfg), tmp_path / name, log_to_console=False)
        assert (note in (tmp_path / name / "train.log").read_text()) is expected, name
