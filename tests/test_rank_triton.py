"""Triton full-ranking evaluation and top-K (plr_kernels/target_rank.py, topk.py) vs brute force.

Ranks must be bit-identical (exact integers) to sorting the materialised
score matrix, with both tie policies, ``exclude_index`` and history
exclusion; top-K must equal a stable sort by (score desc, item id asc).
Under TRITON_INTERPRET=1 the item block is 32, the row block 16.
"""

import pytest
import torch

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("triton_device")

import plr_kernels as K  # noqa: E402
from plr_kernels import reference as ref  # noqa: E402


def brute_force_rank(z, e, target, exclude_index=None, exclude_items=None, ties="optimistic"):
    """1 + number of candidates beating the target, by an explicit per-row loop."""
    scores = z.double() @ e.double().T if z.dtype != torch.float32 else z @ e.T
    ranks = []
    for b in range(z.shape[0]):
        y = int(target[b])
        banned = {y}
        if exclude_index is not None:
            banned.add(exclude_index)
        if exclude_items is not None:
            banned |= {int(i) for i in exclude_items[b] if i >= 0}
        keep = torch.tensor([v not in banned for v in range(e.shape[0])])
        s = scores[b][keep]
        beats = s >= scores[b, y] if ties == "pessimistic" else s > scores[b, y]
        ranks.append(1 + int(beats.sum()))
    return torch.tensor(ranks, dtype=torch.int64)


def history(b, length, v, gen_targets=None):
    hist = torch.randint(-1, v, (b, length))
    if gen_targets is not None and length:
        hist[:, 0] = gen_targets  # the target in the history is never excluded
    return hist


RANK_CASES = [
    # (B, V, d, dtype, exclude_index, history length)
    (1, 1, 4, torch.float64, None, 0),
    (5, 7, 8, torch.float64, 0, 3),
    (17, 97, 8, torch.float64, 0, 5),
    (4, 97, 20, torch.float32, None, 0),
    (3, 1000, 8, torch.float64, 0, 6),
]


@pytest.mark.parametrize("b,v,d,dtype,exclude,length", RANK_CASES)
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_target_rank_random_scores(b, v, d, dtype, exclude, length, ties):
    z, e = torch.randn(b, d, dtype=dtype), torch.randn(v, d, dtype=dtype)
    low = 1 if exclude == 0 and v > 1 else 0
    target = torch.randint(low, v, (b,))
    hist = history(b, length, v, target) if length else None
    got = K.target_rank(z, e, target, exclude_index=exclude, exclude_items=hist, ties=ties, backend="triton")
    assert got.dtype == torch.int64
    assert torch.equal(got, brute_force_rank(z, e, target, exclude, hist, ties))
    assert torch.equal(got, ref.target_rank(z, e, target, exclude_index=exclude, exclude_items=hist, ties=ties))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_target_rank_exact_ties(dtype):
    # Integer-valued embeddings: scores are exact, ties plentiful; the target's
    # score must equal its tied competitors' bit for bit.
    b, v, d = 19, 70, 16
    z = torch.randint(-2, 3, (b, d)).to(dtype)
    e = torch.randint(-1, 2, (v, d)).to(dtype)
    e[5:15] = e[40]  # many exact duplicates of one item
    target = torch.randint(1, v, (b,))
    target[:6] = 40
    hist = history(b, 4, v)
    opt = K.target_rank(z, e, target, exclude_index=0, exclude_items=hist, backend="triton")
    pes = K.target_rank(z, e, target, exclude_index=0, exclude_items=hist, ties="pessimistic", backend="triton")
    assert torch.equal(opt, brute_force_rank(z, e, target, 0, hist, "optimistic"))
    assert torch.equal(pes, brute_force_rank(z, e, target, 0, hist, "pessimistic"))
    assert bool((pes > opt).any())  # the tie policies really differ here


