"""Polling every peer region's `/peer/state` (authenticated) and measuring the round trip.

One asyncio task per peer, every `poll_interval_s` (0.1 s by default, as SkyLB), each request
signed with `x-skylb-auth` (region/marker.py). A poll times out after `stale_after_s`: an answer
later than that would be stale on arrival anyway. Every result goes to the sink with the instant
the poll started and its round-trip time; a failure is reported too (None), so the driver can
count it, and the peer simply turns stale in the core after `stale_after_s` without a fresh
summary: no spill to it until one arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import aiohttp

from skylb_extproc.region.config import PeerConfig
from skylb_extproc.region.marker import AUTH_HEADER, state_auth
from skylb_extproc.region.peers import PeerSummary, summary_from_json
from skylb_extproc.server.polling import Poll, PollingLoops

log = logging.getLogger(__name__)

# (peer name, summary or None, poll started at (monotonic), round trip seconds) -> None
PeerSink = Callable[[str, PeerSummary | None, float, float], None]


class PeerPoller:
    """Polls each peer's state; `clock` is monotonic, `wall_clock` UNIX time (for the auth)."""

    def __init__(
        self,
        peers: Sequence[PeerConfig],
        *,
        secret: bytes,
        interval_s: float,
        timeout_s: float,
        sink: PeerSink,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._peers = tuple(peers)
        self._secret = secret
        self._loops = PollingLoops(interval_s=interval_s, timeout_s=timeout_s, clock=clock)
        self._sink = sink
        self._clock = clock
        self._wall_clock = wall_clock

    async def start(self) -> None:
        await self._loops.start([(f"peer-{p.name}", self._poller(p)) for p in self._peers])

    async def close(self) -> None:
        await self._loops.close()

    async def poll_once(self, peer: PeerConfig) -> PeerSummary | None:
        """One authenticated poll; None (logged at debug) on any failure or a wrong answer."""
        headers = {AUTH_HEADER: state_auth(self._secret, peer.name, self._wall_clock())}
        try:
            async with self._loops.session.get(peer.state_url, headers=headers) as response:
                response.raise_for_status()
                summary = summary_from_json(await response.json(content_type=None))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("poll of peer %s failed: %r", peer.name, exc)
            return None
        if summary.region != peer.name:
            # A misconfigured state_url must not make one region's numbers another's.
            log.warning("peer %s answered as region %r: ignored", peer.name, summary.region)
            return None
        return summary

    def _poller(self, peer: PeerConfig) -> Poll:
        async def poll() -> None:
            started = self._clock()
            summary = await self.poll_once(peer)
            self._sink(peer.name, summary, started, self._clock() - started)

        return poll
