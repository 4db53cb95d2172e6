"""Stream-isolated attention (PLR Eq. 4-5): Triton vs the PyTorch formulations.

    pytest benchmarks/bench_stream_attention.py                   # CUDA: PLR shapes
    pytest benchmarks --benchmark-disable                         # CPU smoke test (CI)
    TRITON_INTERPRET=1 pytest benchmarks/bench_stream_attention.py --benchmark-disable   # + Triton on CPU

Implementations, forward and forward+backward, one reasoning step of one layer:

* ``triton``    -- plr_kernels, one program per (b, h), prefix K/V read once for all M streams;
* ``reference`` -- plr_kernels.reference (einsum, dense [B,H,M,N+S] weights);
* ``sdpa``      -- scaled_dot_product_attention over the expanded key sequence
                   [prefix N | all M*S stream tokens] with a dense boolean mask
                   (query m: valid prefix keys and its own S tokens);
* ``flex``      -- FlexAttention (compiled on CUDA) with the same mask as a mask_mod.

Shapes on CUDA: B=2048, H=2, D=128, N=50, M in {1,2,4,8}, S in {1,5}, bf16
(the target: cost(M=8) <= 1.3 cost(M=1), >= 3x faster than sdpa).
On CPU tiny shapes; Triton only under TRITON_INTERPRET=1, FlexAttention only on CUDA.

extra_info: ``bytes_floor`` (q, prefix K/V read ONCE, stream K/V, o written,
mask), ``bytes_prefix_per_stream`` (the same with the prefix read M times, as an
expanded formulation must), and ``floor_GBps`` = bytes_floor / mean time when timed.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import plr_kernels as K
from plr_kernels import _dispatch
from plr_kernels import reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if CUDA:
    B, H, D, N, DTYPE = 2048, 2, 128, 50, torch.bfloat16
    MS, SS = (1, 2, 4, 8), (1, 5)
else:
    B, H, D, N, DTYPE = 4, 2, 16, 7, torch.float32
    MS, SS = (1, 2), (1, 2)

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch
    flex_attention = None


def make_inputs(m, s):
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, DTYPE).requires_grad_()

    q, kp, vp, ks, vs = t(B, H, m, D), t(B, H, N, D), t(B, H, N, D), t(B, H, m, s, D), t(B, H, m, s, D)
    lengths = torch.randint(1, N + 1, (B,), generator=g)
    lengths[0] = 0  # one fully padded history
    mask = (torch.arange(N)[None, :] >= (N - lengths)[:, None]).to(DEVICE)
    return (q, kp, vp, ks, vs), mask


def dense_mask(mask, m, s):
    """[B,1,M,N+M*S]: query m sees the valid prefix and keys N + m*S .. N + m*S + S-1."""
    own = torch.arange(m, device=DEVICE)[:, None] == torch.arange(m * s, device=DEVICE)[None, :] // s
    return torch.cat([mask[:, None, None, :].expand(-1, 1, m, -1), own[None, None].expand(B, 1, m, m * s)], -1)


def expanded(kp, vp, ks, vs):
    m, s = ks.shape[2], ks.shape[3]
    return (torch.cat([kp, ks.reshape(B, H, m * s, D)], 2), torch.cat([vp, vs.reshape(B, H, m * s, D)], 2))


def build(impl, m, s):
    args, mask = make_inputs(m, s)
    if impl == "triton":
        return args, lambda *a: K.stream_attention(*a, prefix_mask=mask, backend="triton")
    if impl == "reference":
        return args, lambda *a: ref.stream_attention(*a, prefix_mask=mask)
    if impl == "sdpa":
        full = dense_mask(mask, m, s)
        return args, lambda q, kp, vp, ks, vs: F.scaled_dot_product_attention(
            q, *expanded(kp, vp, ks, vs), attn_mask=full)
    # flex: the same mask as a predicate on (query m, key j) of the expanded sequence.
    def mask_mod(b, h, q_idx, kv_idx):
        prefix = (kv_idx < N) & mask[b, kv_idx.clamp(max=N - 1)]
        return prefix | ((kv_idx >= N) & ((kv_idx - N) // s == q_idx))

    block = create_block_mask(mask_mod, B, None, m, N + m * s, device=DEVICE)
    flex = torch.compile(flex_attention, dynamic=False)
    return args, lambda q, kp, vp, ks, vs: flex(q, *expanded(kp, vp, ks, vs), block_mask=block)


def bytes_moved(m, s):
    item = torch.empty((), dtype=DTYPE).element_size()
    per_bh = (m * D) + 2 * N * D + 2 * m * s * D + (m * D)  # q, prefix K/V once, stream K/V, o
    floor = B * H * per_bh * item + B * N
    return floor, floor + B * H * 2 * (m - 1) * N * D * item


IMPLS = ["triton", "reference", "sdpa", "flex"]


def skip_reason(impl):
    if impl == "triton":
        if not _dispatch.triton_importable():
            return "triton is not installed"
        if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on CPU needs TRITON_INTERPRET=1"
    if impl == "flex" and (flex_attention is None or not CUDA):
        return "FlexAttention benchmarked on CUDA only (compiled)"
    return None


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("s", SS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("impl", IMPLS)
def test_stream_attention(benchmark, impl, m, s, mode):
    reason = skip_reason(impl)
    if reason:
        pytest.skip(reason)
    args, fn = build(impl, m, s)
    do = torch.randn(B, H, m, D, device=DEVICE, dtype=DTYPE)
    sync = torch.cuda.synchronize if CUDA else (lambda: None)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*args)
        else:
            out = fn(*args)
            torch.autograd.grad(out, args, do)
        sync()
        return out

    # Every formulation computes the same attention: a wrong benchmark is worthless.
    want = ref.stream_attention(*[a.detach().float() for a in args], prefix_mask=make_inputs(m, s)[1])
    got = step().float()
    assert ((got - want).abs().max() / want.abs().max()).item() < (3e-2 if DTYPE == torch.bfloat16 else 1e-4)

    floor, per_stream = bytes_moved(m, s)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE),
                                B=B, H=H, D=D, N=N, M=m, S=s, bytes_floor=floor, bytes_prefix_per_stream=per_stream)
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.mean > 0:
        benchmark.extra_info["floor_GBps"] = floor / stats.stats.mean / 1e9
