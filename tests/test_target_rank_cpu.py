"""The compiled CPU kernel torch.ops.plr_kernels.target_rank against
plr_kernels.reference.target_rank and against a brute-force sort written here."""

import pytest
import torch

from plr_kernels import _extension
from plr_kernels import reference as ref

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("target_rank", "cpu"),
    reason=f"compiled CPU kernel unavailable: {_extension.extension_error()}",
)
f64 = torch.float64
TIES = ("optimistic", "pessimistic")


def kernel(z, e, target, exclude_index=None, exclude_items=None, ties="optimistic"):
    return torch.ops.plr_kernels.target_rank(
        z, e, target, -1 if exclude_index is None else exclude_index, exclude_items,
        ties == "pessimistic")


def reference(z, e, target, exclude_index=None, exclude_items=None, ties="optimistic"):
    return ref.target_rank(z, e, target, exclude_index=exclude_index,
                           exclude_items=exclude_items, ties=ties)


def brute_force(z, e, target, exclude_index=None, exclude_items=None, ties="optimistic"):
    """Sort each row's candidate scores (the target's included, in fp64) and
    read off the target's position: first among equals when optimistic,
    last when pessimistic."""
    z, e = z.double(), e.double()
    ranks = []
    for b in range(z.shape[0]):
        t = int(target[b])
        drop = {exclude_index} if exclude_index is not None else set()
        if exclude_items is not None:
            drop |= {int(u) for u in exclude_items[b] if u >= 0}
        items = [v for v in range(e.shape[0]) if v == t or v not in drop]
        scores = sorted((float(e[v] @ z[b]) for v in items), reverse=True)
        st = float(e[t] @ z[b])
        pos = [i for i, s in enumerate(scores) if s == st]
        ranks.append(1 + (pos[0] if ties == "optimistic" else pos[-1]))
    return torch.tensor(ranks, dtype=torch.int64)


def integer_table(v, d, dtype, low=-2, high=3):
    """Small integers: every score is exact in any dtype, so ties are real."""
    return torch.randint(low, high, (v, d)).to(dtype)


def history(b, length, v, target, pad=-1):
    """Rows of item ids with negative padding, repeats, the target and id 0."""
    ex = torch.randint(0, v, (b, length))
    ex[:, 0] = pad
    if length > 2:
        ex[:, 1] = target  # listed, yet never excluded
        ex[:, 2] = ex[:, 3 % length]  # duplicate
    if length > 4:
        ex[:, 4] = 0
    return ex


@pytest.mark.parametrize("B", [1, 3, 97])
@pytest.mark.parametrize("V", [1, 7, 97, 1000])
@pytest.mark.parametrize("d", [1, 5, 64])
def test_random_fp64_matches_reference(B, V, d):
    z, e = torch.randn(B, d, dtype=f64), torch.randn(V, d, dtype=f64)
    target = torch.randint(0, V, (B,))
    for ties in TIES:
        torch.testing.assert_close(kernel(z, e, target, ties=ties),
                                   reference(z, e, target, ties=ties), rtol=0, atol=0)


@pytest.mark.parametrize("B,V,d", [(1, 7, 5), (3, 97, 1), (97, 1000, 64), (5, 2, 3)])
@pytest.mark.parametrize("ties", TIES)
def test_exclusions_match_reference(B, V, d, ties):
    z, e = torch.randn(B, d, dtype=f64), torch.randn(V, d, dtype=f64)
    target = torch.randint(1, V, (B,))  # never the padding item 0
    ex = history(B, 6, V, target)
    for exclude_index, exclude_items in [(0, None), (None, ex), (0, ex), (V - 1, ex)]:
        got = kernel(z, e, target, exclude_index, exclude_items, ties)
        want = reference(z, e, target, exclude_index=exclude_index, exclude_items=exclude_items,
                         ties=ties)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got, brute_force(z, e, target, exclude_index, exclude_items, ties))


def test_target_listed_in_history_and_as_exclude_index_is_still_ranked():
    z, e = torch.randn(4, 5, dtype=f64), torch.randn(30, 5, dtype=f64)
    target = torch.tensor([3, 3, 0, 29])
    ex = torch.stack([target, target, -torch.ones(4, dtype=torch.int64)], dim=1)
    for ties in TIES:
        got = kernel(z, e, target, 3, ex, ties)
        torch.testing.assert_close(got, brute_force(z, e, target, 3, ex, ties))
    # Everything but the target excluded: rank 1.
    v = torch.arange(30).expand(4, 30)
    assert kernel(z, e, target, None, v.contiguous(), "pessimistic").tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V,d", [(3, 7, 1), (97, 97, 5), (13, 1000, 64)])
