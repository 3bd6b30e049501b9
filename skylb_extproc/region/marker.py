"""The signed forwarding marker and the peer-state poll credential (pure: `now` and the secret
are arguments; `now` is UNIX time here, because two machines must agree on it).

SkyLB's research code marks a forwarded request with a plain header that any client can send,
so a client could make a region treat its request as "already forwarded" (or loop it). Here a
forwarding region adds four headers:

    x-skylb-origin  the forwarding region
    x-skylb-ts      UNIX seconds, as float text ("1718000000.123456")
    x-skylb-id      an id unique per forward (never reused, also across restarts)
    x-skylb-sig     hex HMAC-SHA256(secret, f"{origin}\\n{ts}\\n{id}\\n{destination region}")

The receiving region accepts the marker only if all four are present, the signature matches
with *itself* as destination (a marker for one region is useless at another), the timestamp is
within `max_skew_s` of its clock, the origin is not itself, and the id was not seen within the
window. Anything else is a `Rejected(reason)`; the caller strips every x-skylb-* header and
treats the request as one of its own clients'. Checks run in that order, and the id is
remembered only for accepted markers, so a rejected replay cannot evict a real one.

State polls carry `x-skylb-auth: <ts>:<hex HMAC-SHA256(secret, f"state\\n{ts}\\n{polled region}")>`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "AUTH_HEADER",
    "CLUSTER_HEADER",
    "HEADER_PREFIX",
    "ID_HEADER",
    "MARKER_HEADERS",
    "ORIGIN_HEADER",
    "SIG_HEADER",
    "TS_HEADER",
    "MarkerVerifier",
    "RejectReason",
    "Rejected",
    "Verified",
    "check_state_auth",
    "sign",
    "signature",
    "state_auth",
]

HEADER_PREFIX = "x-skylb-"
ORIGIN_HEADER = "x-skylb-origin"
TS_HEADER = "x-skylb-ts"
ID_HEADER = "x-skylb-id"
SIG_HEADER = "x-skylb-sig"
MARKER_HEADERS = (ORIGIN_HEADER, TS_HEADER, ID_HEADER, SIG_HEADER)
CLUSTER_HEADER = "x-skylb-cluster"  # Envoy's route: cluster_header
AUTH_HEADER = "x-skylb-auth"  # state polls

# Bounds what an unauthenticated client can make us hash or remember.
_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_REGION_RE = re.compile(r"^[a-z0-9-]{1,63}$")


class RejectReason(enum.Enum):
    """Why a marker was not trusted: the closed label set of skylb_markers_rejected_total."""

    MISSING = "missing"  # some x-skylb-* header, but not the four of a marker
    BAD_SIGNATURE = "bad_signature"  # malformed, wrong signature, or no secret configured
    SKEW = "skew"  # timestamp unreadable or too far from our clock
    REPLAY = "replay"  # id already accepted within the window
    LOOP = "loop"  # signed by us for us: our own forward came back


@dataclass(frozen=True, slots=True)
class Verified:
    origin: str
    marker_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason


def signature(secret: bytes, origin: str, ts: str, marker_id: str, destination: str) -> str:
    message = f"{origin}\n{ts}\n{marker_id}\n{destination}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    secret: bytes, *, origin: str, destination: str, marker_id: str, now: float
) -> tuple[tuple[str, str], ...]:
    """The four marker headers for a request `origin` forwards to `destination` at `now`."""
    ts = f"{now:.6f}"
    sig = signature(secret, origin, ts, marker_id, destination)
    return (
        (ORIGIN_HEADER, origin),
        (TS_HEADER, ts),
        (ID_HEADER, marker_id),
        (SIG_HEADER, sig),
    )


def _same(a: str, b: str) -> bool:
    # bytes: compare_digest refuses non-ASCII str, which a client may well send.
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


class MarkerVerifier:
    """Verifies markers arriving at `region`; remembers accepted ids for the replay check."""

    def __init__(
        self, secret: bytes | None, region: str, *, max_skew_s: float, max_ids: int = 100_000
    ) -> None:
        if max_skew_s <= 0 or max_ids < 1:
            raise ValueError("max_skew_s must be > 0 and max_ids >= 1")
        self._secret = secret
        self._region = region
        self._max_skew_s = max_skew_s
        self._max_ids = max_ids
        # id -> instant after which its timestamp fails the skew check anyway (so it may go).
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, headers: Mapping[str, str], now: float) -> Verified | Rejected:
        """Check the marker in `headers` (x-skylb-* names, lowercase) against our clock `now`."""
        values = [headers.get(name) for name in MARKER_HEADERS]
        if any(v is None or v == "" for v in values):
            return Rejected(RejectReason.MISSING)
        origin, ts, marker_id, sig = (v or "" for v in values)
        if not self._secret or not _REGION_RE.match(origin) or not _ID_RE.match(marker_id):
            return Rejected(RejectReason.BAD_SIGNATURE)
        if not _same(sig, signature(self._secret, origin, ts, marker_id, self._region)):
            return Rejected(RejectReason.BAD_SIGNATURE)
        sent = _parse_ts(ts)
        if sent is None or abs(now - sent) > self._max_skew_s:
            return Rejected(RejectReason.SKEW)
        if origin == self._region:
            return Rejected(RejectReason.LOOP)
        self._forget(now)
        if marker_id in self._seen:
            return Rejected(RejectReason.REPLAY)
        self._remember(marker_id, sent + self._max_skew_s)
        return Verified(origin, marker_id)

    def __len__(self) -> int:
        return len(self._seen)

    def _forget(self, now: float) -> None:
        # Insertion order is close to expiry order (timestamps within the skew of arrival);
        # an entry kept a little longer than needed costs nothing.
        while self._seen:
            marker_id, until = next(iter(self._seen.items()))
            if until >= now:
                break
            del self._seen[marker_id]

    def _remember(self, marker_id: str, until: float) -> None:
        if len(self._seen) >= self._max_ids:
            # Beyond ~max_ids / (2 * skew) forwarded requests per second; the oldest goes.
            self._seen.popitem(last=False)
        self._seen[marker_id] = until


def _parse_ts(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _state_mac(secret: bytes, ts: str, region: str) -> str:
    return hmac.new(secret, f"state\n{ts}\n{region}".encode(), hashlib.sha256).hexdigest()


def state_auth(secret: bytes, region: str, now: float) -> str:
    """The x-skylb-auth value for polling `region`'s /peer/state at `now`."""
    ts = f"{now:.6f}"
    return f"{ts}:{_state_mac(secret, ts, region)}"


def check_state_auth(
    secret: bytes | None, region: str, value: str | None, now: float, *, max_skew_s: float
) -> bool:
    """True when `value` authenticates a poll of `region` (ours) at `now`."""
    if not secret or not value or len(value) > 128:
        return False
    ts, _, mac = value.partition(":")
    if not _same(mac, _state_mac(secret, ts, region)):
        return False
    sent = _parse_ts(ts)
    return sent is not None and abs(now - sent) <= max_skew_s
