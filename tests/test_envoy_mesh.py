"""A region's Envoy in a mesh: two listeners, per-peer routes with the injected delay, and that
Envoy itself accepts every rendering."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from skylb_extproc.envoy_config import (
    EnvoySettings,
    PeerRoute,
    envoy_command,
    find_envoy_binary,
    render_envoy_config,
    write_envoy_config,
)
from skylb_extproc.errors import ConfigError
from skylb_extproc.types import ReplicaSpec

REPLICAS = [ReplicaSpec("r0", "127.0.0.1:8001", "http://127.0.0.1:8001/metrics")]
PEERS = [
    PeerRoute("eu", "peer-eu", "127.0.0.1:11001", delay_ms=50),
    PeerRoute("asia", "peer-asia", "envoy-asia:10001", delay_ms=0),
]


def settings(**kw: object) -> EnvoySettings:
    base: dict[str, object] = {
        "listen_port": 10000,
        "admin_port": 10002,
        "grpc_address": "127.0.0.1:9001",
        "replicas": REPLICAS,
        "peer_port": 10001,
        "peers": PEERS,
        "skylb_admin_address": "127.0.0.1:9002",
    }
    return EnvoySettings(**{**base, **kw})  # type: ignore[arg-type]


def listeners(doc: Any) -> dict[str, Any]:
    return {item["name"]: item for item in doc["static_resources"]["listeners"]}


def hcm(listener: Any) -> Any:
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def routes(listener: Any) -> list[Any]:
    routes: list[Any] = hcm(listener)["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def filter_names(listener: Any) -> list[str]:
    return [f["name"] for f in hcm(listener)["http_filters"]]


def mutations(listener: Any) -> list[Any]:
    mutation = next(
        f for f in hcm(listener)["http_filters"] if f["name"].endswith("header_mutation")
    )
    result: list[Any] = mutation["typed_config"]["mutations"]["request_mutations"]
    return result


def test_client_listener_strips_everything_and_routes_per_peer() -> None:
    client = listeners(yaml.safe_load(render_envoy_config(settings())))["llm"]
    assert {"remove_on_match": {"key_matcher": {"prefix": "x-skylb-"}}} in mutations(client)
    assert {"remove": "x-gateway-destination-endpoint"} in mutations(client)
    # The fault filter after ext_proc: it must see the route that skylb's answer selected.
    assert filter_names(client) == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]
    to_eu, to_asia, local = routes(client)
    assert to_eu["match"]["headers"] == [
        {"name": "x-skylb-cluster", "string_match": {"exact": "peer-eu"}}
    ]
    assert to_eu["route"]["cluster"] == "peer-eu"
    delay = to_eu["typed_per_filter_config"]["envoy.filters.http.fault"]["delay"]
    assert delay["fixed_delay"] == "0.050s"
    assert delay["percentage"] == {"numerator": 100, "denominator": "HUNDRED"}
    assert "typed_per_filter_config" not in to_asia  # delay 0: nothing injected
    assert local["route"]["cluster"] == "replicas" and "headers" not in local["match"]


def test_peer_listener_keeps_markers_and_never_forwards() -> None:
    peer = listeners(yaml.safe_load(render_envoy_config(settings())))["peer"]
    assert peer["address"]["socket_address"]["port_value"] == 10001
    assert mutations(peer) == [
        {"remove": "x-gateway-destination-endpoint"},
        {"remove": "x-skylb-cluster"},
    ]
    assert "envoy.filters.http.ext_proc" in filter_names(peer)
    state, local = routes(peer)
    assert state["match"]["path"] == "/peer/state"
    assert state["route"]["cluster"] == "skylb_admin"
    assert state["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True
    # No route to any peer: whatever skylb answers, a forwarded request is served here.
    assert local["route"]["cluster"] == "replicas"


def test_peer_clusters_point_at_peer_listeners() -> None:
    doc = yaml.safe_load(render_envoy_config(settings()))
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    eu, asia = clusters["peer-eu"], clusters["peer-asia"]
    endpoint = eu["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 11001}
    assert eu["type"] == "STATIC" and asia["type"] == "STRICT_DNS"  # a compose service name
    admin = clusters["skylb_admin"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert admin["endpoint"]["address"]["socket_address"]["port_value"] == 9002


def test_one_region_rendering_is_the_template_text() -> None:
    one = EnvoySettings(
        listen_port=10000, admin_port=10002, grpc_address="127.0.0.1:9001", replicas=REPLICAS
    )
    text = render_envoy_config(one)
    assert text.startswith("# SkyLB for Envoy: one region's Envoy")
    assert [item["name"] for item in yaml.safe_load(text)["static_resources"]["listeners"]] == [
        "llm"
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"peer_port": None},
        {"peers": [PeerRoute("eu", "replicas", "127.0.0.1:1")]},
        {"peers": [PeerRoute("eu", "p", "127.0.0.1:1"), PeerRoute("as", "p", "127.0.0.1:2")]},
        {"peers": [PeerRoute("eu", "p", "nowhere")]},
        {"peers": [PeerRoute("eu", "p", "127.0.0.1:1", delay_ms=-1)]},
    ],
)
def test_bad_mesh_settings_raise_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        render_envoy_config(settings(**bad))


def _validate(path: Path) -> None:
    try:
        binary = find_envoy_binary()
    except FileNotFoundError:
        pytest.skip("no Envoy binary")
    argv = [*envoy_command(path, binary=binary), "--mode", "validate"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize(
    "variant",
    [
        {"body_mode": "buffered"},
        {"body_mode": "duplex", "listen_address": "0.0.0.0"},
        {"peers": [], "skylb_admin_address": None},  # a region that only receives
    ],
)
def test_envoy_accepts_the_mesh_config(tmp_path: Path, variant: dict[str, object]) -> None:
    _validate(write_envoy_config(settings(**variant), tmp_path / "envoy.yaml"))
