"""The demo's plumbing without processes: flags, region names, the skewed workload, the summary."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest

from skylb_extproc.cli import build_parser
from skylb_extproc.demo import _residency, add_demo_arguments, regions_from_args
from skylb_extproc.mesh import MeshOptions, peer_cluster, region_config
from skylb_extproc.mesh_traffic import (
    RegionCounters,
    assign_homes,
    default_weights,
    format_mesh_summary,
    metric_total,
    split_concurrency,
)
from skylb_extproc.types import ReplicaSpec
from skylb_extproc.workload import TurnResult, chat_workload


def _defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in parser._actions if a.dest != "help"}


def test_cli_demo_flags_mirror_the_demo() -> None:
    mine = argparse.ArgumentParser()
    add_demo_arguments(mine)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cli = _defaults(sub.choices["demo"])
    cli.pop("handler", None)
    assert cli == _defaults(mine)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (None, ["local"]),
        ("1", ["local"]),
        ("3", ["us", "eu", "asia"]),
        ("us,eu", ["us", "eu"]),
        ("5", ["r0", "r1", "r2", "r3", "r4"]),
    ],
)
def test_region_names(spec: str | None, names: list[str]) -> None:
    assert regions_from_args(argparse.Namespace(regions=spec)) == names


def test_residency_flag() -> None:
    assert _residency(["eu=eu", "us=us+eu"]) == {"eu": ("eu",), "us": ("us", "eu")}
    with pytest.raises(ValueError):
        _residency(["eu"])


def test_homes_follow_the_weights_exactly() -> None:
    conversations = chat_workload(400, seed=1)
    homes = assign_homes(conversations, ["us", "eu", "asia"], default_weights(3))
    counts = {r: len(c) for r, c in homes.items()}
    n = len(conversations)
    assert sum(counts.values()) == n
    assert all(abs(counts[r] - w * n) <= 1 for r, w in zip(homes, [0.7, 0.2, 0.1], strict=True))
    # Deterministic: the same conversations land in the same regions.
    again = assign_homes(chat_workload(400, seed=1), ["us", "eu", "asia"], default_weights(3))
    assert {r: [c.conversation_id for c in cs] for r, cs in homes.items()} == {
        r: [c.conversation_id for c in cs] for r, cs in again.items()
    }


def test_weights_and_concurrency() -> None:
    assert default_weights(1) == [1.0]
    assert default_weights(2) == [0.7, pytest.approx(0.3)]
    assert split_concurrency(48, [0.7, 0.2, 0.1]) == [34, 10, 5]
    assert split_concurrency(2, [0.7, 0.2, 0.1]) == [1, 1, 1]  # every region gets a client


METRICS = """\
# HELP skylb_spills_total Requests forwarded to a peer region.
# TYPE skylb_spills_total counter
skylb_spills_total{destination="eu",origin="us",reason="no_local"} 7.0
skylb_spills_total{destination="asia",origin="us",reason="no_local"} 3.0
# HELP skylb_markers_rejected_total Stripped x-skylb-* headers.
# TYPE skylb_markers_rejected_total counter
skylb_markers_rejected_total{reason="bad_signature"} 2.0
"""


def test_metric_total_sums_matching_samples() -> None:
    assert metric_total(METRICS, "skylb_spills_total") == 10
    assert metric_total(METRICS, "skylb_spills_total", destination="eu") == 7
    assert metric_total(METRICS, "skylb_markers_rejected_total", reason="replay") == 0
    assert metric_total(METRICS, "skylb_forwarded_received_total") == 0


def _result(replica: str | None, *, error: str | None = None) -> TurnResult:
    return TurnResult("c", 0, False, 200, replica, 100, 40, 0.1, "a", error=error)


def test_mesh_summary_counts_where_requests_were_served() -> None:
    results = {
        "us": [_result("us-r0"), _result("eu-r1"), _result("asia-r0"), _result(None, error="x")],
        "eu": [_result("eu-r0")],
    }
    where = {"us-r0": "us", "eu-r0": "eu", "eu-r1": "eu", "asia-r0": "asia"}
    counters = {"us": RegionCounters(2, 0, 0), "eu": RegionCounters(0, 1, 3)}
    text = format_mesh_summary(results, where, counters, elapsed_s=1.0)
    assert "errors: 1" in text
    assert "served by region: us=1 eu=2" in text
    assert "us clients -> us=1 eu=1" in text
    assert "spills (skylb_spills_total): us=2; forwarded received: eu=1" in text
    assert "prefix hit rate: 40.0%" in text
    assert Counter(text.split()).get("error:") == 1


def test_region_config_peers_everyone_else() -> None:
    opts = MeshOptions(regions=("us", "eu", "asia"), rtt_ms=50, residency={"eu": ["eu"]})
    replicas = [ReplicaSpec("eu-r0", "127.0.0.1:8001", "http://127.0.0.1:8001/metrics")]
    ports = {"us": 1001, "eu": 1002, "asia": 1003}
    config = region_config(opts, "eu", replicas, ports, Path("/run/secret"))
    assert [(p.name, p.cluster, p.state_url, p.rtt_ms) for p in config.peers] == [
        ("us", peer_cluster("us"), "http://127.0.0.1:1001/peer/state", 50),
        ("asia", "peer-asia", "http://127.0.0.1:1003/peer/state", 50),
    ]
    assert config.residency.allowed_regions == ("eu",)
    assert config.secret_file == "/run/secret"
