"""GPU benchmark of the inference kernels: CUDA vs Triton vs PyTorch.

    python benchmarks/bench_cuda_inference.py --out results.json [--quick]

stream_attention forward (PLR Eq. 4-5): B in {1, 64, 1024}, H=2, D=128
(hidden 256, 2 heads), N=50, M in {1, 2, 8}, S in {1, 2}, bf16 and fp32:
  cuda      torch.ops.plr_kernels.stream_attention_fwd (csrc/cuda/stream_attention.cu)
  triton    plr_kernels.stream_attention(..., backend="triton")
  reference plr_kernels.reference.stream_attention (explicit mask, einsum)
  sdpa      F.scaled_dot_product_attention over the expanded sequence: the
            prefix repeated for every stream, the M*S stream tokens appended,
            a boolean mask for stream isolation (the naive formulation)
and the M=8 / M=1 cost ratio of each (target <= 1.3 for the fused kernels).

topk: B in {1, 64, 1024}, V in {12k, 100k}, d=256, k in {10, 100}:
  cuda      torch.ops.plr_kernels.topk (csrc/cuda/topk.cu)
  triton    plr_kernels.topk(..., backend="triton")
  torch     z @ E^T then torch.topk (materialises the [B, V] scores)

Timing: torch.cuda.Event around each call, after warm-up; median of many
runs. Prints a table and writes JSON (device name, torch version, rows).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_ms(fn, warmup=10, reps=50):
    """Median milliseconds of fn() over `reps` runs, each between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def safe_time(fn, **kw):
    try:
        return time_ms(fn, **kw), None
    except Exception as e:  # a backend missing or failing must not end the run
        torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


# --------------------------------------------------------------------------
# stream_attention
# --------------------------------------------------------------------------


def sdpa_expanded(q, kp, vp, ks, vs, mask, scale):
    """Naive formulation: per user, one SDPA over [prefix repeated per stream | stream tokens]."""
    b, h, m, d = q.shape
    n, s = kp.shape[2], ks.shape[3]
    # Keys of query m: its own copy of the prefix and its own S tokens -> [B*M, H, N+S, D].
    k_all = torch.cat([kp[:, :, None].expand(b, h, m, n, d), ks], dim=3)
    v_all = torch.cat([vp[:, :, None].expand(b, h, m, n, d), vs], dim=3)
    k_all = k_all.permute(0, 2, 1, 3, 4).reshape(b * m, h, n + s, d)
    v_all = v_all.permute(0, 2, 1, 3, 4).reshape(b * m, h, n + s, d)
    qq = q.permute(0, 2, 1, 3).reshape(b * m, h, 1, d)
    valid = torch.ones(b, m, n + s, dtype=torch.bool, device=q.device)
    if mask is not None:
        valid[:, :, :n] = mask[:, None, :]
    o = F.scaled_dot_product_attention(qq, k_all, v_all, attn_mask=valid.reshape(b * m, 1, 1, n + s), scale=scale)
    return o.reshape(b, m, h, d).permute(0, 2, 1, 3)


