"""The rendered Envoy config: what varies by mode, and that Envoy itself accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from skylb_extproc.envoy_config import (
    EnvoySettings,
    envoy_command,
    find_envoy_binary,
    render_envoy_config,
    write_envoy_config,
)
from skylb_extproc.errors import ConfigError
from skylb_extproc.types import ReplicaSpec

REPLICAS = [
    ReplicaSpec("r0", "127.0.0.1:8001", "http://127.0.0.1:8001/metrics"),
    ReplicaSpec("r1", "10.0.0.7:8002", "http://10.0.0.7:8002/metrics"),
]


def settings(**kw: object) -> EnvoySettings:
    base: dict[str, object] = {
        "listen_port": 10000,
        "admin_port": 10001,
        "grpc_address": "127.0.0.1:9001",
        "replicas": REPLICAS,
    }
    return EnvoySettings(**{**base, **kw})  # type: ignore[arg-type]


def ext_proc(doc: Any) -> Any:
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    return next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]


def test_buffered_mode() -> None:
    doc = yaml.safe_load(
        render_envoy_config(settings(body_mode="buffered", max_body_bytes=8 << 20))
    )
    mode = ext_proc(doc)["processing_mode"]
    assert mode["request_body_mode"] == "BUFFERED"
    assert mode["request_trailer_mode"] == "SKIP"
    assert mode["response_trailer_mode"] == "SEND"
    # The whole body must fit in the listener's buffer, or Envoy answers 413 itself.
    assert doc["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 8 << 20


def test_duplex_mode_and_timeouts() -> None:
    doc = yaml.safe_load(render_envoy_config(settings(body_mode="duplex", queue_max_wait_s=30)))
    cfg = ext_proc(doc)
    assert cfg["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert cfg["processing_mode"]["request_trailer_mode"] == "SEND"
    assert cfg["message_timeout"] == "35.000s"  # queue deadline + margin
    assert cfg["failure_mode_allow"] is False


def test_replica_endpoints_and_grpc_address() -> None:
    doc = yaml.safe_load(render_envoy_config(settings()))
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    endpoints = clusters["replicas"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "127.0.0.1", "port_value": 8001},
        {"address": "10.0.0.7", "port_value": 8002},
    ]
    grpc = clusters["skylb_extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9001,
    }


@pytest.mark.parametrize(
    "bad", [{"body_mode": "streamed"}, {"replicas": []}, {"grpc_address": "nope"}]
)
def test_bad_settings_raise_config_error(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        render_envoy_config(settings(**bad))


@pytest.mark.parametrize("mode", ["buffered", "duplex"])
def test_envoy_accepts_the_rendered_config(tmp_path: Path, mode: str) -> None:
    try:
        binary = find_envoy_binary()
    except FileNotFoundError:
        pytest.skip("no Envoy binary")
    path = write_envoy_config(settings(body_mode=mode), tmp_path / "envoy.yaml")
    argv = [*envoy_command(path, binary=binary), "--mode", "validate"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
