"""CUDA kernels of the inference path (csrc/cuda/stream_attention.cu, topk.cu)
against the pure-PyTorch reference (plr_kernels/reference.py).

Needs a GPU and a build of plr_kernels._C with the CUDA kernels; skipped
otherwise. Each op is called directly (torch.ops.plr_kernels.*) and through
the public API with backend="cuda".
"""

import math

import pytest
import torch

import plr_kernels
from plr_kernels import _extension, reference

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        not (_extension.has_kernel("topk", "CUDA") and _extension.has_kernel("stream_attention_fwd", "CUDA")),
        reason="plr_kernels._C built without the CUDA kernels",
    ),
]

DEV = "cuda"


# --------------------------------------------------------------------------
# stream_attention forward (PLR Eq. 4-5)
# --------------------------------------------------------------------------


def attention_inputs(b, h, m, n, s, d, dtype, mask_kind="none", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)

    q, kp, vp = rnd(b, h, m, d), rnd(b, h, n, d), rnd(b, h, n, d)
    ks, vs = rnd(b, h, m, s, d), rnd(b, h, m, s, d)
    mask = None
    if mask_kind != "none":
        # Left-padded histories: row i keeps its last `lengths[i]` keys.
        lengths = torch.randint(0, n + 1, (b,), generator=g)
        if mask_kind == "full":
            lengths[:] = 0
        else:
            lengths[0] = 0  # one fully padded row in every padded batch
            lengths[-1] = n
        mask = (torch.arange(n)[None, :] >= n - lengths[:, None]).to(DEV)
    return q, kp, vp, ks, vs, mask


def cuda_attention(q, kp, vp, ks, vs, mask, scale=None, dropout_p=0.0):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.plr_kernels.stream_attention_fwd(q, kp, vp, ks, vs, mask, scale, dropout_p, None)


