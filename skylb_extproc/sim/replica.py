"""The online simulated vLLM replica: vLLM's OpenAI HTTP API over the sans-I/O engine.

One `ReplicaEngine` (`sim/model.py`) per server, driven in scaled wall time: engine time is
`(loop.time() - start) * time_scale` seconds, so `time_scale` 10 runs ten times faster than a real
GPU. A driver task sleeps until the in-progress step ends (or a request arrives or leaves), then
advances the engine and hands each request its events through a queue.

Endpoints, as vLLM's OpenAI server: POST /v1/completions and /v1/chat/completions (JSON or SSE),
GET /v1/models, /health, /metrics (Prometheus text, vLLM V1 names and labels, a private
CollectorRegistry). Every response carries `x-inference-pod: <name>` (as llm-d-inference-sim).

Deliberate choices (see also `sim/openai_format.py`):
- Any model name is accepted and echoed back unless `served_model_name` is given; then another
  name is answered 404 `NotFoundError`, as vLLM does.
- Streaming response headers are sent as soon as the request is accepted, before it may queue,
  as real vLLM (FastAPI StreamingResponse) does; the balancer must not read them as "service
  started". `headers_on_accept=False` delays them to the first token instead (SGLang-like).
- A client that disconnects (aiohttp handler cancellation) is cancelled in the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from skylb_extproc.sim import openai_format as fmt
from skylb_extproc.sim.kvcache import estimate_tokens
from skylb_extproc.sim.model import (
    EngineMetrics,
    Finished,
    FirstToken,
    ReplicaEngine,
    SimEvent,
    Tokens,
)
from skylb_extproc.sim.profiles import PROFILES, Profile, override
from skylb_extproc.sim.vllm_metrics import VllmCollector

POD_HEADER = "x-inference-pod"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SimReplica:
    """One simulated replica: the engine, its driver task and the aiohttp application."""

    def __init__(
        self,
        *,
        name: str,
        profile: Profile,
        time_scale: float = 1.0,
        served_model_name: str | None = None,
        headers_on_accept: bool = True,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.name = name
        self.profile = profile
        self.engine = ReplicaEngine(profile, name, output_text=fmt.filler_text)
        self.model = served_model_name or profile.model
        self._strict_model = served_model_name is not None
        self._headers_on_accept = headers_on_accept
        self._scale = time_scale
        self._origin = asyncio.get_running_loop().time()
        self._queues: dict[str, asyncio.Queue[SimEvent]] = {}
        self._wake = asyncio.Event()
        self._seq = 0
        self.registry = CollectorRegistry()
        self.registry.register(VllmCollector(self))

    def now(self) -> float:
        """Engine (virtual) time."""
        return (asyncio.get_running_loop().time() - self._origin) * self._scale

    # --- engine driving -----------------------------------------------------------------------

    async def drive(self) -> None:
        """Run the engine in scaled real time until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self._pump()
            end = self.engine.next_event_time()
            self._wake.clear()
            timer = None
            if end is not None:
                timer = loop.call_later(max(0.0, (end - self.now()) / self._scale), self._wake.set)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _pump(self) -> None:
        for event in self.engine.advance(self.now()):
            queue = self._queues.get(event.request_id)
            if queue is None:
                continue
            queue.put_nowait(event)
            if isinstance(event, Finished):
                del self._queues[event.request_id]

    def _submit(self, req: fmt.SimRequest) -> tuple[str, asyncio.Queue[SimEvent]]:
        self._seq += 1
        rid = str(self._seq)
        self.engine.add(rid, req.prompt, req.max_tokens, self.now())
        queue: asyncio.Queue[SimEvent] = asyncio.Queue()
        self._queues[rid] = queue
        self._wake.set()
        return rid, queue

    def _release(self, rid: str) -> None:
        """Forget a request whose client is gone (no-op once it finished)."""
        if self._queues.pop(rid, None) is not None:
            self.engine.cancel(rid, self.now())
            self._wake.set()

    def metrics(self) -> EngineMetrics:
        self._pump()
        self._wake.set()
        return self.engine.reported_metrics()

    # --- HTTP -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.on_response_prepare.append(self._tag)
        return app

    async def _tag(self, _request: web.Request, response: web.StreamResponse) -> None:
        response.headers[POD_HEADER] = self.name

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, fmt.COMPLETION, "cmpl-")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, fmt.CHAT, "chatcmpl-")

    async def _generate(self, request: web.Request, kind: str, prefix: str) -> web.StreamResponse:
        if request.content_type != "application/json":
            raise fmt.ApiError(
                400,
                "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                "Bad Request",
            )
        raw = await request.read()
        limit = self.profile.max_model_len
        req = fmt.parse_request(
            kind,
            raw,
            served_model=self.model,
            strict_model=self._strict_model,
            max_model_len=limit,
        )
        tokens = estimate_tokens(req.prompt)
        fmt.check_prompt_length(tokens, limit)
        # vLLM stops at max_model_len instead of refusing a too-large max_tokens.
        req = replace(req, max_tokens=min(req.max_tokens, limit - tokens))
        try:
            self.engine.validate(req.prompt, req.max_tokens)
        except ValueError as exc:
            raise fmt.bad_request(str(exc)) from None
        response_id = prefix + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        created = int(time.time())
        if self.profile.ingest_ms > 0:
            await asyncio.sleep(self.profile.ingest_ms / 1000.0 / self._scale)
        rid, queue = self._submit(req)
        try:
            if req.stream:
                return await self._stream(request, req, queue, response_id, created)
            return await self._unary(req, queue, response_id, created)
        finally:
            self._release(rid)

    async def _unary(
        self, req: fmt.SimRequest, queue: asyncio.Queue[SimEvent], response_id: str, created: int
    ) -> web.Response:
        while not isinstance(event := await queue.get(), Finished):
            pass
        usage = self._usage(event)
        text = fmt.filler_text(0, event.completion_tokens)
        body = fmt.full_body(req, response_id, created, text, usage)
        return web.Response(body=body, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        req: fmt.SimRequest,
        queue: asyncio.Queue[SimEvent],
        response_id: str,
        created: int,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        if self._headers_on_accept:
            await response.prepare(request)
        sent = 0
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            if not response.prepared:
                await response.prepare(request)
            new = sum(_token_count(e) for e in batch)
            end = next((e for e in batch if isinstance(e, Finished)), None)
            text = fmt.filler_text(sent, new)
            out = fmt.stream_chunks(
                req, response_id, created, first=sent == 0, text=text, last=end is not None
            )
            sent += new
            if end is not None:
                if req.include_usage:
                    usage = self._usage(end)
                    out.append(fmt.usage_chunk(req, response_id, created, usage))
                out.append(fmt.DONE)
            await response.write(b"".join(out))
            if end is not None:
                await response.write_eof()
                return response

    def _usage(self, end: Finished) -> fmt.Usage:
        full = end.prompt_tokens // self.profile.block_size * self.profile.block_size
        created = max(0, full - end.cached_tokens)
        return fmt.Usage(end.prompt_tokens, end.completion_tokens, end.cached_tokens, created)

    async def _models(self, _request: web.Request) -> web.Response:
        card = {"id": self.model, "object": "model", "created": int(time.time())}
        card.update(owned_by="vllm", root=self.model, parent=None)
        card.update(max_model_len=self.profile.max_model_len, permission=[])
        body = fmt.dumps({"object": "list", "data": [card]})
        return web.Response(body=body, content_type="application/json")

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)  # the classic text format, as vLLM serves it
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})


