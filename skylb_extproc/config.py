"""Typed configuration of one skylb region (skylb.yaml), validated with the offending key's path.

Everything is a frozen dataclass with the documented defaults, so code (the demo, tests) can build
a `Config` directly and write it out with `render_yaml`. `parse_config` accepts the YAML data and
rejects unknown keys and bad values with `ConfigError("queue.max_wait_s", ...)`. The readers live
in `config_readers.py`, the cross-region sections (peers, secret_file, residency, spill) in
`region/config.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from skylb_extproc.config_readers import (
    Section,
    as_address,
    as_bool,
    as_float,
    as_http_url,
    as_int,
    as_mapping,
    as_region,
    as_str,
    split_host_port,
)
from skylb_extproc.errors import ConfigError
from skylb_extproc.region.config import (
    CostConfig,
    PeerConfig,
    ResidencyConfig,
    SpillConfig,
    cross_region_dict,
    parse_peers,
    parse_residency,
    parse_spill,
    read_secret,
)
from skylb_extproc.types import ReplicaSpec

if TYPE_CHECKING:
    from skylb_extproc.router import RouterSettings

T = TypeVar("T")

__all__ = [
    "Config",
    "CostConfig",
    "LimitsConfig",
    "ListenConfig",
    "PeerConfig",
    "PolicyConfig",
    "PrefixConfig",
    "QueueConfig",
    "ResidencyConfig",
    "ScrapeConfig",
    "SpeedConfig",
    "SpillConfig",
    "config_to_dict",
    "load_config",
    "parse_config",
    "render_yaml",
    "split_host_port",
    "validate_policy",
    "write_config",
]


@dataclass(frozen=True)
class ListenConfig:
    grpc: str = "127.0.0.1:9001"
    admin: str = "127.0.0.1:9002"


@dataclass(frozen=True)
class PolicyConfig:
    name: str = "skylb"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrefixConfig:
    block_chars: int = 64
    max_blocks_per_request: int = 4096
    max_blocks_per_replica: int = 200_000
    ttl_s: float = 600.0
    hash_salt: str = ""


@dataclass(frozen=True)
class QueueConfig:
    max_length: int = 1024
    max_wait_s: float = 30.0


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class ScrapeConfig:
    interval_s: float = 0.1
    timeout_s: float = 0.5
    stale_after_s: float = 1.0
    max_pending: int = 0
    confirm_on_response_headers: bool = False
    dispatch_visible_after_s: float = 0.1


@dataclass(frozen=True)
class SpeedConfig:
    """Every replica's speed until its own counters taught better (state/speed.py); default:
    Llama-3.1-8B on one L4 (ARCHITECTURE.md §6, research/replica_calibration.md)."""

    prefill_tokens_per_s: float = 4700.0
    decode_step_s: float = 0.062


@dataclass(frozen=True)
class Config:
    region: str
    replicas: tuple[ReplicaSpec, ...]
    listen: ListenConfig = field(default_factory=ListenConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    scrape: ScrapeConfig = field(default_factory=ScrapeConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    shutdown_grace_s: float = 10.0
    seed: int = 0
    peers: tuple[PeerConfig, ...] = ()
    secret_file: str | None = None  # the shared secret's file (resolved path); never the secret
    residency: ResidencyConfig = field(default_factory=ResidencyConfig)
    spill: SpillConfig = field(default_factory=SpillConfig)

    def router_settings(self) -> RouterSettings:
        # Imported here: config is loaded (check-config) without the routing core being needed.
        from skylb_extproc.router import RouterSettings
        from skylb_extproc.state.speed import Speed

        return RouterSettings(
            block_chars=self.prefix.block_chars,
            max_blocks=self.prefix.max_blocks_per_request,
            hash_salt=self.prefix.hash_salt,
            index_blocks_per_replica=self.prefix.max_blocks_per_replica,
            index_ttl_s=self.prefix.ttl_s,
            queue_max_length=self.queue.max_length,
            queue_max_wait_s=self.queue.max_wait_s,
            stale_after_s=self.scrape.stale_after_s,
            max_pending=self.scrape.max_pending,
            confirm_on_headers=self.scrape.confirm_on_response_headers,
            dispatch_visible_after_s=self.scrape.dispatch_visible_after_s,
            speed_prior=Speed(self.speed.prefill_tokens_per_s, self.speed.decode_step_s),
        )

    def summary(self) -> str:
        return (
            f"region={self.region} replicas={len(self.replicas)} policy={self.policy.name} "
            f"grpc={self.listen.grpc} admin={self.listen.admin}"
        )


# --- sections -----------------------------------------------------------------------------------


def _replica(item: object, path: str) -> ReplicaSpec:
    s = Section(item, path)
    name = s.take("name", as_str)
    if not name:
        raise ConfigError(s.key_path("name"), "must not be empty")
    address = s.take("address", as_address(allow_port_zero=False))
    metrics_url = s.take("metrics_url", as_http_url, f"http://{address}/metrics")
    s.done()
    return ReplicaSpec(name=name, address=address, metrics_url=metrics_url)


def _replicas(root: Section) -> tuple[ReplicaSpec, ...]:
    replicas: list[ReplicaSpec] = []
    names: set[str] = set()
    addresses: set[str] = set()
    for item, path in root.items("replicas"):
        replica = _replica(item, path)
        if replica.name in names:
            raise ConfigError(f"{path}.name", f"duplicate replica name {replica.name!r}")
        if replica.address in addresses:
            raise ConfigError(f"{path}.address", f"duplicate address {replica.address!r}")
        names.add(replica.name)
        addresses.add(replica.address)
        replicas.append(replica)
    if not replicas:
        raise ConfigError(root.key_path("replicas"), "at least one replica is required")
    return tuple(replicas)


def _policy(s: Section) -> PolicyConfig:
    name = s.take("name", as_str, PolicyConfig().name)
    params: dict[str, Any] = s.take("params", as_mapping, {})
    s.done()
    validate_policy(name, params)
    return PolicyConfig(name=name, params=params)


def validate_policy(name: str, params: Mapping[str, Any]) -> None:
    """Build the policy once so unknown names and bad params fail at load time."""
    # Imported here: the policy registry imports every policy module, which parsing needs only now.
    from skylb_extproc.policy.base import make_policy

    try:
        make_policy(name, params)
    except ConfigError as exc:
        if exc.path.startswith("policy"):
            raise
        raise ConfigError(
            f"policy.params.{exc.path}" if exc.path else "policy", exc.message
        ) from exc
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError("policy", f"{name!r}: {exc}") from exc


_POSITIVE = as_float(positive=True)

# Flat sections: one check per field; defaults come from the dataclass itself.
_FIELD_CHECKS: dict[type, dict[str, Callable[[object, str], Any]]] = {
    ListenConfig: {
        "grpc": as_address(allow_port_zero=True),
        "admin": as_address(allow_port_zero=True),
    },
    PrefixConfig: {
        "block_chars": as_int(1),
        "max_blocks_per_request": as_int(1),
        "max_blocks_per_replica": as_int(1),
        "ttl_s": _POSITIVE,
        "hash_salt": as_str,
    },
    QueueConfig: {"max_length": as_int(1), "max_wait_s": _POSITIVE},
    LimitsConfig: {"max_body_bytes": as_int(1)},
    ScrapeConfig: {
        "interval_s": _POSITIVE,
        "timeout_s": _POSITIVE,
        "stale_after_s": _POSITIVE,
        "max_pending": as_int(0),
        "confirm_on_response_headers": as_bool,
        "dispatch_visible_after_s": as_float(positive=False),
    },
    SpeedConfig: {"prefill_tokens_per_s": _POSITIVE, "decode_step_s": _POSITIVE},
}


def _flat(cls: type[T], s: Section) -> T:
    defaults = cls()
    checks = _FIELD_CHECKS[cls]
    values = {key: s.take(key, check, getattr(defaults, key)) for key, check in checks.items()}
    s.done()
    return cls(**values)


def parse_config(data: object, *, base_dir: Path | None = None) -> Config:
    """Validate YAML data (already loaded) into a Config; raises ConfigError naming the key.

    A relative `secret_file` is taken relative to `base_dir` (the config file's directory).
    """
    root = Section(data, "")
    region = root.take("region", as_region)
    peers = parse_peers(root, region)
    known = frozenset({region, *(p.name for p in peers)})
    config = Config(
        region=region,
        listen=_flat(ListenConfig, root.section("listen")),
        replicas=_replicas(root),
        policy=_policy(root.section("policy")),
        prefix=_flat(PrefixConfig, root.section("prefix")),
        queue=_flat(QueueConfig, root.section("queue")),
        limits=_flat(LimitsConfig, root.section("limits")),
        scrape=_flat(ScrapeConfig, root.section("scrape")),
        speed=_flat(SpeedConfig, root.section("speed")),
        shutdown_grace_s=root.take("shutdown_grace_s", as_float(positive=False), 10.0),
        seed=root.take("seed", as_int(0), 0),
        peers=peers,
        secret_file=_secret_file(root, peers, base_dir),
        residency=parse_residency(root.section("residency"), known),
        spill=parse_spill(root.section("spill")),
    )
    root.done()
    return config


def _secret_file(root: Section, peers: tuple[PeerConfig, ...], base_dir: Path | None) -> str | None:
    """The secret file's path, checked readable and non-empty; required when peers are listed."""
    if "secret_file" not in root:
        if peers:
            raise ConfigError("secret_file", "required when peers are configured")
        return None
    path = Path(root.take("secret_file", as_str))
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    read_secret(str(path))
    return str(path)


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: invalid YAML: {exc}") from exc
    return parse_config(data, base_dir=Path(path).parent)


# --- writing ------------------------------------------------------------------------------------


def config_to_dict(config: Config) -> dict[str, Any]:
    """The YAML data `parse_config` reads back into an equal Config."""
    return {
        "region": config.region,
        "listen": {"grpc": config.listen.grpc, "admin": config.listen.admin},
        "replicas": [
            {"name": r.name, "address": r.address, "metrics_url": r.metrics_url}
            for r in config.replicas
        ],
        "policy": {"name": config.policy.name, "params": dict(config.policy.params)},
        "prefix": dict(vars(config.prefix)),
        "queue": dict(vars(config.queue)),
        "limits": dict(vars(config.limits)),
        "scrape": dict(vars(config.scrape)),
        "speed": dict(vars(config.speed)),
        "shutdown_grace_s": config.shutdown_grace_s,
        "seed": config.seed,
        **cross_region_dict(config.peers, config.secret_file, config.residency, config.spill),
    }


def render_yaml(config: Config) -> str:
    """Serialise a Config as skylb.yaml text (key order as documented)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def write_config(config: Config, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(render_yaml(config), encoding="utf-8")
    return target
