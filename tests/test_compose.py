"""docker-compose.yml, the Envoy configs and the skylb configs of the compose demo agree.

The configs under envoy/compose/ must be exactly what skylb_extproc/compose.py renders from the
templates; every address, port and cluster name must line up between compose (fixed addresses,
published ports, commands), Envoy (listeners, clusters, routes) and skylb (listen, replicas,
peers); the secret must be a mounted file. `docker compose config` / `docker-compose config`
validates the file itself when a client is installed, and Envoy validates its configs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from skylb_extproc import compose
from skylb_extproc.config import Config, parse_config
from skylb_extproc.envoy_config import envoy_command, find_envoy_binary

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
PROFILES = ("gpu", "sim")
_DEFAULT_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _defaults(text: str) -> str:
    """${VAR:-default} -> default (what compose uses with an empty environment)."""
    return _DEFAULT_VAR.sub(lambda m: m.group(2) or "", text)


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _services(spec: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = spec["services"]
    return services


def _ip(service: dict[str, Any]) -> str:
    return str(service["networks"]["skylb"]["ipv4_address"])


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path, for bind mounts of files from the repository."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = ROOT / source
    return out


def _envoy_doc(spec: dict[str, Any], region: str) -> Any:
    return yaml.safe_load(
        _mounts(_services(spec)[f"envoy-{region}"])["/etc/envoy/envoy.yaml"].read_text()
    )


def _skylb(spec: dict[str, Any], region: str, tmp_path: Path) -> Config:
    """The mounted skylb config, parsed with its secret path pointed at a local file."""
    path = _mounts(_services(spec)[f"skylb-{region}"])["/etc/skylb/skylb.yaml"]
    data = yaml.safe_load(path.read_text())
    assert data["secret_file"] == compose.SECRET_PATH
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    return parse_config({**data, "secret_file": str(secret)})


def _endpoints(cluster: dict[str, Any]) -> list[str]:
    out = []
    for group in cluster["load_assignment"]["endpoints"]:
        for item in group["lb_endpoints"]:
            sock = item["endpoint"]["address"]["socket_address"]
            out.append(f"{sock['address']}:{sock['port_value']}")
    return out


def _clusters(doc: Any) -> dict[str, Any]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def _listener_port(doc: Any, name: str) -> int:
    listener = next(item for item in doc["static_resources"]["listeners"] if item["name"] == name)
    return int(listener["address"]["socket_address"]["port_value"])


def test_rendered_configs_are_current() -> None:
    for name, text in compose.render_all().items():
        path = ROOT / "envoy" / "compose" / name
        assert path.read_text() == text, (
            f"{path} is stale: python -m skylb_extproc.compose envoy/compose"
        )


def test_every_referenced_file_exists(spec: dict[str, Any]) -> None:
    for name, service in _services(spec).items():
        for target, source in _mounts(service).items():
            assert source.is_file(), f"{name}: {source} (mounted at {target}) does not exist"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    secret = _defaults(spec["secrets"]["skylb_secret"]["file"])
    assert (ROOT / secret).is_file()


def test_envoy_reaches_its_skylb_and_replica(spec: dict[str, Any], tmp_path: Path) -> None:
    services = _services(spec)
    for region in compose.REGIONS:
        doc, config = _envoy_doc(spec, region.name), _skylb(spec, region.name, tmp_path)
        clusters = _clusters(doc)
        skylb_ip = _ip(services[f"skylb-{region.name}"])
        grpc_port = config.listen.grpc.rsplit(":", 1)[1]
        admin_port = config.listen.admin.rsplit(":", 1)[1]
        assert _endpoints(clusters["skylb_extproc"]) == [f"{skylb_ip}:{grpc_port}"]
        assert _endpoints(clusters["skylb_admin"]) == [f"{skylb_ip}:{admin_port}"]
        # skylb names replicas by the address Envoy's cluster knows, and both replica services
        # (vLLM, sim) of the region sit at that address and port.
        replicas = [r.address for r in config.replicas]
        assert _endpoints(clusters["replicas"]) == replicas
        for kind in ("vllm", "sim"):
            service = services[f"{kind}-{region.name}"]
            assert f"{_ip(service)}:{compose.REPLICA_PORT}" in replicas
            assert "--port=8000" in service["command"]
        assert f"{region.name}-r0" in services[f"sim-{region.name}"]["command"][4]


def test_regions_reach_each_other_through_peer_listeners(
    spec: dict[str, Any], tmp_path: Path
) -> None:
    services = _services(spec)
    for region in compose.REGIONS:
        doc, config = _envoy_doc(spec, region.name), _skylb(spec, region.name, tmp_path)
        clusters = _clusters(doc)
        assert {p.name for p in config.peers} == {r.name for r in compose.REGIONS} - {region.name}
        for peer in config.peers:
            peer_doc = _envoy_doc(spec, peer.name)
            peer_envoy = f"{_ip(services[f'envoy-{peer.name}'])}:{_listener_port(peer_doc, 'peer')}"
            assert _endpoints(clusters[peer.cluster]) == [peer_envoy]
            assert peer.state_url == f"http://{peer_envoy}/peer/state"
            routes = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            matches = [
                r["match"].get("headers")
                for r in routes["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
            ]
            assert [{"name": "x-skylb-cluster", "string_match": {"exact": peer.cluster}}] in matches


def test_published_ports_reach_the_client_listeners(spec: dict[str, Any]) -> None:
    services = _services(spec)
    for region in compose.REGIONS:
        port = _listener_port(_envoy_doc(spec, region.name), "llm")
        assert services[f"envoy-{region.name}"]["ports"] == [f"{region.published_port}:{port}"]


def test_secret_is_a_mounted_file_never_inline(spec: dict[str, Any]) -> None:
    services = _services(spec)
    for region in compose.REGIONS:
        assert services[f"skylb-{region.name}"]["secrets"] == ["skylb_secret"]
    assert set(spec["secrets"]["skylb_secret"]) == {"file"}
    secret = (ROOT / _defaults(spec["secrets"]["skylb_secret"]["file"])).read_text().strip()
    assert secret not in COMPOSE.read_text()
    for name, service in services.items():
        env = service.get("environment", {})
        assert not any("SECRET" in key.upper() for key in env), name
    for path in (ROOT / "envoy" / "compose").glob("*.yaml"):
        assert secret not in path.read_text()


def test_prometheus_scrapes_every_skylb_and_replica(spec: dict[str, Any]) -> None:
    services = _services(spec)
    prom = yaml.safe_load(
        _mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"].read_text()
    )
    targets = {
        job["job_name"]: {t for group in job["static_configs"] for t in group["targets"]}
        for job in prom["scrape_configs"]
    }
    names = [r.name for r in compose.REGIONS]
    assert targets["skylb"] == {f"skylb-{r}:{compose.ADMIN_PORT}" for r in names}
    assert targets["vllm"] == {f"replica-{r}:{compose.REPLICA_PORT}" for r in names}
    for region in names:  # the alias the replica target names exists in both profiles
        for kind in ("vllm", "sim"):
            assert (
                f"replica-{region}" in services[f"{kind}-{region}"]["networks"]["skylb"]["aliases"]
            )


def test_vllm_gets_the_gpus_and_the_model_from_the_environment(spec: dict[str, Any]) -> None:
    for region in compose.REGIONS:
        vllm = _services(spec)[f"vllm-{region.name}"]
        device = vllm["deploy"]["resources"]["reservations"]["devices"][0]
        assert device["capabilities"] == ["gpu"] and device["count"] == "${GPUS:-1}"
        assert any(arg.startswith("--model=${MODEL:-") for arg in vllm["command"])
        assert vllm["profiles"] == ["gpu"]
        assert _services(spec)[f"sim-{region.name}"]["profiles"] == ["sim"]


@pytest.mark.parametrize("name", sorted(n for n in compose.render_all() if n.startswith("envoy-")))
def test_envoy_accepts_the_compose_configs(name: str) -> None:
    try:
        binary = find_envoy_binary()
    except FileNotFoundError:
        pytest.skip("no Envoy binary")
    argv = [*envoy_command(ROOT / "envoy" / "compose" / name, binary=binary), "--mode", "validate"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever works here."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_client_accepts_the_file(profile: str) -> None:
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose plugin or docker-compose) installed")
    argv = [*client, "-f", str(COMPOSE), "--profile", profile, "config", "-q"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
