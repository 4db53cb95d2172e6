"""Nothing wrong passes silently: bad configs, data, checkpoints and diverging
runs give one clear error (CLI: one ``plr: error:`` line, exit code 2), never a
score, a traceback or a modified run directory.

Tiny synthetic histories (plr.demo), a 8-dim SASRec, one epoch: seconds.
"""

import gzip
import hashlib
import math

import numpy as np
import pytest
import torch

from conftest import cli_error
from plr.models.base import CHECKPOINT_FORMAT
from plr import config, guards
from plr.cli import main
from plr.data import build_dataset, check_usable, dataset_stats, read_interactions
from plr.data.interactions import DataFormatError
from plr.demo import synthetic_histories, write_sequences
from plr.errors import UserError
from plr.evaluation import NonFiniteScores, evaluate
from plr.models import SequentialRecommender
from plr.training import LAST, Trainer, train_run

TINY = ["model.hidden_size=8", "model.inner_size=16", "model.num_layers=1", "data.max_len=8",
        "data.format=sequences", "train.batch_size=32", "train.progress=false", "train.epochs=1",
        "train.max_steps_per_epoch=3"]


def sets(*items):
    return sum((["--set", s] for s in items), [])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "seqs.txt"
    write_sequences(synthetic_histories(60, 30, num_interests=3, min_len=4, max_len=8, seed=2), path)
    return path


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ok"
    assert main(["train", "--model", "sasrec", "--data", str(data), "--out", str(out), *sets(*TINY)]) == 0
    return out


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# -- configs: typed, checked before any data is read -----------------------------------


@pytest.mark.parametrize("override,needle", [
    ("train.batch_size=-5", "train.batch_size: expected an integer >= 1, got -5"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("train.save_every_steps=0", "train.save_every_steps: expected an integer >= 1, got 0"),
    ("train.epochs=-1", "train.epochs: expected an integer >= 1, got -1"),
    ("train.lr=abc", "train.lr: expected a finite number > 0.0, got 'abc'"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("train.divergence_limit=-1", "train.divergence_limit: expected a finite number > 0.0"),
    ("train.progress=maybe", "train.progress: expected true or false, got 'maybe'"),
    ("train.device=gpu", "train.device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("eval.metric=foo", "eval.metric: expected one of"),
    ("eval.metric=ndcg@7", "eval.metric: expected one of"),
    ("eval.ks=[0]", "eval.ks[0]: expected an integer >= 1, got 0"),
    ("eval.ties=random", "eval.ties: expected one of ['optimistic', 'pessimistic'], got 'random'"),
    ("data.max_len=0", "data.max_len: expected an integer >= 1, got 0"),
    ("data.split=random", "data.split: expected one of"),
    ("model.foo=1", "model: unknown key(s) ['model.foo'] for model 'sasrec'; accepted:"),
    ("model.dropout=1.5", "model.dropout: expected a probability in [0, 1), got 1.5"),
    ("model.hidden_size=0", "model.hidden_size: expected an int >= 1, got 0"),
    ("train.nope=1", "unknown key(s) ['nope'] in section 'train'"),
])
def test_bad_config_is_one_line_before_the_data_is_read(capsys, tmp_path, override, needle):
    # The data path does not exist: the config error must come first.
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", tmp_path / "missing.txt",
                              "--out", tmp_path / "run", "--set", override])
    assert needle in line
    assert " — " in line  # says how to fix it
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,value", [("5e-4", 5e-4), ("1E-3", 1e-3), (".5", 0.5), ("1.0e5", 1e5),
                                        ("1.0e+5", 1e5), ("-2e3", -2e3), ("3", 3), ("1_000", 1000)])
def test_numbers_in_any_notation(text, value):
    got = config.parse_overrides([f"train.weight_decay={text}"])["train"]["weight_decay"]
    assert got == value and not isinstance(got, str)
    cfg = config.resolve("sasrec", None, [f"train.lr={text.lstrip('-')}"], "x")
    assert cfg["train"]["lr"] == abs(value) and isinstance(cfg["train"]["lr"], float)


def test_scientific_notation_in_a_yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  lr: 1e-4\n  weight_decay: 5E-6\nmodel:\n  dropout: .25\n")
    cfg = config.resolve("sasrec", str(path), [], "x")
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["weight_decay"] == 5e-6
    assert cfg["model"]["dropout"] == 0.25


