"""`plr analyze KIND`: the paper's analyses end to end on MovieLens-100k, tiny
models trained for a few steps; outputs checked for content."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from plr import PLRModel
from plr import config as config_mod
from plr.analysis.robustness import drop_items
from plr.cli import main
from plr.data import load_dataset
from plr.evaluation import metrics_from_ranks
from plr.models.reasoning import record_attention
from plr.training import load_ranks, train_run
from plr_kernels import reference

from conftest import cli_error

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ml-100k_recbole"
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["model.hidden_size=16", "model.inner_size=32", "model.dropout=0.2", "data.max_len=10", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.batch_size=256", "train.progress=false", "eval.ks=[10,20]",
        "train.seed=3"]


def tiny_cfg(model):
    return config_mod.resolve(model, None, TINY, str(DATA))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny trained runs on ml-100k: sasrec, plr (M=2, T=2), erl."""
    out = tmp_path_factory.mktemp("runs")
    dataset = load_dataset(tiny_cfg("sasrec")["data"])
    for model in ("sasrec", "plr", "erl"):
        train_run(tiny_cfg(model), dataset, out / model, log_to_console=False)
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def assert_png(path, min_bytes=5000):
    data = Path(path).read_bytes()
    assert data.startswith(PNG) and len(data) > min_bytes, (path, len(data))
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300
    assert float(image[..., :3].std()) > 0.01  # not a blank canvas


# -- the model option and the debug output the analyses need ---------------------------


def test_mixture_mean_replaces_the_gate_by_the_uniform_mean_of_the_streams(tmp_path):
    model = PLRModel(num_items=30, max_len=6, hidden_size=8, num_heads=2, inner_size=8, num_streams=3,
                     num_steps=2, mixture="mean", backend="torch").eval()
    assert model.gate is None
    seq = torch.randint(1, 31, (4, 6))
    out = model(seq)
    torch.testing.assert_close(out.gate, torch.full((4, 3), 1 / 3))
    torch.testing.assert_close(out.z_rea, out.states.mean(dim=1).mean(dim=1))  # Eq. 6, then uniform over m
    model.save(str(tmp_path / "m.pt"))
    again = PLRModel.load(str(tmp_path / "m.pt"))
    assert again.mixture == "mean" and again.config()["mixture"] == "mean"
    with pytest.raises(ValueError, match=r"mixture: expected one of \['gate', 'mean'\], got 'avg'"):
        PLRModel(num_items=30, mixture="avg")
    with pytest.raises(ValueError, match="model.mixture"):
        config_mod.resolve("plr", None, ["model.mixture=avg"], str(DATA))


@pytest.mark.parametrize("n,s,padded", [(1, 1, False), (7, 3, True)])
def test_reference_attention_probabilities_are_the_weights_of_its_output(n, s, padded):
    g = torch.Generator().manual_seed(n)
    b, h, m, d = 3, 2, 3, 5
    q = torch.randn(b, h, m, d, generator=g, dtype=torch.float64)
    kp, vp = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    ks, vs = (torch.randn(b, h, m, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(b, n, dtype=torch.bool)
    if padded:
        mask[0] = False  # a fully padded prefix row
        mask[1, :4] = False
    o, probs = reference.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, return_probs=True)
    torch.testing.assert_close(o, reference.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask), rtol=0, atol=0)
    assert probs.shape == (b, h, m, n + s)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, m, dtype=torch.float64))
    assert bool((probs[..., :n][~mask[:, None, None, :].expand(b, h, m, n)] == 0).all())
    manual = torch.einsum("bhmn,bhnd->bhmd", probs[..., :n], vp) + torch.einsum("bhms,bhmsd->bhmd",
                                                                               probs[..., n:], vs)
    torch.testing.assert_close(manual, o, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="return_probs"):
        reference.stream_attention(q, kp, vp, ks, vs, return_probs=True, return_lse=True)


