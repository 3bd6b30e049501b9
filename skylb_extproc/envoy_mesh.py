"""What a region's Envoy needs in a mesh of regions, added to the one-region config.

A region in a mesh has two listeners:

- the CLIENT listener (the one-region listener): strips every `x-skylb-*` header and
  `x-gateway-destination-endpoint` before ext_proc, so a client can neither pick a replica nor
  forge a forwarding marker. skylb answers either with a local replica (as in one region) or with
  `x-skylb-cluster: <peer cluster>` plus a signed marker; one route per peer matches that header
  exactly and sends the request to the peer's Envoy, after the inter-region delay (fault filter);
- the PEER listener, where other regions' Envoys send forwarded requests: it keeps the marker
  headers (`x-skylb-origin/ts/id/sig`, skylb verifies them and strips what it cannot verify) but
  removes the routing headers, and it has no route to any peer, so a forwarded request can only be
  served locally, whatever skylb answers. `GET /peer/state` on it goes to the local skylb admin
  (ext_proc off for that route; skylb authenticates the poll by HMAC): a peer that polls through
  this listener sees the region as down when either its Envoy or its skylb is down, and only this
  one port has to be reachable from other regions.

The injected delay models a round trip: Envoy's fault filter delays the request once, before it
is sent upstream, and the response comes back undelayed, so `delay_ms` = the RTT the first token
pays (request one way + first response bytes the other way). Later tokens stream without delay,
as on a real long-lived connection. Set it to 0 across real regions: the network adds it.

Rendering works on the data of the rendered one-region template, so both listeners share every
setting of the template (ext_proc, timeouts, buffers) and cannot drift apart.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLUSTER_HEADER",
    "CLUSTER_RE",
    "MARKER_HEADERS",
    "PEER_STATE_PATH",
    "PeerRoute",
    "add_mesh",
    "fault_delay",
]

CLUSTER_HEADER = "x-skylb-cluster"
MARKER_HEADERS = ("x-skylb-origin", "x-skylb-ts", "x-skylb-id", "x-skylb-sig")
PEER_STATE_PATH = "/peer/state"
CLUSTER_RE = r"^[A-Za-z0-9_.:-]+$"  # as skylb's config checks peers[].cluster

_FAULT = "envoy.filters.http.fault"
_FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
_EXT_PROC = "envoy.filters.http.ext_proc"
_EXT_PROC_ROUTE_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
)
_HEADER_MUTATION = "envoy.filters.http.header_mutation"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_OPTIONS_TYPE = f"type.googleapis.com/{_HTTP_OPTIONS}"
SKYLB_ADMIN_CLUSTER = "skylb_admin"


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """One peer region as this region's Envoy reaches it."""

    name: str  # the peer's region name
    cluster: str  # Envoy cluster name; skylb's peers[].cluster answers with it
    address: str  # host:port of the peer Envoy's PEER listener
    delay_ms: float = 0.0  # injected round trip on the forwarding path; 0 = none


