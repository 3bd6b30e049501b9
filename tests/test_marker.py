"""region/marker.py: signing, verification (signature, skew, replay, loop) and state-poll auth."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from skylb_extproc.region.marker import (
    MarkerVerifier,
    Rejected,
    RejectReason,
    Verified,
    check_state_auth,
    sign,
    signature,
    state_auth,
)

SECRET = b"shared-secret"
NOW = 1_718_000_000.0


def marker(
    *, origin: str = "us", dest: str = "eu", marker_id: str = "us-abc-1", at: float = NOW
) -> dict[str, str]:
    return dict(sign(SECRET, origin=origin, destination=dest, marker_id=marker_id, now=at))


def verifier(region: str = "eu", **kwargs: int) -> MarkerVerifier:
    return MarkerVerifier(SECRET, region, max_skew_s=5.0, **kwargs)


def test_signature_is_the_documented_hmac() -> None:
    headers = marker()
    assert headers == {
        "x-skylb-origin": "us",
        "x-skylb-ts": "1718000000.000000",
        "x-skylb-id": "us-abc-1",
        "x-skylb-sig": hmac.new(
            SECRET, b"us\n1718000000.000000\nus-abc-1\neu", hashlib.sha256
        ).hexdigest(),
    }
    assert signature(SECRET, "us", "1718000000.000000", "us-abc-1", "eu") == headers["x-skylb-sig"]


def test_valid_marker_verifies_once_then_is_a_replay() -> None:
    v = verifier()
    assert v.verify(marker(), NOW + 0.2) == Verified("us", "us-abc-1")
    assert v.verify(marker(), NOW + 0.3) == Rejected(RejectReason.REPLAY)
    assert v.verify(marker(marker_id="us-abc-2"), NOW + 0.3) == Verified("us", "us-abc-2")


def _drop(name: str) -> dict[str, str]:
    headers = marker()
    del headers[name]
    return headers


def _with(name: str, value: str) -> dict[str, str]:
    return {**marker(), name: value}


CASES = [
    ({}, NOW, RejectReason.MISSING),
    ({"x-skylb-cluster": "peer-eu"}, NOW, RejectReason.MISSING),
    (_drop("x-skylb-sig"), NOW, RejectReason.MISSING),
    (_drop("x-skylb-ts"), NOW, RejectReason.MISSING),
    (_with("x-skylb-id", ""), NOW, RejectReason.MISSING),
    (_with("x-skylb-sig", "0" * 64), NOW, RejectReason.BAD_SIGNATURE),
    (_with("x-skylb-sig", "é"), NOW, RejectReason.BAD_SIGNATURE),  # non-ASCII must not crash
    (_with("x-skylb-origin", "asia"), NOW, RejectReason.BAD_SIGNATURE),  # origin is signed
    (_with("x-skylb-ts", f"{NOW + 1:.6f}"), NOW, RejectReason.BAD_SIGNATURE),  # ts is signed
    (_with("x-skylb-id", "x" * 200), NOW, RejectReason.BAD_SIGNATURE),  # bounded ids
    (marker(dest="asia"), NOW, RejectReason.BAD_SIGNATURE),  # made for another region
    (marker(), NOW + 5.5, RejectReason.SKEW),  # too old
    (marker(), NOW - 5.5, RejectReason.SKEW),  # from the future
    (marker(origin="eu"), NOW, RejectReason.LOOP),  # our own forward came back
]


@pytest.mark.parametrize(("headers", "now", "reason"), CASES)
def test_rejections(headers: dict[str, str], now: float, reason: RejectReason) -> None:
    assert verifier().verify(headers, now) == Rejected(reason)


def test_skew_bound_is_inclusive() -> None:
    assert isinstance(verifier().verify(marker(), NOW + 5.0), Verified)


def test_unparsable_signed_timestamp_is_skew() -> None:
    ts = "yesterday"
    sig = signature(SECRET, "us", ts, "id1", "eu")
    headers = {"x-skylb-origin": "us", "x-skylb-ts": ts, "x-skylb-id": "id1", "x-skylb-sig": sig}
    assert verifier().verify(headers, NOW) == Rejected(RejectReason.SKEW)


def test_without_a_secret_nothing_verifies() -> None:
    v = MarkerVerifier(None, "eu", max_skew_s=5.0)
    assert v.verify(marker(), NOW) == Rejected(RejectReason.BAD_SIGNATURE)


def test_seen_ids_expire_after_the_window_and_are_bounded() -> None:
    v = verifier(max_ids=3)
    for i in range(3):
        assert isinstance(v.verify(marker(marker_id=f"id{i}"), NOW), Verified)
    assert len(v) == 3
    assert isinstance(v.verify(marker(marker_id="id3"), NOW), Verified)
    assert len(v) == 3  # the oldest was evicted
    # after ts + skew every entry may go: the skew check would refuse a replay anyway
    assert isinstance(v.verify(marker(marker_id="late", at=NOW + 6), NOW + 6), Verified)
    assert len(v) == 1


def test_rejected_markers_are_not_remembered() -> None:
    v = verifier()
    assert v.verify(_with("x-skylb-sig", "bad"), NOW) == Rejected(RejectReason.BAD_SIGNATURE)
    assert v.verify(marker(origin="eu"), NOW) == Rejected(RejectReason.LOOP)
    assert len(v) == 0


@pytest.mark.parametrize(
    ("value", "now", "region", "ok"),
    [
        (state_auth(SECRET, "eu", NOW), NOW + 1, "eu", True),
        (state_auth(SECRET, "eu", NOW), NOW + 6, "eu", False),  # skew
        (state_auth(SECRET, "us", NOW), NOW, "eu", False),  # made for another region
        (state_auth(b"other", "eu", NOW), NOW, "eu", False),  # wrong secret
        (f"{NOW:.6f}:" + "0" * 64, NOW, "eu", False),
        ("garbage", NOW, "eu", False),
        ("", NOW, "eu", False),
        (None, NOW, "eu", False),
    ],
)
def test_state_auth(value: str | None, now: float, region: str, ok: bool) -> None:
    assert check_state_auth(SECRET, region, value, now, max_skew_s=5.0) is ok


def test_state_auth_without_a_secret_refuses() -> None:
    value = state_auth(SECRET, "eu", NOW)
    assert not check_state_auth(None, "eu", value, NOW, max_skew_s=5.0)
