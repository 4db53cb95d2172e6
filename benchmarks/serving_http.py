"""The HTTP half of benchmarks/bench_serving.py: ``plr serve`` in a subprocess
under closed-loop (``load``) and open-loop (``open_loop``) aiohttp clients, and
the ceiling the model alone puts on micro-batching (``batching_ceiling``).
Run through ``bench_serving.py`` (its ``--http-*`` and ``--open-loop-*`` options)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_serving import build, histories, time_call

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


def print_http(http, ceilings, opened, client_counts, requests, rounds, open_seconds):
    """The tables of ``run_http``'s results."""
    print(f"plr serve (PLR M=2,T=2, FastAPI + uvicorn on 127.0.0.1, aiohttp clients, {requests} "
          f"requests per client x {rounds} rounds):")
    print(f"{'size':<9} {'server':<14} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for r in http:
        print(f"{r['hidden']}x{r['hist']:<6} {r['server']:<14} {r['clients']:>7} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['requests_per_s']:>8.1f}")
    by = {(r["hidden"], r["hist"], r["server"], r["clients"]): r["requests_per_s"] for r in http}
    for c in ceilings:
        for n in client_counts:
            key = (c["hidden"], c["hist"])
            print(f"  d={key[0]}, history {key[1]}, {n:>2} clients: micro-batched / one at a time = "
                  f"{by[key + ('micro-batched', n)] / by[key + ('one at a time', n)]:.2f}x requests/s")
        print(f"  d={c['hidden']}, history {c['hist']}: the model alone allows {c['ceiling']:.2f}x at "
              f"{c['clients']} clients ({c['threads']} thread{'s' * (c['threads'] > 1)}: batch 1 "
              f"{c['batch1_ms']:.3f} ms, batch {c['clients']} {c['batched_ms_per_request']:.3f} ms per request)")
    if opened:
        print(f"open loop (Poisson arrivals, {open_seconds:g} s per rate; latency from arrival):")
        print(f"{'size':<9} {'server':<14} {'offered/s':>9} {'answered/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
        for r in opened:
            print(f"{r['hidden']}x{r['hist']:<6} {r['server']:<14} {r['offered_per_s']:>9.0f} "
                  f"{r['answered_per_s']:>10.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