def test_config_keys_are_declared_beside_their_fields():
    import dataclasses

    for cls in config.SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("spec") is not None, f"{cls.__name__}.{f.name} has no spec"
    with pytest.raises(UserError, match="train.patience: expected an integer >= 1, got 0"):
        config.check({"model": {"name": "sasrec"}, "train": {"patience": 0}})


def test_model_kwargs_checked_against_the_constructor():
    with pytest.raises(UserError, match=r"model\.kl_weightt.*accepted: \[.*'kl_weight'"):
        config.resolve("plr", None, ["model.kl_weightt=0.1"], "x")
    with pytest.raises(UserError, match="model.num_streams: expected an int >= 1, got 0"):
        config.resolve("plr", None, ["model.num_streams=0"], "x")
    # LARES' phase keys are accepted, a bad phase is not.
    config.resolve("lares", None, ["model.rpt_epochs=2"], "x")
    with pytest.raises(UserError, match="model.phase"):
        config.resolve("lares", None, ["model.phase=sft"], "x")


# -- run directories: a refused run changes nothing ------------------------------------


def test_refused_runs_leave_the_run_directory_as_it_was(capsys, data, run):
    before = snapshot(run)
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", data, "--out", run, *sets(*TINY)])
    assert "already holds a training state" in line and "--resume" in line
    assert snapshot(run) == before
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", data, "--out", run, "--resume",
                              *sets(*TINY, "train.lr=0.01")])
    assert "another config (changed: ['train.lr'])" in line
    assert snapshot(run) == before


# -- divergence: an error, never a score -----------------------------------------------


def test_diverged_run_stops_with_one_line_and_no_scores(capsys, data, tmp_path):
    out = tmp_path / "diverged"
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", data, "--out", out,
                              *sets(*TINY, "train.lr=1.0e+5", "train.epochs=3", "train.max_steps_per_epoch=null")])
    assert "training stopped: loss term 'loss'" in line and "epoch" in line and "step" in line
    assert not (out / "metrics.json").exists() and not (out / "test_ranks.csv").exists()
    saved = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert all(bool(torch.isfinite(t).all()) for t in saved["model"].values() if t.is_floating_point())


def _trainer(data, out, *extra):
    # prefix samples: the poisoned loss below is compute_loss (sequence mode calls sequence_loss)
    cfg = config.resolve("sasrec", None, TINY + ["train.epochs=2", "train.samples=prefix", *extra], str(data))
    ds = build_dataset(read_interactions(data, fmt="sequences"), max_len=8, split="loo")
    return Trainer(cfg, ds, out, log_to_console=False)


def _poison(trainer, at_epoch, value, part=None):
    """Make ``compute_loss`` return ``value`` (as the loss, or as ``part``) from epoch ``at_epoch`` on."""
    real = trainer.model.compute_loss
    seen = {}

    def compute_loss(seq, target):
        loss, parts = real(seq, target)
        if trainer.state["epoch"] >= at_epoch:
            seen.setdefault("best", (trainer.run_dir / "best.pt").read_bytes())
            seen.setdefault("weights", {k: v.clone() for k, v in trainer.model.state_dict().items()})
            bad = torch.tensor(value, dtype=loss.dtype)
            if part is None:
                loss = loss * 0 + bad
            else:
                parts = {**parts, part: bad}
        return loss, parts

    trainer.model.compute_loss = compute_loss
    trainer._prefix_loss = compute_loss  # the trainer binds the loss once, at construction
    return seen


@pytest.mark.parametrize("value,part,needle", [
    (float("nan"), None, "loss term 'loss' is nan at epoch 1, step 0"),
    (float("inf"), "nip", "loss term 'nip' is inf at epoch 1, step 0"),
    (5e4, "nip", "loss term 'nip' = 50000 exceeds train.divergence_limit = 10000"),
])
def test_guard_names_the_term_and_keeps_best_and_last_good_state(data, tmp_path, value, part, needle):
    trainer = _trainer(data, tmp_path / "run")
    seen = _poison(trainer, 1, value, part)
    with pytest.raises(guards.TrainingDiverged) as exc:
        trainer.fit()
    assert isinstance(exc.value, RuntimeError) and needle in str(exc.value)
    if part is not None and math.isfinite(value):
        assert "--set train.divergence_limit" in str(exc.value)
    assert (tmp_path / "run" / "best.pt").read_bytes() == seen["best"]  # best.pt untouched
    saved = torch.load(tmp_path / "run" / LAST, map_location="cpu", weights_only=True)
    for k, v in seen["weights"].items():  # last.pt = the state before the bad step
        assert torch.equal(saved["model"][k], v), k
    assert saved["state"]["epoch"] == 1 and saved["state"]["step_in_epoch"] == 0
    assert "stopped at epoch 1, step 0" in (tmp_path / "run" / "train.log").read_text()


