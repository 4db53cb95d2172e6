"""End-to-end serving latency: SASRec vs PLR, reference ops vs compiled ops.

    python benchmarks/bench_serving.py [--items 12101 --hist 50 --batches 1 64 1024]
                                       [--device cpu] [--json OUT.json]
                                       [--http-clients 1 4 16 --http-requests 100 | --no-http]
    pytest benchmarks --benchmark-disable          # tiny smoke test (CI)

One call of ``model.recommend(histories, k=10)`` -- encode the history, reason
(PLR: M streams x T steps over the shared prefix KV cache), score every item
with ``z_final`` and take the top 10 -- timed for:

* models: SASRec, PLR (M=2, T=2), PLR (M=8, T=2), all at the default sizes (plr/configs/plr.yaml)
  (d=256, 2 layers, 2 heads, FFN 300), eval mode, untrained weights (latency
  does not depend on the values), full histories of ``--hist`` items;
* ops: ``backend="torch"`` (the pure-PyTorch reference of every plr_kernels
  op) vs ``backend="auto"`` (the compiled C++ kernels of plr_kernels._C on a
  CPU; Triton, else the CUDA kernels, on a GPU).

All variants are timed in one process, interleaved round by round (so drifts
of the machine hit all of them alike), each round the median of
``torch.utils.benchmark`` blocked runs. Reported: median latency per call and
the ratios PLR / SASRec (target for M=2, T=2: within +5%; the paper reports +5.8%) and
reference / compiled.

HTTP (``benchmarks/serving_http.py``; ``plr serve``, FastAPI + uvicorn, in a
subprocess on 127.0.0.1, at its default thread count: all cores but one): a PLR
M=2, T=2 checkpoint of each ``--http-sizes`` (default the paper's d=256 /
history 50 and the converged comparison's d=64 / history 20) is served twice,
micro-batched (``--max-batch 64``, 2 ms, adaptive wait) and one request at a
time (``--max-batch 1``); 1, 4 and 16 concurrent clients (asyncio + aiohttp,
one connection each) send ``--http-requests`` requests each of random full
histories, k=10. Reported: p50 / p99 latency and requests/s, the rounds of both
servers interleaved, and the ceiling the model alone puts on micro-batching:
t(batch 1) / (t(batch C) / C). ``--open-loop-rates R ...`` adds an open loop:
Poisson arrivals at R requests/s for ``--open-loop-seconds``, each request sent
when it arrives (clients do not wait for their answers), latency counted from
the arrival.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch
from torch.utils import benchmark

from plr import PLRModel
from plr.models import SASRecModel

MODELS = {
    "SASRec": lambda n, a: SASRecModel(n, **a),
    "PLR M=2,T=2": lambda n, a: PLRModel(n, num_streams=2, num_steps=2, **a),
    "PLR M=8,T=2": lambda n, a: PLRModel(n, num_streams=8, num_steps=2, **a),
}
OPS = ("torch", "auto")


def build(name, ops, num_items, hist, hidden, device, dtype):
    torch.manual_seed(0)
    args = dict(max_len=hist, hidden_size=hidden, num_layers=2, num_heads=2, inner_size=300, backend=ops)
    return MODELS[name](num_items, args).to(device, dtype).eval()


def histories(batch, hist, num_items, device):
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, num_items + 1, (batch, hist), generator=g).to(device)


def time_call(model, seq, k, min_run_time):
    timer = benchmark.Timer(stmt="model.recommend(seq, k=k)", globals=dict(model=model, seq=seq, k=k),
                            num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def run(num_items, hist, batches, hidden, k, rounds, min_run_time, device, dtype):
    rows = []
    for batch in batches:
        seq = histories(batch, hist, num_items, device)
        variants = {(name, ops): build(name, ops, num_items, hist, hidden, device, dtype)
                    for name in MODELS for ops in OPS}
        with torch.no_grad():
            # same scores from both op sets (the comparison is of equal work)
            for name in MODELS:
                ref = variants[(name, "torch")].recommend(seq, k=k)[1]
                got = variants[(name, "auto")].recommend(seq, k=k)[1]
                agree = float((ref == got).float().mean())
                if agree < 0.99:
                    raise RuntimeError(f"{name}: top-{k} of backend=auto and backend=torch agree on only "
                                       f"{agree:.3f} of the entries")
        times = {key: [] for key in variants}
        for _ in range(rounds):
            for key, model in variants.items():
                times[key].append(time_call(model, seq, k, min_run_time))
        for (name, ops), ts in times.items():
            rows.append(dict(batch=batch, model=name, ops=ops, ms=1e3 * statistics.median(ts),
                             ms_rounds=[1e3 * t for t in ts]))
    return rows


def ratios(rows):
    by = {(r["batch"], r["model"], r["ops"]): r["ms"] for r in rows}
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        for ops in OPS:
            base = by[(batch, "SASRec", ops)]
            for name in MODELS:
                if name != "SASRec":
                    out.append(dict(batch=batch, ops=ops, model=name, vs_sasrec=by[(batch, name, ops)] / base))
        for name in MODELS:
            out.append(dict(batch=batch, model=name, reference_over_compiled=by[(batch, name, "torch")]
                            / by[(batch, name, "auto")]))
    return out


def compiled_backends(device):
    """What ``backend="auto"`` ran: stream_attention's inference backend, and
    topk's (on a GPU the measured choice of each shape class, made during the run)."""
    import importlib

    from plr_kernels import _autotune, _dispatch

    sa = importlib.import_module("plr_kernels.stream_attention")  # the module, not the op of that name
    topk = importlib.import_module("plr_kernels.topk")

    dev = torch.device(device)
    found = {"stream_attention": sa._backend_name("auto", dev.type, dev.index, True)}
    if dev.type == "cuda":
        found["topk"] = sorted({name for key, name in _autotune.choices().items() if key[0] == "topk"})
    else:
        impl = _dispatch.resolve("topk", "auto", dev, topk.IMPLS)
        found["topk"] = next(name for name, fn in topk.IMPLS.items() if fn is impl)
    return found


