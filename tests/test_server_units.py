"""server/metrics.py and server/driver.py in isolation (a scripted router, no sockets)."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, cast

import prometheus_client
import pytest

from skylb_extproc.policy.base import make_policy
from skylb_extproc.region.balancer import RegionBalancer
from skylb_extproc.router import Router, RouterSettings
from skylb_extproc.server.admin import ready
from skylb_extproc.server.driver import Driver
from skylb_extproc.server.metrics import ServerMetrics
from skylb_extproc.state.speed import Speed
from skylb_extproc.types import (
    Dispatch,
    Outcome,
    Reject,
    ReplicaSpec,
    Route,
    RouteRequest,
    ScrapedMetrics,
)


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_each_server_has_its_own_registry() -> None:
    a, b = ServerMetrics(policy="skylb"), ServerMetrics(policy="skylb")
    a.decided(Outcome.ROUTED, latency_s=0.001)
    assert sample(a, "skylb_decisions_total", policy="skylb", outcome="routed") == 1.0
    assert sample(b, "skylb_decisions_total", policy="skylb", outcome="routed") == 0.0
    assert prometheus_client.REGISTRY.get_sample_value("skylb_decisions_total") is None


def test_prefix_hit_ratio_weights_by_prompt_length() -> None:
    metrics = ServerMetrics(policy="skylb")
    metrics.matched(1.0, 100)
    metrics.matched(0.0, 300)
    metrics.matched(0.5, 0)  # no prompt: not a prefix observation
    assert sample(metrics, "skylb_prefix_hit_ratio") == 0.25
    assert sample(metrics, "skylb_prefix_matched_fraction_count") == 2.0


def test_state_gauges_read_the_source_at_collection() -> None:
    state: dict[str, object] = {"queue_length": 2, "replicas": []}
    metrics = ServerMetrics(policy="p", state_source=lambda: state)
    assert sample(metrics, "skylb_queue_length") == 2.0
    state["replicas"] = [{"name": "r0", "in_flight": 3, "available": False, "healthy": True}]
    assert sample(metrics, "skylb_replica_in_flight", replica="r0") == 3.0
    assert sample(metrics, "skylb_replica_available", replica="r0") == 0.0
    assert sample(metrics, "skylb_replica_healthy", replica="r0") == 1.0
    assert b"skylb_replica_in_flight" in metrics.render()


@dataclass
class ScriptedRouter:
    """Answers each call from a script; records the calls and their `now`."""

    deadline: float | None = None
    on_request_result: list[Dispatch] = field(default_factory=list)
    on_timer_result: list[Dispatch] = field(default_factory=list)
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def on_request(self, request: RouteRequest, now: float) -> list[Dispatch]:
        self.calls.append(("request", request.request_id))
        return self.on_request_result

    def on_finished(self, request_id: str, now: float) -> list[Dispatch]:
        self.calls.append(("finished", request_id))
        return []

    def on_scrape(
        self, replica: str, metrics: ScrapedMetrics | None, *, started_at: float, now: float
    ) -> list[Dispatch]:
        self.calls.append(("scrape", (replica, metrics, started_at)))
        return []

    def on_timer(self, now: float) -> list[Dispatch]:
        self.calls.append(("timer", now))
        self.deadline = None
        return self.on_timer_result

    def shutdown(self, now: float) -> list[Dispatch]:
        self.calls.append(("shutdown", now))
        return []

    def next_deadline(self) -> float | None:
        return self.deadline

    def state(self, now: float) -> dict[str, object]:
        return {"replicas": [], "queue_length": 0, "policy": "scripted"}


def make_driver(router: ScriptedRouter) -> tuple[Driver, ServerMetrics]:
    metrics = ServerMetrics(policy="scripted")
    return Driver(cast(Any, router), region="eu", metrics=metrics), metrics


async def test_immediate_route_resolves_at_once_and_ids_are_ours() -> None:
    router = ScriptedRouter()
    driver, metrics = make_driver(router)
    request_id = driver.new_request_id()
    assert (request_id, driver.new_request_id()) == ("eu-1", "eu-2")
    route = Route("r0", "10.0.0.1:80")
    router.on_request_result = [Dispatch(request_id, route, matched_fraction=0.5)]
    future = driver.submit(RouteRequest(request_id, "/v1/completions", prompt="x" * 10))
    assert future.done() and future.result() == route
    assert sample(metrics, "skylb_decisions_total", policy="scripted", outcome="routed") == 1.0
    assert sample(metrics, "skylb_prefix_hit_ratio") == 0.5


async def test_timer_fires_at_the_router_deadline_and_resolves() -> None:
    router = ScriptedRouter()
    driver, metrics = make_driver(router)
    request = RouteRequest(driver.new_request_id(), "/v1/completions")
    router.deadline = driver.now() + 0.05
    reject = Reject(503, Outcome.DEADLINE, "late")
    router.on_timer_result = [Dispatch(request.request_id, reject, waited_s=0.05)]
    decision = await asyncio.wait_for(driver.decide(request), 2.0)
    assert decision == reject
    assert [c[0] for c in router.calls] == ["request", "timer"]
    assert sample(metrics, "skylb_queue_wait_seconds_count") == 1.0
    driver.close()


async def test_finishing_a_waiting_request_counts_it_cancelled() -> None:
    router = ScriptedRouter()
    driver, metrics = make_driver(router)
    request = RouteRequest(driver.new_request_id(), "/v1/completions")
    future = driver.submit(request)
    assert not future.done()
    driver.on_finished(request.request_id)
    driver.on_finished(request.request_id)  # idempotent: counted once
    assert future.cancelled()
    assert sample(metrics, "skylb_decisions_total", policy="scripted", outcome="cancelled") == 1.0
    assert router.calls[-1] == ("finished", request.request_id)


async def test_shutdown_rejects_later_requests_without_asking_the_router() -> None:
    router = ScriptedRouter()
    driver, _ = make_driver(router)
    driver.shutdown()
    driver.shutdown()  # idempotent
    router.calls.clear()
    decision = await driver.decide(RouteRequest(driver.new_request_id(), "/v1/completions"))
    assert isinstance(decision, Reject) and decision.outcome is Outcome.SHUTDOWN
    assert router.calls == []


async def test_failed_scrape_is_counted_and_forwarded() -> None:
    router = ScriptedRouter()
    driver, metrics = make_driver(router)
    driver.on_scrape("r1", None, 1.0)
    assert sample(metrics, "skylb_scrape_errors_total", replica="r1") == 1.0
    assert router.calls == [("scrape", ("r1", None, 1.0))]


@pytest.mark.parametrize("deadline_in", [0.2, -1.0])
async def test_an_earlier_deadline_rearms_the_timer(deadline_in: float) -> None:
    router = ScriptedRouter(deadline=None)
    driver, _ = make_driver(router)
    router.deadline = driver.now() + 10.0
    driver.on_finished("x")  # any call re-reads next_deadline
    router.deadline = driver.now() + deadline_in  # earlier (or already due)
    driver.on_finished("y")
    await asyncio.sleep(max(deadline_in, 0) + 0.1)
    assert ("timer", pytest.approx(driver.now(), abs=0.2)) in router.calls
    driver.close()


def test_readyz_fails_without_healthy_replicas() -> None:
    assert not ready({"replicas": [{"name": "r0", "healthy": False}]})
    assert not ready({"replicas": [{"name": "r0", "healthy": True}], "shutting_down": True})
    assert ready({"replicas": [{"name": "r0", "healthy": True}], "shutting_down": False})


async def test_missing_speed_counters_are_logged_once_per_replica(
    caplog: pytest.LogCaptureFixture,
) -> None:
    specs = [ReplicaSpec(n, f"10.0.0.{i}:80", f"http://10.0.0.{i}:80/metrics") for i, n in
             enumerate(("r0", "r1"))]  # fmt: skip
    prior = Speed(prefill_tokens_per_s=39000.0, decode_step_s=0.0073)
    router = Router(RouterSettings(speed_prior=prior), specs, make_policy("least_load", {}),
                    random.Random(0))  # fmt: skip
    driver = Driver(RegionBalancer("eu", router), region="eu", metrics=ServerMetrics(policy="x"))
    bare = ScrapedMetrics(waiting=0, running=0)
    counted = replace(bare, prompt_tokens=0.0, generation_tokens=0.0, prefill_seconds_sum=0.0,
                      prefill_seconds_count=0.0, decode_seconds_sum=0.0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="skylb_extproc.server.driver"):
        driver.on_scrape("r0", None, 0.0)  # a failed scrape says nothing about counters
        driver.on_scrape("r1", counted, 0.0)
        for t in (0.1, 0.2):
            driver.on_scrape("r0", bare, t)
    assert [r.getMessage() for r in caplog.records] == [
        "replica r0: its /metrics lack the speed counters (prompt/generation tokens, "
        "prefill/decode time); using the configured speed: 39000 prefill tokens/s, "
        "0.007 s per decode step"
    ]
    speeds = [r["speed"] for r in router.state(driver.now())["replicas"]]  # type: ignore[index]
    assert (
        speeds
        == [{"prefill_tokens_per_s": 39000.0, "decode_step_s": 0.0073, "source": "prior"}] * 2
    )
    driver.close()
