"""Workloads: open-loop trace replay and closed-loop multi-turn clients, with home regions.

Open loop (`mooncake`, `azure`): every request is sent at its trace time (divided by
`rate_scale`) from its group's home region, whatever the system does. Optionally each region's
rate follows a daily curve shifted by its time zone: the trace's span is mapped onto 24 hours and
a request is kept with probability curve(local hour) (thinning; seeded, so deterministic).

Closed loop (`closed-loop`, the paper's setup): the trace's conversations (requests grouped by
prefix group, in trace order) are dealt to their home region; each of `clients_per_region`
(one count for every region, or one per region as the paper's 40/30/30)
clients per region plays one conversation at a time, turn after turn, sending the next turn an
exponential think time (mean `think_time_s / rate_scale`, seeded per client) after the previous
one finished. Trace timestamps are ignored; the load is set by the number of clients.
"""

from __future__ import annotations

import os
import random
from collections import deque
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from skylb_extproc.bench.regions import DailyCurve, assign_region, tz_offsets
from skylb_extproc.bench.trace import TraceRequest, detect_format, load_azure, load_mooncake

__all__ = ["ClosedLoop", "OpenLoop", "Workload", "WorkloadSpec", "build_workload", "load_trace"]

FORMATS = ("auto", "mooncake", "azure", "closed-loop")


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that defines a workload; recorded in report.json as given."""

    trace: str
    format: str = "auto"
    regions: tuple[str, ...] = ("us", "eu", "asia")
    weights: tuple[float, ...] = (1 / 3, 1 / 3, 1 / 3)
    rate_scale: float = 1.0
    limit: int | None = None
    seed: int = 0
    daily_curve: str | None = None  # "category/model" of servegen_daily_rates.csv
    daily_csv: str | None = None
    clients_per_region: tuple[int, ...] = (20,)  # one count for all regions, or one per region
    think_time_s: float = 1.0


class Workload(Protocol):
    """What the engine asks of a workload; `start` resets it, so one object serves many runs."""

    def start(self) -> list[TraceRequest]: ...
    def on_done(self, request: TraceRequest, now: float) -> TraceRequest | None: ...
    def requests(self) -> list[TraceRequest]: ...


class OpenLoop:
    """Requests at fixed times; completions change nothing."""

    def __init__(self, reqs: list[TraceRequest]) -> None:
        self._reqs = reqs

    def start(self) -> list[TraceRequest]:
        return list(self._reqs)

    def on_done(self, request: TraceRequest, now: float) -> TraceRequest | None:
        return None

    def requests(self) -> list[TraceRequest]:
        return list(self._reqs)


class ClosedLoop:
    """N clients per region, each running its region's conversations one after another."""

    def __init__(self, reqs: list[TraceRequest], spec: WorkloadSpec) -> None:
        self._reqs = reqs
        self._spec = spec
        convs: dict[str, list[TraceRequest]] = {}
        for r in reqs:
            convs.setdefault(r.group, []).append(r)
        self._pools_init = {
            name: [c for c in convs.values() if c[0].region == name] for name in spec.regions
        }
        self._pools: dict[str, deque[list[TraceRequest]]] = {}
        self._client_of: dict[str, tuple[str, int]] = {}
        self._rest: dict[tuple[str, int], deque[TraceRequest]] = {}
        self._rngs: dict[tuple[str, int], random.Random] = {}

    def start(self) -> list[TraceRequest]:
        self._pools = {name: deque(p) for name, p in self._pools_init.items()}
        self._client_of, self._rest, self._rngs = {}, {}, {}
        first: list[TraceRequest] = []
        for region, count in zip(self._spec.regions, _clients(self._spec), strict=True):
            for i in range(count):
                client = (region, i)
                self._rngs[client] = random.Random(f"{self._spec.seed}:{region}:{i}")
                nxt = self._next_turn(client, self._think(client))
                if nxt is not None:
                    first.append(nxt)
        return first

    def on_done(self, request: TraceRequest, now: float) -> TraceRequest | None:
        client = self._client_of.pop(request.request_id)
        return self._next_turn(client, now + self._think(client))

    def requests(self) -> list[TraceRequest]:
        return list(self._reqs)

    def _think(self, client: tuple[str, int]) -> float:
        mean = self._spec.think_time_s / self._spec.rate_scale
        return self._rngs[client].expovariate(1.0 / mean) if mean > 0 else 0.0

    def _next_turn(self, client: tuple[str, int], at: float) -> TraceRequest | None:
        rest = self._rest.get(client)
        if not rest:
            pool = self._pools[client[0]]
            if not pool:
                return None
            rest = self._rest[client] = deque(pool.popleft())
        turn = replace(rest.popleft(), arrival=at)
        self._client_of[turn.request_id] = client
        return turn


