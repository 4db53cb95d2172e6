"""Peak extra CPU memory and time of the vocabulary pass: reference vs compiled C++ vs fused Triton.

    python benchmarks/vocab_memory.py [--batch 256 --streams 4 --items 100000 --dim 256]
                                      [--methods reference cpu fused] [--json OUT.json]

Each method runs in its own subprocess: build the inputs (states [B,K,d], z
[B,d], E [V,d], fp32), run one step (forward of L_KL + L_NIP and the backward
to states, z and E) once at a tiny size to import and warm everything, reset
the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), run the
step at full size, and report ``VmHWM - RSS before the step``: the peak extra
resident memory of the step, inputs excluded, gradients included.

What this can and cannot show, on a CPU without a GPU:

* ``reference``: the pure-PyTorch ops (``plr_kernels.reference``) as they run
  on a CPU -- a real measurement of the memory the reference needs (it stores
  [B*K x V] logits, log-probabilities, probabilities and their gradients).
* ``fused``: the Triton kernels run by the Triton *interpreter*
  (TRITON_INTERPRET=1, numpy per tile) with enlarged tiles to make it finish.
  The memory it shows is what the algorithm allocates -- the O(B K d)
  statistics, the gradients dX [B(K+1), d] and dE [V, d], and a few
  [BLOCK_M x BLOCK_N] tiles -- but neither its time nor the exact footprint of
  a compiled GPU kernel (registers / shared memory, CUDA caching allocator).
* ``cpu``: the compiled C++ kernels of ``plr_kernels._C`` (csrc/vocab_pass.cpp,
  OpenMP, streamed over tiles of E): the real CPU figure, time included.
The GPU figures come from benchmarks/bench_vocab_pass.py on a CUDA machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _inputs(b, k, v, d, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(b, k, d, generator=gen).requires_grad_()
    z = torch.randn(b, d, generator=gen).requires_grad_()
    e = (0.1 * torch.randn(v, d, generator=gen)).requires_grad_()
    target = torch.randint(1, v, (b,), generator=gen)
    return states, z, e, target


def _step(method, states, z, e, target, tau=0.07):
    import torch

    from plr_kernels import reference as ref
    from plr_kernels.reasoning_losses import reasoning_losses

    if method == "reference":
        kl = ref.multi_pair_kl(states, e, temperature=tau, exclude_index=0)
        ce = ref.linear_cross_entropy(z, e, target, temperature=tau, exclude_index=0, reduction="none")
    else:  # "cpu": the compiled C++ kernels; "fused": Triton (interpreted on a CPU)
        backend = "cpu" if method == "cpu" else "triton"
        kl, ce = reasoning_losses(states, z, e, target, temperature=tau, exclude_index=0, backend=backend)
    loss = ce.mean() - 0.1 * kl.mean()
    grads = torch.autograd.grad(loss, (states, z, e))
    return float(loss), grads


def child(method: str, b: int, k: int, v: int, d: int, blocks=(128, 2048)) -> dict:
    """Runs in the subprocess: one measured step of ``method``."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if method == "fused":
        from plr_kernels.triton import vocab_pass as kernels

        # The interpreter's time is per tile, its temporaries are a few tiles.
        kernels.INTERPRET_BLOCKS = tuple(blocks)
    _step(method, *_inputs(2, k, 97, d))  # warm-up: imports, kernel "compilation"
    inputs = _inputs(b, k, v, d)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss, grads = _step(method, *inputs)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    return {"method": method, "B": b, "K": k, "V": v, "d": d, "loss": loss,
            "peak_extra_MiB": (peak - before) / 1024, "grad_MiB": grad_bytes / 2**20, "seconds": seconds}


def run(method, b, k, v, d, blocks) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if method == "fused":
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, "--batch", str(b), "--streams", str(k),
         "--items", str(v), "--dim", str(d), "--interpret-blocks", str(blocks[0]), str(blocks[1])],
        env=env, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--streams", type=int, default=4, help="K reasoning states per user")
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=["reference", "cpu"], choices=["reference", "cpu", "fused"],
                   help="cpu: compiled C++ kernels (plr_kernels._C); fused: Triton under the interpreter")
    p.add_argument("--interpret-blocks", type=int, nargs=2, default=[128, 2048], metavar=("BLOCK_M", "BLOCK_N"),
                   help="tiles of the interpreted fused path (powers of two)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.streams, args.items, args.dim, args.interpret_blocks)))
        return
    rows = [run(m, args.batch, args.streams, args.items, args.dim, args.interpret_blocks) for m in args.methods]
    b, k, v, d = args.batch, args.streams, args.items, args.dim
    print(f"vocabulary pass, fp32, B={b} K={k} V={v} d={d}: L_KL over K states + L_NIP of z, forward+backward")
    print(f"{'method':<10} {'peak extra MiB':>15} {'of which grads':>15} {'seconds':>9} {'loss':>12}")
    for r in rows:
        print(f"{r['method']:<10} {r['peak_extra_MiB']:>15.1f} {r['grad_MiB']:>15.1f} {r['seconds']:>9.1f} "
              f"{r['loss']:>12.6f}")
    by = {r["method"]: r for r in rows}
    ref = by.get("reference")
    for name, f in by.items():
        if ref is None or name == "reference":
            continue
        ratio = f["peak_extra_MiB"] / ref["peak_extra_MiB"]
        net = (f["peak_extra_MiB"] - f["grad_MiB"]) / (ref["peak_extra_MiB"] - ref["grad_MiB"])
        print(f"{name} / reference: peak extra memory {ratio:.4f} (target <= 1/20 = 0.05), without the "
              f"gradients both must return {net:.4f}, time {f['seconds'] / ref['seconds']:.3f}"
              + (" (the Triton interpreter's time, not a kernel's)" if name == "fused" else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
