"""Several regions on loopback, each Envoy + skylb + simulated replicas, peered with each other.

Every region's Envoy has a client listener and a PEER listener (`envoy_mesh.py`). A region
reaches a peer through the peer's PEER listener: forwarded requests go there, and so do the
state polls (`/peer/state`, routed by that listener to the peer's skylb admin), so a peer whose
Envoy *or* skylb is down stops answering polls and goes stale. All regions share one secret
file (mode 0600, in the work directory).

Start order, because of who needs whose address:
1. a free port for each region's PEER listener (peers' skylb configs and Envoys point there);
2. all replicas of all regions, side by side;
3. all skylbs (they need their replicas and the peers' PEER listener ports, not the peers);
4. each Envoy (it needs its skylb's gRPC and admin ports, its replicas and the peers' ports).
Envoy may lose a free port to another process in between; the client and admin ports are then
picked again, the PEER port is not (the other regions know it), and the start fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from skylb_extproc.config import Config, PeerConfig, ResidencyConfig, SpillConfig
from skylb_extproc.envoy_config import EnvoySettings, PeerRoute, envoy_command
from skylb_extproc.procs import Child, ChildError, Supervisor, free_port, wait_http_ready
from skylb_extproc.stack import (
    RegionStack,
    SettingsFor,
    StackOptions,
    child_env,
    collect_replicas,
    collect_skylb,
    config_path,
    launch_replicas,
    launch_skylb,
    python_cli,
    skylb_config,
    start_envoy,
)
from skylb_extproc.types import ReplicaSpec

__all__ = [
    "Mesh",
    "MeshOptions",
    "kill_envoy",
    "kill_skylb",
    "peer_cluster",
    "restart_envoy",
    "restart_skylb",
    "start_mesh",
    "wait_peers_fresh",
]


@dataclass(frozen=True)
class MeshOptions:
    """Regions, their link delays and rules; `stack` is the template of every region."""

    regions: tuple[str, ...]
    stack: StackOptions = field(default_factory=lambda: StackOptions(replicas=2))
    rtt_ms: float = 50.0  # round trip between any two regions, injected by the origin's Envoy
    rtt_pairs_ms: Mapping[frozenset[str], float] = field(default_factory=dict)
    residency: Mapping[str, Sequence[str]] = field(default_factory=dict)  # region -> allowed
    spill: SpillConfig = field(default_factory=SpillConfig)
    stacks: Mapping[str, StackOptions] = field(default_factory=dict)  # per-region `stack`

    def rtt(self, a: str, b: str) -> float:
        return self.rtt_pairs_ms.get(frozenset((a, b)), self.rtt_ms)

    def stack_of(self, region: str) -> StackOptions:
        return replace(self.stacks.get(region, self.stack), region=region)


@dataclass
class Mesh:
    regions: list[RegionStack]
    secret_file: Path

    def region(self, name: str) -> RegionStack:
        return next(r for r in self.regions if r.name == name)

    def region_of_replica(self) -> dict[str, str]:
        """x-inference-pod value -> the region that replica belongs to."""
        return {rep.name: r.name for r in self.regions for rep in r.replicas}

    def ready_json(self) -> dict[str, object]:
        return {"regions": [r.ready_json() for r in self.regions]}


def peer_cluster(region: str) -> str:
    """The Envoy cluster name that reaches `region` (the value of x-skylb-cluster)."""
    return f"peer-{region}"


def write_secret(path: Path) -> Path:
    """A fresh random shared secret, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def region_config(
    opts: MeshOptions,
    region: str,
    replicas: Sequence[ReplicaSpec],
    peer_ports: Mapping[str, int],
    secret: Path,
) -> Config:
    peers = tuple(
        PeerConfig(
            name=p,
            cluster=peer_cluster(p),
            state_url=f"http://127.0.0.1:{peer_ports[p]}/peer/state",
            rtt_ms=opts.rtt(region, p),
        )
        for p in opts.regions
        if p != region
    )
    allowed = opts.residency.get(region)
    residency = ResidencyConfig(tuple(allowed) if allowed is not None else None)
    base = skylb_config(opts.stack_of(region), replicas)
    return replace(
        base, peers=peers, secret_file=str(secret), residency=residency, spill=opts.spill
    )


def mesh_settings(
    opts: MeshOptions, region: str, stack: RegionStack, peer_ports: Mapping[str, int]
) -> SettingsFor:
    peers = [
        PeerRoute(p, peer_cluster(p), f"127.0.0.1:{peer_ports[p]}", delay_ms=opts.rtt(region, p))
        for p in opts.regions
        if p != region
    ]

    own = opts.stack_of(region)

    def settings_for(listen_port: int, admin_port: int) -> EnvoySettings:
        return EnvoySettings(
            listen_port=listen_port,
            admin_port=admin_port,
            grpc_address=stack.grpc,
            replicas=stack.replicas,
            body_mode=own.body_mode,
            queue_max_wait_s=own.queue_max_wait_s,
            max_body_bytes=own.max_body_bytes,
            peer_port=peer_ports[region],
            peers=peers,
            skylb_admin_address=stack.admin.removeprefix("http://"),
        )

    return settings_for


