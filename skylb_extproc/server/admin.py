"""Admin HTTP (aiohttp): /metrics, /healthz, /readyz, /state, /peer/state.

- /healthz: 200 while the process serves (liveness; also during a graceful stop).
- /readyz: 200 when at least one replica is healthy and the server is not stopping, else 503.
- /state: the router's view as JSON (region, policy, queue, per-replica load and scrape values,
  and each peer as we see it).
- /peer/state: the summary peers poll (queue length, available and healthy replicas, in-flight
  per replica, dispatch rate, UNIX timestamp), only with a valid `x-skylb-auth` header
  (region/marker.py); otherwise 401 `{"error": "unauthorized"}` and nothing else.
Bound to 127.0.0.1 by default: /state and /metrics describe the fleet. /peer/state is meant to
be reached by peers, through the peer Envoy listener or a bind address of their network.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from skylb_extproc.region.marker import AUTH_HEADER
from skylb_extproc.server.driver import Driver
from skylb_extproc.server.metrics import ServerMetrics

_DRIVER: web.AppKey[Driver] = web.AppKey("driver", Driver)
_METRICS: web.AppKey[ServerMetrics] = web.AppKey("metrics", ServerMetrics)


def healthy_replicas(state: Mapping[str, object]) -> int:
    replicas = state.get("replicas")
    if not isinstance(replicas, list):
        return 0
    return sum(1 for r in replicas if isinstance(r, Mapping) and r.get("healthy"))


def ready(state: Mapping[str, object]) -> bool:
    """At least one healthy replica and not shutting down."""
    return not state.get("shutting_down") and healthy_replicas(state) > 0


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_METRICS].render()
    # CONTENT_TYPE_LATEST carries a charset parameter, which aiohttp wants as a header instead.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[_DRIVER].state()
    ok = ready(state)
    body = {
        "ready": ok,
        "healthy_replicas": healthy_replicas(state),
        "shutting_down": state.get("shutting_down"),
    }
    return web.json_response(body, status=200 if ok else 503)


async def _state(request: web.Request) -> web.Response:
    state = request.app[_DRIVER].state()
    return web.json_response(state, dumps=_dumps)


async def _peer_state(request: web.Request) -> web.Response:
    body = request.app[_DRIVER].peer_state(request.headers.get(AUTH_HEADER))
    if body is None:
        return web.json_response({"error": "unauthorized"}, status=401)
    return web.json_response(body)


def _dumps(value: object) -> str:
    return json.dumps(value, default=str, sort_keys=False)


def make_admin_app(driver: Driver, metrics: ServerMetrics) -> web.Application:
    app = web.Application()
    app[_DRIVER] = driver
    app[_METRICS] = metrics
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/state", _state)
    app.router.add_get("/peer/state", _peer_state)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0 = a free port); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)
