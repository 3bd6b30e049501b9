"""Bring up one region on loopback — replicas, `skylb-extproc serve`, a real Envoy.

Replicas are simulated (`backend="sim"`, the default) or real vLLM on the CPU (`backend="vllm"`,
`backends/vllm.py`: `skylb-extproc vllm-setup` first). Both are started as a `skylb-extproc`
subcommand that prints one JSON line with its port once it serves, so the rest does not care.

Used by the demo, the integration tests and `mesh.py` (several regions). Each step is split
into launching the processes and collecting their ports, so several regions start side by side:
on 2 cores, a dozen Python processes importing at once is the slow part of a start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from skylb_extproc.config import (
    Config,
    LimitsConfig,
    ListenConfig,
    PolicyConfig,
    QueueConfig,
    SpeedConfig,
    write_config,
)
from skylb_extproc.envoy_config import EnvoySettings, envoy_command, write_envoy_config
from skylb_extproc.procs import Child, ChildError, Supervisor, free_port, wait_http_ready
from skylb_extproc.types import ReplicaSpec
from skylb_extproc.workload import DEFAULT_MODEL

ENVOY_START_ATTEMPTS = 3  # free_port can race with another process; a retry picks new ports

# (listen port, admin port) -> the Envoy settings to render for them
SettingsFor = Callable[[int, int], EnvoySettings]


@dataclass(frozen=True)
class StackOptions:
    """What a one-region stack looks like; defaults suit the demo."""

    replicas: int = 3
    profile: str = "l4-llama3.1-8b"
    time_scale: float = 1.0
    body_mode: str = "buffered"
    policy: str = "skylb"
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    queue_max_length: int = 1024
    queue_max_wait_s: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    region: str = "local"
    startup_timeout_s: float = 60.0
    envoy_log_level: str = "warning"
    log_level: str = "INFO"
    backend: str = "sim"  # "sim" | "vllm"
    # --max-num-seqs and --block-size of every replica, both backends (None: the profile's for
    # sim; vLLM's CPU defaults, 128 and our 32, for vllm)
    max_num_seqs: int | None = None
    block_size: int | None = None


@dataclass
class RegionStack:
    """A running region: URLs to talk to it and the children behind it."""

    name: str
    listener: str  # Envoy's client-facing URL
    admin: str  # skylb's admin URL
    envoy_admin: str
    replicas: list[ReplicaSpec]
    replica_pids: dict[str, int]
    skylb_pid: int
    envoy_pid: int
    workdir: Path
    peer_listener: str | None = None  # Envoy's PEER listener URL (a region in a mesh)
    grpc: str = ""  # skylb's ext_proc host:port
    skylb_config: Path | None = None  # with the bound ports: a restart reuses them
    envoy_config: Path | None = None

    def ready_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "listener": self.listener,
            "admin": self.admin,
            "replicas": [{"name": r.name, "address": r.address} for r in self.replicas],
        }


def python_cli(*args: str, log_level: str) -> list[str]:
    return [sys.executable, "-m", "skylb_extproc", "--log-level", log_level, *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def model_of(profile: str) -> str:
    """The model name a simulated replica of `profile` serves (it checks requests against it)."""
    from skylb_extproc.sim.profiles import PROFILES

    known = PROFILES.get(profile)
    return known.model if known else DEFAULT_MODEL


# --- replicas ------------------------------------------------------------------------------------


BACKENDS = ("sim", "vllm")


def replica_args(opts: StackOptions, name: str, run_dir: Path) -> list[str]:
    """The `skylb-extproc` subcommand that serves replica `name` with `opts.backend`."""
    if opts.backend == "vllm":
        from skylb_extproc.backends.vllm import replica_args as vllm_args

        # Served under the profile's model name, so the same workloads run on both backends.
        return vllm_args(
            name=name,
            served_model_name=model_of(opts.profile),
            run_dir=run_dir / name,
            max_num_seqs=opts.max_num_seqs,
            block_size=opts.block_size,
        )
    if opts.backend != "sim":
        raise ValueError(f"unknown backend {opts.backend!r}; known: {', '.join(BACKENDS)}")
    args = ["sim-replica", "--host", "127.0.0.1", "--port", "0", "--name", name]
    args += ["--profile", opts.profile, "--time-scale", str(opts.time_scale)]
    for flag, value in (("--block-size", opts.block_size), ("--max-num-seqs", opts.max_num_seqs)):
        if value is not None:
            args += [flag, str(value)]
    return args


def launch_replicas(sup: Supervisor, opts: StackOptions, prefix: str = "") -> list[Child]:
    children = []
    for i in range(opts.replicas):
        name = f"{prefix}r{i}"
        args = replica_args(opts, name, sup.log_dir / "replicas")
        children.append(
            sup.start(name, python_cli(*args, log_level=opts.log_level), env=child_env())
        )
    return children


def collect_replicas(children: Sequence[Child], timeout_s: float) -> list[ReplicaSpec]:
    specs = []
    for child in children:
        port = int(str(child.read_json_line(timeout_s)["port"]))
        address = f"127.0.0.1:{port}"
        specs.append(ReplicaSpec(child.name, address, f"http://{address}/metrics"))
    return specs


def start_replicas(sup: Supervisor, opts: StackOptions, prefix: str = "") -> list[ReplicaSpec]:
    """Start the simulated replicas side by side, then collect their ports."""
    return collect_replicas(launch_replicas(sup, opts, prefix), opts.startup_timeout_s)


# --- skylb ---------------------------------------------------------------------------------------


def skylb_config(opts: StackOptions, replicas: Sequence[ReplicaSpec]) -> Config:
    from skylb_extproc.sim.profiles import PROFILES, speed_prior

    # The replicas' profile is the speed prior, as an operator who knows their GPUs would set it
    # (a wrong prior costs the first seconds, until the counters teach better); simulated
    # replicas run time_scale times faster.
    prior = speed_prior(PROFILES[opts.profile]) if opts.profile in PROFILES else None
    speed = (
        SpeedConfig()
        if prior is None
        else SpeedConfig(
            prefill_tokens_per_s=prior.prefill_tokens_per_s * opts.time_scale,
            decode_step_s=prior.decode_step_s / opts.time_scale,
        )
    )
    return Config(
        region=opts.region,
        replicas=tuple(replicas),
        listen=ListenConfig(grpc="127.0.0.1:0", admin="127.0.0.1:0"),
        policy=PolicyConfig(name=opts.policy, params=dict(opts.policy_params)),
        queue=QueueConfig(max_length=opts.queue_max_length, max_wait_s=opts.queue_max_wait_s),
        limits=LimitsConfig(max_body_bytes=opts.max_body_bytes),
        speed=speed,
    )


def config_path(workdir: Path, region: str) -> Path:
    return workdir / f"skylb-{region}.yaml"


def launch_skylb(sup: Supervisor, config: Config, workdir: Path, log_level: str) -> Child:
    path = write_config(config, config_path(workdir, config.region))
    argv = python_cli("serve", "--config", str(path), log_level=log_level)
    return sup.start(f"skylb-{config.region}", argv, env=child_env())


def collect_skylb(child: Child, config: Config, workdir: Path, timeout_s: float) -> tuple[str, str]:
    """(grpc address, admin URL) once `child` printed its ports and is ready.

    The config is rewritten with the bound ports, so a restart of this skylb (a test that kills
    it) comes back where Envoy and the peers look for it.
    """
    ports = child.read_json_line(timeout_s)
    grpc, admin = f"127.0.0.1:{ports['grpc']}", f"127.0.0.1:{ports['admin']}"
    admin_url = f"http://{admin}"
    wait_http_ready(f"{admin_url}/readyz", timeout_s=timeout_s, child=child)
    bound = ListenConfig(grpc=grpc, admin=admin)
    write_config(replace(config, listen=bound), config_path(workdir, config.region))
    return grpc, admin_url


def start_skylb(
    sup: Supervisor, opts: StackOptions, replicas: list[ReplicaSpec], workdir: Path
) -> tuple[int, str, str]:
    """Start `serve`; returns (pid, grpc address, admin URL) once it is ready."""
    config = skylb_config(opts, replicas)
    child = launch_skylb(sup, config, workdir, opts.log_level)
    grpc, admin = collect_skylb(child, config, workdir, opts.startup_timeout_s)
    return child.pid, grpc, admin


# --- Envoy ---------------------------------------------------------------------------------------


def start_envoy(
    sup: Supervisor, opts: StackOptions, settings_for: SettingsFor, workdir: Path
) -> tuple[Child, EnvoySettings, Path]:
    """Render and start Envoy; returns once a request passes through ext_proc to a replica."""
    last_error: ChildError | None = None
    for attempt in range(ENVOY_START_ATTEMPTS):
        settings = settings_for(free_port(), free_port())
        path = write_envoy_config(settings, workdir / f"envoy-{opts.region}.yaml")
        argv = envoy_command(path, log_level=opts.envoy_log_level)
        child = sup.start(f"envoy-{opts.region}-{attempt}", argv)
        listener = f"http://127.0.0.1:{settings.listen_port}"
        try:
            admin = f"http://127.0.0.1:{settings.admin_port}"
            wait_http_ready(f"{admin}/ready", timeout_s=opts.startup_timeout_s, child=child)
            # Through ext_proc to a replica: proves the whole path, whatever the status.
            wait_http_ready(
                f"{listener}/v1/models",
                timeout_s=opts.startup_timeout_s,
                child=child,
                any_status=True,
            )
            return child, settings, path
        except ChildError as exc:
            last_error = exc
            sup.stop(child)
    assert last_error is not None
    raise last_error


def one_region_settings(
    opts: StackOptions, replicas: Sequence[ReplicaSpec], grpc: str
) -> SettingsFor:
    def settings_for(listen_port: int, admin_port: int) -> EnvoySettings:
        return EnvoySettings(
            listen_port=listen_port,
            admin_port=admin_port,
            grpc_address=grpc,
            replicas=replicas,
            body_mode=opts.body_mode,
            queue_max_wait_s=opts.queue_max_wait_s,
            max_body_bytes=opts.max_body_bytes,
        )

    return settings_for


def start_region(sup: Supervisor, workdir: Path, opts: StackOptions) -> RegionStack:
    """Replicas, then skylb (needs their addresses), then Envoy (needs all of them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = start_replicas(sup, opts)
    pids = {c.name: c.pid for c in sup.children}
    return start_region_over(sup, workdir, opts, replicas, {r.name: pids[r.name] for r in replicas})


def start_region_over(
    sup: Supervisor,
    workdir: Path,
    opts: StackOptions,
    replicas: list[ReplicaSpec],
    replica_pids: dict[str, int],
) -> RegionStack:
    """skylb and Envoy in front of replicas that already serve (real vLLM replicas take ~20 s
    to start: tests start them once and put several stacks in front of them in turn)."""
    workdir.mkdir(parents=True, exist_ok=True)
    skylb_pid, grpc, admin = start_skylb(sup, opts, replicas, workdir)
    envoy, settings, path = start_envoy(
        sup, opts, one_region_settings(opts, replicas, grpc), workdir
    )
    return RegionStack(
        name=opts.region,
        listener=f"http://127.0.0.1:{settings.listen_port}",
        admin=admin,
        envoy_admin=f"http://127.0.0.1:{settings.admin_port}",
        replicas=replicas,
        replica_pids=replica_pids,
        skylb_pid=skylb_pid,
        envoy_pid=envoy.pid,
        workdir=workdir,
        grpc=grpc,
        skylb_config=config_path(workdir, opts.region),
        envoy_config=path,
    )
