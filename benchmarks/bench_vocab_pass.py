"""Vocabulary pass (plr_kernels/vocab_pass.py): fused Triton path vs the PyTorch reference.

One training step of PLR's two vocabulary losses -- L_KL over the K = 4
reasoning states (PLR Eq. 7) and L_NIP of z (PLR Eq. 11), forward and backward to the
states, z and the item table -- timed with pytest-benchmark; the peak extra
CUDA memory of the step goes to ``extra_info["peak_extra_MiB"]``.

    pytest benchmarks/bench_vocab_pass.py                       # CUDA: B in {256, 2048}, V in {20k, 100k}, d=256
    pytest benchmarks --benchmark-disable                       # CPU smoke test (tiny shapes)

Methods: ``fused`` (``reasoning_losses(..., backend="triton")``, one pass over
E for the K+1 rows of every user), ``reference`` (``plr_kernels.reference``,
eager) and ``compiled`` (``torch.compile`` of the reference; CUDA only, the
CPU smoke test skips it to stay fast). Without CUDA the fused path runs in the
Triton interpreter, whose timings mean nothing: CPU runs are a smoke test.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # CPU smoke test: the Triton kernels run interpreted (before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from plr_kernels import reference as ref  # noqa: E402
from plr_kernels.reasoning_losses import reasoning_losses  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
TAU, K = 0.07, 4
SHAPES = [(b, K, v, 256) for b in (256, 2048) for v in (20_000, 100_000)] if CUDA else [(8, K, 97, 16)]
METHODS = ("fused", "reference", "compiled")


def _reference_losses(states, z, e, target):
    kl = ref.multi_pair_kl(states, e, temperature=TAU, exclude_index=0)
    ce = ref.linear_cross_entropy(z, e, target, temperature=TAU, exclude_index=0, reduction="none")
    return kl, ce


def _fused_losses(states, z, e, target):
    return reasoning_losses(states, z, e, target, temperature=TAU, exclude_index=0, backend="triton")


_COMPILED = {}


def _losses(method):
    if method == "fused":
        return _fused_losses
    if method == "reference":
        return _reference_losses
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_reference_losses)
    return _COMPILED["fn"]


def _inputs(b, k, v, d, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    states = torch.randn(b, k, d, device=DEVICE, generator=gen).requires_grad_()
    z = torch.randn(b, d, device=DEVICE, generator=gen).requires_grad_()
    e = (0.1 * torch.randn(v, d, device=DEVICE, generator=gen)).requires_grad_()
    target = torch.randint(1, v, (b,), device=DEVICE, generator=gen)
    return states, z, e, target


def _step(losses, states, z, e, target):
    kl, ce = losses(states, z, e, target)
    loss = ce.mean() - 0.1 * kl.mean()
    grads = torch.autograd.grad(loss, (states, z, e))
    return loss.detach(), grads


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-K{}-V{}-d{}".format(*s))
def test_vocab_pass(benchmark, shape, method):
    if method == "fused" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    if method == "compiled" and not CUDA:
        pytest.skip("torch.compile of the reference is benchmarked on CUDA only")
    inputs = _inputs(*shape)
    losses = _losses(method)
    try:
        loss, grads = _step(losses, *inputs)  # warm-up (compilation), and the value to check
        _sync()
        if CUDA:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            _step(losses, *inputs)
            _sync()
            benchmark.extra_info["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{method} runs out of GPU memory at {shape}")
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu (Triton interpreter)"
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    if method == "fused" and shape[0] * shape[2] <= 256 * 20_000:
        # The fused step computes the reference's losses (fp32, relative error).
        exp, _ = _step(_reference_losses, *inputs)
        assert abs(float(loss) - float(exp)) <= 1e-4 * max(1.0, abs(float(exp)))
    benchmark.pedantic(lambda: (_step(losses, *inputs), _sync()), rounds=5 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
