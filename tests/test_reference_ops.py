"""Each reference op against a brute-force float64 computation written here."""

import math

import pytest
import torch

from plr_kernels import reference as ref

f64 = torch.float64


# -- multi_pair_kl: against the materialised KL over all ordered pairs ----------------


def pairwise_kl_brute(h, item_emb, temperature, exclude_index, detach_target):
    """KL(p_i || p_j) for every ordered pair, the excluded item sliced away."""
    keep = [v for v in range(item_emb.shape[0]) if v != exclude_index]
    logits = h @ item_emb[keep].T / temperature  # [B,K,V']
    logp = torch.log_softmax(logits, dim=-1)
    b, k, _ = h.shape
    out = torch.zeros(b, dtype=h.dtype)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            lpj = logp[:, j].detach() if detach_target else logp[:, j]
            out = out + (logp[:, i].exp() * (logp[:, i] - lpj)).sum(-1)
    return out / (k * (k - 1))


@pytest.mark.parametrize("b,k,v,d", [(1, 2, 1 + 1, 1), (3, 3, 7, 5), (2, 6, 97, 16)])
@pytest.mark.parametrize("exclude_index", [None, 0])
@pytest.mark.parametrize("detach_target", [False, True])
def test_multi_pair_kl_matches_pairwise_kl(b, k, v, d, exclude_index, detach_target):
    h = torch.randn(b, k, d, dtype=f64, requires_grad=True)
    e = torch.randn(v, d, dtype=f64, requires_grad=True)
    got = ref.multi_pair_kl(h, e, temperature=0.7, exclude_index=exclude_index, detach_target=detach_target)
    want = pairwise_kl_brute(h, e, 0.7, exclude_index, detach_target)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    w = torch.randn(b, dtype=f64)
    g_got = torch.autograd.grad((got * w).sum(), (h, e))
    g_want = torch.autograd.grad((want * w).sum(), (h, e))
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_multi_pair_kl_equals_mu_form_of_design():
    """plr_kernels/vocab_pass.py: L_KL = 1/(K-1) sum_i (h_i - h_mean).mu_i / tau."""
    b, k, v, d, tau = 4, 5, 33, 8, 0.3
    h, e = torch.randn(b, k, d, dtype=f64), torch.randn(v, d, dtype=f64)
    p = torch.softmax(h @ e.T / tau, dim=-1)
    mu = p @ e
    mu_form = ((h - h.mean(1, keepdim=True)) * mu).sum(-1).sum(-1) / tau / (k - 1)
    torch.testing.assert_close(ref.multi_pair_kl(h, e, temperature=tau), mu_form, rtol=1e-12, atol=1e-13)


def test_multi_pair_kl_is_zero_for_identical_states_and_positive_otherwise():
    e = torch.randn(11, 4, dtype=f64)
    same = torch.randn(2, 1, 4, dtype=f64).expand(2, 3, 4)
    assert ref.multi_pair_kl(same, e).abs().max() < 1e-14
    assert (ref.multi_pair_kl(torch.randn(2, 3, 4, dtype=f64), e) > 0).all()


# -- linear_cross_entropy --------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("exclude_index", [None, 0])
def test_linear_cross_entropy_matches_brute_force(reduction, exclude_index):
    b, v, d, tau = 5, 13, 6, 0.07
    z = torch.randn(b, d, dtype=f64, requires_grad=True)
    e = torch.randn(v, d, dtype=f64, requires_grad=True)
    target = torch.randint(1, v, (b,))
    got = ref.linear_cross_entropy(z, e, target, temperature=tau, exclude_index=exclude_index, reduction=reduction)
    keep = [i for i in range(v) if i != exclude_index]
    logits = z @ e[keep].T / tau
    new_target = torch.tensor([keep.index(int(t)) for t in target])
    per_row = torch.stack([torch.logsumexp(logits[r], 0) - logits[r, new_target[r]] for r in range(b)])
    want = {"none": per_row, "mean": per_row.mean(), "sum": per_row.sum()}[reduction]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad(got.sum(), (z, e))
    g_want = torch.autograd.grad(want.sum(), (z, e))
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


