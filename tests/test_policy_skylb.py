"""The predictive `skylb` policy: exact decisions from hand-made views.

Every replica prefills 1,000 tokens per second; the prompt is 4,000 characters (1,000 tokens,
62 blocks of 64), so a replica holding nothing needs ~1.03 s of prefill and one holding 60
blocks ~0.04 s. Queues are given in seconds (backlog, engine admission) as the load tracker
computes them (tests/test_load.py checks that part).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from skylb_extproc.errors import ConfigError
from skylb_extproc.policy.base import make_policy
from skylb_extproc.policy.common import predicted_ttft, prefill_seconds
from skylb_extproc.types import Decision, ReplicaView, Route, RouteRequest, Snapshot, Wait

REQUEST = RouteRequest(request_id="q", path="/v1/completions", model="m", prompt="x" * 4000)


def v(name: str, *, m: int = 0, backlog: float = 0.0, up: bool = True, **kw: object) -> ReplicaView:
    view = ReplicaView(
        name=name,
        address=f"10.0.0.{name[-1]}:8000",
        healthy=up,
        available=up,
        in_flight=0,
        pending=0,
        matched_blocks=m,
        prefill_tokens_per_s=1000.0,
        backlog_s=backlog,
    )
    return replace(view, **kw)  # type: ignore[arg-type]


def snap(*views: ReplicaView, decisions: int = 0, max_tokens: int = 0, queued: int = 1) -> Snapshot:
    return Snapshot(
        replicas=views,
        prompt_blocks=62,
        prompt_chars=4000,
        block_chars=64,
        decisions=decisions,
        max_tokens=max_tokens,
        queued=queued,
    )


def r(name: str, reason: str) -> Route:
    return Route(replica=name, address=f"10.0.0.{name[-1]}:8000", reason=reason)


@dataclass(frozen=True)
class Case:
    id: str
    snapshot: Snapshot
    expected: Decision
    params: dict[str, object] = field(default_factory=dict)


CASES = [
    Case("idle pool: the first in rotation", snap(v("r0"), v("r1"), v("r2")), r("r0", "predicted")),
    Case(
        "idle pool: rotation spreads new conversations",
        snap(v("r0"), v("r1"), v("r2"), decisions=4),
        r("r1", "predicted"),
    ),
    Case(
        "the holder with a short queue beats a full prefill elsewhere",
        snap(v("r0", m=60, backlog=0.3), v("r1")),
        r("r0", "prefix"),
    ),
    Case(
        "a busy holder loses to an idle replica (2.04 s against 1.03 s)",
        snap(v("r0", m=60, backlog=2.0), v("r1")),
        r("r1", "predicted"),
    ),
    Case(
        "the best replica's queue exceeds hold_s: held at the balancer",
        snap(v("r0", m=60, backlog=0.8), v("r1", backlog=1.5)),
        Wait(),
    ),
    Case(
        "saturated (over 4 waiting per replica): the bound is saturated_hold_s",
        snap(v("r0", m=60, backlog=0.8), v("r1", backlog=1.5), queued=9),
        r("r0", "prefix"),
    ),
    Case(
        "4 per replica is not saturated yet",
        snap(v("r0", m=60, backlog=0.8), v("r1", backlog=1.5), queued=8),
        Wait(),
    ),
    Case(
        "the same with hold_s 1: pushed to the holder",
        snap(v("r0", m=60, backlog=0.8), v("r1", backlog=1.5)),
        r("r0", "prefix"),
        {"hold_s": 1.0},
    ),
    Case(
        "the engine's own queue counts: pending x seconds between finishes",
        snap(v("r0", m=60, admit_wait_s=2.0, pending=1), v("r1")),
        r("r1", "predicted"),
    ),
    Case(
        "a request that does not fit the free KV waits one finish there",
        snap(v("r0", m=60, kv_free_tokens=500.0, finish_interval_s=3.0), v("r1"), max_tokens=200),
        r("r1", "predicted"),
    ),
    Case(
        "it fits: the KV numbers change nothing",
        snap(v("r0", m=60, kv_free_tokens=5000.0, finish_interval_s=3.0), v("r1"), max_tokens=200),
        r("r0", "prefix"),
    ),
    Case(
        "a copy into a full, much reused cache counts what it evicts (1.03 s x 1.5 > 1.2 s)",
        snap(v("r0", m=60, backlog=1.2), v("r1", cache_fill=1.0, cache_hit_rate=1.0)),
        r("r0", "prefix"),
        {"hold_s": 2.0},
    ),
    Case(
        "the same copy into an empty cache evicts nothing: the idle replica",
        snap(v("r0", m=60, backlog=1.2), v("r1", cache_fill=0.0, cache_hit_rate=1.0)),
        r("r1", "predicted"),
        {"hold_s": 2.0},
    ),
    Case(
        "an unhealthy holder gets nothing",
        snap(v("r0", m=60, up=False), v("r1")),
        r("r1", "predicted"),
    ),
    Case("no healthy replica: wait", snap(v("r0", up=False), v("r1", up=False)), Wait()),
    Case(
        "hold_s 0: any queue at all holds",
        snap(v("r0", backlog=0.01), v("r1", backlog=0.02)),
        Wait(),
        {"hold_s": 0.0},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decisions(case: Case) -> None:
    policy = make_policy("skylb", {"hold_s": 0.5} | case.params)
    assert policy.decide(REQUEST, case.snapshot, random.Random(0)) == case.expected


def test_prediction_parts() -> None:
    s = snap()
    idle, holder = v("r0"), v("r1", m=60, backlog=0.25)
    assert prefill_seconds(idle, s) == pytest.approx(1.0 * (1 + 500 / 16384))
    held = 60 * 64 / 4  # tokens the holder has
    new = 1000 - held
    assert prefill_seconds(holder, s) == pytest.approx(new / 1000 * (1 + (held + new / 2) / 16384))
    assert predicted_ttft(holder, s) == pytest.approx(0.25 + prefill_seconds(holder, s))


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"hold_s": -1}, "policy.params.hold_s"),
        ({"hold_s": "long"}, "policy.params.hold_s"),
        ({"lookahead": 1.5}, "policy.params.lookahead"),
        ({"lookahead": -1}, "policy.params.lookahead"),
        ({"cache_threshold": 0.5}, "policy.params.cache_threshold"),
    ],
)
def test_bad_params_name_their_key(params: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        make_policy("skylb", params)
    assert err.value.path == key
