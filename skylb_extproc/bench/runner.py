"""Runs the compared systems on one workload, in parallel processes, with a progress line.

Each policy is an independent simulation, so they run in separate processes (`jobs`, default
the CPU count): results do not depend on `jobs` or on which process ran what, only on the
inputs and the seed. Workers rebuild the workload from its spec (a small, picklable value; the
parsed trace itself is cached per process, and forked workers inherit the parent's copy, so a
sweep of many levels parses the trace once) and report progress through a queue; the parent
draws one line on stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from queue import Empty
from typing import Any, TextIO

from skylb_extproc.bench.engine import RunResult, Simulation
from skylb_extproc.bench.fleet import level_name, per_region
from skylb_extproc.bench.regions import RttMatrix
from skylb_extproc.bench.topology import build_system
from skylb_extproc.bench.workloads import WorkloadSpec, build_workload

__all__ = ["Progress", "RunSpec", "run_all", "run_one"]


@dataclass(frozen=True)
class RunSpec:
    """One simulation: a workload, a system and its size."""

    workload: WorkloadSpec
    policy: str
    replicas_per_region: int | tuple[int, ...]  # one count, or one per region (region order)
    profile: str | tuple[str, ...]  # one profile name, or one per region
    rtt_ms: str

    @property
    def label(self) -> str:
        n = self.replicas_per_region
        count = n if isinstance(n, int) else "/".join(map(str, n))
        return f"{self.policy}@{count}{level_name(self.workload.rate_scale)}"


def run_one(spec: RunSpec, on_done: Callable[[int, int], None] | None = None) -> RunResult:
    """Build the workload and the system afresh and simulate them."""
    workload = build_workload(spec.workload)
    total = len(workload.requests())
    regions = spec.workload.regions
    n = spec.replicas_per_region
    counts = n if isinstance(n, int) else dict(zip(regions, n, strict=True))
    system = build_system(
        spec.policy,
        regions,
        counts,
        per_region(spec.profile, regions),
        RttMatrix.parse(spec.rtt_ms, regions),
        spec.workload.seed,
    )
    callback = None if on_done is None else (lambda n: on_done(n, total))
    return Simulation(system, workload, on_done=callback).run()


class Progress:
    """A plain one-line progress bar on a text stream (stderr), redrawn at most per percent."""

    def __init__(self, labels: Sequence[str], stream: TextIO | None = None) -> None:
        self._frac = dict.fromkeys(labels, 0.0)
        self._stream = stream
        self._shown = -1

    def update(self, label: str, frac: float) -> None:
        self._frac[label] = frac
        total = sum(self._frac.values()) / max(1, len(self._frac))
        pct = int(total * 100)
        if self._stream is None or pct == self._shown:
            return
        tty = self._stream.isatty()
        if not tty and pct // 10 == self._shown // 10 and pct < 100:
            return  # a log file gets a line per 10%, not a redraw per percent
        self._shown = pct
        done = sum(1 for f in self._frac.values() if f >= 1.0)
        bar = "#" * (pct // 4) + "." * (25 - pct // 4)
        end = "" if tty else "\n"
        line = f"bench [{bar}] {pct:3d}%  {done}/{len(self._frac)} runs done"
        self._stream.write(("\r" if tty else "") + line + end)
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._shown >= 0 and self._stream.isatty():
            self._stream.write("\n")
            self._stream.flush()


_QUEUE: Any = None  # a worker's progress queue, set by the pool initializer


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _worker(spec: RunSpec) -> RunResult:
    step = [0]

    def report(done: int, total: int) -> None:
        if done * 50 // max(1, total) != step[0] or done == total:
            step[0] = done * 50 // max(1, total)
            _QUEUE.put((spec.label, done / max(1, total)))

    return run_one(spec, report)


def run_all(
    specs: Sequence[RunSpec], *, jobs: int | None = None, progress: bool = True
) -> list[RunResult]:
    """Results in the order of `specs`, whatever the number of processes."""
    bar = Progress([s.label for s in specs], sys.stderr if progress else None)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(specs)))
    try:
        if jobs == 1:
            return [run_one(s, _bar_callback(bar, s.label)) for s in specs]
        return _run_pool(specs, jobs, bar)
    finally:
        bar.close()


def _bar_callback(bar: Progress, label: str) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        bar.update(label, done / max(1, total))

    return update


def _run_pool(specs: Sequence[RunSpec], jobs: int, bar: Progress) -> list[RunResult]:
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    with ProcessPoolExecutor(
        jobs, mp_context=ctx, initializer=_init_worker, initargs=(queue,)
    ) as ex:
        futures: list[Future[RunResult]] = [ex.submit(_worker, s) for s in specs]
        while not all(f.done() for f in futures):
            try:
                label, frac = queue.get(timeout=0.2)
                bar.update(label, frac)
            except Empty:
                pass
        return [f.result() for f in futures]