def _clients(spec: WorkloadSpec) -> tuple[int, ...]:
    counts = spec.clients_per_region
    if len(counts) == 1:
        counts = counts * len(spec.regions)
    if len(counts) != len(spec.regions) or any(c < 0 for c in counts) or not any(counts):
        raise ValueError("--clients-per-region: one count >= 1, or one count >= 0 per region")
    return counts


def load_trace(spec: WorkloadSpec) -> tuple[str, list[TraceRequest]]:
    """(format of the file, its requests with home regions); `limit` cuts the file's head.

    Cached per process by everything that shapes the result (not the rate, which only scales
    arrivals afterwards), keyed also by the file's size and mtime so an edited file is re-read:
    every run of a sweep (and every forked worker, which inherits the parent's cache) reuses
    one parse."""
    fmt = spec.format
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    key = (spec.trace, fmt, spec.limit, spec.seed, spec.regions, spec.weights)
    try:
        st = os.stat(spec.trace)
    except OSError:
        file_fmt, homed = _load(*key)  # raises the loader's TraceError naming the file
    else:
        file_fmt, homed = _load_cached(*key, st.st_size, st.st_mtime_ns)
    return file_fmt, list(homed)


@lru_cache(maxsize=4)
def _load_cached(
    trace: str, fmt: str, limit: int | None, seed: int, regions: tuple[str, ...],
    weights: tuple[float, ...], _size: int, _mtime_ns: int,
) -> tuple[str, tuple[TraceRequest, ...]]:  # fmt: skip
    return _load(trace, fmt, limit, seed, regions, weights)


def _load(
    trace: str, fmt: str, limit: int | None, seed: int, regions: tuple[str, ...],
    weights: tuple[float, ...],
) -> tuple[str, tuple[TraceRequest, ...]]:  # fmt: skip
    file_fmt = detect_format(trace) if fmt in ("auto", "closed-loop") else fmt
    if file_fmt == "mooncake":
        reqs = load_mooncake(trace, limit=limit)
    else:
        reqs = load_azure(trace, limit=limit, seed=seed)
    homed = [replace(r, region=assign_region(r.group, regions, weights)) for r in reqs]
    return file_fmt, tuple(homed)


def _thin_daily(reqs: list[TraceRequest], spec: WorkloadSpec) -> list[TraceRequest]:
    assert spec.daily_curve is not None
    csv_path = spec.daily_csv or str(Path(spec.trace).with_name("servegen_daily_rates.csv"))
    curve = DailyCurve.load(csv_path, spec.daily_curve)
    offsets = dict(zip(spec.regions, tz_offsets(spec.regions), strict=True))
    span = max(reqs[-1].arrival, 1e-9)
    rng = random.Random(spec.seed)
    kept: list[TraceRequest] = []
    for r in reqs:
        hour = r.arrival / span * 24.0 + offsets[r.region]
        if rng.random() < curve.level(hour):
            kept.append(r)
    return kept


def build_workload(spec: WorkloadSpec) -> Workload:
    """The workload `spec` describes (see the module docstring for the two kinds)."""
    if spec.rate_scale <= 0:
        raise ValueError("--rate-scale must be > 0")
    _, reqs = load_trace(spec)
    if spec.format == "closed-loop":
        if spec.daily_curve is not None:
            raise ValueError("--daily-curve applies to open-loop traces, not closed-loop clients")
        _clients(spec)
        return ClosedLoop(reqs, spec)
    if spec.daily_curve is not None:
        reqs = _thin_daily(reqs, spec)
    scaled = [replace(r, arrival=r.arrival / spec.rate_scale) for r in reqs]
    return OpenLoop(scaled)
