"""Time series of one run, for the plots: throughput, per-region load and spills over time.

Sampled once a second of virtual time: each region's balancer queue and the requests running or
waiting on its replicas; spills out of each region and tokens completed are counted between
samples. Plots only; report.json's numbers come from the per-request records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Timeline"]


@dataclass
class Timeline:
    regions: Sequence[str]
    times: list[float] = field(default_factory=list)
    queue: dict[str, list[int]] = field(default_factory=dict)
    busy: dict[str, list[int]] = field(default_factory=dict)  # running + waiting on replicas
    spills: dict[str, list[int]] = field(default_factory=dict)  # per interval, out of region
    tokens: list[int] = field(default_factory=list)  # completed tokens per interval
    _spills_now: dict[str, int] = field(default_factory=dict)
    _tokens_now: int = 0

    def completed(self, now: float, tokens: int) -> None:
        self._tokens_now += tokens

    def spilled(self, region: str) -> None:
        self._spills_now[region] = self._spills_now.get(region, 0) + 1

    def sample(self, now: float, queues: Mapping[str, int], busy: Mapping[str, int]) -> None:
        self.times.append(now)
        for r in self.regions:
            self.queue.setdefault(r, []).append(queues.get(r, 0))
            self.busy.setdefault(r, []).append(busy.get(r, 0))
            self.spills.setdefault(r, []).append(self._spills_now.get(r, 0))
        self.tokens.append(self._tokens_now)
        self._spills_now = {}
        self._tokens_now = 0