def lse_truth(q, kp, ks, mask, scale=None):
    """fp64 log-sum-exp of the scaled scores, written out independently of the reference."""
    q, kp, ks = q.double(), kp.double(), ks.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s_prefix = torch.einsum("bhmd,bhnd->bhmn", q, kp) * scale
    if mask is not None:
        s_prefix = s_prefix.masked_fill(~mask[:, None, None, :], float("-inf"))
    s_stream = torch.einsum("bhmd,bhmsd->bhms", q, ks) * scale
    return torch.logsumexp(torch.cat([s_prefix, s_stream], dim=-1), dim=-1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("n", [1, 3, 200])
@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("mask_kind", ["none", "padded"])
def test_stream_attention_fp64(m, n, d, mask_kind):
    inputs = attention_inputs(3, 2, m, n, 2, d, torch.float64, mask_kind)
    o, lse = cuda_attention(*inputs)
    o_ref, lse_ref = reference.stream_attention(*inputs[:5], prefix_mask=inputs[5], return_lse=True)
    assert o.dtype == torch.float64 and lse.dtype == torch.float64
    assert o.shape == (3, 2, m, d) and lse.shape == (3, 2, m)
    assert rel_err(o, o_ref) < 1e-12
    torch.testing.assert_close(lse, lse_truth(inputs[0], inputs[1], inputs[3], inputs[5]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,n,s,d", [(16, 45, 3, 256), (5, 97, 2, 232), (9, 1, 1, 200)])
def test_stream_attention_fp64_many_streams_wide_heads(m, n, s, d):
    # M * D > 1024: the kernel instance with 16 accumulators per thread
    # (and, in fp64 with M=16, D=256, the largest shared-memory footprint).
    inputs = attention_inputs(2, 2, m, n, s, d, torch.float64, "padded", seed=11)
    o, lse = cuda_attention(*inputs)
    o_ref = reference.stream_attention(*inputs[:5], prefix_mask=inputs[5])
    assert rel_err(o, o_ref) < 1e-12
    torch.testing.assert_close(lse, lse_truth(inputs[0], inputs[1], inputs[3], inputs[5]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m,n,s,d", [(1, 1, 1, 16), (2, 97, 3, 64), (8, 200, 2, 128), (3, 50, 5, 24),
                                     (16, 33, 4, 256), (5, 0, 1, 32), (8, 64, 7, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "padded", "full"])
def test_stream_attention_fp32(m, n, s, d, mask_kind):
    if n == 0 and mask_kind != "none":
        pytest.skip("no prefix to mask")
    inputs = attention_inputs(5, 3, m, n, s, d, torch.float32, mask_kind, seed=1)
    o, lse = cuda_attention(*inputs)
    ref64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    o_ref = reference.stream_attention(*ref64[:5], prefix_mask=ref64[5])
    lse_ref = lse_truth(ref64[0], ref64[1], ref64[3], ref64[5])
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert rel_err(o, o_ref) < 2e-5
    torch.testing.assert_close(lse.double(), lse_ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d", [(1, 50, 128), (2, 3, 64), (8, 200, 16)])
def test_stream_attention_16bit(dtype, m, n, d):
    inputs = attention_inputs(4, 2, m, n, 2, d, dtype, "padded", seed=2)
    o, lse = cuda_attention(*inputs)
    assert o.dtype == dtype and lse.dtype == torch.float32
    # Truth: the same (rounded) inputs in fp64; the kernel only rounds its output.
    ref64 = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    o_ref = reference.stream_attention(*ref64[:5], prefix_mask=ref64[5])
    lse_ref = lse_truth(ref64[0], ref64[1], ref64[3], ref64[5])
    assert rel_err(o, o_ref) < 1e-2
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-4, atol=1e-4)
    # And the 16-bit reference itself (scores rounded to 16 bits): loose.
    o_ref16 = reference.stream_attention(*inputs[:5], prefix_mask=inputs[5])
    assert rel_err(o, o_ref16) < 5e-2


def test_stream_attention_fully_padded_prefix_is_finite_and_ignores_prefix():
    q, kp, vp, ks, vs, mask = attention_inputs(3, 2, 4, 20, 3, 32, torch.float32, "full", seed=3)
    kp[0, 0, 0] = float("nan")  # junk behind the mask must not leak
    vp[0, 0, 0] = float("inf")
    o, lse = cuda_attention(q, kp, vp, ks, vs, mask)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    # Equals attention over the own stream only (N = 0).
    empty = kp[:, :, :0]
    o0, lse0 = cuda_attention(q, empty, empty, ks, vs, None)
    torch.testing.assert_close(o, o0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse0, rtol=1e-6, atol=1e-6)


def test_stream_attention_streams_are_isolated():
    q, kp, vp, ks, vs, mask = attention_inputs(2, 1, 3, 10, 2, 16, torch.float64, "padded", seed=4)
    o, _ = cuda_attention(q, kp, vp, ks, vs, mask)
    ks2, vs2 = ks.clone(), vs.clone()
    ks2[:, :, 1] += 5.0  # another stream's keys/values change ...
    vs2[:, :, 1] -= 3.0
    o2, _ = cuda_attention(q, kp, vp, ks2, vs2, mask)
    assert torch.equal(o[:, :, 0], o2[:, :, 0]) and torch.equal(o[:, :, 2], o2[:, :, 2])  # ... not these
    assert not torch.allclose(o[:, :, 1], o2[:, :, 1])


def test_stream_attention_scale_and_noncontiguous():
    q, kp, vp, ks, vs, mask = attention_inputs(2, 3, 2, 17, 2, 16, torch.float64, "padded", seed=5)
    kp_t = kp.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not kp_t.is_contiguous()
    o, lse = cuda_attention(q, kp_t, vp, ks, vs, mask, scale=0.37)
    o_ref = reference.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=0.37)
    assert rel_err(o, o_ref) < 1e-12
    torch.testing.assert_close(lse, lse_truth(q, kp, ks, mask, 0.37), rtol=1e-12, atol=1e-12)


def test_stream_attention_deterministic():
    inputs = attention_inputs(64, 2, 8, 200, 2, 128, torch.float32, "padded", seed=6)
    o1, lse1 = cuda_attention(*inputs)
    for _ in range(5):  # race check: every run bit-identical
        o2, lse2 = cuda_attention(*inputs)
        assert torch.equal(o1, o2) and torch.equal(lse1, lse2)


def test_stream_attention_errors():
    q, kp, vp, ks, vs, mask = attention_inputs(2, 1, 2, 5, 1, 16, torch.float32, "padded")
    with pytest.raises(RuntimeError, match="dropout_p must be 0"):
        cuda_attention(q, kp, vp, ks, vs, mask, dropout_p=0.1)
    big = attention_inputs(1, 1, 17, 5, 1, 16, torch.float32)
    with pytest.raises(RuntimeError, match=r"M must lie in \[1, 16\], got M = 17"):
        cuda_attention(*big)
    wide = attention_inputs(1, 1, 2, 5, 1, 257, torch.float32)
    with pytest.raises(RuntimeError, match=r"D must lie in \[1, 256\], got D = 257"):
        cuda_attention(*wide)
    with pytest.raises(RuntimeError, match="v_prefix must have the shape of k_prefix"):
        cuda_attention(q, kp, vp[:, :, :3], ks, vs, mask)
    with pytest.raises(RuntimeError, match="prefix_mask must be bool"):
        cuda_attention(q, kp, vp, ks, vs, mask.int())
    with pytest.raises(RuntimeError, match="S >= 1"):
        cuda_attention(q, kp, vp, ks[:, :, :, :0], vs[:, :, :, :0], mask)


def test_stream_attention_public_api():
    inputs = attention_inputs(3, 2, 2, 11, 2, 32, torch.float64, "padded", seed=7)
    o = plr_kernels.stream_attention(*inputs[:5], prefix_mask=inputs[5], backend="cuda")
    o_ref = reference.stream_attention(*inputs[:5], prefix_mask=inputs[5])
    assert rel_err(o, o_ref) < 1e-12
    with pytest.raises((RuntimeError, ValueError), match="dropout"):
        plr_kernels.stream_attention(*inputs[:5], prefix_mask=inputs[5], dropout_p=0.1, backend="cuda")


# --------------------------------------------------------------------------
# topk (plr_kernels/topk.py)
# --------------------------------------------------------------------------


def topk_inputs(b, v, d, dtype, integer=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if integer:  # exact scores in every dtype and summation order: many exact ties
        z = torch.randint(-2, 3, (b, d), generator=g).double()
        e = torch.randint(-2, 3, (v, d), generator=g).double()
    else:
        z, e = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    return z.to(DEV, dtype), e.to(DEV, dtype)


def history(b, length, v, seed=0, pad_frac=0.3):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randint(0, v, (b, length), generator=g)
    h[torch.rand(b, length, generator=g) < pad_frac] = -1  # padding entries are ignored
    if length >= 2:
        h[:, 1] = h[:, 0]  # duplicates
    return h.to(DEV)


def cuda_topk(z, e, k, exclude_index=None, exclude_items=None):
    return torch.ops.plr_kernels.topk(z, e, k, -1 if exclude_index is None else exclude_index, exclude_items)


def assert_same_topk(got, want):
    (vals, ids), (rv, ri) = got, want
    assert vals.dtype == rv.dtype and ids.dtype == torch.int64 and vals.shape == rv.shape
    assert torch.equal(ids, ri)
    assert torch.equal(vals, rv)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,v,d,k", [(1, 97, 8, 1), (3, 1000, 16, 10), (5, 5000, 7, 100), (2, 3000, 24, 1024),
                                     (64, 20000, 32, 10), (1, 50000, 16, 512)])
def test_topk_integer_ties_exact(dtype, b, v, d, k):
    z, e = topk_inputs(b, v, d, dtype, integer=True, seed=b + v)
    got = cuda_topk(z, e, k)
    assert_same_topk(got, reference.topk(z, e, k))


@pytest.mark.parametrize("b,v,d,k", [(1, 97, 16, 5), (3, 1025, 64, 10), (7, 12000, 256, 100), (2, 3000, 3, 1000)])
def test_topk_random_fp64(b, v, d, k):
    z, e = topk_inputs(b, v, d, torch.float64, seed=v)
    vals, ids = cuda_topk(z, e, k)
    rv, ri = reference.topk(z, e, k)
    assert torch.equal(ids, ri)
    torch.testing.assert_close(vals, rv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,v,d,k", [(4, 5000, 64, 10), (33, 20000, 256, 100)])
def test_topk_random_fp32(b, v, d, k):
    z, e = topk_inputs(b, v, d, torch.float32, seed=v)
    vals, ids = cuda_topk(z, e, k)
    rv, ri = reference.topk(z.double(), e.double(), k)
    torch.testing.assert_close(vals.double(), rv, rtol=1e-5, atol=1e-4)
    # Ids agree wherever the fp64 scores are separated by more than fp32 noise.
    gaps = (rv[:, :-1] - rv[:, 1:]).abs()
    clear = torch.ones_like(ri, dtype=torch.bool)
    clear[:, :-1] &= gaps > 1e-3
    clear[:, 1:] &= gaps > 1e-3
    assert clear.float().mean() > 0.5
    assert torch.equal(ids[clear], ri[clear])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,v,k,length", [(3, 97, 10, 5), (5, 3000, 100, 50), (2, 40000, 20, 33), (4, 1500, 1024, 7)])
def test_topk_exclusions(dtype, b, v, k, length):
    z, e = topk_inputs(b, v, 6, dtype, integer=True, seed=v)
    ex = history(b, length, v, seed=k)
    ex[0, -1] = 0  # the padding item also listed in the history
    for exclude_index in (None, 0, v - 1):
        got = cuda_topk(z, e, k, exclude_index, ex)
        want = reference.topk(z, e, k, exclude_index=exclude_index, exclude_items=ex)
        assert_same_topk(got, want)
        for r in range(b):
            excluded = {u for u in ex[r].tolist() if u >= 0} | ({exclude_index} if exclude_index is not None else set())
            assert not excluded & set(got[1][r].tolist())


def test_topk_too_few_candidates_end_in_minus_inf_and_minus_one():
    z, e = topk_inputs(3, 12, 4, torch.float32, integer=True, seed=1)
    ex = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, -1], [-1] * 9, list(range(9))], device=DEV)
    vals, ids = cuda_topk(z, e, 12, 0, ex)
    rv, ri = reference.topk(z, e, 12, exclude_index=0, exclude_items=ex)
    assert torch.equal(ids, ri) and torch.equal(vals, rv)
    assert (ids[0, 3:] == -1).all() and torch.isneginf(vals[0, 3:]).all()
    assert (ids[1, -1:] == -1).all() and (ids[1, :-1] >= 0).all()


