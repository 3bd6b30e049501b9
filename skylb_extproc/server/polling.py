"""Periodic polling tasks over one aiohttp session: the scrapers' and the peer pollers' shell.

One task per target; each runs its `poll` every `interval_s`, scheduled from the previous slot
so a slow poll does not stretch the period, and restarting from now (not bursting to catch up)
when it fell behind by more than a period. A poll that raises is logged and the loop goes on: a
bug downstream must not silence a target for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

log = logging.getLogger(__name__)

Poll = Callable[[], Awaitable[None]]


class PollingLoops:
    """Start, run and stop one periodic task per (name, poll)."""

    def __init__(self, *, interval_s: float, timeout_s: float, clock: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    async def start(self, polls: Sequence[tuple[str, Poll]]) -> None:
        # One session (one connection pool) for every target; keep-alive saves a handshake a poll.
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._tasks = [
            asyncio.create_task(self._loop(name, poll), name=name) for name, poll in polls
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self, name: str, poll: Poll) -> None:
        next_at = self._clock()
        while True:
            try:
                await poll()
            except Exception:
                log.exception("poll %s failed", name)
            next_at = max(next_at + self._interval_s, self._clock())
            await asyncio.sleep(max(0.0, next_at - self._clock()))
