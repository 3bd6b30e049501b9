"""`skylb-extproc demo`: one region on loopback — simulated replicas, skylb and a real Envoy.

Starts everything under a Supervisor, prints ONE JSON line once the stack answers:

    {"regions": [{"name": "local", "listener": "http://127.0.0.1:P", "admin": "http://127.0.0.1:P",
                  "replicas": [{"name": "r0", "address": "127.0.0.1:P"}, ...]}]}

(`admin` is skylb's admin: /readyz, /state, /metrics), then either waits for SIGINT/SIGTERM
or, with `--traffic N`, plays N requests of the multi-turn chat workload through Envoy and
prints a summary. Every child is stopped before returning. `start_region` is also what the
integration tests use to bring a stack up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from skylb_extproc.config import (
    Config,
    LimitsConfig,
    ListenConfig,
    PolicyConfig,
    QueueConfig,
    write_config,
)
from skylb_extproc.envoy_config import EnvoySettings, envoy_command, write_envoy_config
from skylb_extproc.procs import ChildError, Supervisor, free_port, wait_http_ready
from skylb_extproc.types import ReplicaSpec
from skylb_extproc.workload import (
    DEFAULT_MODEL,
    chat_workload,
    format_summary,
    play_conversations,
)

ENVOY_START_ATTEMPTS = 3  # free_port can race with another process; a retry picks new ports


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

    def ready_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "listener": self.listener,
            "admin": self.admin,
            "replicas": [{"name": r.name, "address": r.address} for r in self.replicas],
        }


def _python_cli(*args: str, log_level: str) -> list[str]:
    return [sys.executable, "-m", "skylb_extproc", "--log-level", log_level, *args]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_replicas(sup: Supervisor, opts: StackOptions, prefix: str = "") -> list[ReplicaSpec]:
    """Start the simulated replicas side by side, then collect their ports."""
    children = []
    for i in range(opts.replicas):
        name = f"{prefix}r{i}"
        argv = _python_cli(
            "sim-replica",
            *("--host", "127.0.0.1", "--port", "0", "--name", name),
            *("--profile", opts.profile, "--time-scale", str(opts.time_scale)),
            log_level=opts.log_level,
        )
        children.append(sup.start(name, argv, env=_child_env()))
    specs = []
    for child in children:
        port = int(str(child.read_json_line(opts.startup_timeout_s)["port"]))
        address = f"127.0.0.1:{port}"
        specs.append(ReplicaSpec(child.name, address, f"http://{address}/metrics"))
    return specs


def skylb_config(opts: StackOptions, replicas: list[ReplicaSpec]) -> Config:
    return Config(
        region=opts.region,
        replicas=tuple(replicas),
        listen=ListenConfig(grpc="127.0.0.1:0", admin="127.0.0.1:0"),
        policy=PolicyConfig(name=opts.policy, params=dict(opts.policy_params)),
        queue=QueueConfig(max_length=opts.queue_max_length, max_wait_s=opts.queue_max_wait_s),
        limits=LimitsConfig(max_body_bytes=opts.max_body_bytes),
    )


def start_skylb(
    sup: Supervisor, opts: StackOptions, replicas: list[ReplicaSpec], workdir: Path
) -> tuple[int, str, str]:
    """Start `serve`; returns (pid, grpc address, admin URL) once it printed its ports."""
    path = write_config(skylb_config(opts, replicas), workdir / f"skylb-{opts.region}.yaml")
    argv = _python_cli("serve", "--config", str(path), log_level=opts.log_level)
    child = sup.start(f"skylb-{opts.region}", argv, env=_child_env())
    ports = child.read_json_line(opts.startup_timeout_s)
    admin = f"http://127.0.0.1:{ports['admin']}"
    wait_http_ready(f"{admin}/readyz", timeout_s=opts.startup_timeout_s, child=child)
    return child.pid, f"127.0.0.1:{ports['grpc']}", admin


def start_envoy(
    sup: Supervisor, opts: StackOptions, replicas: list[ReplicaSpec], grpc: str, workdir: Path
) -> tuple[int, str, str]:
    """Render the config and start Envoy; returns (pid, listener URL, admin URL)."""
    last_error: ChildError | None = None
    for attempt in range(ENVOY_START_ATTEMPTS):
        settings = EnvoySettings(
            listen_port=free_port(),
            admin_port=free_port(),
            grpc_address=grpc,
            replicas=replicas,
            body_mode=opts.body_mode,
            queue_max_wait_s=opts.queue_max_wait_s,
            max_body_bytes=opts.max_body_bytes,
        )
        path = write_envoy_config(settings, workdir / f"envoy-{opts.region}.yaml")
        argv = envoy_command(path, log_level=opts.envoy_log_level)
        child = sup.start(f"envoy-{opts.region}-{attempt}", argv)
        admin = f"http://127.0.0.1:{settings.admin_port}"
        listener = f"http://127.0.0.1:{settings.listen_port}"
        try:
            wait_http_ready(f"{admin}/ready", timeout_s=opts.startup_timeout_s, child=child)
            # Through ext_proc to a replica: proves the whole path, whatever the status.
            wait_http_ready(
                f"{listener}/v1/models",
                timeout_s=opts.startup_timeout_s,
                child=child,
                any_status=True,
            )
            return child.pid, listener, admin
        except ChildError as exc:
            last_error = exc
            sup.stop(child)
    assert last_error is not None
    raise last_error


def start_region(sup: Supervisor, workdir: Path, opts: StackOptions) -> RegionStack:
    """Replicas, then skylb (needs their addresses), then Envoy (needs all of them)."""
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = start_replicas(sup, opts)
    pids = {c.name: c.pid for c in sup.children}
    skylb_pid, grpc, admin = start_skylb(sup, opts, replicas, workdir)
    envoy_pid, listener, envoy_admin = start_envoy(sup, opts, replicas, grpc, workdir)
    return RegionStack(
        name=opts.region,
        listener=listener,
        admin=admin,
        envoy_admin=envoy_admin,
        replicas=replicas,
        replica_pids={r.name: pids[r.name] for r in replicas},
        skylb_pid=skylb_pid,
        envoy_pid=envoy_pid,
        workdir=workdir,
    )


# --- the command ----------------------------------------------------------------------------


class _Stopped(Exception):
    """SIGINT/SIGTERM arrived: unwind to the cleanup."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped(signum)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into _Stopped while the body runs; ignore them during cleanup."""
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)