def test_recording_attention_leaves_the_forward_unchanged_and_needs_the_reference():
    model = PLRModel(num_items=40, max_len=7, hidden_size=8, num_layers=2, num_heads=2, inner_size=8,
                     num_streams=2, num_steps=3, backend="torch").eval()
    seq = torch.randint(0, 41, (5, 7))
    seq[:, -1] = torch.randint(1, 41, (5,))
    with torch.no_grad():
        plain = model(seq)
        with record_attention() as steps:
            recorded = model(seq)
    torch.testing.assert_close(recorded.z_final, plain.z_final, rtol=0, atol=0)
    assert len(steps) == 3 and all(len(layers) == 2 for layers in steps)
    for t, layers in enumerate(steps):
        assert all(p.shape == (5, 2, 2, 7 + t + 1) for p in layers)
        torch.testing.assert_close(layers[-1].sum(-1), torch.ones(5, 2, 2))
    cpu = PLRModel(num_items=40, max_len=7, hidden_size=8, num_heads=2, inner_size=8, backend="auto").eval()
    with torch.no_grad(), record_attention(), pytest.raises(ValueError, match="backend: .*expected 'torch'"):
        cpu(seq)


def test_dropping_history_items_keeps_order_target_and_one_item():
    seq = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8, 9, 10], [0] * 9 + [2], [0] * 7 + [5, 6, 7]])
    assert torch.equal(drop_items(seq, 0.0, 0), seq)
    for rate in (0.1, 0.3, 0.5):
        out = drop_items(seq, rate, seed=4)
        assert torch.equal(out, drop_items(seq, rate, seed=4))  # seeded
        for row, new in zip(seq.tolist(), out.tolist()):
            items = [v for v in row if v]
            kept = [v for v in new if v]
            assert new[:len(new) - len(kept)] == [0] * (len(new) - len(kept))  # left-padded
            expected = min(int(torch.round(torch.tensor(rate * len(items), dtype=torch.float64))), len(items) - 1)
            assert len(items) - len(kept) == expected
            it = iter(items)
            assert all(v in it for v in kept)  # a subsequence, in order
    long = torch.arange(1, 51)[None]
    assert not torch.equal(drop_items(long, 0.3, 1), drop_items(long, 0.3, 2))  # the seed chooses the items
    with pytest.raises(ValueError, match="--rates"):
        drop_items(seq, 1.0, 0)


# -- the six kinds end to end -------------------------------------------------------------


def test_ablation_trains_the_four_variants_and_tests_them_against_full(tmp_path, capsys):
    out = tmp_path / "ablation"
    argv = ["analyze", "ablation", "--data", str(DATA), "--out", str(out)] + \
        [a for kv in TINY for a in ("--set", kv)]
    assert main(argv) == 0
    assert "plr analyze ablation: wrote" in capsys.readouterr().out
    rows = {r["variant"]: r for r in read_csv(out / "ablation.csv")}
    assert list(rows) == ["full", "no-mors", "no-rcl", "no-kl"]
    runs = out / "runs" / "data"
    cfgs = {name: yaml.safe_load((runs / name / "config.yaml").read_text()) for name in rows}
    full = cfgs["full"]
    assert full["model"].get("mixture", "gate") == "gate" and full["model"]["kl_weight"] == 0.1
    assert full["model"]["rcl_weight"] == 1.0
    for name, key, value in (("no-mors", "mixture", "mean"), ("no-rcl", "rcl_weight", 0), ("no-kl", "kl_weight", 0)):
        assert cfgs[name]["model"][key] == value
        # the same protocol: everything else as in the full run
        assert {**cfgs[name], "model": {k: v for k, v in cfgs[name]["model"].items() if k != key}} == \
            {**full, "model": {k: v for k, v in full["model"].items() if k != key}}
    for name, row in rows.items():
        test = json.loads((runs / name / "metrics.json").read_text())["test"]
        assert float(row["ndcg@20"]) == pytest.approx(test["ndcg@20"], rel=1e-12)
        if name != "full":
            assert 0.0 <= float(row["p (ndcg@20)"]) <= 1.0
    summary = (out / "SUMMARY.md").read_text()
    assert "| no-mors |" in summary and "against `full`" in summary
    assert_png(out / "ablation.png")
    assert main(argv) == 0  # everything finished: skipped, same table
    assert capsys.readouterr().out.count("finished before, skipped") == 4
    assert read_csv(out / "ablation.csv") == list(rows.values())


