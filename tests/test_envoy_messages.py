"""Golden tests of the ProcessingResponses in envoy/messages.py.

Each case renders a built message with protobuf text format and compares it with
tests/golden/<name>.txt. A missing golden fails with the text to paste (check it by eye first):
there is deliberately no auto-update switch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format

from skylb_extproc.envoy import messages, proto
from skylb_extproc.envoy.messages import Phase
from skylb_extproc.errors import BadRequest, BodyTooLarge
from skylb_extproc.types import Outcome, PeerForward, Reject, Route

GOLDEN = Path(__file__).parent / "golden"
ROUTE = Route(replica="r0", address="10.0.0.7:8000", reason="prefix")
FORWARD = PeerForward(
    region="eu",
    cluster="peer-eu",
    headers=(
        ("x-skylb-origin", "us"),
        ("x-skylb-ts", "1718000000.000000"),
        ("x-skylb-id", "us-1a2b3c4d-7"),
        ("x-skylb-sig", "ab" * 32),
    ),
)
# What a client or a peer sent: stripped, unless the answer sets the header itself.
SENT = ("x-skylb-origin", "x-skylb-cluster", "x-skylb-replica")

CASES: dict[str, Callable[[], Any]] = {
    **{f"continue_{p.value}": (lambda p=p: messages.continue_response(p)) for p in Phase},
    "route_request_headers": lambda: messages.route_response(Phase.REQUEST_HEADERS, ROUTE),
    "route_request_body": lambda: messages.route_response(Phase.REQUEST_BODY, ROUTE),
    "route_request_headers_keep_route_cache": lambda: messages.route_response(
        Phase.REQUEST_HEADERS, ROUTE, clear_route_cache=False
    ),
    "route_request_headers_replace_body": lambda: messages.route_response(
        Phase.REQUEST_HEADERS, ROUTE, body=b'{"model":"m","prompt":"hi"}'
    ),
    "route_request_body_strip_skylb": lambda: messages.route_response(
        Phase.REQUEST_BODY, ROUTE, remove=SENT
    ),
    "forward_request_body": lambda: messages.forward_response(
        Phase.REQUEST_BODY, FORWARD, remove=SENT
    ),
    "forward_request_headers_replace_body": lambda: messages.forward_response(
        Phase.REQUEST_HEADERS, FORWARD, body=b'{"model":"m","prompt":"hi"}'
    ),
    "immediate_error": lambda: messages.immediate_error(
        400, "'model' is required.", "invalid_request_error"
    ),
    "reject_queue_full": lambda: messages.reject_response(
        Reject(429, Outcome.QUEUE_FULL, "The balancer queue is full.")
    ),
    "error_bad_request": lambda: messages.error_response(BadRequest('bad "quoted" é')),
    "error_too_large": lambda: messages.error_response(BodyTooLarge("Too big.")),
    "streamed_request_chunk": lambda: messages.streamed_body_chunk(b'{"model":', False),
    "streamed_request_last_chunk": lambda: messages.streamed_body_chunk(b'"m"}', True),
    "streamed_response_chunk": lambda: messages.streamed_body_chunk(
        b"data: {}\n\n", True, phase=Phase.RESPONSE_BODY
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    text = text_format.MessageToString(CASES[name](), as_utf8=True)
    path = GOLDEN / f"{name}.txt"
    if not path.exists():
        pytest.fail(f"missing golden {path}; if this is right, save it:\n{text}")
    assert text == path.read_text(encoding="utf-8")


def test_messages_are_processing_responses_that_round_trip() -> None:
    for build in CASES.values():
        message = build()
        assert isinstance(message, proto.ProcessingResponse)
        again = proto.ProcessingResponse.FromString(message.SerializeToString())
        assert again == message


def test_route_only_on_request_headers_or_body() -> None:
    for phase in (Phase.REQUEST_TRAILERS, Phase.RESPONSE_HEADERS, Phase.RESPONSE_BODY):
        with pytest.raises(ValueError, match="route"):
            messages.route_response(phase, ROUTE)
        with pytest.raises(ValueError, match="route"):
            messages.forward_response(phase, FORWARD)


def test_only_the_headers_answer_replaces_the_body() -> None:
    with pytest.raises(ValueError, match="replace the body"):
        messages.route_response(Phase.REQUEST_BODY, ROUTE, body=b"{}")


def test_streamed_chunk_only_on_body_phases() -> None:
    with pytest.raises(ValueError, match="body phase"):
        messages.streamed_body_chunk(b"x", True, phase=Phase.REQUEST_HEADERS)


def test_fresh_message_each_call() -> None:
    first = messages.continue_response(Phase.REQUEST_HEADERS)
    first.request_headers.response.clear_route_cache = True
    assert messages.continue_response(Phase.REQUEST_HEADERS) != first