def test_target_rank_feeds_the_metrics():
    z, e = torch.randn(6, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    target = torch.randint(1, 40, (6,))
    rank = K.target_rank(z, e, target, exclude_index=0, backend="triton")
    assert rank.min() >= 1 and rank.max() <= 39
    recall10 = (rank <= 10).double()
    assert torch.equal(recall10, (ref.target_rank(z, e, target, exclude_index=0) <= 10).double())


def brute_force_topk(z, e, k, exclude_index=None, exclude_items=None):
    """Sort (score desc, id asc) per row with a Python key; (-inf, -1) padding."""
    scores = z @ e.T
    vals, idx = [], []
    for b in range(z.shape[0]):
        banned = set() if exclude_index is None else {exclude_index}
        if exclude_items is not None:
            banned |= {int(i) for i in exclude_items[b] if i >= 0}
        cand = sorted((v for v in range(e.shape[0]) if v not in banned), key=lambda v: (-float(scores[b, v]), v))
        cand = cand[:k]
        vals.append([float(scores[b, v]) for v in cand] + [float("-inf")] * (k - len(cand)))
        idx.append(cand + [-1] * (k - len(cand)))
    return torch.tensor(vals, dtype=scores.dtype), torch.tensor(idx, dtype=torch.int64)


TOPK_CASES = [
    # (B, V, d, k, dtype, exclude_index, history length)
    (1, 1, 4, 1, torch.float64, None, 0),
    (5, 7, 8, 6, torch.float64, 0, 0),
    (17, 97, 8, 10, torch.float64, 0, 5),
    (3, 97, 8, 33, torch.float32, None, 2),
    (3, 1000, 8, 5, torch.float64, 0, 4),
]


@pytest.mark.parametrize("b,v,d,k,dtype,exclude,length", TOPK_CASES)
def test_topk_random_scores(b, v, d, k, dtype, exclude, length):
    z, e = torch.randn(b, d, dtype=dtype), torch.randn(v, d, dtype=dtype)
    hist = history(b, length, v) if length else None
    vals, idx = K.topk(z, e, k, exclude_index=exclude, exclude_items=hist, backend="triton")
    rv, ri = ref.topk(z, e, k, exclude_index=exclude, exclude_items=hist)
    assert vals.shape == (b, k) and idx.dtype == torch.int64 and vals.dtype == rv.dtype
    assert torch.equal(idx, ri)
    torch.testing.assert_close(vals, rv, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=0)
    if exclude is None and hist is None:
        tv, ti = torch.topk(z @ e.T, k, dim=1)
        assert torch.equal(idx, ti)


def test_topk_ties_go_to_the_smaller_id():
    b, v, d, k = 18, 80, 16, 12
    z = torch.randint(-1, 2, (b, d)).double()
    e = torch.randint(-1, 2, (v, d)).double()
    e[3:60:4] = e[1]  # duplicates spread over several item tiles
    hist = history(b, 3, v)
    vals, idx = K.topk(z, e, k, exclude_index=0, exclude_items=hist, backend="triton")
    bv, bi = brute_force_topk(z, e, k, 0, hist)
    assert torch.equal(idx, bi) and torch.equal(vals, bv)


def test_topk_rows_with_too_few_candidates_end_in_minus_one():
    b, v, d, k = 3, 9, 4, 6
    z, e = torch.randn(b, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
    hist = torch.tensor([[1, 2, 3, 4, 5, -1], [-1, -1, -1, -1, -1, -1], [8, 8, 7, 6, 5, 4]])
    vals, idx = K.topk(z, e, k, exclude_index=0, exclude_items=hist, backend="triton")
    rv, ri = ref.topk(z, e, k, exclude_index=0, exclude_items=hist)
    assert torch.equal(idx, ri) and torch.equal(idx[0, 3:], torch.tensor([-1, -1, -1]))
    assert torch.isneginf(vals[0, 3:]).all() and torch.isneginf(vals[2, 4:]).all()
    torch.testing.assert_close(vals, rv, rtol=1e-12, atol=0)


def test_triton_is_a_listed_backend_of_the_ranking_ops():
    import importlib

    for name in ("target_rank", "topk"):
        assert "triton" in importlib.import_module(f"plr_kernels.{name}").IMPLS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 arithmetic is wrong in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_ranks_and_topk(dtype):
    b, v, d = 300, 20011, 64
    z = torch.randn(b, d, device="cuda").to(dtype)
    e = torch.randn(v, d, device="cuda").to(dtype)
    target = torch.randint(1, v, (b,), device="cuda")
    hist = torch.randint(-1, v, (b, 50), device="cuda")
    for ties in ("optimistic", "pessimistic"):
        got = K.target_rank(z, e, target, exclude_index=0, exclude_items=hist, ties=ties, backend="triton")
        exp = ref.target_rank(z, e, target, exclude_index=0, exclude_items=hist, ties=ties)
        # fp32 accumulation order differs from cuBLAS: allow near-tie flips only.
        assert (got - exp).abs().max() <= 2
    vals, idx = K.topk(z, e, 20, exclude_index=0, exclude_items=hist, backend="triton")
    rv, ri = ref.topk(z, e, 20, exclude_index=0, exclude_items=hist)
    assert (idx == ri).float().mean() > 0.99
    torch.testing.assert_close(vals, rv, rtol=1e-4, atol=1e-4)
