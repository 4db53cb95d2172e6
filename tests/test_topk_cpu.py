"""The compiled CPU top-k (csrc/topk.cpp) against
plr_kernels.reference.topk and a brute-force sort written here.

The kernel splits the items into chunks of >= 2048 when the batch is small
(serving one request) and merges the per-chunk top-k: V = 5000 and 10007 run
through the merge, V in {1, 7, 97} through a single chunk and a single tile.
"""

import importlib

import pytest
import torch

import plr_kernels as K
from plr_kernels import _dispatch, _extension
from plr_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("topk", "cpu"),
    reason=f"compiled CPU topk unavailable: {_extension.extension_error()}",
)
f64 = torch.float64


def kernel(z, e, k, exclude_index=None, exclude_items=None):
    return torch.ops.plr_kernels.topk(z, e, k, -1 if exclude_index is None else exclude_index, exclude_items)


def brute_force(z, e, k, exclude_index=None, exclude_items=None):
    """Sort (score desc, id asc) per row with a Python key, in fp64; (-inf, -1) padding."""
    scores = z.double() @ e.double().T
    vals, idx = [], []
    for b in range(z.shape[0]):
        banned = set() if exclude_index is None else {exclude_index}
        if exclude_items is not None:
            banned |= {int(i) for i in exclude_items[b] if i >= 0}
        cand = sorted((v for v in range(e.shape[0]) if v not in banned), key=lambda v: (-float(scores[b, v]), v))[:k]
        vals.append([float(scores[b, v]) for v in cand] + [float("-inf")] * (k - len(cand)))
        idx.append(cand + [-1] * (k - len(cand)))
    return torch.tensor(vals, dtype=f64), torch.tensor(idx, dtype=torch.int64)


def history(b, length, v):
    """Per-row ids with negative padding, duplicates and id 0."""
    ex = torch.randint(0, v, (b, length))
    ex[:, 0] = -1
    if length > 3:
        ex[:, 2] = ex[:, 3]
    if length > 4:
        ex[:, 4] = 0
    return ex


@pytest.mark.parametrize("B", [1, 3, 97])
@pytest.mark.parametrize("V", [1, 7, 97, 5000])
@pytest.mark.parametrize("d", [1, 5, 64])
@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_random_scores_match_reference(B, V, d, dtype):
    z, e = torch.randn(B, d, dtype=dtype), torch.randn(V, d, dtype=dtype)
    for k in sorted({1, min(V, 10), V}):
        vals, idx = kernel(z, e, k)
        rv, ri = ref.topk(z, e, k)
        assert vals.shape == idx.shape == (B, k) and vals.dtype == dtype and idx.dtype == torch.int64
        torch.testing.assert_close(vals, rv, rtol=1e-12 if dtype == f64 else 1e-5, atol=1e-12 if dtype == f64 else 1e-5)
        if dtype == f64:
            assert torch.equal(idx, ri)
        else:
            # fp32 sums in another order than BLAS: near-equal scores may swap,
            # so check that each returned value is the score of its id and that
            # the ids are distinct.
            truth = (z.double() @ e.double().T).gather(1, idx)
            torch.testing.assert_close(vals.double(), truth, rtol=1e-5, atol=1e-5)
            assert all(len(set(row)) == k for row in idx.tolist())
            assert (idx == ri).float().mean() > 0.9


@pytest.mark.parametrize("B,V,d,k,L", [(1, 7, 5, 3, 3), (3, 97, 8, 10, 6), (97, 1000, 16, 20, 50),
                                       (2, 10007, 8, 50, 50), (5, 5000, 3, 1, 8)])
@pytest.mark.parametrize("exclude", ["none", "first", "last"])
def test_exclusions_match_reference(B, V, d, k, L, exclude):
    exclude_index = {"none": None, "first": 0, "last": V - 1}[exclude]
    z, e = torch.randn(B, d, dtype=f64), torch.randn(V, d, dtype=f64)
    hist = history(B, L, V)
    vals, idx = kernel(z, e, k, exclude_index, hist)
    rv, ri = ref.topk(z, e, k, exclude_index=exclude_index, exclude_items=hist)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(vals, rv, rtol=1e-12, atol=1e-12)
    banned = hist.clamp_min(0).masked_fill(hist < 0, -7)
    assert not (idx[:, :, None] == banned[:, None, :]).any()
    if exclude_index is not None:
        assert not (idx == exclude_index).any()


@pytest.mark.parametrize("B,V", [(1, 10007), (18, 80), (40, 5000)])
def test_ties_go_to_the_smaller_id(B, V):
    # Small integers: every score is exact, ties are many and span tiles and chunks.
    z = torch.randint(-1, 2, (B, 6)).double()
    e = torch.randint(-1, 2, (V, 6)).double()
    e[3::97] = e[1]  # duplicates of item 1 across the whole table
    hist = history(B, 4, V)
    for k in (1, 12, 300):
        k = min(k, V - 1)
        vals, idx = kernel(z, e, k, 0, hist)
        bv, bi = brute_force(z, e, k, 0, hist)
        assert torch.equal(idx, bi) and torch.equal(vals, bv)
        rv, ri = ref.topk(z, e, k, exclude_index=0, exclude_items=hist)
        assert torch.equal(idx, ri)


