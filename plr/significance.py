"""Paired significance tests between two runs over the users they share.

Every run directory holds ``test_ranks.csv`` (one rank per test user); a
metric per user follows from the rank (``plr.evaluation.per_user_metric``),
and two runs are compared with a paired t-test over the shared users
(``scipy.stats.ttest_rel``), as the PLR and ReaRec papers do, with the 95%
confidence interval of the mean difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
from scipy import stats

from .evaluation import per_user_metric


@dataclass
class PairedTest:
    metric: str
    users: int
    mean_a: float
    mean_b: float
    t: float
    p: float
    ci_low: float = float("nan")   # 95% confidence interval of the mean paired difference B - A
    ci_high: float = float("nan")

    @property
    def diff(self) -> float:
        return self.mean_b - self.mean_a

    @property
    def relative(self) -> float:
        """(B - A) / A in percent (nan when A is 0)."""
        return self.diff / self.mean_a * 100.0 if self.mean_a > 0 else float("nan")

    @property
    def relative_ci(self) -> Tuple[float, float]:
        """The 95% interval of the mean difference over A's mean, in percent
        (A's mean taken as exact; nan when A is 0)."""
        if self.mean_a <= 0:
            return float("nan"), float("nan")
        return self.ci_low / self.mean_a * 100.0, self.ci_high / self.mean_a * 100.0


def paired_test(ranks_a: Dict[int, int], ranks_b: Dict[int, int], metric: str = "ndcg@10") -> PairedTest:
    """B against A: paired t-test of ``metric`` over the users both rank.

    ``ranks_a, ranks_b``: ``{user: rank}``. Raises ``ValueError`` when they
    share fewer than two users. Identical per-user values give t = 0, p = 1.
    """
    users = sorted(set(ranks_a) & set(ranks_b))
    if len(users) < 2:
        raise ValueError(f"runs: expected at least two shared test users, got {len(users)}")
    ma = per_user_metric(np.array([ranks_a[u] for u in users]), metric)
    mb = per_user_metric(np.array([ranks_b[u] for u in users]), metric)
    if np.array_equal(ma, mb):
        t, p, low, high = 0.0, 1.0, 0.0, 0.0
    else:
        res = stats.ttest_rel(mb, ma)
        t, p = res.statistic, res.pvalue
        low, high = res.confidence_interval(0.95)
    return PairedTest(metric, len(users), float(ma.mean()), float(mb.mean()), float(t), float(p),
                      float(low), float(high))


def compare_runs(run_a: Union[str, Path], run_b: Union[str, Path], metric: str = "ndcg@10") -> PairedTest:
    """:func:`paired_test` on the ``test_ranks.csv`` of two run directories."""
    from .training import load_ranks

    return paired_test(load_ranks(Path(run_a) / "test_ranks.csv"), load_ranks(Path(run_b) / "test_ranks.csv"),
                       metric)