def test_divergence_limit_null_disables_the_limit(data, tmp_path):
    trainer = _trainer(data, tmp_path / "run", "train.divergence_limit=null")
    _poison(trainer, 1, 5e4, "nip")
    metrics = trainer.fit()
    assert metrics["epochs"] == 2


def test_ctrl_c_saves_the_state_and_says_how_to_resume(capsys, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = Trainer.train_step

    def train_step(self, idx):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, idx)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    capsys.readouterr()
    argv = ["train", "--model", "sasrec", "--data", str(data), "--out", str(out), *sets(*TINY)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    saved = torch.load(out / LAST, map_location="cpu", weights_only=True)
    assert saved["state"]["step_in_epoch"] == 1
    assert main(argv + ["--resume"]) == 0 and (out / "metrics.json").is_file()


# -- checkpoints ------------------------------------------------------------------------


def _nan_checkpoint(run, tmp_path):
    model, extra = SequentialRecommender.load_with_extra(str(run / "best.pt"))
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    model.save(str(tmp_path / "nan.pt"), extra=extra)
    return tmp_path / "nan.pt"


def test_non_finite_checkpoint_is_refused(capsys, data, run, tmp_path):
    bad = _nan_checkpoint(run, tmp_path)
    line = cli_error(capsys, ["evaluate", "--checkpoint", bad, "--data", data])
    assert "non-finite weights" in line
    assert "non-finite weights" in cli_error(capsys, ["recommend", "--checkpoint", bad, "--history", "1 2"])
    # compare refuses a run whose best.pt diverged
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pt").write_bytes(bad.read_bytes())
    (other / "test_ranks.csv").write_bytes((run / "test_ranks.csv").read_bytes())
    assert "non-finite weights" in cli_error(capsys, ["compare", run, other])
    # The API: non-finite scores are an error, never a metric.
    model = SequentialRecommender.load(str(bad))
    ds = build_dataset(read_interactions(data, fmt="sequences"), max_len=8, split="loo")
    with pytest.raises(NonFiniteScores, match="non-finite"):
        evaluate(model, ds.test)


def test_readout_of_a_model_without_one_is_refused(capsys, data, run):
    line = cli_error(capsys, ["evaluate", "--checkpoint", run / "best.pt", "--data", data, "--readout", "rea"])
    assert "--readout" in line and "SASRecModel" in line


@pytest.mark.parametrize("kind", ["truncated", "foreign", "pickle"])
def test_unreadable_checkpoint_is_one_line(capsys, data, run, tmp_path, kind):
    path = tmp_path / "x.pt"
    if kind == "truncated":
        path.write_bytes((run / "best.pt").read_bytes()[:1000])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        torch.save({"f": np.random.default_rng(0)}, path)  # not loadable with weights_only
    line = cli_error(capsys, ["evaluate", "--checkpoint", path, "--data", data])
    assert str(path) in line and ("not a readable plr checkpoint" in line or CHECKPOINT_FORMAT in line)


def test_recommend_never_prints_the_no_candidate_slot(capsys, run):
    n_items = SequentialRecommender.load(str(run / "best.pt")).num_items
    capsys.readouterr()
    assert main(["recommend", "--checkpoint", str(run / "best.pt"), "--history", "1 2 3", "--k", str(n_items),
                 "--exclude-history"]) == 0
    out, err = capsys.readouterr()
    rows = out.strip().splitlines()[1:]
    assert len(rows) == n_items - 3 and all(r.split()[1] != "-1" for r in rows)
    assert "only" in err and "3 excluded" in err
    assert "--k" in cli_error(capsys, ["recommend", "--checkpoint", run / "best.pt", "--history", "1",
                                       "--k", n_items + 1])


# -- data -------------------------------------------------------------------------------


def _table(tmp_path, body, name="t.csv", header="user,item,timestamp\n"):
    path = tmp_path / name
    path.write_text(header + body, encoding="utf-8")
    return path


@pytest.mark.parametrize("body,needle,line", [
    ("1,1,978300760\n1,2,\n1,3,978300762\n", "missing timestamp", 3),
    ("1,1,978300760\n1,2,nan\n1,3,978300762\n", "expected a finite number", 3),
    ("1,1,978300760\n1,2,inf\n", "expected a finite number", 3),
    ("1,1,978300760\n1,2,2001-01-01\n", "mixes numbers and dates", 3),
])
def test_bad_timestamps_name_file_and_line(tmp_path, body, needle, line):
    path = _table(tmp_path, body)
    with pytest.raises(DataFormatError, match=needle) as exc:
        read_interactions(path)
    assert exc.value.path == str(path) and exc.value.line == line


def test_undecodable_bytes_bom_and_truncated_gzip(tmp_path, capsys):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("user,item,timestamp\n1,caf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="not valid utf-8.*iconv") as exc:
        read_interactions(latin)
    assert exc.value.line == 2
    noise = tmp_path / "noise.txt"
    noise.write_bytes(bytes(np.random.default_rng(0).integers(128, 256, 300, dtype=np.uint8)))
    line = cli_error(capsys, ["data", "stats", noise])
    assert str(noise) in line and "utf-8" in line
    bom = _table(tmp_path, "1,1,1\n", header="\ufeffuser,item,timestamp\n")
    with pytest.raises(DataFormatError, match="byte-order mark") as exc:
        read_interactions(bom)
    assert exc.value.line == 1
    gz = tmp_path / "seqs.txt.gz"
    gz.write_bytes(gzip.compress(b"1 2 3 4\n" * 2000)[:60])
    line = cli_error(capsys, ["data", "stats", gz])
    assert str(gz) in line and "truncated or corrupt gzip" in line


def test_datasets_without_samples_are_errors(tmp_path, capsys):
    singles = tmp_path / "singles.txt"
    singles.write_text("".join(f"{u} {u}\n" for u in range(1, 20)))
    with pytest.raises(ValueError, match="no training samples"):
        check_usable(build_dataset(read_interactions(singles, fmt="sasrec"), split="loo"), str(singles))
    assert "no training samples" in cli_error(capsys, ["train", "--model", "sasrec", "--data", singles, "--out",
                                                       tmp_path / "r0", *sets(*TINY, "data.format=sasrec")])
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"{u} {u} {u + 1}\n" for u in range(1, 20)))
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", pairs, "--out", tmp_path / "r", *sets(*TINY)])
    assert "no valid users" in line
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("1 5\n" + "".join(f"{u} 1 2 3 4\n" for u in range(2, 9)))
    with pytest.warns(UserWarning, match="1 user\\(s\\).*single interaction"):
        check_usable(build_dataset(read_interactions(mixed, fmt="sequences"), split="loo"), str(mixed))


