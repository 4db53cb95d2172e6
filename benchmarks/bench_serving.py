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

HTTP (``plr serve``, FastAPI + uvicorn, in a subprocess on 127.0.0.1, at its
default thread count: all cores but one): a PLR M=2, T=2 checkpoint of each
``--http-sizes`` (default the paper's d=256 / history 50 and the converged
comparison's d=64 / history 20) is served twice, micro-batched (``--max-batch
64``, 2 ms, adaptive wait) and one request at a time (``--max-batch 1``); 1, 4
and 16 concurrent clients (asyncio + aiohttp, one connection each) send
``--http-requests`` requests each of random full histories, k=10. Reported:
p50 / p99 latency and requests/s, the rounds of both servers interleaved, and
the ceiling the model alone puts on micro-batching: t(batch 1) / (t(batch C) / C).
``--open-loop-rates R ...`` adds an open loop: Poisson arrivals at R requests/s
for ``--open-loop-seconds``, each request sent when it arrives (clients do not
wait for their answers), latency counted from the arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
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


# -- HTTP: plr serve in a subprocess -------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def start_server(checkpoint, max_batch, device, threads=None, max_wait_ms=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    extra = ([] if threads is None else ["--threads", str(threads)]) + (
        [] if max_wait_ms is None else ["--max-wait-ms", str(max_wait_ms)])
    proc = subprocess.Popen([sys.executable, "-m", "plr.cli", "serve", "--checkpoint", str(checkpoint), "--port",
                             "0", "--max-batch", str(max_batch), "--device", device, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = []
    for line in proc.stdout:
        log.append(line)
        if "http://127.0.0.1:" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.wait()
    raise RuntimeError(f"plr serve exited with {proc.returncode}:\n{''.join(log)}")


async def load(url, clients, requests, histories, k):
    """``clients`` concurrent connections, ``requests`` sequential requests each
    -> (latencies in s, wall s). Every answer must be a 200 with k items.

    The load generator is aiohttp (one session, a keep-alive connection per
    client; TCP_NODELAY is aiohttp's default): it costs the shared CPU about
    half of what httpx costs per request, so more of the 2 cores measure the
    server."""
    import aiohttp

    async def client(c, http):
        out = []
        for i in range(requests):
            body = {"history": histories[(c * requests + i) % len(histories)], "k": k, "exclude_history": False}
            t0 = time.perf_counter()
            async with http.post(url + "/recommend", json=body) as r:
                answer = await r.json()
            out.append(time.perf_counter() - t0)
            if r.status != 200 or len(answer["items"]) != k:
                raise RuntimeError(f"bad answer {r.status}: {str(answer)[:200]}")
        return out

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        for _ in range(3):  # warm-up
            async with http.post(url + "/recommend", json={"history": histories[0], "k": k}) as r:
                await r.read()
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(client(c, http) for c in range(clients)))
        return [x for run in runs for x in run], time.perf_counter() - t0


async def open_loop(url, rate, seconds, histories, k, seed=0):
    """Requests arriving as a Poisson process of ``rate`` per second for
    ``seconds``, each sent when it arrives whatever is still unanswered (up to
    256 connections) -> (latencies in s, counted from each arrival; answered
    per s). Unlike ``load``, the clients do not wait for their answers before
    the next request: the arrivals of a real service."""
    import aiohttp

    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    arrivals = arrivals or [0.0]  # a run too short for one arrival still sends one request

    async def one(i, at, http, start):
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        body = {"history": histories[i % len(histories)], "k": k, "exclude_history": False}
        async with http.post(url + "/recommend", json=body) as r:
            answer = await r.json()
        if r.status != 200 or len(answer["items"]) != k:
            raise RuntimeError(f"bad answer {r.status}: {str(answer)[:200]}")
        return time.perf_counter() - (start + at)

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as http:
        for _ in range(3):  # warm-up
            async with http.post(url + "/recommend", json={"history": histories[0], "k": k}) as r:
                await r.read()
        start = time.perf_counter()
        lat = await asyncio.gather(*(one(i, at, http, start) for i, at in enumerate(arrivals)))
        return list(lat), len(lat) / (time.perf_counter() - start)


def batching_ceiling(model, hist, num_items, clients, threads, min_run_time):
    """The most micro-batching can give at ``clients`` concurrent clients, from
    the model alone: ``t(batch 1) / (t(batch C) / C)`` of ``recommend`` in this
    process, at the server's thread count. A model that is already
    compute-bound at batch 1 gains little from batching, whatever the server does."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            one = time_call(model, histories(1, hist, num_items, "cpu"), 10, min_run_time)
            many = time_call(model, histories(clients, hist, num_items, "cpu"), 10, min_run_time)
    finally:
        torch.set_num_threads(previous)
    return one / (many / clients), 1e3 * one, 1e3 * many / clients


def run_http(num_items, sizes, k, client_counts, requests, rounds, device, min_run_time, threads=None,
             max_batch=64, max_wait_ms=None, open_rates=(), open_seconds=5.0):
    """For each ``(hidden, hist)`` of ``sizes``: a PLR M=2, T=2 checkpoint served
    micro-batched and one request at a time, rounds interleaved; then, for each
    of ``open_rates``, both servers under Poisson arrivals at that rate."""
    import httpx

    from plr.serving.app import default_threads

    rows, ceilings, opened = [], [], []
    for hidden, hist in sizes:
        model = build("PLR M=2,T=2", "auto", num_items, hist, hidden, "cpu", torch.float32)
        server_threads = default_threads() if threads is None else threads
        ceiling, one_ms, batched_ms = batching_ceiling(model, hist, num_items, max(client_counts),
                                                       server_threads, min_run_time)
        ceilings.append(dict(hidden=hidden, hist=hist, clients=max(client_counts), threads=server_threads,
                             ceiling=ceiling, batch1_ms=one_ms, batched_ms_per_request=batched_ms))
        rng = random.Random(0)
        hists = [[rng.randint(1, num_items) for _ in range(hist)] for _ in range(256)]
        servers = {}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "plr.pt"
            model.save(str(checkpoint))
            try:
                for name, batch in (("micro-batched", max_batch), ("one at a time", 1)):
                    servers[name] = start_server(checkpoint, batch, device, threads, max_wait_ms)
                for _, url in servers.values():
                    deadline = time.monotonic() + 120
                    while True:
                        try:
                            if httpx.get(url + "/health", timeout=2).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"plr serve at {url} did not answer /health")
                        time.sleep(0.2)
                stats = {(name, c): ([], []) for name in servers for c in client_counts}
                for _ in range(rounds):
                    for c in client_counts:
                        for name, (_, url) in servers.items():
                            lat, wall = asyncio.run(load(url, c, requests, hists, k))
                            stats[(name, c)][0].extend(lat)
                            stats[(name, c)][1].append(len(lat) / wall)
                for rate in open_rates:
                    for name, (_, url) in servers.items():
                        lat, answered = asyncio.run(open_loop(url, rate, open_seconds, hists, k))
                        q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
                        opened.append(dict(hidden=hidden, hist=hist, server=name, offered_per_s=rate,
                                           requests=len(lat), answered_per_s=answered, p50_ms=1e3 * q[49],
                                           p99_ms=1e3 * q[98]))
            finally:
                for proc, _ in servers.values():
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
        for (name, c), (lat, rates) in stats.items():
            q = statistics.quantiles(lat, n=100)
            rows.append(dict(hidden=hidden, hist=hist, server=name, clients=c, requests=len(lat),
                             p50_ms=1e3 * q[49], p99_ms=1e3 * q[98], requests_per_s=statistics.median(rates)))
    return rows, ceilings, opened


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
        http, ceilings, opened = run_http(args.items, args.http_sizes, args.k, args.http_clients,
                                          args.http_requests, args.http_rounds, args.device, args.min_run_time,
                                          args.http_threads, args.http_max_batch, args.http_max_wait_ms,
                                          args.open_loop_rates, args.open_loop_seconds)
        print(f"plr serve (PLR M=2,T=2, FastAPI + uvicorn on 127.0.0.1, aiohttp clients, {args.http_requests} "
              f"requests per client x {args.http_rounds} rounds):")
        print(f"{'size':<9} {'server':<14} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for r in http:
            print(f"{r['hidden']}x{r['hist']:<6} {r['server']:<14} {r['clients']:>7} {r['p50_ms']:>8.2f} "
                  f"{r['p99_ms']:>8.2f} {r['requests_per_s']:>8.1f}")
        by = {(r["hidden"], r["hist"], r["server"], r["clients"]): r["requests_per_s"] for r in http}
        for c in ceilings:
            for n in args.http_clients:
                key = (c["hidden"], c["hist"])
                print(f"  d={key[0]}, history {key[1]}, {n:>2} clients: micro-batched / one at a time = "
                      f"{by[key + ('micro-batched', n)] / by[key + ('one at a time', n)]:.2f}x requests/s")
            print(f"  d={c['hidden']}, history {c['hist']}: the model alone allows {c['ceiling']:.2f}x at "
                  f"{c['clients']} clients ({c['threads']} thread{'s' * (c['threads'] > 1)}: batch 1 "
                  f"{c['batch1_ms']:.3f} ms, batch {c['clients']} {c['batched_ms_per_request']:.3f} ms per request)")
        if opened:
            print(f"open loop (Poisson arrivals, {args.open_loop_seconds:g} s per rate; latency from arrival):")
            print(f"{'size':<9} {'server':<14} {'offered/s':>9} {'answered/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
            for r in opened:
                print(f"{r['hidden']}x{r['hist']:<6} {r['server']:<14} {r['offered_per_s']:>9.0f} "
                      f"{r['answered_per_s']:>10.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
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
