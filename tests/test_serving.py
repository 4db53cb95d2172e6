"""`plr serve`: a real server process on 127.0.0.1 (free port), a real HTTP client.

A tiny PLR trained on ml-100k (3 steps) is served; every answer is compared
with ``model.recommend`` on the same history, a bounded load test (16 clients
x 100 requests) checks every response and reports latency and throughput,
bad requests get their 4xx, and SIGTERM ends the server cleanly.
"""

import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plr.cli import main  # noqa: E402
from plr.models import SequentialRecommender  # noqa: E402
from plr.serving import ItemCatalog, MicroBatcher, Query, Recommender  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ML100K = REPO.parent / "shared" / "data" / "ml-100k_recbole"
pytestmark = pytest.mark.skipif(not ML100K.is_dir(), reason="shared data (ml-100k_recbole) not present")
MAX_LEN = 20
TOL = 1e-5


def nodelay_client(base_url, **kwargs):
    """An httpx client with TCP_NODELAY (as curl): without it each request body
    waits for the server's delayed ACK of the headers (~40 ms on Linux)."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=base_url, transport=transport, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    sets = ["model.hidden_size=16", "model.inner_size=24", f"data.max_len={MAX_LEN}", "train.epochs=1",
            "train.max_steps_per_epoch=3", "train.batch_size=64", "train.progress=false", "train.seed=3"]
    assert main(["train", "--model", "plr", "--data", str(ML100K), "--out", str(out),
                 *sum((["--set", s] for s in sets), [])]) == 0
    return out / "best.pt"


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The checkpoint loaded in the test process, and its raw-id catalog."""
    model, extra = SequentialRecommender.load_with_extra(str(checkpoint))
    return model.eval(), ItemCatalog.from_checkpoint_extra(model.num_items, extra)


def start_server(checkpoint, *extra_args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "plr.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", *extra_args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=str(REPO))
    lines, url = [], None
    deadline = time.monotonic() + 120
    while url is None:  # the first line naming the bound address (or the process dies)
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError(f"plr serve exited with {proc.returncode}:\n{''.join(lines)}")
        lines.append(line)
        if "http://127.0.0.1:" in line:
            url = line.strip().rsplit(" ", 1)[-1]
        assert time.monotonic() < deadline, "".join(lines)
    threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()  # drain, keep the log
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, lines
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.1)


def stop_server(proc, timeout=60):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url, log = start_server(checkpoint)
    yield url
    assert stop_server(proc) == 0, "".join(log)


def raw_history(catalog, rng, length):
    return [catalog.raw_ids[rng.randint(1, catalog.num_items)] for _ in range(length)]


def expected(reference, history, k, exclude_history):
    model, catalog = reference
    seq = torch.tensor([catalog.to_internal(history)])
    scores, ids = model.recommend(seq, k=k, exclude_history=exclude_history)
    return catalog.describe(scores[0].tolist(), ids[0].tolist())


def assert_same_answer(got, want):
    """Same items and titles, best first; scores equal to float32 rounding (a
    batch and a lone history run the same math in different GEMM shapes), and
    a different item only where the reference itself has a tie at that tolerance."""
    items, scores, titles = want
    assert len(got["items"]) == len(items) and len(got["scores"]) == len(scores)
    for i, (a, b) in enumerate(zip(got["scores"], scores)):
        assert abs(a - b) <= TOL * max(1.0, abs(b)), (i, got, want)
    for i, (a, b) in enumerate(zip(got["items"], items)):
        if a != b:
            near = [scores[j] for j in (i - 1, i + 1) if 0 <= j < len(scores)]
            assert any(abs(s - scores[i]) <= 2 * TOL for s in near), (i, got, want)
    assert all(ta == tb for a, b, ta, tb in zip(got["items"], items, got["titles"], titles) if a == b)


# -- answers ---------------------------------------------------------------------------


def test_health_and_info(server, reference):
    model, _ = reference
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    info = httpx.get(server + "/info").json()
    assert info["model"] == "PLRModel" and info["dataset"] == "ml-100k"
    assert info["num_items"] == model.num_items == 1682 and info["max_len"] == MAX_LEN
    assert info["config"]["num_streams"] == 2 and info["micro_batching"]["max_batch"] == 64