def test_k_equal_to_all_candidates_and_rows_with_too_few():
    b, v, d = 3, 9, 4
    z, e = torch.randn(b, d, dtype=f64), torch.randn(v, d, dtype=f64)
    hist = torch.tensor([[1, 2, 3, 4, 5, -1], [-1, -1, -1, -1, -1, -1], [8, 8, 7, 6, 5, 4]])
    k = v - 1  # every candidate of a row without history
    vals, idx = kernel(z, e, k, 0, hist)
    rv, ri = ref.topk(z, e, k, exclude_index=0, exclude_items=hist)
    bv, bi = brute_force(z, e, k, 0, hist)
    assert torch.equal(idx, ri) and torch.equal(idx, bi)
    assert torch.equal(idx[0, 3:], torch.full((5,), -1)) and torch.isneginf(vals[0, 3:]).all()
    assert (idx[1] >= 1).all() and torch.equal(idx[2, 3:], torch.full((5,), -1))
    assert sorted(idx[1].tolist()) == list(range(1, v))
    torch.testing.assert_close(vals, rv, rtol=1e-12, atol=1e-12)


def test_a_row_with_no_candidate_at_all():
    z, e = torch.randn(2, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    hist = torch.tensor([[1, 2, 3, 0], [-1, -1, -1, -1]])
    vals, idx = kernel(z, e, 2, None, hist)
    assert torch.equal(idx[0], torch.tensor([-1, -1])) and torch.isneginf(vals[0]).all()
    assert torch.equal(idx[1], ref.topk(z, e, 2)[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scores_are_fp32(dtype):
    # Integer-valued 16-bit inputs are exact in fp32: the same result as the
    # reference (which upcasts) to the bit; random ones within fp32 rounding.
    z, e = torch.randint(-3, 4, (5, 16)).to(dtype), torch.randint(-3, 4, (3000, 16)).to(dtype)
    vals, idx = kernel(z, e, 25, 0)
    rv, ri = ref.topk(z, e, 25, exclude_index=0)
    assert vals.dtype == torch.float32 and torch.equal(idx, ri) and torch.equal(vals, rv)
    z, e = torch.randn(5, 16).to(dtype), torch.randn(3000, 16).to(dtype)
    vals, idx = kernel(z, e, 25)
    rv, ri = ref.topk(z, e, 25)
    torch.testing.assert_close(vals, rv, rtol=1e-5, atol=1e-5)
    assert (idx == ri).float().mean() > 0.95  # only near-ties may swap


def test_same_result_for_any_number_of_threads():
    z, e = torch.randn(2, 32), torch.randn(20011, 32)
    hist = history(2, 30, 20011)
    one = kernel(z, e, 40, 0, hist)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = kernel(z, e, 40, 0, hist)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_public_api_and_auto_dispatch():
    topk_module = importlib.import_module("plr_kernels.topk")
    impl = _dispatch.resolve("topk", "auto", torch.device("cpu"), topk_module.IMPLS)
    assert impl is topk_module.IMPLS["cpu"]
    assert topk_module.IMPLS["cuda"] is topk_module.IMPLS["cpu"]  # both call torch.ops.plr_kernels.topk
    z, e = torch.randn(4, 8, dtype=f64), torch.randn(50, 8, dtype=f64)
    hist = history(4, 5, 50)
    vals, idx = K.topk(z, e, 7, exclude_index=0, exclude_items=hist, backend="cpu")
    rv, ri = K.topk(z, e, 7, exclude_index=0, exclude_items=hist, backend="torch")
    assert torch.equal(idx, ri) and torch.allclose(vals, rv, rtol=1e-12, atol=1e-12)
    # Non-contiguous inputs go through the wrapper's .contiguous().
    zt = torch.randn(8, 4, dtype=f64).T
    assert torch.equal(K.topk(zt, e, 3, backend="cpu")[1], ref.topk(zt, e, 3)[1])


def test_bad_inputs_name_the_argument():
    z, e = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(RuntimeError, match=r"topk: k must lie in \[1, V\] = \[1, 9\], got 0"):
        kernel(z, e, 0)
    with pytest.raises(RuntimeError, match=r"topk: item_emb must have shape \[V, d\] with d = 4"):
        kernel(z, torch.randn(9, 5), 2)
    with pytest.raises(RuntimeError, match=r"topk: item_emb must have the dtype of z"):
        kernel(z, e.double(), 2)
    with pytest.raises(RuntimeError, match=r"topk: exclude_index must be an item id in \[0, V\)"):
        kernel(z, e, 2, 9)
    with pytest.raises(RuntimeError, match=r"topk: exclude_items must be int64, got Int"):
        kernel(z, e, 2, None, torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"topk: exclude_items must have shape \[B, L\] with B = 3"):
        kernel(z, e, 2, None, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"topk: exclude_items entries must be < V = 9"):
        kernel(z, e, 2, None, torch.full((3, 2), 9))


def test_op_registration():
    z, e = torch.randn(3, 4), torch.randn(20, 4)
    hist = torch.tensor([[1, -1], [2, 3], [-1, -1]])
    torch.library.opcheck(torch.ops.plr_kernels.topk.default, (z, e, 5, 0, hist),
                          test_utils=("test_schema", "test_faketensor"))