def bench_attention(quick):
    import plr_kernels
    from plr_kernels import reference

    rows = []
    batches = [1, 64] if quick else [1, 64, 1024]
    for dtype in (torch.bfloat16, torch.float32):
        for b in batches:
            for s in (1, 2):
                for m in (1, 2, 8):
                    h, d, n = 2, 128, 50
                    scale = 1.0 / math.sqrt(d)
                    q = torch.randn(b, h, m, d, device="cuda", dtype=dtype)
                    kp, vp = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(2))
                    ks, vs = (torch.randn(b, h, m, s, d, device="cuda", dtype=dtype) for _ in range(2))
                    lengths = torch.randint(1, n + 1, (b,), device="cuda")
                    mask = torch.arange(n, device="cuda")[None, :] >= n - lengths[:, None]
                    fns = {
                        "cuda": lambda: torch.ops.plr_kernels.stream_attention_fwd(
                            q, kp, vp, ks, vs, mask, scale, 0.0, None),
                        "triton": lambda: plr_kernels.stream_attention(
                            q, kp, vp, ks, vs, prefix_mask=mask, backend="triton"),
                        "reference": lambda: reference.stream_attention(q, kp, vp, ks, vs, prefix_mask=mask),
                        "sdpa": lambda: sdpa_expanded(q, kp, vp, ks, vs, mask, scale),
                    }
                    with torch.no_grad():
                        for name, fn in fns.items():
                            ms, err = safe_time(fn)
                            rows.append(dict(op="stream_attention", impl=name, dtype=str(dtype).split(".")[-1],
                                             B=b, H=h, D=d, N=n, M=m, S=s, ms=ms, error=err))
    # Cost of M=8 streams relative to M=1 at the same (dtype, B, S, impl).
    by_key = {(r["impl"], r["dtype"], r["B"], r["S"], r["M"]): r["ms"] for r in rows}
    for r in rows:
        base = by_key.get((r["impl"], r["dtype"], r["B"], r["S"], 1))
        if r["M"] == 8 and r["ms"] and base:
            r["m8_over_m1"] = r["ms"] / base
    return rows


# --------------------------------------------------------------------------
# topk
# --------------------------------------------------------------------------


def bench_topk(quick):
    import plr_kernels

    rows = []
    batches = [1, 64] if quick else [1, 64, 1024]
    for dtype in (torch.bfloat16, torch.float32):
        for v in (12_000, 100_000):
            e = torch.randn(v, 256, device="cuda", dtype=dtype)
            for b in batches:
                z = torch.randn(b, 256, device="cuda", dtype=dtype)
                for k in (10, 100):
                    fns = {
                        "cuda": lambda: torch.ops.plr_kernels.topk(z, e, k, 0, None),
                        "triton": lambda: plr_kernels.topk(z, e, k, exclude_index=0, backend="triton"),
                        "torch": lambda: torch.topk(
                            (z.float() @ e.float().T if dtype != torch.float32 else z @ e.T)
                            .index_fill_(1, torch.tensor([0], device="cuda"), float("-inf")), k, dim=1),
                        "torch_bf16_matmul": lambda: torch.topk(
                            (z @ e.T).float().index_fill_(1, torch.tensor([0], device="cuda"), float("-inf")),
                            k, dim=1),
                    }
                    if dtype == torch.float32:
                        del fns["torch_bf16_matmul"]
                    with torch.no_grad():
                        for name, fn in fns.items():
                            ms, err = safe_time(fn, warmup=5, reps=20 if b == 1024 else 50)
                            rows.append(dict(op="topk", impl=name, dtype=str(dtype).split(".")[-1],
                                             B=b, V=v, d=256, k=k, ms=ms, error=err))
    return rows


def print_table(rows, keys):
    cols = keys + ["impl", "ms", "m8_over_m1", "error"]
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            x = r.get(c)
            cells.append(f"{x:10.4f}" if isinstance(x, float) else f"{'' if x is None else str(x)[:40]:>10}")
        print(" | ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_cuda_inference.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="B in {1, 64} only")
    ap.add_argument("--only", choices=["attention", "topk"], default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_inference.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    from plr_kernels import _extension

    if not _extension.has_kernel("topk", "CUDA"):
        sys.exit("plr_kernels._C has no CUDA kernels: build it with CUDA first "
                 f"(python setup.py build_ext --inplace); {_extension.extension_error() or ''}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=[])
    if args.only in (None, "attention"):
        rows = bench_attention(args.quick)
        print_table(rows, ["dtype", "B", "M", "S"])
        result["rows"] += rows
    if args.only in (None, "topk"):
        rows = bench_topk(args.quick)
        print_table(rows, ["dtype", "B", "V", "k"])
        result["rows"] += rows
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['device']})")


if __name__ == "__main__":
    main()
