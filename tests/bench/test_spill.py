"""Table-driven spill decisions with exact expected results (region/spill.py, region/peers.py)."""

from __future__ import annotations

import pytest

from skylb_extproc.hashing import key_hash
from skylb_extproc.policy.consistent_hash import build_ring
from skylb_extproc.region.peers import PeerSummary, PeerTable, summarize
from skylb_extproc.region.spill import (
    Forward,
    RegionView,
    SpillPlanner,
    SpillSettings,
    candidates,
    choose_by_prefix,
)
from skylb_extproc.types import ReplicaView


def rv(
    name: str,
    queue: int = 0,
    avail: int = 1,
    in_flight: tuple[int, ...] = (1, 1),
    rtt: float = 0.1,
    fresh: bool = True,
) -> RegionView:
    return RegionView(name, queue, avail, in_flight, rtt, fresh)


@pytest.mark.parametrize(
    ("peers", "our_queue", "expected"),
    [
        ([rv("a"), rv("b")], 3, ["a", "b"]),
        ([rv("a", fresh=False), rv("b")], 3, ["b"]),  # stale summary
        ([rv("a", avail=0), rv("b")], 3, ["b"]),  # no available replica
        ([rv("a", queue=11), rv("b", queue=10)], 20, ["b"]),  # tau = 10
        ([rv("a", queue=4), rv("b", queue=3)], 3, ["b"]),  # not busier than us
        ([rv("a", queue=0)], 0, ["a"]),  # equal queues are fine
    ],
)
def test_candidates(peers: list[RegionView], our_queue: int, expected: list[str]) -> None:
    assert [p.name for p in candidates(peers, our_queue=our_queue, tau=10)] == expected


@pytest.mark.parametrize(
    ("peers", "matched", "expected"),
    [
        # 3 of 4 blocks (75% > 50%): the matching region even when busier
        (
            [rv("a", in_flight=(0, 0)), rv("b", in_flight=(5, 5))],
            {"b": 3},
            Forward("b", "prefix", 3),
        ),
        # 2 of 4 blocks is not > 50%: least load
        (
            [rv("a", in_flight=(0, 0)), rv("b", in_flight=(5, 5))],
            {"b": 2},
            Forward("a", "least_load", 0),
        ),
        # equal best match: lower load wins
        (
            [rv("a", in_flight=(4, 4)), rv("b", in_flight=(1, 1))],
            {"a": 4, "b": 4},
            Forward("b", "prefix", 4),
        ),
        # equal match and load: lower RTT wins
        ([rv("a", rtt=0.2), rv("b", rtt=0.05)], {"a": 4, "b": 4}, Forward("b", "prefix", 4)),
        # load is per replica: 6 over 3 replicas (2) beats 3 over 1 (3)
        (
            [rv("a", in_flight=(3,)), rv("b", in_flight=(2, 2, 2))],
            {},
            Forward("b", "least_load", 0),
        ),
        # full tie: peer order
        ([rv("a"), rv("b")], {}, Forward("a", "least_load", 0)),
        ([], {}, None),
    ],
)
def test_choose_by_prefix(
    peers: list[RegionView], matched: dict[str, int], expected: Forward | None
) -> None:
    got = choose_by_prefix(peers, matched, prompt_chars=256, block_chars=64, cache_threshold=0.5)
    assert got == expected


def test_planner_prefix_mode_remembers_what_it_forwarded() -> None:
    planner = SpillPlanner("us", ["us", "eu", "asia"], SpillSettings())
    peers = [rv("eu"), rv("asia")]
    hashes = (11, 12, 13, 14)
    args = {"our_queue": 2, "prompt_chars": 256, "block_chars": 64, "key_hash": None}
    assert planner.decide(peers, hashes=hashes, now=0.0, **args) == Forward("eu", "least_load", 0)
    planner.record("asia", hashes[:3], 0.0)
    assert planner.decide(peers, hashes=hashes, now=1.0, **args) == Forward("asia", "prefix", 3)
    # never to itself, even if "us" shows up among the views
    only_self = [rv("us")]
    assert planner.decide(only_self, hashes=hashes, now=1.0, **args) is None


def test_planner_hash_mode_follows_the_ring() -> None:
    regions = ["us", "eu", "asia"]
    planner = SpillPlanner("us", regions, SpillSettings(mode="hash"))
    points, owners = build_ring(tuple(regions), 1024)
    # find keys whose primary owner is each region
    key_for: dict[str, int] = {}
    for i in range(1000):
        k = key_hash(f"session-{i}")
        idx = next((j for j, p in enumerate(points) if p >= k), 0)
        key_for.setdefault(regions[owners[idx]], k)
    args = {"our_queue": 2, "hashes": (), "prompt_chars": 0, "block_chars": 64, "now": 0.0}
    peers = [rv("eu"), rv("asia")]
    assert planner.decide(peers, key_hash=key_for["eu"], **args) == Forward("eu", "hash")
    assert planner.decide(peers, key_hash=key_for["asia"], **args) == Forward("asia", "hash")
    # asia full: its keys walk clockwise to the next eligible region, never to "us"
    got = planner.decide([rv("eu"), rv("asia", avail=0)], key_hash=key_for["asia"], **args)
    assert got == Forward("eu", "hash")
    # no key: least load
    assert planner.decide(peers, key_hash=None, **args) == Forward("eu", "least_load")


def test_peer_table_freshness() -> None:
    table = PeerTable({"eu": 0.1, "asia": 0.2}, stale_after_s=0.5)
    assert [v.fresh for v in table.views(0.0)] == [False, False]
    table.update(PeerSummary("eu", 2, 1, (3, 4)), 1.0)
    table.update(PeerSummary("mars", 0, 1, ()), 1.0)  # unknown: ignored
    assert table.views(1.4) == (
        RegionView("eu", 2, 1, (3, 4), 0.1, True),
        RegionView("asia", 0, 0, (), 0.2, False),
    )
    assert table.views(1.5)[0].fresh is False


def test_summarize_counts_available_replicas() -> None:
    views = [
        ReplicaView("r0", "a:1", True, True, 2, 0),
        ReplicaView("r1", "a:2", True, False, 5, 1),
    ]
    got = summarize("us", 4, views)
    assert (got.region, got.queue_length, got.available_replicas, got.in_flight) == (
        "us",
        4,
        1,
        (2, 5),
    )