def test_every_answer_equals_model_recommend(server, reference):
    _, catalog = reference
    rng = random.Random(0)
    with nodelay_client(server) as client:
        for length, k, exclude in [(1, 10, True), (5, 1, False), (MAX_LEN, 25, True), (7, 3, False), (12, 50, True)]:
            history = raw_history(catalog, rng, length)
            history[0] = int(history[0])  # raw ids may come as JSON numbers too
            r = client.post("/recommend", json={"history": history, "k": k, "exclude_history": exclude})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == k
            assert_same_answer(r.json(), expected(reference, history, k, exclude))
            if exclude:
                assert not set(r.json()["items"]) & {str(h) for h in history}
        histories = [raw_history(catalog, rng, rng.randint(1, MAX_LEN)) for _ in range(9)]
        r = client.post("/recommend/batch", json={"histories": histories, "k": 4, "exclude_history": False})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(histories)
        for got, history in zip(results, histories):
            assert_same_answer(got, expected(reference, history, 4, False))
        # the defaults: k=10, exclude_history=true
        history = raw_history(catalog, rng, 6)
        assert_same_answer(client.post("/recommend", json={"history": history}).json(),
                           expected(reference, history, 10, True))


def test_no_candidate_slots_are_not_returned(reference):
    model, catalog = reference
    recommender = Recommender(model, catalog, max_k=model.num_items)
    history = [3, 3, 7, 9]  # 3 distinct items excluded: num_items - 3 candidates
    (out,) = recommender.run_batch([Query(history, model.num_items, True)])
    assert len(out["items"]) == model.num_items - 3 and None not in out["items"]
    assert not {catalog.raw_ids[i] for i in history} & set(out["items"])
    assert all(s > float("-inf") for s in out["scores"])


def test_recommend_excludes_history_per_row(reference):
    model, _ = reference
    seq = torch.tensor([[0, 5, 6, 7], [0, 0, 9, 5]])
    scores, ids = model.recommend(seq, k=30, exclude_history=torch.tensor([True, False]))
    assert torch.equal(ids[0], model.recommend(seq[:1], k=30, exclude_history=True)[1][0])
    assert torch.equal(ids[1], model.recommend(seq[1:], k=30, exclude_history=False)[1][0])
    with pytest.raises(ValueError, match=r"exclude_history: expected a bool or a bool tensor of shape \[2\]"):
        model.recommend(seq, k=3, exclude_history=torch.tensor([True]))
    with pytest.raises(TypeError, match="exclude_history: expected a bool"):
        model.recommend(seq, k=3, exclude_history="yes")


# -- bad requests ----------------------------------------------------------------------

