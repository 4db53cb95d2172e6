"""`plr demo` and the synthetic generator behind it."""

import re

import numpy as np
import pytest
import yaml

from plr.cli import main
from plr.demo import synthetic_histories


def test_demo_trains_both_models_and_prints_a_table(capsys, tmp_path):
    code = main(["demo", "--users", "150", "--items", "40", "--epochs", "1", "--hidden", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(r"^(SASRec|PLR \(M=2, T=2\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert [r[0] for r in rows] == ["SASRec", "PLR (M=2, T=2)"]
    for _, recall10, ndcg10, recall20, ndcg20 in rows:
        assert 0.0 <= float(ndcg10) <= float(recall10) <= float(recall20) <= 1.0
    assert re.search(r"paired t-test over \d+ users", out)
    assert (tmp_path / "plr" / "metrics.json").is_file() and (tmp_path / "sasrec" / "best.pt").is_file()


def test_demo_set_changes_plr_only_and_labels_the_row(capsys, tmp_path):
    code = main(["demo", "--users", "120", "--items", "40", "--epochs", "1", "--hidden", "8", "--out", str(tmp_path),
                 "--set", "model.rcl_weight=0", "--set", "model.num_streams=3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "PLR (M=3, T=2) with model.rcl_weight=0, model.num_streams=3" in out
    plr_cfg = yaml.safe_load((tmp_path / "plr" / "config.yaml").read_text())
    assert plr_cfg["model"]["rcl_weight"] == 0 and plr_cfg["model"]["num_streams"] == 3
    sasrec_cfg = yaml.safe_load((tmp_path / "sasrec" / "config.yaml").read_text())
    assert "rcl_weight" not in sasrec_cfg["model"]


def test_demo_set_refuses_an_unknown_key(capsys, tmp_path):
    assert main(["demo", "--users", "60", "--items", "40", "--epochs", "1", "--hidden", "8", "--out", str(tmp_path),
                 "--set", "model.no_such_key=1"]) != 0
    assert "no_such_key" in capsys.readouterr().err


def test_synthetic_histories_are_seeded_and_follow_the_cluster_order():
    a = synthetic_histories(200, 40, num_interests=4, seed=3)
    assert a == synthetic_histories(200, 40, num_interests=4, seed=3)
    assert a != synthetic_histories(200, 40, num_interests=4, seed=4)
    flat = np.concatenate([np.array(s) for s in a])
    assert flat.min() >= 1 and flat.max() <= 40
    # Successor steps inside a cluster are far more frequent than chance (1/10).
    def successor(x, y, size=10):
        (cx, px), (cy, py) = divmod(x - 1, size), divmod(y - 1, size)
        return cx == cy and py == (px + 1) % size

    assert np.mean([successor(x, y) for s in a for x, y in zip(s, s[1:])]) > 0.4


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2


def test_data_stats_prints_counts_and_lengths(tmp_path, capsys):
    path = tmp_path / "seqs.txt"
    path.write_text("1 10 11 12\n2 10 13\n3 11 12 13 14 15\n")
    assert main(["data", "stats", str(path)]) == 0
    out = capsys.readouterr().out.lower()
    for word in ("users", "items", "interactions", "sparsity"):
        assert word in out
    assert re.search(r"users\D+3\b", out) and re.search(r"items\D+6\b", out)
    assert re.search(r"interactions\D+10\b", out) and "max 5" in out