def _start_skylbs(
    sup: Supervisor, workdir: Path, opts: MeshOptions, configs: Sequence[Config]
) -> list[tuple[Child, str, str]]:
    children = [launch_skylb(sup, c, workdir, opts.stack_of(c.region).log_level) for c in configs]
    timeout = opts.stack.startup_timeout_s
    started = []
    for child, config in zip(children, configs, strict=True):
        grpc, admin = collect_skylb(child, config, workdir, timeout)
        started.append((child, grpc, admin))
    return started


def start_mesh(sup: Supervisor, workdir: Path, opts: MeshOptions) -> Mesh:
    """Start every region (see the module docstring for the order); returns once all serve."""
    if len(set(opts.regions)) != len(opts.regions) or not opts.regions:
        raise ValueError(f"regions must be distinct and at least one: {opts.regions}")
    workdir.mkdir(parents=True, exist_ok=True)
    secret = write_secret(workdir / "skylb-secret")
    peer_ports = {r: free_port() for r in opts.regions}
    launched = {r: launch_replicas(sup, opts.stack_of(r), prefix=f"{r}-") for r in opts.regions}
    timeout = opts.stack.startup_timeout_s
    replicas = {r: collect_replicas(cs, timeout) for r, cs in launched.items()}
    configs = [region_config(opts, r, replicas[r], peer_ports, secret) for r in opts.regions]
    skylbs = _start_skylbs(sup, workdir, opts, configs)
    stacks = []
    for region, (skylb, grpc, admin) in zip(opts.regions, skylbs, strict=True):
        stack = RegionStack(
            name=region,
            listener="",
            admin=admin,
            envoy_admin="",
            replicas=replicas[region],
            replica_pids={c.name: c.pid for c in launched[region]},
            skylb_pid=skylb.pid,
            envoy_pid=0,
            workdir=workdir,
            peer_listener=f"http://127.0.0.1:{peer_ports[region]}",
            grpc=grpc,
            skylb_config=config_path(workdir, region),
        )
        settings = mesh_settings(opts, region, stack, peer_ports)
        envoy, rendered, path = start_envoy(sup, opts.stack_of(region), settings, workdir)
        stack.listener = f"http://127.0.0.1:{rendered.listen_port}"
        stack.envoy_admin = f"http://127.0.0.1:{rendered.admin_port}"
        stack.envoy_pid, stack.envoy_config = envoy.pid, path
        stacks.append(stack)
    mesh = Mesh(stacks, secret)
    wait_peers_fresh(mesh, timeout_s=timeout)
    return mesh


def peers_fresh(admin_url: str) -> dict[str, bool]:
    """Peer name -> fresh, as the region's skylb sees it (its /state)."""
    with urllib.request.urlopen(f"{admin_url}/state", timeout=5.0) as resp:
        state = json.loads(resp.read())
    return {str(p["name"]): bool(p["fresh"]) for p in state.get("peers", [])}


def wait_peers_fresh(mesh: Mesh, *, timeout_s: float, regions: Sequence[str] | None = None) -> None:
    """Until every region (or `regions`) has a fresh summary of every peer: before that a
    region would not spill, and a demo or test would measure the start, not the mesh."""
    names = [r.name for r in mesh.regions]
    deadline = time.monotonic() + timeout_s
    for region in regions or names:
        want = {n: True for n in names if n != region}
        while peers_fresh(mesh.region(region).admin) != want:
            if time.monotonic() > deadline:
                raise ChildError(f"{region}: peers not all fresh within {timeout_s:.0f}s")
            time.sleep(0.05)


# --- breaking and mending a region (tests) ------------------------------------------------------


def _child(sup: Supervisor, pid: int) -> Child:
    return next(c for c in sup.children if c.pid == pid)


def _kill(sup: Supervisor, pid: int) -> None:
    """SIGKILL, as a crash: no graceful shutdown, no goodbye to anyone."""
    child = _child(sup, pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    sup.stop(child, grace_s=1.0)


def kill_skylb(sup: Supervisor, stack: RegionStack) -> None:
    _kill(sup, stack.skylb_pid)


def kill_envoy(sup: Supervisor, stack: RegionStack) -> None:
    _kill(sup, stack.envoy_pid)


def restart_skylb(sup: Supervisor, stack: RegionStack, *, timeout_s: float = 30.0) -> None:
    """Start the region's skylb again on the ports it had (its config names them)."""
    assert stack.skylb_config is not None
    argv = python_cli("serve", "--config", str(stack.skylb_config), log_level="INFO")
    child = sup.start(f"skylb-{stack.name}-restarted", argv, env=child_env())
    child.read_json_line(timeout_s)
    wait_http_ready(f"{stack.admin}/readyz", timeout_s=timeout_s, child=child)
    stack.skylb_pid = child.pid


def restart_envoy(sup: Supervisor, stack: RegionStack, *, timeout_s: float = 30.0) -> None:
    """Start the region's Envoy again from its rendered config (same ports)."""
    assert stack.envoy_config is not None
    child = sup.start(f"envoy-{stack.name}-restarted", envoy_command(stack.envoy_config))
    try:
        wait_http_ready(f"{stack.envoy_admin}/ready", timeout_s=timeout_s, child=child)
    except ChildError:
        sup.stop(child)
        raise
    stack.envoy_pid = child.pid
