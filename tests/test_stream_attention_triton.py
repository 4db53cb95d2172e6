"""Triton stream-isolated attention (PLR Eq. 4-5) against the reference.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so the
shapes are tiny and the (M, S, N, D) grid is a covering set, not a product.
GPU-only checks (16-bit accuracy, bitwise determinism, the dot shapes the
interpreter accepts but the GPU rejects) run when CUDA is there.
"""

import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

import plr_kernels as K  # noqa: E402
from plr import PLRModel  # noqa: E402
from plr_kernels import reference as ref  # noqa: E402

sa = importlib.import_module("plr_kernels.stream_attention")  # the name K.stream_attention is the op
kernels = importlib.import_module("plr_kernels.triton.stream_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16, races, GPU dot shapes)")


def rel_err(got, want):
    """max |got - want| / max |want| (exact zeros must stay exact zeros)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def inputs(b, h, m, s, n, d, dtype, padding="partial", device=DEVICE):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=True)

    q, kp, vp, ks, vs = t(b, h, m, d), t(b, h, n, d), t(b, h, n, d), t(b, h, m, s, d), t(b, h, m, s, d)
    mask = None
    if padding != "none":
        # Left padding as in the model: row i keeps its last n - i keys; "full"
        # pads one user's prefix completely, "partial" leaves one key to each.
        lengths = torch.tensor([max(n - i, 1) for i in range(b)])
        if padding == "full":
            lengths[0] = 0
        mask = torch.arange(n)[None, :] >= (n - lengths)[:, None]
        mask = mask.to(device)
    return (q, kp, vp, ks, vs), mask


def check_fwd_bwd(args, mask, tol, **kw):
    got = K.stream_attention(*args, prefix_mask=mask, backend="triton", **kw)
    want = ref.stream_attention(*args, prefix_mask=mask, **{k: v for k, v in kw.items() if k != "seed"})
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < tol
    do = torch.randn_like(want)
    g_got = torch.autograd.grad(got, args, do)
    g_want = torch.autograd.grad(want, args, do)
    for name, a, b in zip(("dq", "dk_prefix", "dv_prefix", "dk_stream", "dv_stream"), g_got, g_want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, name


# (M, S, N, D, padding): every M, S, N, D value and padding kind appears.
CASES = [
    (1, 1, 1, 16, "none"),
    (2, 2, 7, 32, "partial"),
    (3, 5, 50, 64, "partial"),
    (8, 1, 50, 128, "full"),
    (8, 5, 7, 16, "full"),
    (1, 2, 50, 128, "partial"),
    (3, 1, 1, 32, "full"),
    (2, 5, 1, 64, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("m,s,n,d,padding", CASES)
def test_forward_backward_match_reference(m, s, n, d, padding, dtype):
    args, mask = inputs(3, 2, m, s, n, d, dtype, padding)
    check_fwd_bwd(args, mask, TOL[dtype], scale=None if d != 32 else 0.3)


@pytest.mark.parametrize("block_n", [16, 32])
def test_several_prefix_tiles_and_lse(block_n):
    """N=50 over tiles of 16/32 keys (ragged last tile), called at the launcher."""
    (q, kp, vp, ks, vs), mask = inputs(2, 2, 3, 2, 50, 16, torch.float64, "full")
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    o, lse = kernels.forward(*x, mask, 0.25, 0.0, None, block_n=block_n)
    want_o, want_lse = ref.stream_attention(*x, prefix_mask=mask, scale=0.25, return_lse=True)
    assert rel_err(o, want_o) < 1e-12
    assert lse.dtype == torch.float64 and rel_err(lse, want_lse) < 1e-6  # reference lse is fp32
    do = torch.randn_like(o)
    got = kernels.backward(do, *x, mask, o, lse, 0.25, 0.0, None, block_n=block_n)
    want = torch.autograd.grad(ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=0.25),
                               (q, kp, vp, ks, vs), do)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_fully_padded_prefix_sees_only_its_stream():
    (q, kp, vp, ks, vs), _ = inputs(2, 1, 3, 2, 5, 16, torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool, device=DEVICE)
    got = K.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, backend="triton")
    # Only the stream's own S keys: plain softmax attention over them.
    w = torch.softmax(torch.einsum("bhmd,bhmsd->bhms", q, ks) / 4.0, dim=-1)
    assert rel_err(got, torch.einsum("bhms,bhmsd->bhmd", w, vs)) < 1e-12
    grads = torch.autograd.grad(got.sum(), (kp, vp))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_non_contiguous_views_and_fp32_lse():
    """The model hands transposed views ([B,L,H,Dh] -> [B,H,L,Dh]); strides are honoured."""
    b, h, m, s, n, d = 2, 2, 3, 2, 7, 16
    q = torch.randn(b, m, h, d, device=DEVICE).transpose(1, 2)
    kp, vp = (torch.randn(b, n, h, d, device=DEVICE).transpose(1, 2) for _ in range(2))
    ks, vs = (torch.randn(b, m, s, h, d, device=DEVICE).permute(0, 3, 1, 2, 4) for _ in range(2))
    assert not q.is_contiguous() and not ks.is_contiguous()
    o, lse = kernels.forward(q, kp, vp, ks, vs, None, d ** -0.5, 0.0, None)
    want_o, want_lse = ref.stream_attention(q, kp, vp, ks, vs, return_lse=True)
    assert lse.dtype == torch.float32 and rel_err(lse, want_lse) < 1e-5
    assert rel_err(o, want_o) < 1e-5


def test_gradcheck_fp64():
    args, mask = inputs(1, 1, 2, 2, 3, 4, torch.float64, "partial")
    mask[0, 0] = False
    assert torch.autograd.gradcheck(lambda *a: K.stream_attention(*a, prefix_mask=mask, backend="triton"), args)


# -- dropout --------------------------------------------------------------------


def test_dropout_matches_reference_with_the_debug_mask_forward_and_backward():
    b, h, m, s, n, d, p = 2, 2, 3, 2, 7, 16, 0.3
    args, mask = inputs(b, h, m, s, n, d, torch.float64, "partial")
    keep = sa.triton_dropout_mask(b, h, m, n, s, p, seed=1234, device=DEVICE)
    assert keep.shape == (b, h, m, n + s) and keep.dtype == torch.bool
    got = K.stream_attention(*args, prefix_mask=mask, dropout_p=p, seed=1234, backend="triton")
    want = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p, dropout_mask=keep)
    assert rel_err(got, want) < 1e-12
    # The backward regenerates the same mask: its gradients are the reference's under `keep`.
    do = torch.randn_like(want)
    for a, c in zip(torch.autograd.grad(got, args, do), torch.autograd.grad(want, args, do)):
        assert rel_err(a, c) < 1e-12
    # ... and not those of another mask.
    other = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p,
                                 dropout_mask=sa.triton_dropout_mask(b, h, m, n, s, p, seed=1235, device=DEVICE))
    assert rel_err(got, other) > 1e-3


def test_dropout_gradcheck_fixed_seed():
    args, mask = inputs(1, 1, 2, 2, 3, 4, torch.float64, "partial")
    fn = lambda *a: K.stream_attention(*a, prefix_mask=mask, dropout_p=0.4, seed=7, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_dropout_seed_reproducible_and_global_generator():
    args, mask = inputs(2, 1, 3, 2, 7, 16, torch.float32, "partial")
    run = lambda **kw: K.stream_attention(*args, prefix_mask=mask, dropout_p=0.5, backend="triton", **kw)  # noqa: E731
    assert torch.equal(run(seed=3), run(seed=3))
    assert not torch.equal(run(seed=3), run(seed=4))
    torch.manual_seed(11)
    a = run()
    torch.manual_seed(11)
    assert torch.equal(a, run())
    torch.manual_seed(12)
    assert not torch.equal(a, run())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p):
    b, h, m, n, s = 16, 2, 8, 50, 5
    keep = sa.triton_dropout_mask(b, h, m, n, s, p, seed=99, device=DEVICE)
    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Prefix keys and stream keys, and different streams, get independent draws.
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1])
    assert abs(keep[..., n:].float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep[..., n:].numel())


# -- torch.library / torch.compile --------------------------------------------------


def test_opcheck_custom_ops():
    (q, kp, vp, ks, vs), mask = inputs(1, 2, 2, 2, 3, 16, torch.float64, "partial")
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    seed = torch.tensor([5], dtype=torch.int64, device=DEVICE)
    fwd = torch.ops.plr_kernels.stream_attention_triton_fwd.default
    for drop, sd in ((0.0, None), (0.25, seed)):
        result = torch.library.opcheck(fwd, (*[t.clone().requires_grad_() for t in x], mask, 0.25, drop, sd))
        assert all(v == "SUCCESS" for v in result.values()), result
    o, lse = fwd(*x, mask, 0.25, 0.0, None)
    bwd = torch.ops.plr_kernels.stream_attention_triton_bwd.default
    result = torch.library.opcheck(bwd, (torch.randn_like(o), *x, mask, o, lse, 0.25, 0.0, None))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_traces_without_graph_breaks():
    args, mask = inputs(2, 2, 3, 2, 7, 16, torch.float64, "partial")

    def f(*a):
        return K.stream_attention(*a, prefix_mask=mask, backend="triton").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(ref.stream_attention(*args, prefix_mask=mask).square().sum(), args)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-10


def test_triton_backend_errors_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, _ = inputs(1, 1, 1, 1, 1, 16, torch.float32, "none", device="cpu")
    with pytest.raises(K.BackendUnavailableError, match="stream_attention"):
        K.stream_attention(*args, backend="triton")


# -- the model: every reasoning step of every layer through the kernel -------------


def small_model(kernels):
    torch.manual_seed(0)
    model = PLRModel(30, max_len=7, hidden_size=32, num_layers=2, num_heads=2, inner_size=24, num_streams=3,
                     num_steps=2, dropout=0.0, reasoning_dropout=0.0, kernels=kernels)
    return model.double().to(DEVICE)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-no-dropout"])
def test_plr_model_triton_equals_torch(monkeypatch, training):
    tri, base = small_model("triton"), small_model("torch")
    base.load_state_dict(tri.state_dict())
    tri.train(training), base.train(training)
    seq = torch.randint(1, 31, (4, 7))
    seq[1, :3] = 0
    seq[2, :6] = 0  # one valid item
    seq, target = seq.to(DEVICE), torch.randint(1, 31, (4,), device=DEVICE)

    calls = []
    impl = sa.IMPLS["triton"]
    monkeypatch.setitem(sa.IMPLS, "triton", lambda *a: calls.append(a[0].shape) or impl(*a))

    outs = {}
    for name, model in (("triton", tri), ("torch", base)):
        out = model(seq)
        loss = ref.linear_cross_entropy(out.z_rea, model.item_emb, target, temperature=model.temperature,
                                        exclude_index=0) + (out.states ** 2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        outs[name] = (out, grads)
    # Step t of the T=2 steps, through each of the 2 layers: 4 kernel calls, all M=3 streams each.
    assert calls == [torch.Size([4, 2, 3, 16])] * 4
    (o1, g1), (o2, g2) = outs["triton"], outs["torch"]
    for field in ("states", "z_rea", "z_final"):
        assert rel_err(getattr(o1, field), getattr(o2, field)) < 1e-10, field
    # Relative to the largest gradient: some are zero in exact arithmetic (the
    # key bias shifts all of a query's scores alike) and pure roundoff here.
    scale = max(b.abs().max().item() for b in g2 if b is not None)
    for (pname, _), a, b in zip(tri.named_parameters(), g1, g2):
        assert (a is None) == (b is None), pname
        if a is not None:
            assert (a - b).abs().max().item() < 1e-9 * max(b.abs().max().item(), 1e-6 * scale), pname


def test_plr_model_triton_attention_dropout_is_seeded_by_torch():
    model = PLRModel(30, max_len=7, hidden_size=32, num_layers=2, num_heads=2, inner_size=24, num_streams=3,
                     num_steps=2, dropout=0.0, attn_dropout=0.3, reasoning_dropout=0.0, kernels="triton")
    model = model.double().to(DEVICE).train()
    seq = torch.randint(1, 31, (3, 7), device=DEVICE)
    torch.manual_seed(5)
    a = model(seq).states
    torch.manual_seed(5)
    b = model(seq).states
    torch.manual_seed(6)
    c = model(seq).states
    assert torch.equal(a, b) and not torch.equal(a, c)
    (grad,) = torch.autograd.grad(a.square().sum(), [model.trigger_tokens])
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


# -- GPU only ------------------------------------------------------------------------


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_16bit_against_fp32_reference(dtype):
    args, mask = inputs(64, 2, 8, 5, 50, 128, dtype, "full")
    up = [a.detach().float().requires_grad_() for a in args]
    got = K.stream_attention(*args, prefix_mask=mask, backend="triton")
    want = ref.stream_attention(*up, prefix_mask=mask)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(got, want) < tol
    do = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, args, do.to(dtype)), torch.autograd.grad(want, up, do)):
        assert rel_err(a, b) < 4 * tol


@cuda_only
def test_gpu_backward_is_bitwise_deterministic():
    args, mask = inputs(256, 2, 8, 5, 50, 128, torch.float32, "partial")
    do = torch.randn(256, 2, 8, 128, device="cuda")
    runs = [torch.autograd.grad(K.stream_attention(*args, prefix_mask=mask, dropout_p=0.2, seed=1,
                                                   backend="triton"), args, do) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("m,s,n,d", [(1, 1, 1, 1), (1, 1, 3, 8), (3, 2, 7, 24), (8, 5, 50, 128)])
def test_gpu_compiles_smallest_and_ragged_block_shapes(m, s, n, d, dtype):
    """Shapes under 16 that the interpreter takes but GPU tl.dot rejects are padded to 16."""
    args, mask = inputs(2, 2, m, s, n, d, dtype, "partial")
    got = K.stream_attention(*args, prefix_mask=mask, backend="triton")
    up = [a.detach().double() for a in args]
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    assert rel_err(got, ref.stream_attention(*up, prefix_mask=mask)) < tol
    got.sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)


def test_block_sizes_are_gpu_legal():
    for m, n, d in [(1, 1, 1), (3, 7, 24), (8, 50, 128), (9, 1000, 200)]:
        bm, bn, bd = kernels.block_sizes(m, n, d)
        for blk, need in ((bm, m), (bd, d)):
            assert blk >= max(16, need) and blk & (blk - 1) == 0
        assert 16 <= bn <= 64 and bn & (bn - 1) == 0
        for itemsize in (2, 4, 8):  # a K/V tile stays within 16 KiB where the minimum 16 allows
            bn = kernels.block_sizes(m, n, d, itemsize=itemsize)[1]
            assert bn == 16 or bn * bd * itemsize <= 16384
    with pytest.raises(ValueError, match="block_n"):
        kernels.block_sizes(2, 50, 16, block_n=8)
