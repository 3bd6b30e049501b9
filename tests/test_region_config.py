"""The cross-region config sections: peers, secret_file, residency, spill (region/config.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from skylb_extproc.cli import main
from skylb_extproc.config import (
    CostConfig,
    PeerConfig,
    ResidencyConfig,
    SpillConfig,
    load_config,
    parse_config,
    render_yaml,
)
from skylb_extproc.errors import ConfigError
from skylb_extproc.region.config import read_secret


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("s3cret\n")
    return path


def data(secret: Path) -> dict[str, Any]:
    return {
        "region": "us",
        "replicas": [{"name": "r0", "address": "127.0.0.1:8001"}],
        "peers": [
            {"name": "eu", "cluster": "peer-eu", "state_url": "http://10.1.0.2:9002/peer/state"},
            {
                "name": "asia",
                "cluster": "peer_asia",
                "state_url": "https://asia.example:9002/peer/state",
                "rtt_ms": 120,
            },
        ],
        "secret_file": str(secret),
        "residency": {
            "allowed_regions": ["us", "eu"],
            "tenant_header": "x-tenant",
            "tenants": {"acme": ["us"], "globex": ["eu", "asia"]},
        },
        "spill": {"mode": "cost", "tau": 4, "cost": {"margin_s": 0.1}},
    }


def test_full_example_parses(secret: Path) -> None:
    config = parse_config(data(secret))
    assert config.peers == (
        PeerConfig("eu", "peer-eu", "http://10.1.0.2:9002/peer/state"),
        PeerConfig("asia", "peer_asia", "https://asia.example:9002/peer/state", 120.0),
    )
    assert config.secret_file == str(secret)
    assert config.residency == ResidencyConfig(
        ("us", "eu"), "x-tenant", {"acme": ("us",), "globex": ("eu", "asia")}
    )
    assert config.spill == SpillConfig(mode="cost", tau=4, cost=CostConfig(margin_s=0.1))
    assert parse_config(yaml.safe_load(render_yaml(config))) == config


def test_defaults_without_peers() -> None:
    config = parse_config({"region": "us", "replicas": [{"name": "a", "address": "1.2.3.4:80"}]})
    assert config.peers == () and config.secret_file is None
    assert config.residency == ResidencyConfig()
    assert config.spill == SpillConfig()
    assert (config.spill.tau, config.spill.poll_interval_s, config.spill.stale_after_s) == (
        10,
        0.1,
        0.5,
    )
    assert parse_config(yaml.safe_load(render_yaml(config))) == config


def test_relative_secret_file_is_relative_to_the_config(tmp_path: Path, secret: Path) -> None:
    d = data(secret)
    d["secret_file"] = "secret"
    path = tmp_path / "skylb.yaml"
    path.write_text(yaml.safe_dump(d))
    assert load_config(path).secret_file == str(secret)


def test_read_secret_strips_whitespace(secret: Path) -> None:
    assert read_secret(str(secret)) == b"s3cret"


def _set(d: dict[str, Any], where: str, value: object) -> None:
    keys = where.split(".")
    node: Any = d
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last: Any = int(keys[-1]) if keys[-1].isdigit() else keys[-1]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

BAD = [
    ("peers", {"eu": 1}, "peers", "list"),
    ("peers.0.name", "us", "peers[0].name", "own peer"),
    ("peers.0.name", "EU", "peers[0].name", "[a-z0-9-]+"),
    ("peers.1.name", "eu", "peers[1].name", "duplicate"),
    ("peers.1.cluster", "peer-eu", "peers[1].cluster", "duplicate"),
    ("peers.0.cluster", "bad cluster", "peers[0].cluster", "A-Za-z0-9"),
    ("peers.0.cluster", _DELETE, "peers[0].cluster", "required"),
    ("peers.0.state_url", "10.1.0.2:9002", "peers[0].state_url", "http"),
    ("peers.0.rtt_ms", -1, "peers[0].rtt_ms", ">= 0"),
    ("peers.0.colour", "red", "peers[0].colour", "unknown key"),
    ("secret_file", _DELETE, "secret_file", "required when peers"),
    ("secret_file", "/nonexistent/secret", "secret_file", "cannot read"),
    ("secret_file", 5, "secret_file", "string"),
    ("residency.allowed_regions", [], "residency.allowed_regions", "non-empty"),
    ("residency.allowed_regions", ["us", "mars"], "residency.allowed_regions[1]", "unknown"),
    ("residency.tenants.acme", ["moon"], "residency.tenants.acme[0]", "unknown"),
    ("residency.tenants", [1], "residency.tenants", "mapping"),
    ("residency.tenant_header", _DELETE, "residency.tenant_header", "required"),
    ("residency.tenant_header", "X-Tenant", "residency.tenant_header", "lowercase"),
    ("residency.tenant_header", "x-skylb-tenant", "residency.tenant_header", "x-skylb"),
    ("residency.bogus", 1, "residency.bogus", "unknown key"),
    ("spill.mode", "fastest", "spill.mode", "prefix, hash, cost"),
    ("spill.tau", -1, "spill.tau", ">= 0"),
    ("spill.cache_threshold", 1.5, "spill.cache_threshold", "[0, 1]"),
    ("spill.poll_interval_s", 0, "spill.poll_interval_s", "> 0"),
    ("spill.stale_after_s", "1s", "spill.stale_after_s", "number"),
    ("spill.marker_max_skew_s", 0, "spill.marker_max_skew_s", "> 0"),
    ("spill.cost.margin_s", -0.1, "spill.cost.margin_s", ">= 0"),
    ("spill.cost.prefill_tokens_per_s", 0, "spill.cost.prefill_tokens_per_s", "> 0"),
    ("spill.cost.bogus", 1, "spill.cost.bogus", "unknown key"),
]


@pytest.mark.parametrize(
    ("where", "value", "path", "word"), BAD, ids=[f"{b[2]}={b[1]!r}" for b in BAD]
)
def test_bad_value_names_its_path(
    secret: Path, where: str, value: object, path: str, word: str
) -> None:
    d = copy.deepcopy(data(secret))
    _set(d, where, value)
    with pytest.raises(ConfigError) as info:
        parse_config(d)
    assert info.value.path == path
    assert word in str(info.value)


def test_empty_secret_file_is_refused(secret: Path) -> None:
    secret.write_text("  \n")
    with pytest.raises(ConfigError, match=r"^secret_file: .* is empty$"):
        parse_config(data(secret))


def test_check_config_exit_code_2_names_the_secret_key(
    tmp_path: Path, secret: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = data(secret)
    d["secret_file"] = "missing-secret"
    path = tmp_path / "skylb.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["check-config", str(path)]) == 2
    assert "secret_file: cannot read" in capsys.readouterr().err


def test_build_balancer_from_config(secret: Path) -> None:
    from skylb_extproc.region.build import build_balancer

    balancer = build_balancer(parse_config(data(secret)))
    state = balancer.state(0.0)
    assert state["spill_mode"] == "cost"
    peers = state["peers"]
    assert isinstance(peers, list)
    assert [(p["name"], p["rtt_s"], p["fresh"]) for p in peers] == [
        ("eu", 0.0, False),  # unknown until measured
        ("asia", pytest.approx(0.12), False),  # rtt_ms: a round trip
    ]
    one_region = build_balancer(
        parse_config({"region": "us", "replicas": data(secret)["replicas"]})
    )
    assert "peers" not in one_region.state(0.0)
