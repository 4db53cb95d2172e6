"""NaN and infinite scores in full ranking and top-K, in every backend that
runs here (reference torch, Triton under the interpreter, compiled C++ CPU).

The rule (plr_kernels/reference.py): a NaN candidate beats nothing, a NaN
target is beaten by every candidate (rank = 1 + number of candidates, i.e.
last), and items scoring NaN never enter a top-K; rows left with fewer than
k candidates end in ``(-inf, -1)`` after every real candidate, ``-inf`` ones
included. Each backend is checked against a brute force written here and
against the reference, in float64, on odd sizes with history exclusions.
"""

import math

import pytest
import torch

import plr_kernels as K
from plr_kernels import _dispatch, _extension
from plr_kernels import reference as ref

f64 = torch.float64
NAN = float("nan")


def backends():
    out = ["torch"]
    if _dispatch.triton_importable():
        out.append("triton")
    if _extension.has_kernel("topk", "cpu") and _extension.has_kernel("target_rank", "cpu"):
        out.append("cpu")
    return out


BACKENDS = backends()


def nan_inputs(b=5, v=37, d=7, seed=0):
    """Item rows 3 and 20 are NaN (every user scores them NaN); user row 1 is NaN
    (every score NaN); the rest is random."""
    g = torch.Generator().manual_seed(seed)
    z, e = torch.randn(b, d, generator=g, dtype=f64), torch.randn(v, d, generator=g, dtype=f64)
    e[3, 2] = NAN
    e[20] = NAN
    z[1, 0] = NAN
    return z, e


def brute_rank(z, e, target, exclude_index, exclude_items, ties):
    scores = z @ e.T
    out = []
    for b in range(z.shape[0]):
        y = int(target[b])
        banned = {y} | ({exclude_index} if exclude_index is not None else set())
        if exclude_items is not None:
            banned |= {int(i) for i in exclude_items[b] if i >= 0}
        cands = [float(scores[b, v]) for v in range(e.shape[0]) if v not in banned]
        t = float(scores[b, y])
        if math.isnan(t):
            out.append(1 + len(cands))
        else:
            out.append(1 + sum((s >= t) if ties == "pessimistic" else (s > t) for s in cands))
    return torch.tensor(out, dtype=torch.int64)


def brute_topk(z, e, k, exclude_index, exclude_items):
    scores = z @ e.T
    vals, ids = [], []
    for b in range(z.shape[0]):
        banned = {exclude_index} if exclude_index is not None else set()
        if exclude_items is not None:
            banned |= {int(i) for i in exclude_items[b] if i >= 0}
        cand = [v for v in range(e.shape[0]) if v not in banned and not math.isnan(float(scores[b, v]))]
        cand = sorted(cand, key=lambda v: (-float(scores[b, v]), v))[:k]
        vals.append([float(scores[b, v]) for v in cand] + [float("-inf")] * (k - len(cand)))
        ids.append(cand + [-1] * (k - len(cand)))
    return torch.tensor(vals, dtype=f64), torch.tensor(ids, dtype=torch.int64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("with_history", [False, True])
def test_target_rank_nan(backend, ties, with_history):
    z, e = nan_inputs()
    # Targets: a NaN item (3), a NaN item (20), a normal one, and one per NaN user row.
    target = torch.tensor([3, 5, 20, 7, 11])
    hist = None
    if with_history:
        hist = torch.tensor([[1, 2, -1], [4, 4, 20], [3, -1, -1], [20, 3, 7], [0, 9, 36]])
    got = K.target_rank(z, e, target, exclude_index=0, exclude_items=hist, ties=ties, backend=backend)
    want = brute_rank(z, e, target, 0, hist, ties)
    assert torch.equal(got, want)
    assert torch.equal(got, ref.target_rank(z, e, target, exclude_index=0, exclude_items=hist, ties=ties))
    # The NaN user (row 1) and the NaN targets (rows 0, 2) rank last: never a hit.
    assert min(got[:3].tolist()) > 10
    if hist is None:  # 37 items less the padding id and the target
        assert got[:3].tolist() == [36] * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5, 35, 36])
def test_topk_never_returns_nan_items(backend, k):
    z, e = nan_inputs()
    hist = torch.tensor([[1, 2, -1], [4, 4, 20], [3, -1, -1], [20, 3, 7], [0, 9, 36]])
    for exclude_items in (None, hist):
        vals, ids = K.topk(z, e, k, exclude_index=0, exclude_items=exclude_items, backend=backend)
        bv, bi = brute_topk(z, e, k, 0, exclude_items)
        assert torch.equal(ids, bi), (backend, k)
        torch.testing.assert_close(vals, bv, rtol=1e-12, atol=0)  # summation orders differ
        rv, ri = ref.topk(z, e, k, exclude_index=0, exclude_items=exclude_items)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(vals, rv, rtol=1e-12, atol=0)
        assert not torch.isnan(vals).any()
        assert not ((ids == 3) | (ids == 20)).any()
        assert (ids[1] == -1).all()  # the all-NaN user has no candidate
        # Best first, within every row.
        assert (vals[:, 1:] <= vals[:, :-1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_candidates_come_before_missing_slots(backend):
    # d = 1: item 1 scores -inf for z = -1, items 2.. finite; item 3 excluded.
    z = torch.tensor([[-1.0], [1.0]], dtype=f64)
    e = torch.tensor([[0.0], [math.inf], [2.0], [3.0], [NAN], [-4.0]], dtype=f64)
    hist = torch.tensor([[3], [3]])
    vals, ids = K.topk(z, e, 5, exclude_index=0, exclude_items=hist, backend=backend)
    assert ids.tolist() == [[5, 2, 1, -1, -1], [1, 2, 5, -1, -1]]
    torch.testing.assert_close(vals, torch.tensor([[4.0, -2.0, -math.inf, -math.inf, -math.inf],
                                                   [math.inf, 2.0, -4.0, -math.inf, -math.inf]], dtype=f64))
    rv, ri = ref.topk(z, e, 5, exclude_index=0, exclude_items=hist)
    assert torch.equal(ri, ids)
    torch.testing.assert_close(rv, vals)


def test_reference_topk_matches_brute_force_with_random_nans():
    g = torch.Generator().manual_seed(3)
    z, e = torch.randn(7, 5, generator=g, dtype=f64), torch.randn(53, 5, generator=g, dtype=f64)
    e[torch.rand(53, generator=g) < 0.2] = NAN
    for k in (1, 9, 52):
        got = ref.topk(z, e, k, exclude_index=0)
        want = brute_topk(z, e, k, 0, None)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
