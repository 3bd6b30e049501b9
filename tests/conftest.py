"""Replicas shared by the contract and real-vLLM tests, started once per session.

Real vLLM tests are opt-in: they need `skylb-extproc vllm-setup` (a 2.5 GB venv) and minutes of
CPU, so a plain `pytest` skips them, saying how to turn them on. With SKYLB_TEST_VLLM=1 (as
.ci/run sets after installing) a missing or broken install FAILS them instead: CI must never
pass by skipping the backend it was asked to test.
"""

from __future__ import annotations

import os

# Tests fork children (procs.Supervisor) from a process that has grpc's threads running; grpc's
# fork handlers then made a child abort (epoll_wait: bad file descriptor) before its exec.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from skylb_extproc.backends.vllm import default_venv, is_ready
from skylb_extproc.procs import Supervisor
from skylb_extproc.stack import StackOptions, collect_replicas, launch_replicas
from skylb_extproc.types import ReplicaSpec

VLLM_ENV = "SKYLB_TEST_VLLM"
HOW_TO_ENABLE = (
    f"real-vLLM tests are off: run `skylb-extproc vllm-setup` once, then `{VLLM_ENV}=1 pytest`"
)
# The replica both backends emulate: the tiny Llama on vLLM's CPU build, 32-token blocks, and
# at most 2 running requests so that a handful of requests makes vLLM queue (waiting > 0).
REAL = StackOptions(
    replicas=3,
    backend="vllm",
    profile="cpu-tiny-llama",
    max_num_seqs=2,
    startup_timeout_s=300.0,
    log_level="INFO",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `vllm` run last, together: the session's vLLM servers start with the first
    of them and stop at the end, and idle they still burn ~20% of a core each, which would slow
    every other test."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)  # stable


def vllm_enabled() -> bool:
    return os.environ.get(VLLM_ENV) == "1"


def require_vllm() -> None:
    """Skip (not enabled) or fail (enabled but not installed) a test that needs real vLLM."""
    if not vllm_enabled():
        pytest.skip(HOW_TO_ENABLE)
    venv = default_venv()
    if not is_ready(venv):
        pytest.fail(f"{VLLM_ENV}=1 but no ready vLLM venv at {venv}: run skylb-extproc vllm-setup")


@dataclass
class ReplicaPool:
    """Started replicas and the supervisor that owns them."""

    sup: Supervisor
    opts: StackOptions
    replicas: list[ReplicaSpec]
    pids: dict[str, int]

    def url(self, index: int = 0) -> str:
        return f"http://{self.replicas[index].address}"


def start_pool(workdir: Path, opts: StackOptions) -> ReplicaPool:
    sup = Supervisor(workdir / "logs")
    try:
        children = launch_replicas(sup, opts, prefix=f"{opts.backend}-")
        replicas = collect_replicas(children, opts.startup_timeout_s)
    except BaseException:
        sup.stop_all()
        raise
    return ReplicaPool(sup, opts, replicas, {c.name: c.pid for c in children})


@pytest.fixture(scope="session")
def vllm_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaPool]:
    """Three real vLLM replicas for the whole session (~30-60 s to start side by side).

    With vLLM's dev endpoints (loopback test replicas only): the bench-serve test empties their
    prefix caches between policies with POST /reset_prefix_cache."""
    require_vllm()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_SERVER_DEV_MODE", "1")
        pool = start_pool(tmp_path_factory.mktemp("vllm-pool"), REAL)
    try:
        yield pool
    finally:
        pool.sup.stop_all(grace_s=10.0)


@pytest.fixture(scope="session")
def sim_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplicaPool]:
    """The simulated twin of vllm_pool: same profile, block size and batch limit."""
    from dataclasses import replace

    pool = start_pool(tmp_path_factory.mktemp("sim-pool"), replace(REAL, backend="sim"))
    try:
        yield pool
    finally:
        pool.sup.stop_all()