def _token_count(event: SimEvent) -> int:
    if isinstance(event, Tokens):
        return event.n
    return 1 if isinstance(event, FirstToken) else 0


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """vLLM's JSON errors: ErrorResponse for API errors, FastAPI's {"detail"} for routing."""
    try:
        return await handler(request)
    except fmt.ApiError as exc:
        return web.Response(status=exc.status, body=exc.body(), content_type="application/json")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        body = fmt.dumps({"detail": exc.reason})
        # 405 names the allowed methods, as Starlette does
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.Response(
            status=exc.status, body=body, content_type="application/json", headers=headers
        )


async def serve_replica(
    *,
    host: str,
    port: int,
    name: str,
    profile: str,
    time_scale: float = 1.0,
    ready: Callable[[int], None] | None = None,
    served_model_name: str | None = None,
    headers_on_accept: bool = True,
    block_size: int | None = None,
    max_num_seqs: int | None = None,
) -> None:
    """Serve one simulated replica until cancelled; port 0 picks a free port, given to `ready`.

    block_size / max_num_seqs override the profile's, as vLLM's flags of the same names do.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(sorted(PROFILES))}")
    replica = SimReplica(
        name=name,
        profile=override(PROFILES[profile], block_size=block_size, max_num_seqs=max_num_seqs),
        time_scale=time_scale,
        served_model_name=served_model_name,
        headers_on_accept=headers_on_accept,
    )
    # Handler cancellation turns a client disconnect into CancelledError -> engine.cancel.
    runner = web.AppRunner(
        replica.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if ready is not None:
            ready(int(runner.addresses[0][1]))
        await replica.drive()
    finally:
        await runner.cleanup()


def main_sim_replica(args: argparse.Namespace) -> int:
    """CLI: print `{"name", "port"}` as one JSON line once listening; stop on SIGINT/SIGTERM."""

    def ready(bound: int) -> None:
        print(json.dumps({"name": args.name, "port": bound}), flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = asyncio.create_task(
            serve_replica(
                host=args.host,
                port=args.port,
                name=args.name,
                profile=args.profile,
                time_scale=args.time_scale,
                ready=ready,
                served_model_name=getattr(args, "served_model_name", None),
                headers_on_accept=not getattr(args, "headers_at_first_token", False),
                block_size=getattr(args, "block_size", None),
                max_num_seqs=getattr(args, "max_num_seqs", None),
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not server.done():
            server.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server  # re-raises a startup error (bad profile, port in use)

    try:
        asyncio.run(run())
    except (ValueError, OSError) as exc:
        print(f"sim-replica: {exc}", file=sys.stderr)
        return 2
    return 0
