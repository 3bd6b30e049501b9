"""The balancer-side wait queue of selective pushing.

Requests wait here, not in a replica's queue, until a replica is available (SkyLB paper §3.3):
a request that waits at the balancer can still go to whichever replica frees up first, and to the
one holding its prefix. FIFO, bounded in length (a full queue answers 429 at once instead of
letting latency grow without bound) and in time (each entry carries a deadline; past it the
router answers 503).

The queue is a plain object; it decides nothing and performs no I/O. Because every entry waits
the same `max_wait_s` and `now` never goes backwards, deadlines grow from head to tail: the head
holds the earliest deadline, and `expire` only looks at the head.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from skylb_extproc.types import RouteRequest

__all__ = ["Queued", "WaitQueue"]


@dataclass
class Queued:
    """A waiting request, its prompt's block hashes (computed once), arrival and deadline."""

    request: RouteRequest
    hashes: tuple[int, ...]
    arrived: float
    deadline: float


class WaitQueue:
    """FIFO of waiting requests with a length bound, per-entry deadlines and removal by id."""

    def __init__(self, *, max_length: int, max_wait_s: float) -> None:
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self._max_length = max_length
        self._max_wait_s = max_wait_s
        self._entries: OrderedDict[str, Queued] = OrderedDict()

    def offer(self, request: RouteRequest, hashes: tuple[int, ...], now: float) -> bool:
        """Append; False when full. A request id already queued is a caller bug (ValueError)."""
        if request.request_id in self._entries:
            raise ValueError(f"request {request.request_id!r} is already queued")
        if len(self._entries) >= self._max_length:
            return False
        self._entries[request.request_id] = Queued(
            request=request, hashes=hashes, arrived=now, deadline=now + self._max_wait_s
        )
        return True

    def head(self) -> Queued | None:
        """The oldest entry, or None when empty."""
        return next(iter(self._entries.values()), None)

    def pop(self) -> Queued:
        """Remove and return the head (IndexError when empty)."""
        if not self._entries:
            raise IndexError("pop from an empty WaitQueue")
        return self._entries.popitem(last=False)[1]

    def remove(self, request_id: str) -> Queued | None:
        """Remove an entry wherever it is (client went away); None if it is not queued."""
        return self._entries.pop(request_id, None)

    def expire(self, now: float) -> list[Queued]:
        """Remove and return, oldest first, the entries whose deadline is at or before `now`."""
        expired: list[Queued] = []
        while self._entries:
            head = next(iter(self._entries.values()))
            if head.deadline > now:
                break
            expired.append(self.pop())
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline (the head's), or None when empty."""
        head = self.head()
        return None if head is None else head.deadline

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Queued]:
        """Entries oldest first."""
        return iter(self._entries.values())

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries
