"""The server side of the forwarding marker and the state-poll auth: secret, UNIX clock, ids.

The pure rules live in `region/marker.py`; this holds what they need from the outside world:
the shared secret (read at start), the wall clock (markers cross machines, so monotonic time is
useless there), a random boot token so that marker ids never repeat across restarts (a restarted
region must not look like a replayer within the skew window), and the peers' Envoy clusters.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from skylb_extproc.region.marker import (
    MarkerVerifier,
    Rejected,
    Verified,
    check_state_auth,
    sign,
)
from skylb_extproc.types import PeerForward

__all__ = ["Peering"]


@dataclass
class Peering:
    """One region's marker signer / verifier; `secret` None = nothing verifies (no peers)."""

    region: str
    secret: bytes | None = None
    clusters: Mapping[str, str] = field(default_factory=dict)  # peer region -> Envoy cluster
    max_skew_s: float = 5.0
    wall_clock: Callable[[], float] = time.time
    boot: str = field(default_factory=lambda: secrets.token_hex(4))

    def __post_init__(self) -> None:
        self._verifier = MarkerVerifier(self.secret, self.region, max_skew_s=self.max_skew_s)

    def forward(self, request_id: str, destination: str) -> PeerForward:
        """The answer that sends `request_id` to `destination`, with a fresh signed marker."""
        assert self.secret is not None, "forwarding needs the shared secret"
        headers = sign(
            self.secret,
            origin=self.region,
            destination=destination,
            marker_id=f"{request_id}.{self.boot}",  # request ids restart at 1 with the process
            now=self.wall_clock(),
        )
        return PeerForward(destination, self.clusters[destination], headers)

    def verify(self, headers: Mapping[str, str]) -> Verified | Rejected:
        return self._verifier.verify(headers, self.wall_clock())

    def state_allowed(self, auth: str | None) -> bool:
        """Whether a /peer/state poll carrying `auth` (x-skylb-auth) may read our state."""
        return check_state_auth(
            self.secret, self.region, auth, self.wall_clock(), max_skew_s=self.max_skew_s
        )