def size(text):
    hidden, _, hist = text.partition("x")
    if not (hidden.isdigit() and hist.isdigit()):
        raise argparse.ArgumentTypeError(f"expected HIDDENxHISTORY such as 256x50, got {text!r}")
    return int(hidden), int(hist)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=12101, help="item table size (S3-Rec Amazon Beauty: 12101)")
    p.add_argument("--hist", type=int, default=50, help="history length (full histories)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per blocked measurement")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the in-process table (default: torch's, all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--http-clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--http-requests", type=int, default=100, help="sequential requests per client")
    p.add_argument("--http-rounds", type=int, default=2, help="interleaved rounds of both servers")
    p.add_argument("--http-sizes", type=size, nargs="+", default=[(256, 50), (64, 20)],
                   help="HIDDENxHISTORY of the served PLR: the paper's size and the converged comparison's")
    p.add_argument("--http-threads", type=int, default=None,
                   help="plr serve --threads (default: the server's own, all cores but one)")
    p.add_argument("--http-max-batch", type=int, default=64, help="plr serve --max-batch of the micro-batched server")
    p.add_argument("--http-max-wait-ms", type=float, default=None, help="plr serve --max-wait-ms (default: its own)")
    p.add_argument("--open-loop-rates", type=float, nargs="*", default=[],
                   help="also offer Poisson arrivals at these requests/s to both servers (open loop)")
    p.add_argument("--open-loop-seconds", type=float, default=5.0, help="length of each open-loop run")
    p.add_argument("--no-http", action="store_true", help="skip the plr serve figures")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = run(args.items, args.hist, args.batches, args.hidden, args.k, args.rounds, args.min_run_time,
               args.device, dtype)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                    f"{torch.get_num_threads()} threads")
    backends = compiled_backends(args.device)
    print(f"recommend(k={args.k}) latency, {args.dtype}, V={args.items}, history {args.hist}, d={args.hidden}, "
          f"{machine}; torch {torch.__version__}; backend=auto ran {backends}")
    print(f"{'batch':>6} {'model':<13} {'reference ms':>13} {'compiled ms':>12} {'ref/compiled':>13}")
    by = {(r["batch"], r["model"], r["ops"]): r["ms"] for r in rows}
    for batch in args.batches:
        for name in MODELS:
            ref, comp = by[(batch, name, "torch")], by[(batch, name, "auto")]
            print(f"{batch:>6} {name:<13} {ref:>13.3f} {comp:>12.3f} {ref / comp:>13.3f}")
    print("PLR latency / SASRec latency (same ops):")
    for r in ratios(rows):
        if "vs_sasrec" in r:
            print(f"  batch {r['batch']:>5} {r['ops']:<6} {r['model']:<13} {r['vs_sasrec']:.3f}")
    http, ceilings, opened = [], [], []
    if not args.no_http:
        from serving_http import print_http, run_http

        http, ceilings, opened = run_http(args.items, args.http_sizes, args.k, args.http_clients,
                                          args.http_requests, args.http_rounds, args.device, args.min_run_time,
                                          args.http_threads, args.http_max_batch, args.http_max_wait_ms,
                                          args.open_loop_rates, args.open_loop_seconds)
        print_http(http, ceilings, opened, args.http_clients, args.http_requests, args.http_rounds,
                   args.open_loop_seconds)
    if args.json:
        args.json.write_text(json.dumps(dict(machine=machine, torch=torch.__version__, args=vars(args) | {
            "json": str(args.json)}, backends=backends, rows=rows, ratios=ratios(rows), http=http, http_ceilings=ceilings, open_loop=opened), indent=2))


def test_serving_smoke(tmp_path):
    """CI: the script runs end to end at a tiny size (no timing claims)."""
    out = tmp_path / "serving.json"
    main(["--items", "97", "--hist", "7", "--batches", "1", "3", "--hidden", "16", "--rounds", "1",
          "--min-run-time", "0.01", "--http-clients", "1", "3", "--http-requests", "4", "--http-rounds", "1",
          "--http-sizes", "16x7", "--open-loop-rates", "40", "--open-loop-seconds", "0.3", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {r["model"] for r in data["rows"]} == set(MODELS)
    assert all(r["ms"] > 0 for r in data["rows"])
    assert [c["clients"] for c in data["http_ceilings"]] == [3] and data["http_ceilings"][0]["ceiling"] > 0
    assert {r["server"] for r in data["open_loop"]} == {"micro-batched", "one at a time"}
    assert all(r["requests"] >= 1 and r["answered_per_s"] > 0 for r in data["open_loop"])
    assert {(r["server"], r["clients"]) for r in data["http"]} == {
        (s, c) for s in ("micro-batched", "one at a time") for c in (1, 3)}
    assert all(r["requests"] == 4 * r["clients"] and r["requests_per_s"] > 0 for r in data["http"])


if __name__ == "__main__":
    main()