def test_stats_report_duplicates_not_negative_sparsity(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("1 1 1 1 1 2\n2 1 1 1\n")
    stats = dataset_stats(path)
    # user 1: items 1,1,1,1,2 (3 repeats); user 2: items 1,1,1 (2 repeats)
    assert stats["duplicates"] == 5 and stats["interactions"] == 8
    assert stats["sparsity"] == pytest.approx(0.25)  # 3 distinct pairs fill 3 of the 2 x 2 cells



def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UserError, match="train.batch_size"):
        main(["train", "--model", "sasrec", "--data", str(tmp_path / "x"), "--set", "train.batch_size=0", "--debug"])


def test_data_encoding_reads_a_latin1_file_and_an_unknown_one_is_refused(tmp_path, capsys):
    from plr.data import read_interactions

    path = tmp_path / "latin1.csv"
    rows = ["user,item,timestamp"] + [f"u{u},caf\u00e9{i},{10 * u + i}" for u in range(3) for i in range(4)]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    with pytest.raises(Exception, match=r"not valid utf-8.*--set data.encoding=latin-1"):
        read_interactions(path)
    inter = read_interactions(path, encoding="latin-1")
    assert sorted(set(map(str, inter.item))) == [f"caf\u00e9{i}" for i in range(4)]
    line = cli_error(capsys, ["train", "--model", "sasrec", "--data", path, "--set", "data.encoding=klingon"])
    assert "data.encoding" in line and "klingon" in line


def test_a_run_written_before_a_new_config_key_still_resumes(tmp_path):
    from plr.training import same_config

    cfg = config.resolve("sasrec", None, TINY, "x")
    old = {sec: dict(v) for sec, v in cfg.items()}
    del old["data"]["encoding"]  # a run directory written before data.encoding existed
    assert same_config(old) == cfg
