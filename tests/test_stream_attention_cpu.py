"""The compiled CPU kernels torch.ops.plr_kernels.stream_attention_fwd / _bwd
(csrc/stream_attention.cpp, PLR Eq. 4-5) against plr_kernels.reference.

Mirrors tests/test_stream_attention_triton.py; the dropout mask is checked
against the Triton kernel's (same seed, same mask) and against a Philox4x32-10
written here in Python.
"""

import importlib
import math

import numpy as np
import pytest
import torch

import plr_kernels as K
from plr import PLRModel
from plr_kernels import _dispatch, _extension
from plr_kernels import reference as ref

sa = importlib.import_module("plr_kernels.stream_attention")  # the name K.stream_attention is the op

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("stream_attention_fwd", "cpu")
    or not _extension.has_kernel("stream_attention_bwd", "cpu"),
    reason=f"compiled CPU kernel of stream_attention unavailable: {_extension.extension_error() or 'not in this build'}",
)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
GRADS = ("dq", "dk_prefix", "dv_prefix", "dk_stream", "dv_stream")


def rel_err(got, want):
    """max |got - want| / max |want| (0 for empty tensors, whose shapes are compared)."""
    assert got.shape == want.shape
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def inputs(b, h, m, s, n, d, dtype, padding="partial"):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    q, kp, vp, ks, vs = t(b, h, m, d), t(b, h, n, d), t(b, h, n, d), t(b, h, m, s, d), t(b, h, m, s, d)
    mask = None
    if padding != "none":
        # Left padding as in the model: row i keeps its last n - i keys; "full"
        # pads user 0's prefix completely.
        lengths = torch.tensor([max(n - i, 1) for i in range(b)])
        if padding == "full":
            lengths[0] = 0
        mask = torch.arange(n)[None, :] >= (n - lengths)[:, None]
    return (q, kp, vp, ks, vs), mask


def lse_fp64(q, kp, ks, mask, scale):
    """log-sum-exp of the scores in float64, written out here (the reference's lse is fp32)."""
    q, kp, ks = q.double(), kp.double(), ks.double()
    sp = torch.einsum("bhmd,bhnd->bhmn", q, kp) * scale
    if mask is not None:
        sp = sp.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.logsumexp(torch.cat([sp, torch.einsum("bhmd,bhmsd->bhms", q, ks) * scale], -1), -1)


