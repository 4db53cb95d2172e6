"""Micro-batching of concurrent requests: one model call for many requests.

Requests are queued; a single worker task takes the first one waiting, then
keeps collecting for at most ``max_wait_ms`` or until ``max_batch`` requests,
runs ``run_batch`` on all of them in one call (in a worker thread, so the
event loop keeps accepting connections), and answers each request with its
own result. Under load the queue refills while a batch runs, so batches grow
with the number of concurrent clients and throughput with them. ``max_batch=1``
serves one request at a time (the baseline the benchmark compares with).

When a batch waits: ``wait="always"``: every batch waits up to ``max_wait_ms``
after its first request, so a lone client pays that wait on every request.
``wait="adaptive"`` (the default): a batch waits only when the previous one
held more than one request, i.e. while concurrent clients are seen; a lone
client is answered at once, and under load the batches fill as with
``"always"``. Requests already queued are always taken without waiting.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    largest: int = 0
    sizes: List[int] = field(default_factory=list, repr=False)  # the last few batch sizes

    def record(self, size: int) -> None:
        self.batches += 1
        self.requests += size
        self.largest = max(self.largest, size)
        self.sizes = (self.sizes + [size])[-256:]


class MicroBatcher:
    """``await batcher.submit(x)`` -> ``run_batch([..., x, ...])[i]``.

    Args:
        run_batch: ``list of payloads -> list of results`` (same length and
            order); called in one worker thread, one batch at a time. If it
            raises, every request of that batch gets the exception.
        max_batch: most payloads per call (>= 1).
        max_wait_ms: longest a batch waits for more requests after its first (>= 0).
        wait: ``"adaptive"`` (wait only after a batch of more than one
            request) or ``"always"``.
    """

    WAITS = ("adaptive", "always")

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 64,
                 max_wait_ms: float = 2.0, wait: str = "adaptive"):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms: expected a number >= 0, got {max_wait_ms!r}")
        if wait not in self.WAITS:
            raise ValueError(f"wait: expected one of {self.WAITS}, got {wait!r}")
        self.wait = wait
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1e3
        self.stats = BatchStats()
        self._queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    async def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("MicroBatcher.start: already started")
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plr-model")
        self._worker = asyncio.create_task(self._run(), name="plr-microbatcher")

    async def stop(self) -> None:
        """Stop the worker; requests still queued or in its batch get an error.
        (uvicorn calls this after its graceful shutdown answered the open requests.)"""
        if self._worker is None:
            return
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)
        self._worker = self._queue = self._executor = None

    async def submit(self, payload: Any) -> Any:
        if self._worker is None:
            raise RuntimeError("MicroBatcher.submit: not started (call start() first)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((payload, future))
        return await future

    async def _collect(self) -> list:
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        concurrent = self.wait == "always" or (self.stats.sizes and self.stats.sizes[-1] > 1)
        deadline = loop.time() + (self.max_wait if concurrent else 0.0)
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # already waiting: take without yielding
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(p, f) for p, f in batch if not f.done()]  # a client may have gone
            if not live:
                continue
            self.stats.record(len(live))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [p for p, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch: expected {len(live)} results, got {len(results)}")
            except asyncio.CancelledError:
                for _, f in live:
                    if not f.done():
                        f.set_exception(RuntimeError("the server is shutting down"))
                raise
            except Exception as e:  # the batch failed: every request in it learns why
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(live, results):
                if not f.done():
                    f.set_result(r)