BAD = [
    ("/recommend", {"history": [], "k": 3}, 422, "history", "at least one item"),
    ("/recommend", {"history": ["1", "no-such-item"], "k": 3}, 422, "history", "'no-such-item'"),
    ("/recommend", {"history": ["1"] * (MAX_LEN + 1)}, 422, "history", f"max_len={MAX_LEN}"),
    ("/recommend", {"history": ["1"], "k": 0}, 422, "k", "got 0"),
    ("/recommend", {"history": ["1"], "k": 5000}, 422, "k", "got 5000"),
    ("/recommend", {"history": ["1"], "k": "ten"}, 422, "k", "'ten'"),
    ("/recommend", {"history": ["1"], "k": 2.5}, 422, "k", "2.5"),
    ("/recommend", {"history": [1.5]}, 422, "history[0]", "1.5"),
    ("/recommend", {"history": "1 2 3"}, 422, "history", "array"),  # JSON's word: pydantic validates the JSON itself
    ("/recommend", {"history": ["1"], "exclude_history": "maybe"}, 422, "exclude_history", "maybe"),
    ("/recommend", {"k": 3}, 422, "history", "required"),
    ("/recommend", {"history": ["1"], "kk": 3}, 422, "kk", "Extra"),
    ("/recommend", [1, 2], 422, "body", "an object"),
    ("/recommend", b'{"history": [1', 400, "body", "malformed JSON"),
    ("/recommend", b"", 422, "body", "empty body"),
    ("/recommend/batch", {"histories": [["1"], []]}, 422, "histories[1]", "at least one item"),
    ("/recommend/batch", {"histories": []}, 422, "histories", "got 0"),
    ("/recommend/batch", {"histories": [["1"], ["nope"]]}, 422, "histories[1]", "'nope'"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server, reference):
    _, catalog = reference
    with nodelay_client(server) as client:
        for path, body, status, field, words in BAD:
            if isinstance(body, bytes):
                r = client.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = client.post(path, json=body)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["field"] == field and words in error["message"], (body, error)
        # oversized bodies, announced (Content-Length) and streamed (chunked)
        big = b'{"history": [' + b",".join([b'"1"'] * 400_000) + b"]}"
        r = client.post("/recommend", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text
        r = client.post("/recommend", content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                        headers={"content-type": "application/json"})
        assert r.status_code == 413 and "chunked" in r.json()["error"]["message"], r.text
        r = client.get("/nowhere")
        assert r.status_code == 404 and r.json()["error"]["field"] == "path"
        history = raw_history(catalog, random.Random(1), 4)
        r = client.post("/recommend", json={"history": history, "k": 5})
        assert r.status_code == 200
        assert_same_answer(r.json(), expected(reference, history, 5, True))


# -- load ------------------------------------------------------------------------------


def test_load_16_clients_every_response_correct(server, reference):
    """16 concurrent clients x 100 requests (bounded; stops by itself). Reports
    p50/p99 latency and throughput; asserts correctness and that batches formed."""
    _, catalog = reference
    rng = random.Random(2)
    pool = [(raw_history(catalog, rng, rng.randint(1, MAX_LEN)), rng.choice([5, 10]), rng.random() < 0.5)
            for _ in range(48)]
    want = [expected(reference, h, k, e) for h, k, e in pool]
    clients, per_client = 16, 100

    def client_run(c):
        latencies, errors = [], []
        with nodelay_client(server, timeout=60) as client:
            for i in range(per_client):
                j = (c * 7 + i) % len(pool)
                history, k, exclude = pool[j]
                t0 = time.perf_counter()
                r = client.post("/recommend", json={"history": history, "k": k, "exclude_history": exclude})
                latencies.append(time.perf_counter() - t0)
                try:
                    assert r.status_code == 200, r.text
                    assert_same_answer(r.json(), want[j])
                except AssertionError as e:
                    errors.append(str(e)[:300])
        return latencies, errors

    before = httpx.get(server + "/info").json()["micro_batching"]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        runs = list(ex.map(client_run, range(clients)))
    wall = time.perf_counter() - t0
    after = httpx.get(server + "/info").json()["micro_batching"]
    latencies = sorted(x for lat, _ in runs for x in lat)
    errors = [e for _, errs in runs for e in errs]
    assert not errors, errors[:3]
    assert len(latencies) == clients * per_client
    p50, p99 = statistics.quantiles(latencies, n=100)[49], statistics.quantiles(latencies, n=100)[98]
    batches = after["batches"] - before["batches"]
    print(f"\nplr serve load test: {clients} clients x {per_client} requests in {wall:.2f} s = "
          f"{len(latencies) / wall:.0f} req/s; p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms; "
          f"{batches} forwards, mean batch {(after['requests'] - before['requests']) / batches:.1f}, "
          f"largest {after['largest_batch']}")
    assert after["requests"] - before["requests"] == clients * per_client
    assert after["largest_batch"] >= 2  # concurrent requests shared a forward


def test_sigterm_answers_open_requests_then_exits_0(checkpoint, reference):
    _, catalog = reference
    proc, url, log = start_server(checkpoint, "--max-wait-ms", "1000", "--batch-wait", "always")
    history = raw_history(catalog, random.Random(3), 5)
    clients = [nodelay_client(url, timeout=60) for _ in range(4)]
    try:
        for client in clients:  # connections open before the signal
            assert client.get("/health").status_code == 200
        with ThreadPoolExecutor(len(clients)) as ex:
            pending = [ex.submit(c.post, "/recommend", json={"history": history, "k": 3}) for c in clients]
            time.sleep(0.3)  # the requests are in: their batch waits up to 1 s for more
            assert not any(f.done() for f in pending)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result() for f in pending]
        assert proc.wait(60) == 0, "".join(log)
    finally:
        for client in clients:
            client.close()
        stop_server(proc)
    for r in answers:  # open when the signal came: answered before the exit
        assert r.status_code == 200 and len(r.json()["items"]) == 3
    assert any("stopped" in line for line in log), "".join(log)
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


# -- the micro-batcher alone -----------------------------------------------------------


def test_microbatcher_batches_routes_results_and_survives_a_failing_batch():
    calls = []

    def run_batch(xs):
        calls.append(list(xs))
        if "boom" in xs:
            raise RuntimeError("boom in batch")
        time.sleep(0.01)
        return [x * 2 for x in xs]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=20)
        await batcher.start()
        try:
            got = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
            assert got == [2 * i for i in range(20)]
            assert max(len(c) for c in calls) == 8 and all(len(c) <= 8 for c in calls)
            bad = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
            assert isinstance(bad[0], RuntimeError) and "boom" in str(bad[0])
            assert await batcher.submit(21) == 42  # still serving
        finally:
            await batcher.stop()
        lone = MicroBatcher(run_batch, max_batch=1, max_wait_ms=20)
        await lone.start()
        try:
            calls.clear()
            assert await asyncio.gather(*(lone.submit(i) for i in range(5))) == [0, 2, 4, 6, 8]
            assert [len(c) for c in calls] == [1] * 5
        finally:
            await lone.stop()

    asyncio.run(scenario())