# -- stream_attention: against attention over the whole extended sequence ------------


def extended_attention_brute(q, kp, vp, ks, vs, prefix_mask, scale, keep_mask=None, p=0.0):
    """Keys laid out as [prefix (N), stream 0 (S), ..., stream M-1 (S)]; the
    query of stream m may see valid prefix keys and stream m's S keys only."""
    b, h, m, d = q.shape
    n, s = kp.shape[2], ks.shape[3]
    keys = torch.cat([kp, ks.reshape(b, h, m * s, d)], dim=2)
    vals = torch.cat([vp, vs.reshape(b, h, m * s, d)], dim=2)
    allowed = torch.zeros(b, m, n + m * s, dtype=torch.bool)
    allowed[:, :, :n] = True if prefix_mask is None else prefix_mask[:, None, :]
    for stream in range(m):
        allowed[:, stream, n + stream * s: n + (stream + 1) * s] = True
    scores = torch.einsum("bhmd,bhkd->bhmk", q, keys) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep_mask is not None:
        # keep_mask is [B,H,M,N+S] in (prefix, own stream) layout; scatter it.
        full = torch.zeros_like(probs, dtype=torch.bool)
        full[..., :n] = keep_mask[..., :n]
        for stream in range(m):
            full[:, :, stream, n + stream * s: n + (stream + 1) * s] = keep_mask[:, :, stream, n:]
        probs = probs * full / (1 - p)
    return torch.einsum("bhmk,bhkd->bhmd", probs, vals)


def random_attention_inputs(b, h, m, s, n, d, dtype=f64, requires_grad=False):
    make = lambda *shape: torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return make(b, h, m, d), make(b, h, n, d), make(b, h, n, d), make(b, h, m, s, d), make(b, h, m, s, d)


