"""The configs of the docker-compose demo (two regions, us and eu), rendered from the templates.

`docker-compose.yml` mounts plain files from `envoy/compose/`; they are rendered once by

    python -m skylb_extproc.compose envoy/compose

and committed, and `tests/test_compose.py` checks that they are exactly what this module renders
and that compose, Envoy and skylb agree on every address, port and cluster name.

Every container has a fixed address on the compose network. That is deliberate: skylb names a
replica by `ip:port`, and Envoy's `override_host` matches that string against the addresses of
its STATIC cluster; a DNS name would resolve to an address skylb does not know, and every
request would fall back to round robin.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from skylb_extproc.config import Config, ListenConfig, PeerConfig, render_yaml
from skylb_extproc.envoy_config import EnvoySettings, PeerRoute, render_envoy_config
from skylb_extproc.types import ReplicaSpec

__all__ = [
    "REGIONS",
    "ComposeRegion",
    "envoy_settings",
    "render_all",
    "skylb_config",
]

SUBNET = "172.28.0.0/16"
SECRET_PATH = "/run/secrets/skylb_secret"  # where compose mounts the `skylb_secret` file
REPLICA_PORT = 8000  # vLLM's default, and what the sim replica is told
GRPC_PORT = 9001
ADMIN_PORT = 9002
LISTEN_PORT = 10000  # Envoy, for clients
PEER_PORT = 10001  # Envoy, for the other region's Envoy (forwarded requests, state polls)
ENVOY_ADMIN_PORT = 9901  # on the container's loopback only
# Both regions run on one host: the fault filter adds what a real inter-region link would.
# Across real regions render with 0.
RTT_MS = 50.0
_HEADER = "# Rendered by skylb_extproc/compose.py: regenerate, do not edit\n"


@dataclass(frozen=True)
class ComposeRegion:
    """One region of the compose demo: its containers live in 172.28.<index>.0/24."""

    name: str
    index: int
    published_port: int  # the host port clients use (Envoy's client listener)

    def ip(self, host: int) -> str:
        return f"172.28.{self.index}.{host}"

    @property
    def replica_ip(self) -> str:
        return self.ip(10)

    @property
    def skylb_ip(self) -> str:
        return self.ip(20)

    @property
    def envoy_ip(self) -> str:
        return self.ip(30)

    @property
    def replica_name(self) -> str:
        return f"{self.name}-r0"

    @property
    def cluster(self) -> str:
        """The Envoy cluster (in the other region) that reaches this region."""
        return f"peer-{self.name}"


REGIONS = (ComposeRegion("us", 1, 8080), ComposeRegion("eu", 2, 8081))


def _peers(region: ComposeRegion, regions: Sequence[ComposeRegion]) -> list[ComposeRegion]:
    return [r for r in regions if r != region]


def skylb_config(
    region: ComposeRegion, regions: Sequence[ComposeRegion] = REGIONS, *, secret: str = SECRET_PATH
) -> Config:
    address = f"{region.replica_ip}:{REPLICA_PORT}"
    return Config(
        region=region.name,
        replicas=(ReplicaSpec(region.replica_name, address, f"http://{address}/metrics"),),
        # 0.0.0.0: Envoy, the peer Envoy (state polls) and Prometheus reach it over the network.
        listen=ListenConfig(grpc=f"0.0.0.0:{GRPC_PORT}", admin=f"0.0.0.0:{ADMIN_PORT}"),
        peers=tuple(
            PeerConfig(
                name=p.name,
                cluster=p.cluster,
                # Through the peer's Envoy: down when its Envoy or its skylb is down.
                state_url=f"http://{p.envoy_ip}:{PEER_PORT}/peer/state",
                rtt_ms=RTT_MS,
            )
            for p in _peers(region, regions)
        ),
        secret_file=secret,
    )


def envoy_settings(
    region: ComposeRegion, regions: Sequence[ComposeRegion] = REGIONS
) -> EnvoySettings:
    return EnvoySettings(
        listen_port=LISTEN_PORT,
        admin_port=ENVOY_ADMIN_PORT,
        grpc_address=f"{region.skylb_ip}:{GRPC_PORT}",
        replicas=skylb_config(region, regions).replicas,
        listen_address="0.0.0.0",
        peer_port=PEER_PORT,
        peers=[
            PeerRoute(p.name, p.cluster, f"{p.envoy_ip}:{PEER_PORT}", delay_ms=RTT_MS)
            for p in _peers(region, regions)
        ],
        skylb_admin_address=f"{region.skylb_ip}:{ADMIN_PORT}",
    )


def render_all(regions: Sequence[ComposeRegion] = REGIONS) -> dict[str, str]:
    """File name -> text, for every config docker-compose.yml mounts from envoy/compose/."""
    files = {}
    for region in regions:
        files[f"envoy-{region.name}.yaml"] = render_envoy_config(envoy_settings(region, regions))
        files[f"skylb-{region.name}.yaml"] = _HEADER + render_yaml(skylb_config(region, regions))
    return files


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0] if args else "envoy/compose")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (out / name).write_text(text, encoding="utf-8")
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