def test_sensitivity_plots_each_parameter_from_one_suite(tmp_path, capsys):
    out = tmp_path / "sens"
    argv = ["analyze", "sensitivity", "--data", str(DATA), "--out", str(out), "--vary", "M=1,2",
            "--vary", "T=1,2"] + [a for kv in TINY for a in ("--set", kv)]
    assert main(argv) == 0
    rows = read_csv(out / "sensitivity.csv")
    assert [(r["parameter"], r["value"], r["run"]) for r in rows] == [
        ("M", "1", "M-1"), ("M", "2", "base"), ("T", "1", "T-1"), ("T", "2", "base")]
    runs = out / "runs" / "data"
    assert sorted(p.name for p in runs.iterdir()) == ["M-1", "T-1", "base"]  # the base run is shared
    assert yaml.safe_load((runs / "M-1" / "config.yaml").read_text())["model"]["num_streams"] == 1
    for r in rows:
        test = json.loads((runs / r["run"] / "metrics.json").read_text())["test"]
        assert float(r["recall@20"]) == pytest.approx(test["recall@20"], rel=1e-12)
    for name in ("M", "T"):
        assert_png(out / f"sensitivity-{name}.png")
    err = cli_error(capsys, ["analyze", "sensitivity", "--data", DATA, "--vary", "K=1,2"])
    assert "--vary" in err and "'K=1,2'" in err


def test_robustness_at_rate_zero_is_the_plain_evaluation(runs, tmp_path):
    out = tmp_path / "rob"
    assert main(["analyze", "robustness", "--checkpoint", str(runs / "sasrec"), str(runs / "plr"),
                 str(runs / "erl" / "best.pt"), "--labels", "SASRec", "PLR", "ERL", "--rates", "0.1", "0.3",
                 "--seed", "5", "--out", str(out)]) == 0
    rows = read_csv(out / "robustness.csv")
    assert [(r["model"], float(r["drop_rate"])) for r in rows] == [
        (m, rate) for m in ("SASRec", "PLR", "ERL") for rate in (0.0, 0.1, 0.3)]
    for r in rows:
        if float(r["drop_rate"]) == 0.0:
            plain = json.loads((runs / r["model"].lower() / "metrics.json").read_text())["test"]
            for metric in ("ndcg@10", "ndcg@20", "recall@20", "mrr"):
                assert float(r[metric]) == plain[metric]  # exactly: the same ranks
    lengths = [float(r["mean_history"]) for r in rows if r["model"] == "PLR"]
    assert lengths[0] > lengths[1] > lengths[2]
    assert_png(out / "robustness.png")
    assert "0%" in (out / "SUMMARY.md").read_text()


def test_ceiling_is_at_least_the_model_for_every_user(runs, tmp_path):
    out = tmp_path / "ceil"
    assert main(["analyze", "ceiling", "--checkpoint", str(runs / "plr"), str(runs / "erl"), "--out", str(out)]) == 0
    for model, states in (("plr", ["t1/m1", "t1/m2", "t2/m1", "t2/m2"]), ("erl", ["step0", "step1", "step2"])):
        ranks = read_csv(out / f"ceiling-{model}-ranks.csv")
        assert list(ranks[0]) == ["user", "own", *states, "ceiling"]
        own = np.array([int(r["own"]) for r in ranks])
        ceiling = np.array([int(r["ceiling"]) for r in ranks])
        state = np.array([[int(r[s]) for s in states] for r in ranks])
        assert (ceiling <= own).all() and (ceiling == np.minimum(own, state.min(1))).all()
        saved = load_ranks(runs / model / "test_ranks.csv")  # the model's own score is its plain evaluation
        assert [saved[int(r["user"])] for r in ranks] == own.tolist()
        rows = [r for r in read_csv(out / "ceiling.csv") if r["model"] == model]
        for r in rows:
            assert float(r["ceiling (states + own)"]) >= float(r["own"])
            assert float(r["ceiling (states + own)"]) == pytest.approx(
                metrics_from_ranks(ceiling, [10, 20])[r["metric"]], rel=1e-12)
    assert_png(out / "ceiling.png")