def test_integer_ties_match_reference_and_sort(dtype, B, V, d):
    z, e = integer_table(B, d, dtype), integer_table(V, d, dtype)
    target = torch.randint(1, V, (B,)) if V > 1 else torch.zeros(B, dtype=torch.int64)
    ex = history(B, 5, V, target)
    for ties in TIES:
        for exclude_index, exclude_items in [(None, None), (0, ex)]:
            got = kernel(z, e, target, exclude_index, exclude_items, ties)
            # The reference in fp64: these scores are exact, so it is the truth.
            want = reference(z.double(), e.double(), target, exclude_index=exclude_index,
                             exclude_items=exclude_items, ties=ties)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            if B * V <= 10_000:
                torch.testing.assert_close(got, brute_force(z, e, target, exclude_index,
                                                            exclude_items, ties))
    opt, pes = kernel(z, e, target), kernel(z, e, target, ties="pessimistic")
    assert (pes >= opt).all() and (pes > opt).any()  # the tables are built to tie


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 7, 64, 129])
def test_duplicated_target_rows_tie_exactly(dtype, d):
    """Items whose embedding equals the target's tie with it bit for bit, on
    random (non-integer) data: the target's score comes from the same routine."""
    B, V, n_dup = 6, 500, 3
    z, e = torch.randn(B, d, dtype=dtype), torch.randn(V, d, dtype=dtype)
    target = torch.arange(B) * 7 + 1
    dups = torch.stack([torch.arange(B) * 7 + 2 + i for i in range(n_dup)], dim=1)  # [B, n_dup]
    e_dup = e.clone()
    for b in range(B):
        e_dup[dups[b]] = e[target[b]]
    # Every row's duplicates (and every other row's) present; remove them
    # again through exclude_items to get the rank among the other items.
    all_dups = dups.reshape(1, -1).expand(B, -1).contiguous()
    others = [dups[b] for b in range(B)]
    rows_opt, rows_pes = [], []
    for b in range(B):
        row_opt = kernel(z[b:b + 1], e_dup, target[b:b + 1])
        row_pes = kernel(z[b:b + 1], e_dup, target[b:b + 1], ties="pessimistic")
        alone = kernel(z[b:b + 1], e_dup, target[b:b + 1], None, others[b][None].contiguous())
        alone_pes = kernel(z[b:b + 1], e_dup, target[b:b + 1], None, others[b][None].contiguous(),
                           "pessimistic")
        assert int(row_opt) == int(alone)
        assert int(row_pes) == int(alone_pes) + n_dup
        rows_opt.append(int(row_opt))
        rows_pes.append(int(row_pes))
    # Batched, rows are scored in groups (csrc/target_rank.cpp): same ranks.
    assert kernel(z, e_dup, target).tolist() == rows_opt
    assert kernel(z, e_dup, target, ties="pessimistic").tolist() == rows_pes
    # And against the reference where no duplicates remain.
    got = kernel(z.double(), e_dup.double(), target, None, all_dups)
    want = reference(z.double(), e_dup.double(), target, exclude_items=all_dups)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float32_random_close_to_fp64_reference():
    """fp32 accumulation may flip near-ties only: ranks within a few places."""
    B, V, d = 97, 1000, 64
    z, e = torch.randn(B, d), torch.randn(V, d)
    target = torch.randint(0, V, (B,))
    got = kernel(z, e, target)
    want = reference(z.double(), e.double(), target)
    assert (got - want).abs().max() <= 2
    assert (got == want).float().mean() > 0.9


def test_non_contiguous_inputs():
    z = torch.randn(9, 5, dtype=f64).t()  # [5, 9]
    e = torch.randn(9, 40, dtype=f64).t()  # [40, 9]
    target = torch.randint(0, 40, (10,))[::2]
    ex = torch.randint(-1, 40, (5, 8))[:, ::2]
    for ties in TIES:
        torch.testing.assert_close(
            kernel(z, e, target, 0, ex, ties),
            reference(z, e, target, exclude_index=0, exclude_items=ex, ties=ties), rtol=0, atol=0)


def test_thread_count_and_item_chunking_do_not_change_ranks():
    # B=1 with many items splits the items over tasks (serving); B large
    # splits rows. Counts must not depend on the split.
    old = torch.get_num_threads()
    try:
        for B, V in [(1, 50_000), (37, 5_000)]:
            z, e = integer_table(B, 16, torch.float32), integer_table(V, 16, torch.float32)
            target = torch.randint(0, V, (B,))
            want = reference(z, e, target, ties="pessimistic")
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                torch.testing.assert_close(kernel(z, e, target, ties="pessimistic"), want)
    finally:
        torch.set_num_threads(old)


def test_edge_cases():
    empty = kernel(torch.randn(0, 4), torch.randn(5, 4), torch.zeros(0, dtype=torch.int64))
    assert empty.shape == (0,) and empty.dtype == torch.int64
    # d = 0: every score is 0, all items tie.
    z, e, t = torch.randn(2, 0), torch.randn(6, 0), torch.tensor([0, 5])
    assert kernel(z, e, t).tolist() == [1, 1]
    assert kernel(z, e, t, ties="pessimistic").tolist() == [6, 6]
    # Empty history rows [B, 0].
    ex = torch.zeros(2, 0, dtype=torch.int64)
    assert kernel(z, e, t, 1, ex, "pessimistic").tolist() == [5, 5]
    # A NaN score beats nothing and is beaten by nothing, as in the reference.
    z = torch.tensor([[float("nan"), 1.0], [1.0, 1.0]], dtype=f64)
    e = torch.randn(8, 2, dtype=f64)
    t = torch.tensor([2, 3])
    for ties in TIES:
        torch.testing.assert_close(kernel(z, e, t, ties=ties), reference(z, e, t, ties=ties))


def test_public_api_cpu_backend_uses_kernel():
    import plr_kernels as K

    z, e = torch.randn(5, 8, dtype=f64), torch.randn(50, 8, dtype=f64)
    target = torch.randint(1, 50, (5,))
    ex = history(5, 4, 50, target)
    got = K.target_rank(z, e, target, exclude_index=0, exclude_items=ex, backend="cpu")
    torch.testing.assert_close(got, reference(z, e, target, exclude_index=0, exclude_items=ex))