def test_topk_empty_exclusion_list_and_empty_batch():
    z, e = topk_inputs(4, 300, 8, torch.float32, integer=True)
    assert_same_topk(cuda_topk(z, e, 7, None, torch.empty(4, 0, dtype=torch.long, device=DEV)),
                     reference.topk(z, e, 7))
    vals, ids = cuda_topk(z[:0], e, 7)
    assert vals.shape == (0, 7) and ids.shape == (0, 7)


def test_topk_deterministic():
    z, e = topk_inputs(64, 30000, 64, torch.float32, seed=3)
    ex = history(64, 50, 30000)
    first = cuda_topk(z, e, 100, 0, ex)
    for _ in range(5):  # race check: every run bit-identical
        again = cuda_topk(z, e, 100, 0, ex)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_topk_errors():
    z, e = topk_inputs(2, 2000, 8, torch.float32)
    with pytest.raises(RuntimeError, match=r"k must be <= 1024 .* got k = 1025"):
        cuda_topk(z, e, 1025)
    with pytest.raises(RuntimeError, match=r"k must lie in \[1, V\]"):
        cuda_topk(z, e[:5], 6)
    with pytest.raises(RuntimeError, match="exclude_items must be int64"):
        cuda_topk(z, e, 3, None, torch.zeros(2, 3, dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match="exclude_items entries must be < V"):
        cuda_topk(z, e, 3, None, torch.full((2, 3), 2000, dtype=torch.long, device=DEV))
    with pytest.raises(RuntimeError, match="item_emb must have the dtype of z"):
        cuda_topk(z, e.double(), 3)
    with pytest.raises(RuntimeError, match="exclude_index must be an item id"):
        cuda_topk(z, e, 3, 2000)


def test_topk_public_api():
    z, e = topk_inputs(5, 4000, 32, torch.float32, integer=True, seed=9)
    ex = history(5, 20, 4000)
    got = plr_kernels.topk(z, e, 50, exclude_index=0, exclude_items=ex, backend="cuda")
    assert_same_topk(got, reference.topk(z, e, 50, exclude_index=0, exclude_items=ex))


# --------------------------------------------------------------------------
# NaN scores in target_rank and topk (the rule of plr_kernels/reference.py,
# also tested on the CPU backends in tests/test_nan_ranking.py)
# --------------------------------------------------------------------------


def nan_inputs(b=5, v=3000, d=33, dtype=torch.float64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    z, e = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64)
    e[3, 2] = float("nan")
    e[20] = float("nan")
    e[2999] = float("nan")
    z[1, 0] = float("nan")
    return z.to(DEV, dtype), e.to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
def test_target_rank_nan_matches_reference(dtype, ties):
    z, e = nan_inputs(dtype=dtype)
    target = torch.tensor([3, 5, 20, 7, 2999], device=DEV)
    hist = torch.tensor([[1, 2, -1], [4, 4, 20], [3, -1, -1], [20, 3, 7], [0, 9, 36]], device=DEV)
    for ex in (None, hist):
        got = torch.ops.plr_kernels.target_rank(z, e, target, 0, ex, ties == "pessimistic")
        want = reference.target_rank(z, e, target, exclude_index=0, exclude_items=ex, ties=ties)
        assert torch.equal(got, want)
        assert min(got[[0, 1, 2, 4]].tolist()) > 2900  # NaN targets and the NaN user rank last


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_topk_nan_items_never_returned(dtype, k):
    z, e = nan_inputs(dtype=dtype)
    hist = torch.tensor([[1, 2, -1], [4, 4, 20], [3, -1, -1], [20, 3, 7], [0, 9, 36]], device=DEV)
    for ex in (None, hist):
        vals, ids = cuda_topk(z, e, k, 0, ex)
        rv, ri = reference.topk(z, e, k, exclude_index=0, exclude_items=ex)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(vals, rv)
        assert not torch.isnan(vals).any() and (ids[1] == -1).all()
        assert not ((ids == 3) | (ids == 20) | (ids == 2999)).any()


def test_topk_minus_inf_candidates_before_missing_slots():
    z = torch.tensor([[-1.0], [1.0]], dtype=torch.float64, device=DEV)
    e = torch.tensor([[0.0], [math.inf], [2.0], [3.0], [float("nan")], [-4.0]], dtype=torch.float64, device=DEV)
    hist = torch.tensor([[3], [3]], device=DEV)
    vals, ids = cuda_topk(z, e, 5, 0, hist)
    assert ids.tolist() == [[5, 2, 1, -1, -1], [1, 2, 5, -1, -1]]
    rv, ri = reference.topk(z, e, 5, exclude_index=0, exclude_items=hist)
    assert torch.equal(ri, ids) and torch.equal(rv, vals)


# --------------------------------------------------------------------------
# what ``auto`` runs on a GPU (issue 15)
# --------------------------------------------------------------------------


def test_auto_stream_attention_runs_the_cuda_kernel_for_inference_and_triton_for_training():
    import importlib

    sa = importlib.import_module("plr_kernels.stream_attention")  # the module, not the op of that name

    assert sa._backend_name("auto", "cuda", torch.cuda.current_device(), True) == "cuda"
    want = "triton" if "triton" in sa.IMPLS else "cuda"
    assert sa._backend_name("auto", "cuda", torch.cuda.current_device(), False) == want


def test_auto_topk_picks_the_cuda_kernel_or_torch_and_equals_the_reference():
    from plr_kernels import _autotune

    g = torch.Generator(device="cpu").manual_seed(3)
    z = torch.randn(5, 64, generator=g, dtype=torch.float64).to(DEV)
    e = torch.randn(301, 64, generator=g, dtype=torch.float64).to(DEV)
    _autotune.clear()
    values, ids = plr_kernels.topk(z, e, 7, exclude_index=0)
    ref_v, ref_i = reference.topk(z, e, 7, exclude_index=0)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(values, ref_v, rtol=1e-12, atol=1e-12)
    picked = [name for key, name in _autotune.choices().items() if key[0] == "topk"]
    assert picked and set(picked) <= {"cuda", "torch"}