def _arg(args: argparse.Namespace, *names: str, default: Any) -> Any:
    """The first of `names` the parser defined and set, else `default`."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def options_from_args(args: argparse.Namespace) -> StackOptions:
    """Read the demo's options, tolerating a parser that defines only some of them."""
    return StackOptions(
        replicas=int(_arg(args, "replicas_per_region", "replicas", default=3)),
        profile=str(_arg(args, "profile", default=StackOptions.profile)),
        time_scale=float(_arg(args, "time_scale", default=1.0)),
        body_mode=str(_arg(args, "body_mode", default="buffered")),
        policy=str(_arg(args, "policy", default="skylb")),
        log_level=str(_arg(args, "log_level", default="INFO")),
    )


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags, for a CLI that wants all of them."""
    parser.add_argument("--replicas-per-region", type=int, default=3)
    parser.add_argument("--profile", default=StackOptions.profile)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--body-mode", choices=("buffered", "duplex"), default="buffered")
    parser.add_argument("--policy", default="skylb")
    parser.add_argument("--traffic", type=int, default=0, help="send N requests, then exit")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep configs and logs here")


def _wait_for_signal(sup: Supervisor) -> int:
    """Until a signal (raised as _Stopped); a child dying on its own ends the demo with 1."""
    while True:
        time.sleep(0.2)
        for child in sup.children:
            if not child.alive():
                print(child.describe_failure("exited unexpectedly"), file=sys.stderr)
                return 1


def model_of(profile: str) -> str:
    """The model name a simulated replica of `profile` serves (it checks requests against it)."""
    from skylb_extproc.sim.profiles import PROFILES

    known = PROFILES.get(profile)
    return known.model if known else DEFAULT_MODEL


def _run_traffic(
    stack: RegionStack, opts: StackOptions, args: argparse.Namespace, requests: int
) -> int:
    conversations = chat_workload(requests, seed=int(_arg(args, "seed", default=0)))
    started = time.monotonic()
    results = asyncio.run(
        play_conversations(
            stack.listener,
            conversations,
            concurrency=int(_arg(args, "concurrency", default=8)),
            model=model_of(opts.profile),
        )
    )
    print(format_summary(results, elapsed_s=time.monotonic() - started), flush=True)
    return 0 if all(r.ok for r in results) else 1


def main_demo(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    keep = _arg(args, "workdir", default=None)
    workdir = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="skylb-demo-"))
    sup = Supervisor(workdir / "logs")
    code = 1
    try:
        with _stop_on_signals():
            try:
                stack = start_region(sup, workdir, opts)
                print(json.dumps({"regions": [stack.ready_json()]}), flush=True)
                requests = int(_arg(args, "traffic", default=0))
                code = (
                    _run_traffic(stack, opts, args, requests)
                    if requests > 0
                    else _wait_for_signal(sup)
                )
            except _Stopped:
                code = 0
            except ChildError as exc:
                print(f"demo: {exc}\n(logs kept in {workdir})", file=sys.stderr)
                keep = str(workdir)
            finally:
                sup.stop_all()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return code
