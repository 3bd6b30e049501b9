"""The cross-region sections of skylb.yaml: `peers`, `secret_file`, `residency`, `spill`.

```yaml
peers:                          # optional; empty = a one-region balancer, exactly as before
  - name: eu                    # the peer's `region`
    cluster: peer-eu            # Envoy cluster reaching the peer Envoy's peer listener
    state_url: http://10.1.0.2:9002/peer/state   # the peer skylb's admin /peer/state
    rtt_ms: 80                  # optional round trip, used until a poll measures one
secret_file: /etc/skylb/secret  # shared by all regions; required with peers; never inline
residency:
  allowed_regions: [us, eu]     # where this region's own traffic may be served (default: all)
  tenant_header: x-tenant       # optional: a header naming the tenant ...
  tenants: {acme: [us]}         # ... whose allowed set replaces allowed_regions
spill:
  mode: predict                 # predict (ours, default) | prefix (SkyLB) | hash (SkyLB-CH) | cost
  tau: 10                       # a peer with a longer queue takes nothing
  cache_threshold: 0.5          # prefix match share that picks a region by prefix
  poll_interval_s: 0.1          # each peer's /peer/state
  stale_after_s: 0.5            # no fresh summary for this long: the peer takes nothing
  marker_max_skew_s: 5          # accepted clock skew of markers and state-poll auth
  cost: {margin_s: 0.05, prefill_tokens_per_s: 4700, chars_per_token: 4, rate_window_s: 10}
```
The secret is read once here (`read_secret`), so `check-config` also catches a missing file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skylb_extproc.config_readers import (
    Section,
    as_float,
    as_http_url,
    as_int,
    as_mapping,
    as_region,
    as_str,
)
from skylb_extproc.errors import ConfigError

__all__ = [
    "CostConfig",
    "PeerConfig",
    "ResidencyConfig",
    "SpillConfig",
    "cross_region_dict",
    "parse_peers",
    "parse_residency",
    "parse_spill",
    "read_secret",
]

SPILL_MODES = ("predict", "prefix", "hash", "cost")
# Envoy cluster names end up in a header value and in Envoy's config: keep them plain.
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_HEADER_RE = re.compile(r"^[a-z0-9-]+$")


@dataclass(frozen=True)
class PeerConfig:
    name: str
    cluster: str
    state_url: str
    rtt_ms: float | None = None  # round trip; None = unknown until measured


@dataclass(frozen=True)
class ResidencyConfig:
    allowed_regions: tuple[str, ...] | None = None  # None: every region
    tenant_header: str | None = None
    tenants: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class CostConfig:
    margin_s: float = 0.05  # a peer must beat waiting at home by this much (and lose by it)
    prefill_tokens_per_s: float = 4700.0  # Llama-3.1-8B on an L4 (ARCHITECTURE.md §6)
    chars_per_token: float = 4.0
    rate_window_s: float = 10.0  # local dispatch rate measured over this window


@dataclass(frozen=True)
class SpillConfig:
    mode: str = "predict"
    tau: int = 10
    cache_threshold: float = 0.5
    poll_interval_s: float = 0.1
    stale_after_s: float = 0.5
    marker_max_skew_s: float = 5.0
    cost: CostConfig = field(default_factory=CostConfig)


_POSITIVE = as_float(positive=True)


def _peer(item: object, path: str, region: str) -> PeerConfig:
    s = Section(item, path)
    name = s.take("name", as_region)
    if name == region:
        raise ConfigError(s.key_path("name"), f"a region is not its own peer ({name!r})")
    cluster = s.take("cluster", as_str)
    if not _CLUSTER_RE.match(cluster):
        raise ConfigError(s.key_path("cluster"), f"must match [A-Za-z0-9_.:-]+, got {cluster!r}")
    state_url = s.take("state_url", as_http_url)
    rtt_ms = s.take("rtt_ms", as_float(positive=False), -1.0)
    s.done()
    return PeerConfig(name, cluster, state_url, None if rtt_ms < 0 else rtt_ms)


def parse_peers(root: Section, region: str) -> tuple[PeerConfig, ...]:
    """The `peers` list (absent = none); names and clusters unique."""
    if "peers" not in root:
        return ()
    peers: list[PeerConfig] = []
    for item, path in root.items("peers"):
        peer = _peer(item, path, region)
        if any(p.name == peer.name for p in peers):
            raise ConfigError(f"{path}.name", f"duplicate peer {peer.name!r}")
        if any(p.cluster == peer.cluster for p in peers):
            raise ConfigError(f"{path}.cluster", f"duplicate cluster {peer.cluster!r}")
        peers.append(peer)
    return tuple(peers)


def read_secret(path: str, key_path: str = "secret_file") -> bytes:
    """The shared secret's bytes (surrounding whitespace dropped); must exist and be non-empty."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(key_path, f"cannot read {path}: {exc.strerror or exc}") from exc
    if not data:
        raise ConfigError(key_path, f"{path} is empty")
    return data


