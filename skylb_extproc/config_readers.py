"""Typed readers of YAML configuration data: each check names the offending key's path.

Shared by `config.py` (the one-region sections) and `region/config.py` (peers, residency,
spill), so a bad value anywhere is reported the same way: `ConfigError("queue.max_wait_s", ...)`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

from skylb_extproc.errors import ConfigError

T = TypeVar("T")

REGION_RE = re.compile(r"^[a-z0-9-]+$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class Section:
    """A mapping being read: each accessor pops a key, `done()` rejects whatever is left."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {kind(data)}")
        for key in data:
            if not isinstance(key, str):
                raise ConfigError(path, f"keys must be strings, got {key!r}")
        self.path = path
        self._data: dict[str, object] = dict(data)

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def take(self, key: str, check: Callable[[object, str], T], default: T | None = None) -> T:
        """Read `key` through `check`; a missing key yields `default` (None default = required)."""
        if key not in self._data:
            if default is None:
                raise ConfigError(self.key_path(key), "required")
            return default
        return check(self._data.pop(key), self.key_path(key))

    def section(self, key: str) -> Section:
        return Section(self._data.pop(key, None), self.key_path(key))

    def items(self, key: str) -> Iterator[tuple[object, str]]:
        value = self._data.pop(key, None)
        if not isinstance(value, list):
            raise ConfigError(self.key_path(key), f"expected a list, got {kind(value)}")
        for i, item in enumerate(value):
            yield item, f"{self.key_path(key)}[{i}]"

    def done(self) -> None:
        for key in self._data:
            raise ConfigError(self.key_path(key), "unknown key")


def kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def as_str(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"expected a string, got {kind(value)}")
    return value


def as_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {kind(value)}")
    return value


def as_int(minimum: int) -> Callable[[object, str], int]:
    def check(value: object, path: str) -> int:
        # bool is an int subclass; `true` as a count is almost surely a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {kind(value)}")
        if value < minimum:
            raise ConfigError(path, f"must be >= {minimum}, got {value}")
        return value

    return check


def as_float(*, positive: bool) -> Callable[[object, str], float]:
    def check(value: object, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"expected a number, got {kind(value)}")
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
    return dict(Section(value, path)._data)


def as_region(value: object, path: str) -> str:
    region = as_str(value, path)
    if not REGION_RE.match(region):
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