def test_attention_maps_are_the_reference_probabilities_and_the_gate(runs, tmp_path, capsys):
    out = tmp_path / "att"
    dataset = load_dataset(tiny_cfg("plr")["data"], parts=("test",))
    users = [str(dataset.user_raw_ids[int(u)]) for u in dataset.test.user[:2]]
    assert main(["analyze", "attention", "--checkpoint", str(runs / "plr"), "--users", *users,
                 "--out", str(out)]) == 0
    model = PLRModel.load(str(runs / "plr" / "best.pt")).eval()
    with torch.no_grad():
        gate = model(dataset.test.item_seq[:2]).gate
    for b, user in enumerate(users):
        data = json.loads((out / f"attention-{user}.json").read_text())
        matrix = np.array([[np.nan if v is None else v for v in row] for row in data["attention"]], dtype=float)
        n = len(data["history_items"])
        assert matrix.shape == (4, n + 2) and data["rows"] == ["t1 m1", "t1 m2", "t2 m1", "t2 m2"]
        np.testing.assert_allclose(np.nansum(matrix, axis=1), 1.0, rtol=1e-5)
        assert np.isnan(matrix[:2, n + 1]).all() and not np.isnan(matrix[2:]).any()  # step 1 sees r1 only
        np.testing.assert_allclose(data["gate"], gate[b].tolist(), rtol=1e-6)
        assert_png(out / f"attention-{user}.png")
    bad = cli_error(capsys, ["analyze", "attention", "--checkpoint", runs / "plr", "--users", "no-such-user",
                             "--out", tmp_path / "x"])
    assert "--users" in bad and "'no-such-user'" in bad


def test_efficiency_flops_exceed_sasrec_by_the_reasoning_tokens_share(runs, tmp_path):
    out = tmp_path / "eff"
    assert main(["analyze", "efficiency", "--like", str(runs / "plr"), "--models", "plr", "sasrec", "erl",
                 "--repeats", "3", "--batch-size", "16", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in read_csv(out / "efficiency.csv")}
    assert list(rows) == ["sasrec", "plr", "erl"]  # SASRec first: the reference of the ratios
    n = 10  # max_len: every history is full
    # Each reasoning token costs what a history token does (same layers; its attention spans N + t
    # keys instead of N), so the extra FLOPs are the reasoning tokens' share T*M/N, within 10 %.
    for name, tokens in (("plr", 2 * 2), ("erl", 2)):
        extra = float(rows[name]["relative FLOPs"]) - 1.0
        assert extra == pytest.approx(tokens / n, rel=0.10), (name, extra)
        assert float(rows[name]["relative FLOPs with scoring"]) < float(rows[name]["relative FLOPs"])
    for r in rows.values():
        assert math.isfinite(float(r["relative latency"])) and float(r["latency ms/sample"]) > 0
    assert float(rows["sasrec"]["relative latency"]) == 1.0
    assert_png(out / "efficiency.png")
    # The trained checkpoints themselves: the FLOPs do not depend on the weights.
    assert main(["analyze", "efficiency", "--checkpoint", str(runs / "plr"), str(runs / "sasrec"), "--repeats", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "eff2")]) == 0
    trained = {r["model"]: r for r in read_csv(tmp_path / "eff2" / "efficiency.csv")}
    assert trained["plr"]["MFLOPs/sample"] == rows["plr"]["MFLOPs/sample"]
    assert trained["sasrec"]["MFLOPs/sample"] == rows["sasrec"]["MFLOPs/sample"]


# -- wrong checkpoints, wrong data ---------------------------------------------------------


def test_wrong_model_class_and_foreign_dataset_are_clear_errors(runs, tmp_path, capsys):
    err = cli_error(capsys, ["analyze", "ceiling", "--checkpoint", runs / "sasrec", "--out", tmp_path / "a"])
    assert "SASRecModel" in err and "ceiling" in err
    err = cli_error(capsys, ["analyze", "attention", "--checkpoint", runs / "sasrec", "--out", tmp_path / "b"])
    assert "SASRecModel" in err and "attention" in err
    err = cli_error(capsys, ["analyze", "ablation", "--run", runs / "sasrec", "--out", tmp_path / "c"])
    assert "sasrec run" in err
    # A dataset whose item vocabulary is not the checkpoint's: the first 20k interactions of ml-100k.
    other = tmp_path / "ml-100k-part"
    other.mkdir()
    lines = (DATA / "ml-100k.inter").read_text().splitlines()[:20001]
    (other / "ml-100k-part.inter").write_text("\n".join(lines) + "\n")
    err = cli_error(capsys, ["analyze", "robustness", "--checkpoint", runs / "plr", "--data", other,
                             "--out", tmp_path / "d"])
    assert "--data" in err and "differ from those" in err
    err = cli_error(capsys, ["analyze", "ceiling", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "e"])
    assert "no run directory or checkpoint" in err
    err = cli_error(capsys, ["analyze", "ceiling", "--checkpoint", runs / "plr", runs / "erl", "--labels", "x",
                             "--out", tmp_path / "f"])
    assert "--labels: expected 2 distinct names" in err


