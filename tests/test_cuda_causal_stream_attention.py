"""GPU checks of the causal-prefix form of stream_attention: the CUDA forward
(csrc/cuda/causal_stream_attention.cu, inference only) and the Triton kernels
compiled for the GPU, against the reference. Skipped without a GPU (and the
Triton part under TRITON_INTERPRET=1, which tests/conftest.py sets by default:
run with TRITON_INTERPRET=0 on a GPU machine).
"""

import math

import pytest
import torch

import plr_kernels
from plr_kernels import _dispatch, _extension, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cuda_kernel = pytest.mark.skipif(
    not _extension.has_kernel("causal_stream_attention_fwd", "CUDA"),
    reason="plr_kernels._C built without the CUDA kernels")
needs_compiled_triton = pytest.mark.skipif(_dispatch.triton_interpreting(),
                                           reason="TRITON_INTERPRET=1: the Triton kernels run on CPU tensors")
DEV = "cuda"


def inputs(b, h, n, m, s, d, dtype, padded=True, seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype).requires_grad_(requires_grad)

    q, kp, vp = rnd(b, h, n, m, d), rnd(b, h, n, d), rnd(b, h, n, d)
    ks, vs = rnd(b, h, n, m, s, d), rnd(b, h, n, m, s, d)
    mask = None
    if padded:  # left padding; user 0 fully padded, the last user not padded
        first = torch.randint(0, n + 1, (b,), generator=g)
        first[0], first[-1] = n, 0
        mask = (torch.arange(n)[None, :] >= first[:, None]).to(DEV)
    return (q, kp, vp, ks, vs), mask


def cuda_fwd(args, mask, scale=None, dropout_p=0.0):
    scale = 1.0 / math.sqrt(args[0].shape[-1]) if scale is None else scale
    return torch.ops.plr_kernels.causal_stream_attention_fwd(*args, mask, scale, dropout_p, None)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@needs_cuda_kernel
@pytest.mark.parametrize("n,m,s,d", [(1, 1, 1, 8), (7, 3, 2, 5), (50, 2, 2, 128), (33, 8, 3, 64), (9, 17, 1, 256)])
@pytest.mark.parametrize("padded", [False, True])
def test_cuda_forward_fp64(n, m, s, d, padded):
    args, mask = inputs(3, 2, n, m, s, d, torch.float64, padded)
    o, lse = cuda_fwd(args, mask)
    o_ref, lse_ref = reference.stream_attention(*args, prefix_mask=mask, causal_prefix=True, return_lse=True)
    assert torch.isfinite(o).all() and lse.dtype == torch.float64
    assert rel_err(o, o_ref) < 1e-12 and rel_err(lse, lse_ref) < 1e-12


@needs_cuda_kernel
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_cuda_forward_fp32_16bit(dtype, tol):
    args, mask = inputs(4, 2, 50, 2, 2, 128, dtype)
    o, lse = cuda_fwd(args, mask)
    o_ref = reference.stream_attention(*[a.double() for a in args], prefix_mask=mask, causal_prefix=True)
    assert o.dtype == dtype and lse.dtype == torch.float32 and rel_err(o, o_ref) < tol


@needs_cuda_kernel
def test_cuda_public_api_deterministic_and_inference_only():
    args, mask = inputs(2, 2, 20, 3, 2, 32, torch.float32)
    with torch.no_grad():
        o = plr_kernels.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend="cuda")
        assert torch.equal(o, plr_kernels.stream_attention(*args, prefix_mask=mask, causal_prefix=True,
                                                           backend="cuda"))
        with pytest.raises(plr_kernels.BackendUnavailableError, match="inference-only"):
            plr_kernels.stream_attention(*args, prefix_mask=mask, causal_prefix=True, dropout_p=0.1, backend="cuda")
    with pytest.raises(RuntimeError, match="dropout_p must be 0"):
        cuda_fwd(args, mask, dropout_p=0.1)
    assert rel_err(o, reference.stream_attention(*args, prefix_mask=mask, causal_prefix=True)) < 1e-5


@needs_compiled_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_triton_forward_backward_on_gpu(dtype, tol):
    args, mask = inputs(3, 2, 50, 2, 2, 64, dtype, requires_grad=True)
    up = [a.detach().double().requires_grad_() for a in args]
    got = plr_kernels.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend="triton")
    want = reference.stream_attention(*up, prefix_mask=mask, causal_prefix=True)
    assert rel_err(got, want) < tol
    do = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, args, do.to(dtype)), torch.autograd.grad(want, up, do)):
        assert rel_err(a, b) < 4 * tol


@needs_compiled_triton
def test_triton_dropout_on_gpu_matches_reference_with_its_mask():
    import importlib

    csa = importlib.import_module("plr_kernels.causal_stream_attention")
    args, mask = inputs(2, 2, 20, 3, 2, 32, torch.float32, requires_grad=True)
    keep = csa.causal_triton_dropout_mask(2, 2, 20, 3, 2, 0.3, 77, device=DEV)
    got = plr_kernels.stream_attention(*args, prefix_mask=mask, causal_prefix=True, dropout_p=0.3, seed=77,
                                       backend="triton")
    want = reference.stream_attention(*args, prefix_mask=mask, causal_prefix=True, dropout_p=0.3,
                                      dropout_mask=keep)
    assert rel_err(got, want) < 1e-5
