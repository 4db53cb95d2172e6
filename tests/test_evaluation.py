"""Full-ranking evaluation and its metrics."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from plr import SASRecModel
from plr.evaluation import evaluate, metrics_from_ranks, per_user_metric, popularity_ranks


def test_metrics_from_ranks_by_hand():
    ranks = np.array([1, 3, 10, 11, 60])
    m = metrics_from_ranks(ranks, ks=[10])
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 10 + 1 / 11 + 1 / 60) / 5)
    with pytest.raises(ValueError, match="metric: expected recall@K"):
        per_user_metric(ranks, "hit@10")


def test_evaluate_equals_ranking_the_materialised_score_matrix():
    torch.manual_seed(0)
    model = SASRecModel(30, max_len=6, hidden_size=8, num_layers=1, num_heads=2, inner_size=8,
                        backend="torch").double()
    seq = torch.randint(1, 31, (13, 6))
    seq[:4, :2] = 0
    target = torch.randint(1, 31, (13,))
    samples = SimpleNamespace(item_seq=seq, target=target, user=torch.arange(13))
    for exclude_history in (False, True):
        result = evaluate(model.eval(), samples, ks=[5, 10], batch_size=4, exclude_history=exclude_history)
        with torch.no_grad():
            scores = model(seq).z_final @ model.item_emb.T
        scores[:, 0] = -math.inf
        if exclude_history:
            hist = scores.clone()
            hist.scatter_(1, seq, -math.inf)
            hist[torch.arange(13), target] = scores[torch.arange(13), target]
            scores = hist
        want = 1 + (scores > scores[torch.arange(13), target][:, None]).sum(1)
        assert np.array_equal(result.ranks, want.numpy())
        assert result.metrics["recall@10"] == pytest.approx(float((want <= 10).double().mean()))


def test_popularity_ranks():
    popularity = np.array([0, 5, 9, 1, 9])  # item 0 is padding
    samples = SimpleNamespace(item_seq=torch.tensor([[0, 2], [1, 4]]), target=torch.tensor([1, 3]),
                              user=torch.arange(2))
    assert popularity_ranks(popularity, samples).tolist() == [3, 4]
    assert popularity_ranks(popularity, samples, ties="pessimistic").tolist() == [3, 4]
    assert popularity_ranks(popularity, samples, exclude_history=True).tolist() == [2, 2]
