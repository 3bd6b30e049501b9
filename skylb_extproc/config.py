"""Typed configuration of one skylb region (skylb.yaml), validated with the offending key's path.

Everything is a frozen dataclass with the documented defaults, so code (the demo, tests) can build
a `Config` directly and write it out with `render_yaml`. `parse_config` accepts the YAML data and
rejects unknown keys and bad values with `ConfigError("queue.max_wait_s", ...)`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import yaml

from skylb_extproc.errors import ConfigError
from skylb_extproc.types import ReplicaSpec

if TYPE_CHECKING:
    from skylb_extproc.router import RouterSettings

T = TypeVar("T")

_REGION_RE = re.compile(r"^[a-z0-9-]+$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


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
    shutdown_grace_s: float = 10.0
    seed: int = 0

    def router_settings(self) -> RouterSettings:
        # Imported here: config is loaded (check-config) without the routing core being needed.
        from skylb_extproc.router import RouterSettings

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
        )

    def summary(self) -> str:
        return (
            f"region={self.region} replicas={len(self.replicas)} policy={self.policy.name} "
            f"grpc={self.listen.grpc} admin={self.listen.admin}"
        )


# --- typed readers ------------------------------------------------------------------------------


class _Section:
    """A mapping being read: each accessor pops a key, `done()` rejects whatever is left."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {key!r}")
        self.path = path
        self._data: dict[str, object] = dict(data)

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, check: Callable[[object, str], T], default: T | None = None) -> T:
        """Read `key` through `check`; a missing key yields `default` (None default = required)."""
        if key not in self._data:
            if default is None:
                raise ConfigError(self.key_path(key), "required")
            return default
        return check(self._data.pop(key), self.key_path(key))

    def section(self, key: str) -> _Section:
        return _Section(self._data.pop(key, None), self.key_path(key))

    def items(self, key: str) -> Iterator[tuple[object, str]]:
        value = self._data.pop(key, None)
        if not isinstance(value, list):
            raise ConfigError(self.key_path(key), f"expected a list, got {_kind(value)}")
        for i, item in enumerate(value):
            yield item, f"{self.key_path(key)}[{i}]"

    def done(self) -> None:
        for key in self._data:
            raise ConfigError(self.key_path(key), "unknown key")


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {_kind(value)}")
    return value


def as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {_kind(value)}")
    return value


def as_int(minimum: int) -> Callable[[object, str], int]:
    def check(value: object, path: str) -> int:
        # bool is an int subclass; `true` as a count is almost surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {_kind(value)}")
        if value < minimum:
            raise ConfigError(path, f"must be >= {minimum}, got {value}")
        return value

    return check


def as_float(*, positive: bool) -> Callable[[object, str], float]:
    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {_kind(value)}")
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(path, f"must be finite, got {value}")
        if positive and number <= 0:
            raise ConfigError(path, f"must be > 0, got {value}")
        if number < 0:
            raise ConfigError(path, f"must be >= 0, got {value}")
        return number

    return check


def as_mapping(value: object, path: str) -> dict[str, Any]:
    return dict(_Section(value, path)._data)


def as_region(value: object, path: str) -> str:
    region = as_str(value, path)
    if not _REGION_RE.match(region):
        raise ConfigError(path, f"must match [a-z0-9-]+, got {region!r}")
    return region


def split_host_port(value: str, path: str, *, allow_port_zero: bool) -> tuple[str, int]:
    """Split `host:port` / `[v6]:port`; the host must be an IP address or a DNS name."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(path, f"expected host:port, got {value!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ConfigError(path, f"port out of range in {value!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if bare != host or not _HOSTNAME_RE.match(host):
            raise ConfigError(path, f"invalid host in {value!r}") from None
        return host, port
    if ip.version == 6 and bare == host:
        raise ConfigError(path, f"IPv6 hosts need brackets: [{host}]:{port}")
    return bare, port


def as_address(*, allow_port_zero: bool) -> Callable[[object, str], str]:
    def check(value: object, path: str) -> str:
        text = as_str(value, path)
        split_host_port(text, path, allow_port_zero=allow_port_zero)
        return text

    return check


def as_http_url(value: object, path: str) -> str:
    url = as_str(value, path)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(path, f"expected an http(s) URL, got {url!r}")
    return url


# --- sections -----------------------------------------------------------------------------------


def _replica(item: object, path: str) -> ReplicaSpec:
    s = _Section(item, path)
    name = s.take("name", as_str)
    if not name:
        raise ConfigError(s.key_path("name"), "must not be empty")
    address = s.take("address", as_address(allow_port_zero=False))
    metrics_url = s.take("metrics_url", as_http_url, f"http://{address}/metrics")
    s.done()
    return ReplicaSpec(name=name, address=address, metrics_url=metrics_url)


def _replicas(root: _Section) -> tuple[ReplicaSpec, ...]:
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


def _policy(s: _Section) -> PolicyConfig:
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
    },
}


def _flat(cls: type[T], s: _Section) -> T:
    defaults = cls()
    checks = _FIELD_CHECKS[cls]
    values = {key: s.take(key, check, getattr(defaults, key)) for key, check in checks.items()}
    s.done()
    return cls(**values)


def parse_config(data: object) -> Config:
    """Validate YAML data (already loaded) into a Config; raises ConfigError naming the key."""
    root = _Section(data, "")
    config = Config(
        region=root.take("region", as_region),
        listen=_flat(ListenConfig, root.section("listen")),
        replicas=_replicas(root),
        policy=_policy(root.section("policy")),
        prefix=_flat(PrefixConfig, root.section("prefix")),
        queue=_flat(QueueConfig, root.section("queue")),
        limits=_flat(LimitsConfig, root.section("limits")),
        scrape=_flat(ScrapeConfig, root.section("scrape")),
        shutdown_grace_s=root.take("shutdown_grace_s", as_float(positive=False), 10.0),
        seed=root.take("seed", as_int(0), 0),
    )
    root.done()
    return config


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path}: invalid YAML: {exc}") from exc
    return parse_config(data)


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
        "shutdown_grace_s": config.shutdown_grace_s,
        "seed": config.seed,
    }


def render_yaml(config: Config) -> str:
    """Serialise a Config as skylb.yaml text (key order as documented)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)


def write_config(config: Config, path: str | Path) -> Path:
    target = Path(path)
    target.write_text(render_yaml(config), encoding="utf-8")
    return target
