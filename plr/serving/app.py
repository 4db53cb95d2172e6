"""``plr serve``: a checkpoint behind HTTP (FastAPI on uvicorn), with micro-batching.

    POST /recommend        {"history": [raw ids, oldest first], "k": 10, "exclude_history": true}
                        -> {"items": [raw ids], "scores": [...], "titles": [...]}
    POST /recommend/batch  {"histories": [[...], ...], "k": 10, "exclude_history": true}
                        -> {"results": [{"items", "scores", "titles"}, ...]}
    GET  /health        -> {"status": "ok"}
    GET  /info          -> model class, dataset, item count, max_len, config, micro-batching

Every history of every request goes through one MicroBatcher, so concurrent
requests share one forward. A refused request gets a 4xx JSON body
``{"error": {"field": ..., "message": ...}}``: 400 malformed JSON, 413 a
body over ``max_body_bytes``, 422 anything else wrong (unknown item ids,
empty or too long histories, bad k, wrong types, unknown fields).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import sys
from typing import Annotated, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .microbatch import MicroBatcher
from .recommender import Recommender, RequestError

def _raw_id(value):
    """An item id as JSON sends it: a string or an integer, compared as a string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("expected an item id (a string or an integer)")
    return str(value)


RawId = Annotated[str, BeforeValidator(_raw_id)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: List[RawId] = Field(description="raw item ids, oldest first (at most the model's max_len)")
    k: StrictInt = 10
    exclude_history: StrictBool = True


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    histories: List[List[RawId]]
    k: StrictInt = 10
    exclude_history: StrictBool = True


class Recommendation(BaseModel):
    items: List[str]
    scores: List[float]
    titles: List[str]


class BatchResponse(BaseModel):
    results: List[Recommendation]


async def _parse(request: Request, schema: type) -> BaseModel:
    """The request body as ``schema``, parsed and validated in one pass by
    pydantic-core (``model_validate_json``) instead of FastAPI's body
    dependency (Python ``json.loads``, then validation field by field): less
    work per request on the event loop, which every request goes through.
    Errors take the same route as FastAPI's own (the RequestValidationError
    handler)."""
    raw = await request.body()
    if not raw.strip():
        raise RequestError("body", "expected a JSON object, got an empty body")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _request_body(schema: type) -> dict:
    """The OpenAPI entry of a body that ``_parse`` reads (FastAPI cannot see it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status)


def _field_name(loc) -> str:
    """pydantic's ``("body", "histories", 2, 0)`` -> ``"histories[2][0]"``."""
    parts = [p for p in loc if p != "body"]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or "body"


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, by its
    Content-Length or, when chunked, counted as it arrives (the body is then
    read here, at most ``max_bytes``, and handed on in one piece)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, got: str) -> JSONResponse:
        return _error(413, "body", f"expected a body of at most {self.max_bytes} bytes, got {got}")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._too_large(f"Content-Length {length.decode(errors='replace')}")(
                    scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._too_large("more (chunked)")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        return await self.app(scope, replay, send)


def create_app(recommender: Recommender, max_batch: int = 64, max_wait_ms: float = 2.0,
               max_body_bytes: int = 1 << 20, max_batch_request: int = 1024, wait: str = "adaptive") -> FastAPI:
    """The FastAPI app serving ``recommender``; the micro-batcher (``max_batch``,
    ``max_wait_ms``, ``wait``: see MicroBatcher) lives with the app's lifespan."""
    batcher = MicroBatcher(recommender.run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, wait=wait)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="plr serve", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def _refused(_request: Request, e: RequestError):
        return _error(e.status, e.field, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, e: StarletteHTTPException):
        return _error(e.status_code, "path" if e.status_code in (404, 405) else "body", str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", first["msg"])
            return _error(400, "body", f"expected a JSON object, got malformed JSON ({why})")
        field = _field_name(first.get("loc", ()))
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."
        if first.get("type") == "missing":
            message = "expected a JSON object, got an empty body" if field == "body" else first["msg"]
        else:
            message = f"{first['msg']}, got {got}"
        return _error(422, field, message)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        stats = batcher.stats
        return {**recommender.info, "max_k": recommender.max_k,
                "micro_batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "wait": wait,
                                   "batches": stats.batches,
                                   "requests": stats.requests, "largest_batch": stats.largest}}

    # The handlers return their JSON directly: Recommender.run_batch builds the
    # results in the declared shape, so validating them again against
    # response_model (kept for the OpenAPI schema) would repeat work per request.
    @app.post("/recommend", response_model=Recommendation, openapi_extra=_request_body(RecommendRequest))
    async def recommend(request: Request):
        body = await _parse(request, RecommendRequest)
        return JSONResponse(await batcher.submit(recommender.query(body.history, body.k, body.exclude_history)))

    @app.post("/recommend/batch", response_model=BatchResponse, openapi_extra=_request_body(BatchRequest))
    async def recommend_batch(request: Request):
        body = await _parse(request, BatchRequest)
        if not 1 <= len(body.histories) <= max_batch_request:
            raise RequestError("histories", f"expected 1 to {max_batch_request} histories, "
                                            f"got {len(body.histories)}")
        queries = [recommender.query(h, body.k, body.exclude_history, field=f"histories[{i}]")
                   for i, h in enumerate(body.histories)]
        return JSONResponse({"results": await asyncio.gather(*(batcher.submit(q) for q in queries))})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_threads() -> int:
    """Intra-op threads of the model: all cores but one, which the HTTP event
    loop keeps. (Measured on the project's 2-core CPU: with 2 threads the idle
    OpenMP workers compete with the event loop and one request of a d=64 PLR
    took 4.7 ms, with 1 thread 1.75 ms; benchmarks/RESULTS.md, issue 15.)"""
    return max(1, (os.cpu_count() or 1) - 1)


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          max_wait_ms: float = 2.0, device: str = "cpu", max_body_bytes: int = 1 << 20, log_level: str = "warning",
          threads: Optional[int] = None, wait: str = "adaptive") -> int:
    """Load ``checkpoint`` and serve it until SIGINT/SIGTERM (graceful: open
    requests are answered first). ``port=0`` picks a free port; the URL is
    printed once the socket is bound. ``threads``: the model's intra-op
    threads (``torch.set_num_threads``; default ``default_threads()``)."""
    import torch
    import uvicorn

    from .recommender import load_recommender

    threads = default_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads!r}")
    torch.set_num_threads(threads)

    if not is_loopback(host):
        print(f"plr serve: warning: --host {host} is not a loopback address; the server has no authentication",
              file=sys.stderr)
    recommender = load_recommender(checkpoint, device=device)
    app = create_app(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes,
                     wait=wait)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # Accepted connections inherit TCP_NODELAY on Linux: without it the body of a
        # response on a kept-alive connection waits for the client's delayed ACK of
        # its headers (~40 ms per request).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    bound_port = sock.getsockname()[1]
    print(f"plr serve: {recommender.info['model']} ({recommender.info['num_items']} items, {threads} model "
          f"thread{'s' * (threads > 1)}) on http://{host}:{bound_port}", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down; ignore
    # that second delivery so a SIGTERM ends the process with status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("plr serve: stopped", flush=True)
    return 0
