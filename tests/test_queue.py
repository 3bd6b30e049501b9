"""WaitQueue: FIFO order, length bound, deadlines, removal by id."""

from __future__ import annotations

import pytest

from skylb_extproc.dispatch.queue import Queued, WaitQueue
from skylb_extproc.types import RouteRequest


def req(rid: str) -> RouteRequest:
    return RouteRequest(request_id=rid, path="/v1/completions", model="m", prompt="p")


def ids(entries: list[Queued]) -> list[str]:
    return [e.request.request_id for e in entries]


def test_fifo_and_fields() -> None:
    q = WaitQueue(max_length=3, max_wait_s=10.0)
    assert q.head() is None and q.next_deadline() is None and len(q) == 0
    assert q.offer(req("a"), (1, 2), now=1.0)
    assert q.offer(req("b"), (), now=2.0)
    head = q.head()
    assert head == Queued(request=req("a"), hashes=(1, 2), arrived=1.0, deadline=11.0)
    assert q.next_deadline() == 11.0
    assert "a" in q and "zz" not in q
    assert ids([q.pop(), q.pop()]) == ["a", "b"]
    with pytest.raises(IndexError):
        q.pop()


def test_full_queue_refuses() -> None:
    q = WaitQueue(max_length=2, max_wait_s=1.0)
    assert q.offer(req("a"), (), 0.0) and q.offer(req("b"), (), 0.0)
    assert not q.offer(req("c"), (), 0.0)
    assert len(q) == 2
    q.pop()
    assert q.offer(req("c"), (), 0.0)


def test_zero_length_queue_refuses_everything() -> None:
    assert not WaitQueue(max_length=0, max_wait_s=1.0).offer(req("a"), (), 0.0)


def test_duplicate_id_is_a_caller_bug() -> None:
    q = WaitQueue(max_length=5, max_wait_s=1.0)
    q.offer(req("a"), (), 0.0)
    with pytest.raises(ValueError):
        q.offer(req("a"), (), 0.5)


def test_remove_anywhere_keeps_order() -> None:
    q = WaitQueue(max_length=5, max_wait_s=1.0)
    for i, rid in enumerate("abcd"):
        q.offer(req(rid), (), float(i))
    removed = q.remove("b")
    assert removed is not None and removed.request.request_id == "b"
    assert q.remove("b") is None
    assert q.remove("a") is not None
    assert q.next_deadline() == 3.0  # "c" arrived at 2.0
    assert ids([q.pop(), q.pop()]) == ["c", "d"]


def test_expire_at_and_after_deadline() -> None:
    q = WaitQueue(max_length=5, max_wait_s=2.0)
    q.offer(req("a"), (), 0.0)
    q.offer(req("b"), (), 1.0)
    q.offer(req("c"), (), 1.5)
    assert q.expire(1.999) == []
    assert ids(q.expire(3.0)) == ["a", "b"]  # deadline 2.0 passed, 3.0 reached
    assert q.next_deadline() == 3.5
    assert ids(q.expire(100.0)) == ["c"]
    assert len(q) == 0 and q.next_deadline() is None


@pytest.mark.parametrize(("length", "wait"), [(-1, 1.0), (1, -1.0)])
def test_bad_arguments(length: int, wait: float) -> None:
    with pytest.raises(ValueError):
        WaitQueue(max_length=length, max_wait_s=wait)