def test_quantile_groups_keep_ties_together_and_leave_no_group_empty():
    from plr.analysis.groups import quantile_groups

    values = np.array([4, 4, 4, 4, 4, 5, 6, 7, 8, 20, 20, 20])
    group = quantile_groups(values, 4)
    assert sorted(set(group.tolist())) == list(range(group.max() + 1))  # no gap: no empty group
    for v in np.unique(values):
        assert len(set(group[values == v].tolist())) == 1  # equal values, one group
    order = np.argsort(values, kind="stable")
    assert (np.diff(group[order]) >= 0).all()  # groups are value ranges, in order
    assert quantile_groups(np.arange(100), 4).tolist() == [i // 25 for i in range(100)]
    assert quantile_groups(np.full(7, 3), 4).tolist() == [0] * 7


def test_groups_split_the_paired_test_by_history_length_and_target_popularity(runs, tmp_path):
    from scipy import stats

    from plr.evaluation import per_user_metric

    out = tmp_path / "groups"
    assert main(["analyze", "groups", str(runs / "sasrec"), str(runs / "plr"), str(runs / "erl"), "--bins", "3",
                 "--out", str(out)]) == 0
    rows = read_csv(out / "groups.csv")
    dataset = load_dataset(tiny_cfg("sasrec")["data"], parts=("test",))
    users = dataset.test.user.numpy()
    ranks = {name: load_ranks(runs / name / "test_ranks.csv") for name in ("sasrec", "plr", "erl")}
    for name in ("sasrec", "plr", "erl"):
        plain = json.loads((runs / name / "metrics.json").read_text())["test"]
        for metric in ("ndcg@10", "recall@20"):
            every = [r for r in rows if r["group"] == "all" and r["metric"] == metric]
            assert len(every) == 2 and all(float(r[name]) == pytest.approx(plain[metric], abs=1e-12) for r in every)
    values = {"history": np.asarray(dataset.seq_lengths)[users] - 1,  # leave-one-out: the target comes last
              "popularity": np.asarray(dataset.item_popularity)[dataset.test.target.numpy()]}
    for grouping, vals in values.items():
        groups = [r for r in rows if r["grouping"] == grouping and r["metric"] == "ndcg@10" and r["group"] != "all"]
        assert 2 <= len(groups) <= 3 and sum(int(r["users"]) for r in groups) == len(users)
        for r in groups:  # recomputed from the ranks and the group's value range
            lo, _, hi = r["group"].partition("-")
            sel = (vals >= int(lo)) & (vals <= int(hi or lo))
            assert sel.sum() == int(r["users"])
            a = per_user_metric(np.array([ranks["sasrec"][u] for u in users[sel]]), "ndcg@10")
            b = per_user_metric(np.array([ranks["plr"][u] for u in users[sel]]), "ndcg@10")
            assert float(r["sasrec"]) == pytest.approx(a.mean()) and float(r["plr"]) == pytest.approx(b.mean())
            want = 1.0 if np.array_equal(a, b) else stats.ttest_rel(b, a).pvalue
            assert float(r["plr p"]) == pytest.approx(want)
    assert_png(out / "groups.png")
    summary = (out / "SUMMARY.md").read_text()
    assert "By interactions before the target" in summary and "By training count of the target item" in summary


def test_groups_refuse_a_single_run_unfinished_runs_and_bad_metrics(runs, tmp_path, capsys):
    err = cli_error(capsys, ["analyze", "groups", runs / "sasrec", "--out", tmp_path / "a"])
    assert "expected a reference run and at least one other, got 1" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, ["analyze", "groups", runs / "sasrec", tmp_path / "empty", "--out", tmp_path / "b"])
    assert "holds no test_ranks.csv" in err
    err = cli_error(capsys, ["analyze", "groups", runs / "sasrec", runs / "plr", "--metrics", "mrr@3",
                             "--out", tmp_path / "c"])
    assert "--metrics: expected recall@K or ndcg@K, got 'mrr@3'" in err