def check_fwd_bwd(args, mask, tol, **kw):
    got = K.stream_attention(*args, prefix_mask=mask, backend="cpu", **kw)
    want = ref.stream_attention(*args, prefix_mask=mask, **{k: v for k, v in kw.items() if k != "seed"})
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < tol
    do = torch.randn_like(want)
    for name, a, b in zip(GRADS, torch.autograd.grad(got, args, do), torch.autograd.grad(want, args, do)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, name


# (M, S, N, D, padding): every value appears; N = 97 and 130 span several
# prefix tiles of 64 keys (130 with user 0's first tile fully padded); N = 0
# is a step with no prefix at all.
CASES = [
    (1, 1, 1, 16, "none"),
    (2, 2, 7, 32, "partial"),
    (3, 5, 50, 64, "partial"),
    (8, 1, 50, 128, "full"),
    (8, 5, 7, 16, "full"),
    (1, 2, 97, 3, "partial"),
    (3, 1, 1, 1, "full"),
    (2, 5, 1, 64, "none"),
    (3, 3, 130, 9, "full"),
    (3, 2, 0, 8, "none"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("m,s,n,d,padding", CASES)
def test_forward_backward_match_reference(m, s, n, d, padding, dtype):
    args, mask = inputs(3, 2, m, s, n, d, dtype, padding)
    check_fwd_bwd(args, mask, TOL[dtype], scale=None if d != 32 else 0.3)


def test_tile_boundary_padding_and_lse():
    """User 0: the first 64-key tile fully padded, the second partly; lse in float64."""
    (q, kp, vp, ks, vs), mask = inputs(2, 3, 3, 2, 130, 8, torch.float64, "none")
    mask = torch.ones(2, 130, dtype=torch.bool)
    mask[0, :70] = False
    mask[1, 64] = False
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    o, lse = torch.ops.plr_kernels.stream_attention_fwd(*x, mask, 0.25, 0.0, None)
    assert lse.dtype == torch.float64 and lse.shape == (2, 3, 3)
    assert rel_err(lse, lse_fp64(x[0], x[1], x[3], mask, 0.25)) < 1e-14
    assert rel_err(o, ref.stream_attention(*x, prefix_mask=mask, scale=0.25)) < 1e-13
    o32, lse32 = torch.ops.plr_kernels.stream_attention_fwd(*[t.float() for t in x], mask, 0.25, 0.0, None)
    assert lse32.dtype == torch.float32 and rel_err(lse32, lse) < 1e-6
    # The backward straight through the op, against autograd of the reference.
    do = torch.randn_like(o)
    got = torch.ops.plr_kernels.stream_attention_bwd(do, *x, mask, o, lse, 0.25, 0.0, None)
    want = torch.autograd.grad(ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=0.25),
                               (q, kp, vp, ks, vs), do)
    for name, a, b in zip(GRADS, got, want):
        assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16bit_against_fp32_reference(dtype):
    args, mask = inputs(3, 2, 4, 3, 50, 32, dtype, "full")
    up = [a.detach().float().requires_grad_() for a in args]
    got, lse = torch.ops.plr_kernels.stream_attention_fwd(*[a.detach() for a in args], mask, 32 ** -0.5, 0.0, None)
    want, want_lse = ref.stream_attention(*up, prefix_mask=mask, return_lse=True)
    assert got.dtype == dtype and lse.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert rel_err(got, want) < tol
    assert rel_err(lse, want_lse) < 1e-5  # fp32 statistics of the same (rounded) inputs
    got = K.stream_attention(*args, prefix_mask=mask, backend="cpu")
    do = torch.randn_like(want)
    for name, a, b in zip(GRADS, torch.autograd.grad(got, args, do.to(dtype)), torch.autograd.grad(want, up, do)):
        assert a.dtype == dtype and rel_err(a, b) < 4 * tol, name


def test_fully_padded_prefix_sees_only_its_stream():
    (q, kp, vp, ks, vs), _ = inputs(2, 1, 3, 2, 5, 16, torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    got = K.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, backend="cpu")
    w = torch.softmax(torch.einsum("bhmd,bhmsd->bhms", q, ks) / 4.0, dim=-1)
    assert rel_err(got, torch.einsum("bhms,bhmsd->bhmd", w, vs)) < 1e-13
    grads = torch.autograd.grad(got.sum(), (kp, vp))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_non_contiguous_views():
    """The model hands transposed views ([B,L,H,Dh] -> [B,H,L,Dh])."""
    b, h, m, s, n, d = 2, 2, 3, 2, 7, 16
    q = torch.randn(b, m, h, d, dtype=torch.float64).transpose(1, 2)
    kp, vp = (torch.randn(b, n, h, d, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    ks, vs = (torch.randn(b, m, s, h, d, dtype=torch.float64).permute(0, 3, 1, 2, 4) for _ in range(2))
    mask = torch.ones(b, n * 2, dtype=torch.bool)[:, ::2]
    mask[1, :3] = False
    assert not q.is_contiguous() and not ks.is_contiguous() and not mask.is_contiguous()
    got = K.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, backend="cpu")
    assert rel_err(got, ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask)) < 1e-13


def test_gradcheck_fp64():
    args, mask = inputs(2, 1, 2, 2, 3, 4, torch.float64, "full")
    mask[1, 0] = False
    assert torch.autograd.gradcheck(lambda *a: K.stream_attention(*a, prefix_mask=mask, backend="cpu"), args)
    assert torch.autograd.gradcheck(lambda *a: K.stream_attention(*a, backend="cpu", scale=0.7), args)


def test_runs_are_bitwise_identical_across_thread_counts():
    args, mask = inputs(5, 2, 4, 3, 70, 24, torch.float32, "partial")
    do = torch.randn(5, 2, 4, 24)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            o = K.stream_attention(*args, prefix_mask=mask, dropout_p=0.2, seed=1, backend="cpu")
            runs.append((o, *torch.autograd.grad(o, args, do)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# -- dropout --------------------------------------------------------------------


def philox_uniform(seed, offsets):
    """tl.rand(seed, offset) of triton/language/random.py, in Python integers:
    Philox4x32-10 on counter (offset_lo, offset_hi, 0, 0) and key (seed_lo,
    seed_hi), first word as int32, x < 0 -> ~x, times 4.6566127342e-10 in float32."""
    mask32 = 0xFFFFFFFF
    seed &= 2**64 - 1
    out = []
    for off in offsets:
        c0, c1, c2, c3 = off & mask32, (off >> 32) & mask32, 0, 0
        k0, k1 = seed & mask32, seed >> 32
        for _ in range(10):
            a0, a2 = c0, c2
            c0 = (((0xCD9E8D57 * a2) >> 32) ^ c1 ^ k0) & mask32
            c2 = (((0xD2511F53 * a0) >> 32) ^ c3 ^ k1) & mask32
            c1 = (0xCD9E8D57 * a2) & mask32
            c3 = (0xD2511F53 * a0) & mask32
            k0, k1 = (k0 + 0x9E3779B9) & mask32, (k1 + 0xBB67AE85) & mask32
        x = c0 - 2**32 if c0 >= 2**31 else c0
        if x < 0:
            x = ~x
        out.append(np.float32(x) * np.float32(4.6566127342e-10))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1234, -7, 2**63 + 5, 2**40 + 3])
def test_dropout_mask_is_philox_of_the_documented_offset(seed):
    b, h, m, n, s, p = 2, 2, 3, 5, 2, 0.3
    keep = sa.cpu_dropout_mask(b, h, m, n, s, p, seed)
    assert keep.shape == (b, h, m, n + s) and keep.dtype == torch.bool
    # offset = ((b*H + h)*M + m)*(N+S) + j: the flat index of [B,H,M,N+S].
    want = philox_uniform(seed, range(keep.numel())) >= np.float32(p)
    assert np.array_equal(keep.flatten().numpy(), want)


@pytest.mark.parametrize("seed", [1234, -3, 2**63 + 5])
def test_dropout_mask_equals_triton(seed):
    """Same seed, same mask on both backends (on the GPU where there is one)."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not _dispatch.triton_interpreting():
        pytest.skip("the Triton mask runs on CPU only under TRITON_INTERPRET=1")
    b, h, m, n, s, p = 2, 3, 3, 11, 4, 0.37
    triton_keep = sa.triton_dropout_mask(b, h, m, n, s, p, seed, device=device).cpu()
    assert torch.equal(sa.cpu_dropout_mask(b, h, m, n, s, p, seed), triton_keep)


def test_dropout_matches_reference_with_the_mask_forward_and_backward():
    b, h, m, s, n, d, p = 2, 2, 3, 2, 70, 16, 0.3
    args, mask = inputs(b, h, m, s, n, d, torch.float64, "full")
    keep = sa.cpu_dropout_mask(b, h, m, n, s, p, seed=1234)
    got = K.stream_attention(*args, prefix_mask=mask, dropout_p=p, seed=1234, backend="cpu")
    want = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p, dropout_mask=keep)
    assert rel_err(got, want) < 1e-13
    do = torch.randn_like(want)
    for name, a, c in zip(GRADS, torch.autograd.grad(got, args, do), torch.autograd.grad(want, args, do)):
        assert rel_err(a, c) < 1e-12, name
    other = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p,
                                 dropout_mask=sa.cpu_dropout_mask(b, h, m, n, s, p, seed=1235))
    assert rel_err(got, other) > 1e-3


def test_dropout_gradcheck_fixed_seed():
    args, mask = inputs(1, 1, 2, 2, 3, 4, torch.float64, "partial")
    fn = lambda *a: K.stream_attention(*a, prefix_mask=mask, dropout_p=0.4, seed=7, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_dropout_seed_reproducible_and_global_generator():
    args, mask = inputs(2, 1, 3, 2, 7, 16, torch.float32, "partial")
    run = lambda **kw: K.stream_attention(*args, prefix_mask=mask, dropout_p=0.5, backend="cpu", **kw)  # noqa: E731
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
    keep = sa.cpu_dropout_mask(b, h, m, n, s, p, seed=99)
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    assert not torch.equal(keep[:, :, 0], keep[:, :, 1])


# -- dispatch, errors, torch.library -----------------------------------------------


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert _dispatch.resolve("stream_attention", "auto", torch.device("cpu"), sa.IMPLS,
                             kernel="stream_attention_fwd") is sa.IMPLS["cpu"]
    args, mask = inputs(2, 2, 3, 2, 7, 8, torch.float32, "partial")
    assert torch.equal(K.stream_attention(*args, prefix_mask=mask), K.stream_attention(*args, prefix_mask=mask,
                                                                                        backend="cpu"))


def test_cuda_entry_is_inference_only():
    args, mask = inputs(1, 1, 2, 1, 3, 8, torch.float32, "none")
    with pytest.raises(K.BackendUnavailableError, match="cuda"):
        K.stream_attention(*args, backend="cuda")  # CPU tensors: no CUDA kernel for them
    # The "cuda" entry itself refuses training work before reaching a kernel.
    with pytest.raises(K.BackendUnavailableError, match="gradient.*backend='triton'"):
        sa.IMPLS["cuda"](*args, None, None, 0.0, None)
    with torch.no_grad(), pytest.raises(K.BackendUnavailableError, match="dropout_p.*backend='triton'"):
        sa.IMPLS["cuda"](*args, None, None, 0.1, 3)


def test_kernel_rejects_bad_input_naming_the_argument():
    (q, kp, vp, ks, vs), _ = inputs(2, 1, 2, 2, 3, 4, torch.float32, "none")
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    fwd, bwd = torch.ops.plr_kernels.stream_attention_fwd, torch.ops.plr_kernels.stream_attention_bwd
    with pytest.raises(RuntimeError, match=r"k_prefix must have shape \[B, H, N, D\]"):
        fwd(x[0], x[1][..., :3], *x[2:], None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="v_stream must have the dtype of q"):
        fwd(*x[:4], x[4].double(), None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="S >= 1"):
        fwd(*x[:3], x[3][:, :, :, :0], x[4][:, :, :, :0], None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"prefix_mask must have shape \[B, N\]"):
        fwd(*x, torch.ones(2, 4, dtype=torch.bool), 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="prefix_mask must be bool"):
        fwd(*x, torch.ones(2, 3), 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="scale must be a finite number > 0"):
        fwd(*x, None, -1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"dropout_p must lie in \[0, 1\)"):
        fwd(*x, None, 0.5, 1.0, None)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        fwd(*x, None, 0.5, 0.2, None)
    o, lse = fwd(*x, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        bwd(torch.ones_like(o), *x, None, o, lse.double(), 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_o must have the shape of q"):
        bwd(o[:, :, :1], *x, None, o, lse, 0.5, 0.0, None)


def test_opcheck_compiled_ops():
    (q, kp, vp, ks, vs), mask = inputs(1, 2, 2, 2, 3, 8, torch.float64, "partial")
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    seed = torch.tensor([5], dtype=torch.int64)
    fwd = torch.ops.plr_kernels.stream_attention_fwd.default
    for drop, sd in ((0.0, None), (0.25, seed)):
        result = torch.library.opcheck(fwd, (*[t.clone().requires_grad_() for t in x], mask, 0.25, drop, sd))
        assert all(v == "SUCCESS" for v in result.values()), result
    o, lse = fwd(*x, mask, 0.25, 0.0, None)
    bwd = torch.ops.plr_kernels.stream_attention_bwd.default
    result = torch.library.opcheck(bwd, (torch.randn_like(o), *x, mask, o, lse, 0.25, 0.0, None))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_torch_compile_traces_without_graph_breaks():
    args, mask = inputs(2, 2, 3, 2, 7, 8, torch.float64, "partial")

    def f(*a):
        return K.stream_attention(*a, prefix_mask=mask, backend="cpu").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(ref.stream_attention(*args, prefix_mask=mask).square().sum(), args)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


# -- the model: every reasoning step of every layer through the kernel -------------


def small_model(kernels):
    torch.manual_seed(0)
    model = PLRModel(30, max_len=7, hidden_size=32, num_layers=2, num_heads=2, inner_size=24, num_streams=3,
                     num_steps=2, dropout=0.0, reasoning_dropout=0.0, kernels=kernels)
    return model.double()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train-no-dropout"])
def test_plr_model_cpu_equals_torch(monkeypatch, training):
    cpu, base = small_model("cpu"), small_model("torch")
    base.load_state_dict(cpu.state_dict())
    cpu.train(training), base.train(training)
    seq = torch.randint(1, 31, (4, 7))
    seq[1, :3] = 0
    seq[2, :6] = 0  # one valid item
    target = torch.randint(1, 31, (4,))

    calls = []
    impl = sa.IMPLS["cpu"]
    monkeypatch.setitem(sa.IMPLS, "cpu", lambda *a: calls.append(a[0].shape) or impl(*a))

    outs = {}
    for name, model in (("cpu", cpu), ("torch", base)):
        out = model(seq)
        loss = ref.linear_cross_entropy(out.z_rea, model.item_emb, target, temperature=model.temperature,
                                        exclude_index=0) + (out.states ** 2).mean()
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        outs[name] = (out, grads)
    assert calls == [torch.Size([4, 2, 3, 16])] * 4  # T=2 steps x 2 layers, all M=3 streams per call
    (o1, g1), (o2, g2) = outs["cpu"], outs["torch"]
    for field in ("states", "z_rea", "z_final"):
        assert rel_err(getattr(o1, field), getattr(o2, field)) < 1e-12, field
    scale = max(b.abs().max().item() for b in g2 if b is not None)
    for (pname, _), a, b in zip(cpu.named_parameters(), g1, g2):
        assert (a is None) == (b is None), pname
        if a is not None:
            assert (a - b).abs().max().item() < 1e-10 * max(b.abs().max().item(), 1e-6 * scale), pname