def _regions(value: object, path: str, known: frozenset[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(path, "expected a non-empty list of regions")
    out: list[str] = []
    for i, item in enumerate(value):
        name = as_region(item, f"{path}[{i}]")
        if name not in known:
            raise ConfigError(f"{path}[{i}]", f"unknown region {name!r} (not this one or a peer)")
        out.append(name)
    return tuple(dict.fromkeys(out))


def _tenants(s: Section, known: frozenset[str]) -> dict[str, tuple[str, ...]]:
    raw: dict[str, Any] = s.take("tenants", as_mapping, {})
    return {name: _regions(v, f"{s.key_path('tenants')}.{name}", known) for name, v in raw.items()}


def _header(value: object, path: str) -> str:
    name = as_str(value, path)
    if not _HEADER_RE.match(name) or name.startswith("x-skylb-"):
        raise ConfigError(path, f"must be a lowercase header name, not x-skylb-*, got {name!r}")
    return name


def parse_residency(s: Section, known: frozenset[str]) -> ResidencyConfig:
    """`residency`; every named region must be this region or a configured peer."""
    allowed = None
    if "allowed_regions" in s:
        allowed = s.take("allowed_regions", lambda v, p: _regions(v, p, known))
    header = s.take("tenant_header", _header, "") or None
    tenants = _tenants(s, known)
    s.done()
    if tenants and header is None:
        raise ConfigError(s.key_path("tenant_header"), "required when tenants are listed")
    return ResidencyConfig(allowed, header, tenants)


def parse_spill(s: Section) -> SpillConfig:
    d = SpillConfig()
    mode = s.take("mode", as_str, d.mode)
    if mode not in SPILL_MODES:
        raise ConfigError(s.key_path("mode"), f"must be one of {', '.join(SPILL_MODES)}")
    config = SpillConfig(
        mode=mode,
        tau=s.take("tau", as_int(0), d.tau),
        cache_threshold=s.take("cache_threshold", _fraction, d.cache_threshold),
        poll_interval_s=s.take("poll_interval_s", _POSITIVE, d.poll_interval_s),
        stale_after_s=s.take("stale_after_s", _POSITIVE, d.stale_after_s),
        marker_max_skew_s=s.take("marker_max_skew_s", _POSITIVE, d.marker_max_skew_s),
        cost=_cost(s.section("cost")),
    )
    s.done()
    return config


def _fraction(value: object, path: str) -> float:
    number = as_float(positive=False)(value, path)
    if number > 1:
        raise ConfigError(path, f"must be in [0, 1], got {value}")
    return number


def _cost(s: Section) -> CostConfig:
    d = CostConfig()
    config = CostConfig(
        margin_s=s.take("margin_s", as_float(positive=False), d.margin_s),
        prefill_tokens_per_s=s.take("prefill_tokens_per_s", _POSITIVE, d.prefill_tokens_per_s),
        chars_per_token=s.take("chars_per_token", _POSITIVE, d.chars_per_token),
        rate_window_s=s.take("rate_window_s", _POSITIVE, d.rate_window_s),
    )
    s.done()
    return config


def cross_region_dict(
    peers: tuple[PeerConfig, ...],
    secret_file: str | None,
    residency: ResidencyConfig,
    spill: SpillConfig,
) -> dict[str, Any]:
    """The YAML data of these sections, read back by the parsers above into equal values."""
    out: dict[str, Any] = {"peers": [_peer_dict(p) for p in peers]}
    if secret_file is not None:
        out["secret_file"] = secret_file
    res: dict[str, Any] = {}
    if residency.allowed_regions is not None:
        res["allowed_regions"] = list(residency.allowed_regions)
    if residency.tenant_header is not None:
        res["tenant_header"] = residency.tenant_header
        res["tenants"] = {k: list(v) for k, v in residency.tenants.items()}
    out["residency"] = res
    out["spill"] = {**vars(spill), "cost": dict(vars(spill.cost))}
    return out


def _peer_dict(peer: PeerConfig) -> dict[str, Any]:
    data: dict[str, Any] = {"name": peer.name, "cluster": peer.cluster, "state_url": peer.state_url}
    if peer.rtt_ms is not None:
        data["rtt_ms"] = peer.rtt_ms
    return data
