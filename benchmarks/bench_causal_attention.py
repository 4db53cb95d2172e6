"""The causal-prefix form of stream_attention (every prefix end n of one encoder
pass): the compiled kernels vs the reference.

    pytest benchmarks/bench_causal_attention.py            # pytest-benchmark table
    pytest benchmarks --benchmark-disable                  # smoke test (CI)
    python benchmarks/bench_causal_attention.py [--rounds 7]   # interleaved timing, prints ratios

Shape: B=256, H=2, N=50, M=2, S=2, D=128, fp32 (CPU: ``cpu`` = the C++ kernel of
csrc/causal_stream_attention.cpp; CUDA: ``triton``, and ``cuda`` forward only),
forward and forward+backward, left-padded histories with one fully padded.
``reference`` is plr_kernels.reference (dense [B,H,N,M,N+S] weights, explicit mask);
``<kernel>_per_position`` the non-causal kernel on every position as its own
sample (the prefix cache copied N times, mask cut at n): what the causal form avoids.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytest
import torch

import plr_kernels as K
from plr_kernels import _extension
from plr_kernels import reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B, H, N, M, S, D, DTYPE = 256, 2, 50, 2, 2, 128, torch.float32
KERNEL = "triton" if CUDA else "cpu"


def make_inputs():
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, DTYPE).requires_grad_()

    args = (t(B, H, N, M, D), t(B, H, N, D), t(B, H, N, D), t(B, H, N, M, S, D), t(B, H, N, M, S, D))
    first = torch.randint(0, N, (B,), generator=g)
    first[0] = N  # one fully padded history
    return args, (torch.arange(N)[None, :] >= first[:, None]).to(DEVICE)


def per_position(args, mask, backend):
    """What the causal form avoids: every position n as its own sample of the
    non-causal op, the prefix cache copied N times (batch B*N, mask cut at n)."""
    q, kp, vp, ks, vs = args
    cut = torch.arange(N, device=DEVICE)[None, :] <= torch.arange(N, device=DEVICE)[:, None]  # [n, j]
    pm = (mask[:, None, :] & cut[None]).reshape(B * N, N)

    def flat(x):  # [B,H,N,...] -> [B*N,H,...]
        return x.transpose(1, 2).reshape(B * N, H, *x.shape[3:])

    def expand(x):  # [B,H,N,D] -> [B*N,H,N,D], a copy per position
        return x[:, None].expand(B, N, H, N, D).reshape(B * N, H, N, D)

    o = K.stream_attention(flat(q), expand(kp), expand(vp), flat(ks), flat(vs), prefix_mask=pm, backend=backend)
    return o.reshape(B, N, H, M, D).transpose(1, 2)


def step(impl, mode, args, mask):
    """One call (forward, or forward+backward with a fixed upstream gradient)."""
    if impl == "reference":
        fn = lambda: ref.stream_attention(*args, prefix_mask=mask, causal_prefix=True)  # noqa: E731
    elif impl.endswith("_per_position"):
        fn = lambda: per_position(args, mask, impl[: -len("_per_position")])  # noqa: E731
    else:
        fn = lambda: K.stream_attention(*args, prefix_mask=mask, causal_prefix=True, backend=impl)  # noqa: E731
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn()
    else:
        do = torch.ones(B, H, N, M, D, device=DEVICE, dtype=DTYPE)

        def run():
            torch.autograd.grad(fn(), args, do)
    return run


def sync():
    if CUDA:
        torch.cuda.synchronize()


def skip_reason(impl, mode):
    impl = impl.replace("_per_position", "")
    if impl == "cpu" and not _extension.has_kernel("causal_stream_attention_fwd", "cpu"):
        return f"compiled CPU kernel unavailable: {_extension.extension_error() or 'not in this build'}"
    if impl in ("triton", "cuda") and not CUDA:
        return f"{impl} benchmarked on CUDA only"
    if impl == "cuda" and (mode != "fwd" or not _extension.has_kernel("causal_stream_attention_fwd", "CUDA")):
        return "the CUDA kernel is a forward (inference) only"
    return None


IMPLS = ["reference", "cpu", "triton", "cuda", "cpu_per_position", "triton_per_position"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_causal_stream_attention(benchmark, impl, mode):
    why = skip_reason(impl, mode)
    if why:
        pytest.skip(why)
    args, mask = make_inputs()
    run = step(impl, mode, args, mask)
    benchmark.extra_info.update(shape=dict(B=B, H=H, N=N, M=M, S=S, D=D), dtype=str(DTYPE), device=DEVICE)

    def timed():
        run()
        sync()

    benchmark(timed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    args, mask = make_inputs()
    impls = [i for i in ("reference", KERNEL, "cuda", KERNEL + "_per_position") if skip_reason(i, "fwd") is None]
    print(f"device={DEVICE} threads={torch.get_num_threads()} B={B} H={H} N={N} M={M} S={S} D={D} {DTYPE}")
    for mode in ("fwd", "fwd_bwd"):
        runs = {i: step(i, mode, args, mask) for i in impls if skip_reason(i, mode) is None}
        times = {i: [] for i in runs}
        for run in runs.values():  # warm-up
            run()
        sync()
        for _ in range(opts.rounds):  # interleaved: load changes hit every implementation alike
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                sync()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["reference"])
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{mode:8s} {name:18s} median {med * 1e3:9.2f} ms  reference/this = {base / med:6.2f}x")


if __name__ == "__main__":
    main()
