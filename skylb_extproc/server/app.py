"""Wiring of one skylb server: config -> Router -> Driver -> grpc.aio servicer + health, admin
HTTP, scrapers; and its graceful stop.

Stop sequence (SIGTERM/SIGINT, or the `stop` event): gRPC health turns NOT_SERVING (so Envoy's
health checks move traffic away), queued requests are rejected with 503 and later decisions too.
The gRPC server keeps accepting streams meanwhile, so a request that still arrives gets skylb's
JSON 503 rather than the 500 Envoy answers when ext_proc refuses the stream, and open streams
finish (with `response_trailer_mode: SEND` a stream lives as long as its HTTP response). That
lasts until no stream has been open for `DRAIN_QUIET_S` (Envoy has stopped sending: health
checks moved it away, or there is no traffic) or `shutdown_grace_s` ends; then the gRPC server
cuts what is left, and everything else closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from skylb_extproc.config import Config, split_host_port
from skylb_extproc.region.build import build_balancer, build_router
from skylb_extproc.region.config import read_secret
from skylb_extproc.server.admin import make_admin_app, start_admin
from skylb_extproc.server.driver import Driver
from skylb_extproc.server.metrics import ServerMetrics
from skylb_extproc.server.peering import Peering
from skylb_extproc.server.peers import PeerPoller
from skylb_extproc.server.scrape import Scraper
from skylb_extproc.server.servicer import ExtProcServicer

log = logging.getLogger(__name__)

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)
MIN_MESSAGE_BYTES = 64 * 1024 * 1024
DRAIN_POLL_S = 0.05  # how often a graceful stop looks at the streams
DRAIN_QUIET_S = 1.0  # a graceful stop ends once no stream has been open this long

ReadyCallback = Callable[[dict[str, int]], None]


def grpc_options(config: Config) -> list[tuple[str, int]]:
    # grpcio's 4 MiB default turns large duplex chunks / buffered bodies into 500s (measured).
    size = max(MIN_MESSAGE_BYTES, config.limits.max_body_bytes + 1024 * 1024)
    return [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # Linux grpc sets SO_REUSEPORT by default: a second server on our port would silently
        # share the traffic (and the routing state would be split) instead of failing.
        ("grpc.so_reuseport", 0),
    ]


__all__ = ["RunningServer", "build_router", "grpc_options", "run_server", "start_server"]


@dataclass
class RunningServer:
    """The parts of a started server; `ports` holds the bound gRPC and admin ports."""

    driver: Driver
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    admin: web.AppRunner
    scraper: Scraper
    ports: dict[str, int]
    poller: PeerPoller | None = None

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, for good
        self.driver.shutdown()
        log.info("stopping: %d streams open, grace %.1fs", self.driver.streams_active, grace_s)
        await self._drain(grace_s)
        await self.grpc_server.stop(0)
        await self.scraper.close()
        if self.poller is not None:
            await self.poller.close()
        self.driver.close()
        await self.admin.cleanup()

    async def _drain(self, grace_s: float) -> None:
        """Wait until no stream has been open for DRAIN_QUIET_S, at most `grace_s`."""
        now = time.monotonic()
        deadline, quiet_since, seen = now + grace_s, now, self.driver.streams_opened
        while now < deadline and now - quiet_since < DRAIN_QUIET_S:
            await asyncio.sleep(DRAIN_POLL_S)
            now = time.monotonic()
            if self.driver.streams_active or self.driver.streams_opened != seen:
                quiet_since, seen = now, self.driver.streams_opened


async def start_server(config: Config) -> RunningServer:
    """Start everything (ports 0 in the config are picked here); stop with `RunningServer.stop`."""
    metrics = ServerMetrics(policy=config.policy.name)
    peering = _peering(config)
    driver = Driver(build_balancer(config), region=config.region, metrics=metrics, peering=peering)
    grpc_server, health_servicer, grpc_port = await _start_grpc(config, driver)
    admin_host, admin_port = split_host_port(
        config.listen.admin, "listen.admin", allow_port_zero=True
    )
    try:
        runner, admin_port = await start_admin(
            make_admin_app(driver, metrics), admin_host, admin_port
        )
    except BaseException:
        await grpc_server.stop(0)
        raise
    scraper = Scraper(
        config.replicas,
        interval_s=config.scrape.interval_s,
        timeout_s=config.scrape.timeout_s,
        sink=driver.on_scrape,
        clock=driver.now,
    )
    await scraper.start()
    poller = await _start_poller(config, driver, peering)
    ports = {"grpc": grpc_port, "admin": admin_port}
    log.info("serving %s on %s", config.summary(), ports)
    return RunningServer(driver, grpc_server, health_servicer, runner, scraper, ports, poller)


def _peering(config: Config) -> Peering:
    """The secret is read here, at start (check-config read it too, to fail early)."""
    secret = None if config.secret_file is None else read_secret(config.secret_file)
    return Peering(
        config.region,
        secret,
        clusters={p.name: p.cluster for p in config.peers},
        max_skew_s=config.spill.marker_max_skew_s,
    )


async def _start_poller(config: Config, driver: Driver, peering: Peering) -> PeerPoller | None:
    if not config.peers or peering.secret is None:
        return None
    poller = PeerPoller(
        config.peers,
        secret=peering.secret,
        interval_s=config.spill.poll_interval_s,
        timeout_s=config.spill.stale_after_s,
        sink=driver.on_peer_summary,
        clock=driver.now,
        wall_clock=time.time,
    )
    await poller.start()
    return poller


async def _start_grpc(
    config: Config, driver: Driver
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server(options=grpc_options(config))
    servicer = ExtProcServicer(
        driver,
        max_body_bytes=config.limits.max_body_bytes,
        tenant_header=config.residency.tenant_header,
    )
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(config.listen.grpc)
    except RuntimeError as exc:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot bind gRPC to {config.listen.grpc}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot bind gRPC to {config.listen.grpc}")
    await server.start()
    for service in HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port


async def run_server(
    config: Config, *, ready: ReadyCallback | None = None, stop: asyncio.Event | None = None
) -> None:
    """Serve until `stop` is set (default: until SIGTERM/SIGINT), then stop gracefully.

    `ready` gets {"grpc": port, "admin": port} once serving; by default that is printed as one
    JSON line on stdout, which is how launchers learn the ports picked for port 0.
    """
    with _signal_event(stop) as stop_event:
        server = await start_server(config)
        try:
            (ready or _print_ports)(dict(server.ports))
            await stop_event.wait()
        finally:
            await server.stop(config.shutdown_grace_s)
    log.info("stopped")


def _print_ports(ports: dict[str, int]) -> None:
    print(json.dumps(ports), flush=True)


@contextlib.contextmanager
def _signal_event(stop: asyncio.Event | None) -> Iterator[asyncio.Event]:
    """The caller's stop event, or one set by SIGTERM/SIGINT (handlers removed afterwards)."""
    if stop is not None:
        yield stop
        return
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, event.set)
    try:
        yield event
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