def test_microbatcher_adaptive_wait_answers_a_lone_client_at_once_and_batches_concurrent_ones():
    """wait="adaptive": no wait after a batch of one (a lone client never pays
    max_wait_ms), the full wait after a batch of several; "always" waits every time."""
    calls = []

    def run_batch(xs):
        calls.append(list(xs))
        return list(xs)

    async def lone_client(wait):
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=300, wait=wait)
        await batcher.start()
        try:
            t0 = time.perf_counter()
            for i in range(3):
                assert await batcher.submit(i) == i
            return time.perf_counter() - t0
        finally:
            await batcher.stop()

    assert asyncio.run(lone_client("adaptive")) < 0.3  # three answers, none waited 300 ms
    assert asyncio.run(lone_client("always")) >= 0.9  # each of the three waited

    async def concurrent():
        batcher = MicroBatcher(run_batch, max_batch=8, max_wait_ms=300, wait="adaptive")
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(4)))  # queued together: one batch, no wait
            t0 = time.perf_counter()
            first = asyncio.ensure_future(batcher.submit("a"))
            await asyncio.sleep(0.05)  # the last batch held 4: this one waits for more
            second = asyncio.ensure_future(batcher.submit("b"))
            assert await asyncio.gather(first, second) == ["a", "b"]
            return time.perf_counter() - t0
        finally:
            await batcher.stop()

    calls.clear()
    waited = asyncio.run(concurrent())
    assert calls == [[0, 1, 2, 3], ["a", "b"]] and waited >= 0.3


@pytest.mark.parametrize("kwargs,match", [({"max_batch": 0}, "max_batch"), ({"max_wait_ms": -1}, "max_wait_ms"),
                                          ({"max_batch": True}, "max_batch"), ({"wait": "never"}, "wait")])
def test_microbatcher_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MicroBatcher(lambda xs: xs, **kwargs)


@pytest.mark.parametrize("threads", [0, -2, True, 1.5])
def test_serve_refuses_a_bad_thread_count_before_loading_anything(threads, tmp_path):
    from plr.serving.app import serve

    with pytest.raises(ValueError, match=r"threads: expected an int >= 1, got"):
        serve(str(tmp_path / "no-such-checkpoint.pt"), threads=threads)
