"""Delayed links to replicas in other regions, for live runs of the single-balancer baselines.

A baseline with one balancer for every region reaches the other regions' replicas across the
WAN. Live, on loopback, one extra Envoy stands for those links: one listener per remote replica,
whose fault filter holds each request for the link's round trip before proxying it (as the
mesh's peer routes do, `envoy_mesh.py`: the first token pays the whole round trip, later tokens
stream undelayed). The balancer is configured with the listeners' addresses in place of the
replicas', so its dispatches and its scrapes both cross the link.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from skylb_extproc.envoy_config import envoy_command, split_host_port
from skylb_extproc.envoy_mesh import fault_delay
from skylb_extproc.procs import ChildError, Supervisor, free_port, wait_http_ready
from skylb_extproc.types import ReplicaSpec

__all__ = ["start_links"]

_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_ATTEMPTS = 3


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _listener(name: str, port: int, delay_ms: float) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        "stream_idle_timeout": "0s",  # long decodes stream for minutes
        "route_config": {
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "0s"}}
                    ],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.fault", "typed_config": fault_delay(delay_ms)},
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    return {
        "name": name,
        "address": _address("127.0.0.1", port),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _cluster(name: str, target: str) -> dict[str, Any]:
    host, port = split_host_port(target)
    endpoint = {"endpoint": {"address": _address(host, port)}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }


def links_config(
    links: Mapping[str, tuple[ReplicaSpec, float]], ports: Mapping[str, int], admin_port: int
) -> dict[str, Any]:
    """Envoy's config: for each replica name, a listener on ports[name] delaying by the ms."""
    listeners, clusters = [], []
    for name, (spec, delay_ms) in links.items():
        link = f"link-{name}"
        listeners.append(_listener(link, ports[name], delay_ms))
        clusters.append(_cluster(link, spec.address))
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def start_links(
    sup: Supervisor, workdir: Path, links: Mapping[str, tuple[ReplicaSpec, float]], timeout_s: float
) -> dict[str, ReplicaSpec]:
    """Start the link Envoy; returns each replica as reached through its link."""
    if not links:
        return {}
    last: ChildError | None = None
    for attempt in range(_ATTEMPTS):  # a free port can be taken before Envoy binds it
        ports = {name: free_port() for name in links}
        admin = free_port()
        path = workdir / "envoy-links.json"
        path.write_text(json.dumps(links_config(links, ports, admin), indent=1), encoding="utf-8")
        child = sup.start(f"envoy-links-{attempt}", envoy_command(path, log_level="warning"))
        try:
            wait_http_ready(f"http://127.0.0.1:{admin}/ready", timeout_s=timeout_s, child=child)
            out = {}
            for name in links:
                address = f"127.0.0.1:{ports[name]}"
                wait_http_ready(f"http://{address}/health", timeout_s=timeout_s, child=child)
                out[name] = ReplicaSpec(name, address, f"http://{address}/metrics")
            return out
        except ChildError as exc:
            last = exc
            sup.stop(child)
    assert last is not None
    raise last