def _hcm(listener: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _filter_index(filters: list[dict[str, Any]], name: str) -> int:
    return next(i for i, f in enumerate(filters) if f["name"] == name)


def _socket(address: str) -> dict[str, Any]:
    from skylb_extproc.envoy_config import split_host_port

    host, port = split_host_port(address)
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cluster(name: str, address: str, *, max_requests: int, http2: bool) -> dict[str, Any]:
    """A one-endpoint cluster; a DNS name (compose service) resolves through STRICT_DNS."""
    from skylb_extproc.envoy_config import split_host_port

    host, _ = split_host_port(address)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "2s",
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_requests": max_requests,
                    "max_pending_requests": max_requests,
                    "max_connections": max_requests,
                }
            ]
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket(address)}}]}],
        },
    }
    if http2:
        # Envoy to Envoy across regions: one multiplexed connection instead of one per request
        # (each new connection would pay the inter-region handshake).
        cluster["typed_extension_protocol_options"] = {
            _HTTP_OPTIONS: {
                "@type": _HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def fault_delay(delay_ms: float) -> dict[str, Any]:
    """The fault filter's config (or per-route override) that holds every request `delay_ms`."""
    return {
        "@type": _FAULT_TYPE,
        "delay": {
            "fixed_delay": f"{delay_ms / 1000:.3f}s",
            "percentage": {"numerator": 100, "denominator": "HUNDRED"},
        },
    }


def _peer_route(peer: PeerRoute) -> dict[str, Any]:
    route: dict[str, Any] = {
        "name": f"to-{peer.name}",
        "match": {
            "prefix": "/",
            "headers": [{"name": CLUSTER_HEADER, "string_match": {"exact": peer.cluster}}],
        },
        # No retry: the peer cluster has one host, and a request that reached it may be running.
        "route": {"cluster": peer.cluster, "timeout": "0s"},
    }
    if peer.delay_ms > 0:
        route["typed_per_filter_config"] = {_FAULT: fault_delay(peer.delay_ms)}
    return route


def _state_route() -> dict[str, Any]:
    """GET /peer/state straight to the local skylb admin: no ext_proc, skylb checks the HMAC."""
    return {
        "name": "peer-state",
        "match": {
            "path": PEER_STATE_PATH,
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        "route": {"cluster": SKYLB_ADMIN_CLUSTER, "timeout": "2s"},
        "typed_per_filter_config": {_EXT_PROC: {"@type": _EXT_PROC_ROUTE_TYPE, "disabled": True}},
    }


def _client_listener(listener: dict[str, Any], peers: Sequence[PeerRoute]) -> None:
    """Per-peer routes before the local default route; the fault filter right after ext_proc, so
    it sees the route skylb's answer selected (clear_route_cache) and delays only peer routes."""
    hcm = _hcm(listener)
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["routes"] = [_peer_route(p) for p in peers] + vhost["routes"]
    filters = hcm["http_filters"]
    filters.insert(
        _filter_index(filters, _EXT_PROC) + 1,
        {"name": _FAULT, "typed_config": {"@type": _FAULT_TYPE}},
    )


def _peer_listener(client: dict[str, Any], port: int, with_state_route: bool) -> dict[str, Any]:
    """A copy of the client listener (before peer routes are added) that keeps the markers."""
    listener = copy.deepcopy(client)
    listener["name"] = "peer"
    listener["address"]["socket_address"]["port_value"] = port
    hcm = _hcm(listener)
    hcm["stat_prefix"] = "peer"
    hcm["route_config"]["name"] = "peer"
    vhost = hcm["route_config"]["virtual_hosts"][0]
    vhost["name"] = "peer"
    if with_state_route:
        vhost["routes"] = [_state_route(), *vhost["routes"]]
    mutation = hcm["http_filters"][_filter_index(hcm["http_filters"], _HEADER_MUTATION)]
    # Routing headers go, markers stay: skylb verifies them (a forged one is stripped and
    # counted there). x-skylb-cluster could not forward anyway: this listener has no peer route.
    mutation["typed_config"]["mutations"]["request_mutations"] = [
        {"remove": "x-gateway-destination-endpoint"},
        {"remove": CLUSTER_HEADER},
    ]
    return listener


def add_mesh(
    doc: dict[str, Any],
    peers: Sequence[PeerRoute],
    *,
    peer_port: int,
    skylb_admin_address: str | None,
    max_requests: int,
) -> dict[str, Any]:
    """Turn the one-region config data `doc` into a mesh member's (in place; also returned)."""
    resources = doc["static_resources"]
    client = resources["listeners"][0]
    peer = _peer_listener(client, peer_port, skylb_admin_address is not None)
    _client_listener(client, peers)
    resources["listeners"].append(peer)
    clusters = resources["clusters"]
    for p in peers:
        clusters.append(_cluster(p.cluster, p.address, max_requests=max_requests, http2=True))
    if skylb_admin_address is not None:
        clusters.append(
            _cluster(SKYLB_ADMIN_CLUSTER, skylb_admin_address, max_requests=1024, http2=False)
        )
    return doc
