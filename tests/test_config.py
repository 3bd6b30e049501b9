"""config.py: the documented example parses; every bad key or value is named by its path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from skylb_extproc.cli import main
from skylb_extproc.config import (
    Config,
    ListenConfig,
    load_config,
    parse_config,
    render_yaml,
    split_host_port,
)
from skylb_extproc.errors import ConfigError
from skylb_extproc.state.speed import Speed
from skylb_extproc.types import ReplicaSpec

EXAMPLE = """
region: us
listen:
  grpc: 127.0.0.1:9001
  admin: 127.0.0.1:9002
replicas:
  - name: r0
    address: 127.0.0.1:8001
    metrics_url: http://127.0.0.1:8001/metrics
  - name: r1
    address: 127.0.0.1:8002
policy:
  name: skylb
  params: {}
prefix:
  block_chars: 64
  max_blocks_per_request: 4096
  max_blocks_per_replica: 200000
  ttl_s: 600
queue:
  max_length: 1024
  max_wait_s: 30
limits:
  max_body_bytes: 16777216
scrape:
  interval_s: 0.1
  timeout_s: 0.5
  stale_after_s: 1.0
  max_pending: 0
speed:
  prefill_tokens_per_s: 39000
  decode_step_s: 0.0073
shutdown_grace_s: 10
seed: 0
"""


def example() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(EXAMPLE)
    return data


def test_example_parses_with_values_and_defaults() -> None:
    config = parse_config(example())
    assert config.region == "us"
    assert config.listen == ListenConfig("127.0.0.1:9001", "127.0.0.1:9002")
    assert config.replicas == (
        ReplicaSpec("r0", "127.0.0.1:8001", "http://127.0.0.1:8001/metrics"),
        ReplicaSpec("r1", "127.0.0.1:8002", "http://127.0.0.1:8002/metrics"),
    )
    assert config.queue.max_wait_s == 30.0 and isinstance(config.queue.max_wait_s, float)
    assert config.scrape.interval_s == 0.1
    assert config.shutdown_grace_s == 10.0
    assert config.router_settings().speed_prior == Speed(39000.0, 0.0073, "prior")


def test_minimal_config_takes_documented_defaults() -> None:
    config = parse_config(
        {"region": "eu-west", "replicas": [{"name": "a", "address": "10.0.0.1:80"}]}
    )
    assert config == Config(
        region="eu-west",
        replicas=(ReplicaSpec("a", "10.0.0.1:80", "http://10.0.0.1:80/metrics"),),
    )
    assert config.policy.name == "skylb"
    assert config.prefix.block_chars == 64
    assert config.limits.max_body_bytes == 16 * 1024 * 1024
    assert config.router_settings().speed_prior == Speed(4700.0, 0.062)


def test_render_yaml_round_trips() -> None:
    data = example()
    data["policy"] = {"name": "consistent_hash", "params": {"virtual_nodes": 64}}
    config = parse_config(data)
    assert parse_config(yaml.safe_load(render_yaml(config))) == config


def _set(data: dict[str, Any], path: str, value: object) -> None:
    keys = path.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value


_DELETE = object()

# (where to change the example, new value, the path the error must name, a word of the message)
BAD = [
    ("bogus", 1, "bogus", "unknown key"),
    ("queue.max_wiat_s", 3, "queue.max_wiat_s", "unknown key"),
    ("replicas.1.port", 1, "replicas[1].port", "unknown key"),
    ("region", _DELETE, "region", "required"),
    ("region", "US", "region", "[a-z0-9-]+"),
    ("region", 5, "region", "string"),
    ("listen", [1], "listen", "mapping"),
    ("listen.grpc", "localhost", "listen.grpc", "host:port"),
    ("listen.admin", "127.0.0.1:70000", "listen.admin", "port"),
    ("listen.grpc", "::1:9000", "listen.grpc", "brackets"),
    ("listen.grpc", "bad host!:9000", "listen.grpc", "invalid host"),
    ("replicas", [], "replicas", "at least one"),
    ("replicas", {"r0": 1}, "replicas", "list"),
    ("replicas.0", "r0", "replicas[0]", "mapping"),
    ("replicas.1.address", "127.0.0.1:0", "replicas[1].address", "port"),
    ("replicas.1.address", "127.0.0.1:8001", "replicas[1].address", "duplicate"),
    ("replicas.1.name", "r0", "replicas[1].name", "duplicate"),
    ("replicas.1.name", "", "replicas[1].name", "empty"),
    ("replicas.0.address", _DELETE, "replicas[0].address", "required"),
    ("replicas.0.metrics_url", "ftp://x/metrics", "replicas[0].metrics_url", "http"),
    ("policy.name", "fastest", "policy.name", "fastest"),
    ("policy.params", [1], "policy.params", "mapping"),
    ("policy.params", {"bogus": 1}, "policy.params.bogus", "unknown"),
    ("prefix.block_chars", 0, "prefix.block_chars", ">= 1"),
    ("prefix.block_chars", True, "prefix.block_chars", "integer"),
    ("prefix.max_blocks_per_request", 1.5, "prefix.max_blocks_per_request", "integer"),
    ("prefix.ttl_s", -1, "prefix.ttl_s", "> 0"),
    ("queue.max_wait_s", "30s", "queue.max_wait_s", "number"),
    ("queue.max_wait_s", 0, "queue.max_wait_s", "> 0"),
    ("queue.max_wait_s", float("nan"), "queue.max_wait_s", "finite"),
    ("queue.max_length", 0, "queue.max_length", ">= 1"),
    ("limits.max_body_bytes", None, "limits.max_body_bytes", "integer"),
    ("scrape.interval_s", 0, "scrape.interval_s", "> 0"),
    ("scrape.max_pending", -1, "scrape.max_pending", ">= 0"),
    ("speed.prefill_tokens_per_s", 0, "speed.prefill_tokens_per_s", "> 0"),
    ("speed.decode_step_s", "62ms", "speed.decode_step_s", "number"),
    ("speed.decode_step_s", float("inf"), "speed.decode_step_s", "finite"),
    ("speed.decode_s", 0.06, "speed.decode_s", "unknown key"),
    ("speed", 4700, "speed", "mapping"),
    ("shutdown_grace_s", -0.5, "shutdown_grace_s", ">= 0"),
    ("seed", "x", "seed", "integer"),
]


@pytest.mark.parametrize(
    ("where", "value", "path", "word"), BAD, ids=[f"{b[2]}={b[1]!r}" for b in BAD]
)
def test_bad_value_names_its_path(where: str, value: object, path: str, word: str) -> None:
    data = copy.deepcopy(example())
    _set(data, where, value)
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert info.value.path == path
    assert word in str(info.value)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("data", [[], "region: us", 3])
def test_document_must_be_a_mapping(data: object) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        parse_config(data)


def test_empty_document_asks_for_the_region() -> None:
    with pytest.raises(ConfigError, match=r"^region: required$"):
        parse_config(None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:9000", ("::1", 9000)),
        ("replica-0.us.internal:8000", ("replica-0.us.internal", 8000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_split_host_port_accepts(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text, "x", allow_port_zero=True) == expected


def test_load_config_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("region: [us\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(broken)


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(EXAMPLE)
    assert main(["check-config", str(good)]) == 0
    assert capsys.readouterr().out.startswith("ok: region=us replicas=2 policy=skylb")

    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.replace("max_wait_s: 30", "max_wait_s: -3"))
    assert main(["check-config", str(bad)]) == 2
    assert "queue.max_wait_s: must be > 0" in capsys.readouterr().err


def test_check_config_as_a_module(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE + "colour: blue\n")
    done = subprocess.run(
        [sys.executable, "-m", "skylb_extproc", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "colour: unknown key" in done.stderr
