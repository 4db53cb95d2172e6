"""The `plr` command line."""

import re

import pytest

from plr.cli import main, synthetic_histories


def test_demo_trains_both_models_and_prints_a_table(capsys):
    code = main(["demo", "--users", "120", "--items", "40", "--max-len", "8", "--hidden", "8",
                 "--steps", "4", "--batch", "16"])
    out = capsys.readouterr().out
    assert code == 0
    rows = re.findall(r"^(SASRec|PLR \(M=2, T=2\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    assert [r[0] for r in rows] == ["SASRec", "PLR (M=2, T=2)"]
    for _, start, end, ndcg, recall in rows:
        assert 0.0 <= float(ndcg) <= float(recall) <= 1.0
    top = re.search(r"top-10 for held-out user \d+: \[([\d, ]+)\]", out)
    assert top and len(top.group(1).split(",")) == 10


def test_synthetic_histories_are_seeded_and_in_range():
    a = synthetic_histories(50, 40, 9, 4, seed=3)
    assert a.shape == (50, 10) and a.min() >= 1 and a.max() <= 40
    assert (a == synthetic_histories(50, 40, 9, 4, seed=3)).all()
    assert not (a == synthetic_histories(50, 40, 9, 4, seed=4)).all()


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