@pytest.mark.parametrize("b,h,m,s,n,d", [(1, 1, 1, 1, 1, 1), (3, 2, 3, 2, 7, 5), (2, 1, 8, 5, 50, 16)])
@pytest.mark.parametrize("padding", ["none", "partial", "full"])
def test_stream_attention_matches_extended_sequence(b, h, m, s, n, d, padding):
    q, kp, vp, ks, vs = random_attention_inputs(b, h, m, s, n, d, requires_grad=True)
    mask = None
    if padding != "none":
        lengths = torch.randint(0, n + 1, (b,)) if padding == "partial" else torch.zeros(b, dtype=torch.long)
        mask = torch.arange(n)[None, :] >= (n - lengths)[:, None]  # left padding
    scale = 0.37
    got = ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=scale)
    want = extended_attention_brute(q, kp, vp, ks, vs, mask, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(got)
    g_got = torch.autograd.grad((got * w).sum(), (q, kp, vp, ks, vs))
    g_want = torch.autograd.grad((want * w).sum(), (q, kp, vp, ks, vs))
    for a, c in zip(g_got, g_want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_stream_attention_fully_padded_prefix_sees_only_its_stream():
    q, kp, vp, ks, vs = random_attention_inputs(2, 2, 3, 2, 5, 4)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    got = ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask)
    probs = torch.softmax(torch.einsum("bhmd,bhmsd->bhms", q, ks) / math.sqrt(4), dim=-1)
    torch.testing.assert_close(got, torch.einsum("bhms,bhmsd->bhmd", probs, vs), rtol=1e-12, atol=1e-12)


def test_stream_attention_dropout_mask_and_seed():
    q, kp, vp, ks, vs = random_attention_inputs(3, 2, 4, 3, 6, 8)
    p = 0.3
    keep = ref.dropout_keep_mask((3, 2, 4, 9), p, seed=123, device="cpu")
    got = ref.stream_attention(q, kp, vp, ks, vs, dropout_p=p, dropout_mask=keep)
    want = extended_attention_brute(q, kp, vp, ks, vs, None, 1 / math.sqrt(8), keep_mask=keep, p=p)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # The same seed draws the same mask, so the output is reproducible.
    seeded = ref.stream_attention(q, kp, vp, ks, vs, dropout_p=p, seed=123)
    torch.testing.assert_close(seeded, got, rtol=0, atol=0)
    other = ref.stream_attention(q, kp, vp, ks, vs, dropout_p=p, seed=124)
    assert not torch.equal(other, got)


def test_dropout_keep_fraction_matches_one_minus_p():
    p, count = 0.3, 200_000
    kept = ref.dropout_keep_mask((count,), p, seed=7, device="cpu").double().mean().item()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(kept - (1 - p)) < 5 * sigma


def test_stream_attention_gradcheck():
    inputs = random_attention_inputs(2, 1, 2, 2, 3, 3, requires_grad=True)
    mask = torch.tensor([[False, True, True], [False, False, False]])
    assert torch.autograd.gradcheck(lambda *a: ref.stream_attention(*a, prefix_mask=mask), inputs)


# -- target_rank and topk: against sorting -------------------------------------------


def rank_by_sorting(scores, target, excluded, ties):
    ranks = []
    for r in range(scores.shape[0]):
        t = int(target[r])
        cand = [float(scores[r, v]) for v in range(scores.shape[1]) if v != t and not excluded[r, v]]
        ordered = sorted(cand, reverse=True)
        st = float(scores[r, t])
        better = sum(1 for x in ordered if (x >= st if ties == "pessimistic" else x > st))
        ranks.append(1 + better)
    return torch.tensor(ranks)


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("integer_scores", [False, True])
def test_target_rank_matches_sorting(ties, integer_scores):
    b, v, d = 9, 23, 3
    if integer_scores:  # many exact ties
        z, e = torch.randint(-1, 2, (b, d)).double(), torch.randint(-1, 2, (v, d)).double()
    else:
        z, e = torch.randn(b, d, dtype=f64), torch.randn(v, d, dtype=f64)
    target = torch.randint(1, v, (b,))
    history = torch.randint(-1, v, (b, 4))
    history[0, 0] = target[0]  # the target listed in the history stays a target
    got = ref.target_rank(z, e, target, exclude_index=0, exclude_items=history, ties=ties)
    excluded = torch.zeros(b, v, dtype=torch.bool)
    excluded[:, 0] = True
    for r in range(b):
        for x in history[r].tolist():
            if x >= 0:
                excluded[r, x] = True
    assert torch.equal(got, rank_by_sorting(z @ e.T, target, excluded, ties))


def test_topk_matches_torch_topk_and_breaks_ties_by_id():
    z, e = torch.randn(4, 5, dtype=f64), torch.randn(30, 5, dtype=f64)
    values, ids = ref.topk(z, e, 7, exclude_index=0)
    scores = z @ e.T
    scores[:, 0] = float("-inf")
    want_v, want_i = torch.topk(scores, 7)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(values, want_v, rtol=0, atol=0)
    e_tied = torch.zeros(6, 2, dtype=f64)
    e_tied[[2, 4, 5]] = 1.0
    values, ids = ref.topk(torch.ones(1, 2, dtype=f64), e_tied, 4)
    assert ids.tolist() == [[2, 4, 5, 0]] and values[0, :3].tolist() == [2.0, 2.0, 2.0]


def test_topk_marks_missing_candidates():
    z, e = torch.randn(1, 3, dtype=f64), torch.randn(4, 3, dtype=f64)
    values, ids = ref.topk(z, e, 3, exclude_index=0, exclude_items=torch.tensor([[1, 2]]))
    assert ids[0, 0] == 3 and ids[0, 1:].tolist() == [-1, -1]
    assert torch.isinf(values[0, 1:]).all()