def _history_reference(model, samples, training: bool, seed: int = 0):
    """Per sample, from the whole score matrix: (top-1 in history, history mass,
    rank with all items, rank with the history excluded); float64."""
    from plr.models.base import PADDING

    model.train(training)
    torch.manual_seed(seed)
    with torch.no_grad():
        seq = model.prepare(samples.item_seq)
        z = model.inference_vector(model.forward_prepared(seq)).double()
    model.eval()
    scores = z @ model.item_emb.detach().double().T / model.temperature
    scores[:, PADDING] = -math.inf
    hist = torch.zeros_like(scores, dtype=torch.bool)
    for b, row in enumerate(seq.tolist()):
        hist[b, [v for v in row if v != PADDING]] = True
    target_score = scores.gather(1, samples.target[:, None])
    rank_all = 1 + (scores > target_score).sum(1)
    rank_excl = 1 + ((scores > target_score) & ~hist).sum(1)
    top1 = hist.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    mass = (torch.softmax(scores, 1) * hist).sum(1)
    return top1.double().mean().item(), mass.mean().item(), rank_all.numpy(), rank_excl.numpy()


def test_history_shares_and_exclusion_are_those_of_the_whole_score_matrix(runs, tmp_path):
    """`plr analyze history`: the share of top-1 history items, their softmax mass in
    eval and training mode, and the metrics without / with the history excluded,
    against a float64 reference over the [samples x items] score matrix."""
    from plr.analysis.common import load_checkpoint

    out = tmp_path / "hist"
    assert main(["analyze", "history", "--checkpoint", str(runs / "sasrec"), str(runs / "plr"),
                 "--metrics", "ndcg@10", "recall@20", "--seed", "7", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in read_csv(out / "history.csv")}
    assert list(rows) == ["sasrec", "plr"]
    valid = load_dataset(tiny_cfg("sasrec")["data"], parts=("valid",)).valid
    for name, row in rows.items():
        model, _, _ = load_checkpoint(runs / name)
        assert row["split"] == "valid" and int(row["samples"]) == len(valid.target)
        assert float(row["target in history"]) == 0.0  # MovieLens: a user rates a film once
        for mode, training in (("eval", False), ("train", True)):
            top1, mass, _, _ = _history_reference(model, valid, training, seed=7)
            assert float(row[f"top-1 in history ({mode})"]) == pytest.approx(top1, abs=1e-12)
            assert float(row[f"history mass ({mode})"]) == pytest.approx(mass, rel=1e-4)
        # dropout 0.2: one training-mode pass is not the eval-mode one
        assert float(row["history mass (train)"]) != pytest.approx(float(row["history mass (eval)"]), rel=1e-6)
        _, _, rank_all, rank_excl = _history_reference(model, valid, False)
        assert (rank_excl <= rank_all).all() and (rank_excl < rank_all).any()
        for metric in ("ndcg@10", "recall@20"):
            assert float(row[metric]) == pytest.approx(metrics_from_ranks(rank_all, [10, 20])[metric], rel=1e-9)
            assert float(row[f"{metric} excluding history"]) == pytest.approx(
                metrics_from_ranks(rank_excl, [10, 20])[metric], rel=1e-9)
            assert float(row[f"{metric} excluding history"]) >= float(row[metric])
    assert_png(out / "history.png")
    assert "excluded" in (out / "SUMMARY.md").read_text()


def test_history_refuses_a_bad_split_and_bad_metrics(runs, tmp_path, capsys):
    from plr.analysis.history import run_history
    from plr.errors import UserError

    with pytest.raises(UserError, match=r"--split: expected one of \['valid', 'test'\], got 'train'"):
        run_history(tmp_path / "a", [str(runs / "sasrec")], split="train")
    err = cli_error(capsys, ["analyze", "history", "--checkpoint", runs / "sasrec", "--metrics", "mrr@3",
                             "--out", tmp_path / "b"])
    assert "--metrics: expected recall@K or ndcg@K, got 'mrr@3'" in err
    err = cli_error(capsys, ["analyze", "history", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "c"])
    assert "no run directory or checkpoint" in err
