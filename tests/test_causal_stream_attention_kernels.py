"""Kernels of the causal-prefix form of stream_attention against the reference:
the compiled CPU kernel (csrc/causal_stream_attention.cpp) and the Triton
kernels (plr_kernels/triton/causal_stream_attention.py, interpreted on CPU).
CUDA: tests/test_cuda_kernels.py.
"""

import importlib

import pytest
import torch

import plr_kernels as K
from plr_kernels import _dispatch, _extension
from plr_kernels import reference as ref

from test_causal_stream_attention import causal_inputs, rel_err

csa = importlib.import_module("plr_kernels.causal_stream_attention")

HAS_CPU = _extension.has_kernel("causal_stream_attention_fwd", "cpu") and _extension.has_kernel(
    "causal_stream_attention_bwd", "cpu")
needs_cpu = pytest.mark.skipif(
    not HAS_CPU, reason=f"compiled CPU kernel unavailable: {_extension.extension_error() or 'not in this build'}")
needs_triton = pytest.mark.skipif(
    "triton" not in csa.IMPLS or not _dispatch.triton_interpreting(),
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
BACKENDS = [pytest.param("cpu", marks=needs_cpu), pytest.param("triton", marks=needs_triton)]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
GRADS = ("dq", "dk_prefix", "dv_prefix", "dk_stream", "dv_stream")


def check_fwd_bwd(backend, args, mask, tol, dropout_mask=None, **kw):
    got = K.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend=backend, **kw)
    kw.pop("seed", None)
    want = ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True, dropout_mask=dropout_mask, **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < tol
    do = torch.randn_like(want)
    for name, a, b in zip(GRADS, torch.autograd.grad(got, args, do), torch.autograd.grad(want, args, do)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, name
    return got


def mask_of(backend, b, h, n, m, s, p, seed):
    if backend == "cpu":
        return csa.causal_cpu_dropout_mask(b, h, n, m, s, p, seed)
    return csa.causal_triton_dropout_mask(b, h, n, m, s, p, seed)


# (N, M, S, D, padding): N = 70 spans two 64-key CPU tiles and several Triton
# blocks; "full" pads user 0's whole prefix (its rows see only their streams).
CASES = [(1, 1, 1, 5, "none"), (7, 3, 2, 5, "partial"), (7, 1, 2, 3, "full"), (1, 3, 1, 4, "full"),
         (20, 2, 1, 16, "partial")]
CPU_ONLY_CASES = [(70, 2, 2, 9, "full"), (65, 3, 1, 32, "partial")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,m,s,d,padding", CASES)
def test_forward_backward_match_reference(backend, n, m, s, d, padding, dtype):
    args, mask = causal_inputs(3, 2, n, m, s, d, dtype, padding)
    check_fwd_bwd(backend, args, mask, TOL[dtype], scale=None if d != 16 else 0.3)


@needs_cpu
@pytest.mark.parametrize("n,m,s,d,padding", CPU_ONLY_CASES)
def test_cpu_several_tiles(n, m, s, d, padding):
    args, mask = causal_inputs(3, 2, n, m, s, d, torch.float64, padding)
    mask[1, 64] = False  # a hole in the second tile
    check_fwd_bwd("cpu", args, mask, 1e-12)


@needs_triton
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_triton_several_row_and_key_blocks(drop):
    """Blocks of 16: 3 row blocks (R = 38) cut at different positions, 2 key blocks (N = 19)."""
    kernels = importlib.import_module("plr_kernels.triton.causal_stream_attention")
    b, h, n, m, s, d = 2, 1, 19, 2, 2, 3
    (q, kp, vp, ks, vs), mask = causal_inputs(b, h, n, m, s, d, torch.float64, "full")
    mask[1, 17] = False
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    seed = torch.tensor([99], dtype=torch.int64)
    o, lse = kernels.forward(*x, mask, 0.4, drop, seed, block_r=16, block_n=16)
    keep = kernels.dropout_mask(b, h, n, m, s, drop, seed) if drop else None
    want = ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=0.4, dropout_p=drop, dropout_mask=keep,
                                causal_prefix=True)
    assert rel_err(o, want) < 1e-13
    do = torch.randn_like(o)
    got = kernels.backward(do, *x, mask, o, lse, 0.4, drop, seed, block_r=16, block_n=16)
    for name, a, c in zip(GRADS, got, torch.autograd.grad(want, (q, kp, vp, ks, vs), do)):
        assert rel_err(a, c) < 1e-12, name
    with pytest.raises(ValueError, match="block_r: expected a power of two >= 16, got 8"):
        kernels.forward(*x, mask, 0.4, drop, seed, block_r=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_backward_ops_directly(backend):
    (q, kp, vp, ks, vs), mask = causal_inputs(2, 2, 7, 3, 2, 5, torch.float64, "full")
    x = [t.detach() for t in (q, kp, vp, ks, vs)]
    fwd = (torch.ops.plr_kernels.causal_stream_attention_fwd if backend == "cpu"
           else torch.ops.plr_kernels.causal_stream_attention_triton_fwd)
    bwd = (torch.ops.plr_kernels.causal_stream_attention_bwd if backend == "cpu"
           else torch.ops.plr_kernels.causal_stream_attention_triton_bwd)
    o, lse = fwd(*x, mask, 0.25, 0.0, None)
    want_o, want_lse = ref.stream_attention(*x, prefix_mask=mask, scale=0.25, causal_prefix=True, return_lse=True)
    assert lse.dtype == torch.float64 and lse.shape == (2, 2, 7, 3)
    assert rel_err(lse, want_lse) < 1e-14 and rel_err(o, want_o) < 1e-13
    do = torch.randn_like(o)
    got = bwd(do, *x, mask, o, lse, 0.25, 0.0, None)
    want = torch.autograd.grad(ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, scale=0.25,
                                                    causal_prefix=True), (q, kp, vp, ks, vs), do)
    for name, a, b in zip(GRADS, got, want):
        assert rel_err(a, b) < 1e-12, name


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_16bit_against_fp32_reference(dtype):
    args, mask = causal_inputs(3, 2, 9, 2, 2, 32, dtype, "full")
    up = [a.detach().float().requires_grad_() for a in args]
    got = K.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend="cpu")
    want = ref.stream_attention(*up, prefix_mask=mask, causal_prefix=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert got.dtype == dtype and rel_err(got, want) < tol
    do = torch.randn_like(want)
    for name, a, b in zip(GRADS, torch.autograd.grad(got, args, do.to(dtype)), torch.autograd.grad(want, up, do)):
        assert a.dtype == dtype and rel_err(a, b) < 4 * tol, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    # The interpreter runs every perturbed forward: fast mode (random directions) for Triton.
    fast = backend == "triton"
    args, mask = causal_inputs(2, 1, 3, 2, 2, 3, torch.float64, "full")
    assert torch.autograd.gradcheck(
        lambda *a: K.stream_attention(*a, prefix_mask=mask, causal_prefix=True, backend=backend), args,
        fast_mode=fast)
    fn = lambda *a: K.stream_attention(*a, prefix_mask=mask, causal_prefix=True, dropout_p=0.4, seed=7,  # noqa: E731
                                       backend=backend)
    assert torch.autograd.gradcheck(fn, args, fast_mode=fast)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_views(backend):
    """The model hands transposed views ([B,N,H,...] -> [B,H,N,...])."""
    b, h, n, m, s, d = 2, 2, 5, 3, 2, 4
    q = torch.randn(b, n, h, m, d, dtype=torch.float64).transpose(1, 2)
    kp, vp = (torch.randn(b, n, h, d, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    ks, vs = (torch.randn(b, n, m, s, h, d, dtype=torch.float64).permute(0, 4, 1, 2, 3, 5) for _ in range(2))
    mask = torch.ones(b, n * 2, dtype=torch.bool)[:, ::2]
    mask[1, :3] = False
    assert not q.is_contiguous() and not ks.is_contiguous() and not mask.is_contiguous()
    got = K.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, causal_prefix=True, backend=backend)
    assert rel_err(got, ref.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask, causal_prefix=True)) < 1e-13


# -- dropout --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_reference_with_the_debug_mask(backend):
    b, h, n, m, s, d, p = 2, 2, 7, 3, 2, 5, 0.3
    args, mask = causal_inputs(b, h, n, m, s, d, torch.float64, "full")
    keep = mask_of(backend, b, h, n, m, s, p, 1234)
    assert keep.shape == (b, h, n, m, n + s) and keep.dtype == torch.bool
    got = check_fwd_bwd(backend, args, mask, 1e-12, dropout_mask=keep, dropout_p=p, seed=1234)
    other = ref.stream_attention(*args, prefix_mask=mask, dropout_p=p, causal_prefix=True,
                                 dropout_mask=mask_of(backend, b, h, n, m, s, p, 1235))
    assert rel_err(got, other) > 1e-3


@needs_cpu
@needs_triton
@pytest.mark.parametrize("seed", [1234, -3, 2**63 + 5])
def test_dropout_mask_triton_equals_cpu(seed):
    b, h, n, m, s, p = 2, 3, 7, 3, 2, 0.37
    assert torch.equal(csa.causal_cpu_dropout_mask(b, h, n, m, s, p, seed),
                       csa.causal_triton_dropout_mask(b, h, n, m, s, p, seed))
    # ... and the outputs of both backends, which use them.
    args, mask = causal_inputs(b, h, n, m, s, 4, torch.float64, "partial", requires_grad=False)
    run = lambda be: K.stream_attention(*args, prefix_mask=mask, causal_prefix=True, dropout_p=p,  # noqa: E731
                                        seed=seed, backend=be)
    assert rel_err(run("cpu"), run("triton")) < 1e-13


@needs_cpu
def test_dropout_seed_reproducible_and_global_generator():
    args, mask = causal_inputs(2, 1, 5, 2, 2, 8, torch.float32, "partial", requires_grad=False)
    run = lambda **kw: K.stream_attention(*args, prefix_mask=mask, dropout_p=0.5, causal_prefix=True,  # noqa: E731
                                          backend="cpu", **kw)
    assert torch.equal(run(seed=3), run(seed=3)) and not torch.equal(run(seed=3), run(seed=4))
    torch.manual_seed(11)
    a = run()
    torch.manual_seed(11)
    assert torch.equal(a, run())


@needs_cpu
def test_cpu_backward_is_bitwise_identical_across_thread_counts():
    args, mask = causal_inputs(5, 2, 9, 3, 2, 24, torch.float32, "partial")
    do = torch.randn(5, 2, 9, 3, 24)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            o = K.stream_attention(*args, prefix_mask=mask, dropout_p=0.2, seed=1, causal_prefix=True,
                                   backend="cpu")
            runs.append((o, *torch.autograd.grad(o, args, do)))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


# -- dispatch, errors, torch.library -------------------------------------------


@needs_cpu
def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    assert _dispatch.resolve("causal_stream_attention", "auto", torch.device("cpu"), csa.IMPLS,
                             kernel="causal_stream_attention_fwd") is csa.IMPLS["cpu"]


@needs_cpu
def test_cuda_entry_is_inference_only():
    args, _ = causal_inputs(1, 1, 3, 2, 1, 4, torch.float32, "none")
    with pytest.raises(K.BackendUnavailableError, match="cuda"):
        K.stream_attention(*args, causal_prefix=True, backend="cuda")
    with pytest.raises(K.BackendUnavailableError, match="gradient.*backend='triton'"):
        csa.IMPLS["cuda"](*args, None, None, 0.0, None)
    with torch.no_grad(), pytest.raises(K.BackendUnavailableError, match="dropout_p.*backend='triton'"):
        csa.IMPLS["cuda"](*args, None, None, 0.1, 3)


@needs_cpu
def test_cpu_kernel_rejects_bad_input_naming_the_argument():
    (q, kp, vp, ks, vs), _ = causal_inputs(2, 1, 3, 2, 2, 4, torch.float32, "none", requires_grad=False)
    fwd, bwd = torch.ops.plr_kernels.causal_stream_attention_fwd, torch.ops.plr_kernels.causal_stream_attention_bwd
    with pytest.raises(RuntimeError, match=r"q must be 5-D \[B, H, N, M, D\]"):
        fwd(q[:, :, 0], kp, vp, ks, vs, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"k_prefix must have shape \[B, H, N, D\] = \[2, 1, 3, 4\]"):
        fwd(q, kp[:, :, :2], vp, ks, vs, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"k_stream must have shape \[B, H, N, M, S, D\]"):
        fwd(q, kp, vp, ks[:, :, :2], vs, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="v_stream must have the shape of k_stream"):
        fwd(q, kp, vp, ks, vs[..., :1, :], None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="S >= 1"):
        fwd(q, kp, vp, ks[..., :0, :], vs[..., :0, :], None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="v_prefix must have the dtype of q"):
        fwd(q, kp, vp.double(), ks, vs, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"prefix_mask must have shape \[B, N\] = \[2, 3\]"):
        fwd(q, kp, vp, ks, vs, torch.ones(2, 4, dtype=torch.bool), 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="seed must be an int64 tensor"):
        fwd(q, kp, vp, ks, vs, None, 0.5, 0.2, None)
    o, lse = fwd(q, kp, vp, ks, vs, None, 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[B, H, N, M\]"):
        bwd(torch.ones_like(o), q, kp, vp, ks, vs, None, o, lse[..., :1], 0.5, 0.0, None)
    with pytest.raises(RuntimeError, match="grad_o must have the shape of q"):
        bwd(o[:, :, :1], q, kp, vp, ks, vs, None, o, lse, 0.5, 0.0, None)


def _opcheck_ops(backend):
    if backend == "cpu":
        return (torch.ops.plr_kernels.causal_stream_attention_fwd.default,
                torch.ops.plr_kernels.causal_stream_attention_bwd.default)
    return (torch.ops.plr_kernels.causal_stream_attention_triton_fwd.default,
            torch.ops.plr_kernels.causal_stream_attention_triton_bwd.default)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_custom_ops(backend):
    (q, kp, vp, ks, vs), mask = causal_inputs(1, 2, 3, 2, 2, 4, torch.float64, "partial", requires_grad=False)
    x = [q, kp, vp, ks, vs]
    fwd, bwd = _opcheck_ops(backend)
    seed = torch.tensor([5], dtype=torch.int64)
    for drop, sd in ((0.0, None), (0.25, seed)):
        result = torch.library.opcheck(fwd, (*[t.clone().requires_grad_() for t in x], mask, 0.25, drop, sd))
        assert all(v == "SUCCESS" for v in result.values()), result
    o, lse = fwd(*x, mask, 0.25, 0.0, None)
    result = torch.library.opcheck(bwd, (torch.randn_like(o), *x, mask, o, lse, 0.25, 0.0, None))
    assert all(v == "SUCCESS" for v in result.values()), result


@needs_cpu
def test_torch_compile_traces_without_graph_breaks():
    args, mask = causal_inputs(2, 2, 5, 3, 2, 4, torch.float64, "partial")

    def f(*a):
        return K.stream_attention(*a, prefix_mask=mask, causal_prefix=True, backend="cpu").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True).square().sum(),
                               args)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
