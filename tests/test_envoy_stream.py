"""envoy/stream.py in memory: ProcessingRequest sequences in, exact action lists out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from skylb_extproc.envoy import messages, proto
from skylb_extproc.envoy.messages import Phase
from skylb_extproc.envoy.stream import (
    BodyMode,
    Decide,
    Fail,
    Send,
    Started,
    StreamMachine,
    UnsupportedMode,
)
from skylb_extproc.errors import BadRequest, BodyTooLarge
from skylb_extproc.parsing.openai import parse_body
from skylb_extproc.types import Outcome, Reject, Route, RouteRequest

CHAT = "/v1/chat/completions"
ROUTE = Route(replica="r1", address="10.0.0.2:8000", reason="prefix")
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": True}
).encode()
CHAT_REQUEST = parse_body("rid", "POST", CHAT, BODY, hash_key=None)


# --- message helpers -------------------------------------------------------------------------


def request_headers(
    method: str = "POST",
    path: str = CHAT,
    *,
    eos: bool = False,
    mode: BodyMode | None = BodyMode.BUFFERED,
    response_mode: BodyMode = BodyMode.NONE,
    extra: dict[str, str] | None = None,
) -> Any:
    """The first message of a stream: Envoy attaches protocol_config to it."""
    pairs = {":method": method, ":path": path, ":authority": "gw", **(extra or {})}
    headers = proto.HeaderMap(
        headers=[proto.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    )
    msg = proto.ProcessingRequest(
        request_headers=proto.HttpHeaders(headers=headers, end_of_stream=eos)
    )
    if mode is not None:
        msg.protocol_config.request_body_mode = mode
        msg.protocol_config.response_body_mode = response_mode
    return msg


def body(data: bytes, eos: bool) -> Any:
    return proto.ProcessingRequest(request_body=proto.HttpBody(body=data, end_of_stream=eos))


def trailers() -> Any:
    trailer = proto.HeaderMap(headers=[proto.HeaderValue(key="x-checksum", raw_value=b"1")])
    return proto.ProcessingRequest(request_trailers=proto.HttpTrailers(trailers=trailer))


def response_headers(status: str) -> Any:
    headers = proto.HeaderMap(headers=[proto.HeaderValue(key=":status", raw_value=status.encode())])
    return proto.ProcessingRequest(response_headers=proto.HttpHeaders(headers=headers))


def response_body(data: bytes, eos: bool) -> Any:
    return proto.ProcessingRequest(response_body=proto.HttpBody(body=data, end_of_stream=eos))


def response_trailers() -> Any:
    return proto.ProcessingRequest(response_trailers=proto.HttpTrailers())


def cont(phase: Phase) -> Send:
    return Send(messages.continue_response(phase))


def route(phase: Phase) -> Send:
    return Send(messages.route_response(phase, ROUTE))


def route_with_body(data: bytes) -> Send:
    return Send(messages.route_response(Phase.REQUEST_HEADERS, ROUTE, body=data))


def bad_request(message: str) -> list[Any]:
    error = BadRequest(message)
    return [Send(messages.error_response(error)), Fail(Outcome.BAD_REQUEST, 400, message)]


def too_large(limit: int) -> list[Any]:
    error = BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    return [Send(messages.error_response(error)), Fail(Outcome.TOO_LARGE, 413, error.message)]


def machine(max_body_bytes: int = 1 << 20) -> StreamMachine:
    return StreamMachine("rid", max_body_bytes=max_body_bytes)


def passthrough(method: str, path: str, hash_key: str | None = None) -> Decide:
    return Decide(RouteRequest("rid", path, method, hash_key=hash_key, inference=False))


# --- BUFFERED --------------------------------------------------------------------------------


def test_buffered_chat_full_exchange() -> None:
    m = machine()
    assert m.receive(request_headers()) == [cont(Phase.REQUEST_HEADERS)]
    assert m.body_mode is BodyMode.BUFFERED
    assert m.receive(body(BODY, True)) == [Decide(CHAT_REQUEST)]
    assert m.awaiting_decision
    assert m.decided(ROUTE) == [route(Phase.REQUEST_BODY)]
    assert m.routed
    assert m.receive(response_headers("200")) == [cont(Phase.RESPONSE_HEADERS), Started(200)]
    assert m.receive(response_body(b"data: x\n\n", False)) == [cont(Phase.RESPONSE_BODY)]
    assert m.receive(response_trailers()) == [cont(Phase.RESPONSE_TRAILERS)]


def test_buffered_body_with_trailers_is_whole_without_end_of_stream() -> None:
    m = machine()
    m.receive(request_headers())
    assert m.receive(body(BODY, False)) == [Decide(CHAT_REQUEST)]
    assert m.decided(ROUTE) == [route(Phase.REQUEST_BODY)]
    assert m.receive(trailers()) == [cont(Phase.REQUEST_TRAILERS)]


def test_buffered_get_decides_on_headers() -> None:
    m = machine()
    assert m.receive(request_headers("GET", "/v1/models?x=1", eos=True)) == [
        passthrough("GET", "/v1/models")
    ]
    assert m.decided(ROUTE) == [route(Phase.REQUEST_HEADERS)]


def test_buffered_passthrough_with_body_routes_on_headers_then_continues_body() -> None:
    m = machine(max_body_bytes=4)  # pass-through bodies stay in Envoy: no limit of ours
    assert m.receive(request_headers("POST", "/v1/embeddings")) == [
        passthrough("POST", "/v1/embeddings")
    ]
    assert m.decided(ROUTE) == [route(Phase.REQUEST_HEADERS)]
    assert m.receive(body(b"not json at all", True)) == [cont(Phase.REQUEST_BODY)]


def test_buffered_passthrough_body_before_decision_waits_for_the_route() -> None:
    m = machine()
    m.receive(request_headers("PUT", CHAT))
    assert m.receive(body(b"{}", False)) == []
    assert m.receive(trailers()) == []
    assert m.decided(ROUTE) == [
        route(Phase.REQUEST_HEADERS),
        cont(Phase.REQUEST_BODY),
        cont(Phase.REQUEST_TRAILERS),
    ]


def test_buffered_bad_json_is_answered_here() -> None:
    m = machine()
    m.receive(request_headers())
    actions = m.receive(body(b'{"model": ', True))
    assert actions == bad_request(
        "Request body is not valid JSON: Expecting value (line 1, column 11)."
    )
    assert m.closed
    assert m.receive(response_headers("400")) == []
    assert m.decided(ROUTE) == []


def test_inference_post_without_body_is_a_bad_request() -> None:
    m = machine()
    assert m.receive(request_headers(eos=True)) == bad_request(
        "Request body is empty; expected a JSON object."
    )


def test_buffered_oversize_by_content_length_is_refused_at_the_headers() -> None:
    m = machine(max_body_bytes=10)
    assert m.receive(request_headers(extra={"content-length": "11"})) == too_large(10)


def test_buffered_oversize_body_without_content_length() -> None:
    m = machine(max_body_bytes=10)
    assert m.receive(request_headers(extra={"content-length": "10"})) == [
        cont(Phase.REQUEST_HEADERS)
    ]
    assert m.receive(body(b"x" * 11, True)) == too_large(10)


def test_hash_key_and_legacy_value_field_are_read() -> None:
    msg = request_headers("GET", "/health", eos=True)
    msg.request_headers.headers.headers.add(key="x-hash-key", value="user-7")
    msg.request_headers.headers.headers.add(key="x-hash-key", value="ignored-second")
    assert machine().receive(msg) == [passthrough("GET", "/health", hash_key="user-7")]


def test_reject_answers_immediately() -> None:
    m = machine()
    m.receive(request_headers())
    m.receive(body(BODY, True))
    reject = Reject(429, Outcome.QUEUE_FULL, "The balancer queue is full.")
    assert m.decided(reject) == [Send(messages.reject_response(reject))]
    assert m.closed


# --- FULL_DUPLEX_STREAMED ------------------------------------------------------------------

DUPLEX = BodyMode.FULL_DUPLEX_STREAMED


def test_duplex_holds_headers_until_decision_then_routes_with_the_whole_body() -> None:
    m = machine()
    assert m.receive(request_headers(mode=DUPLEX)) == []
    assert m.receive(body(BODY[:10], False)) == []
    assert m.receive(body(BODY[10:], True)) == [Decide(CHAT_REQUEST)]
    assert m.decided(ROUTE) == [route_with_body(BODY)]
    assert m.receive(response_headers("200")) == [cont(Phase.RESPONSE_HEADERS), Started(200)]
    assert m.receive(response_trailers()) == [cont(Phase.RESPONSE_TRAILERS)]


def test_duplex_body_ended_by_trailers_owes_no_trailers_answer() -> None:
    m = machine()
    m.receive(request_headers(mode=DUPLEX))
    m.receive(body(BODY[:10], False))
    m.receive(body(BODY[10:], False))
    assert m.receive(trailers()) == [Decide(CHAT_REQUEST)]
    assert m.decided(ROUTE) == [route_with_body(BODY)]


def test_duplex_empty_last_chunk() -> None:
    m = machine()
    m.receive(request_headers(mode=DUPLEX))
    m.receive(body(BODY, False))
    assert m.receive(body(b"", True)) == [Decide(CHAT_REQUEST)]
    assert m.decided(ROUTE) == [route_with_body(BODY)]


def test_duplex_oversize_is_refused_as_soon_as_the_limit_is_crossed() -> None:
    m = machine(max_body_bytes=15)
    m.receive(request_headers(mode=DUPLEX))
    assert m.receive(body(b"x" * 10, False)) == []
    assert m.receive(body(b"x" * 6, False)) == too_large(15)
    assert m.receive(body(b"x", True)) == []


def test_duplex_bad_json_after_trailers() -> None:
    m = machine()
    m.receive(request_headers(mode=DUPLEX))
    m.receive(body(b"[1, 2]", False))
    assert m.receive(trailers()) == bad_request("Request body must be a JSON object, got array.")


def test_duplex_get() -> None:
    m = machine()
    assert m.receive(request_headers("GET", "/v1/models", eos=True, mode=DUPLEX)) == [
        passthrough("GET", "/v1/models")
    ]
    assert m.decided(ROUTE) == [route(Phase.REQUEST_HEADERS)]


def test_duplex_passthrough_body_is_held_and_sent_back_with_the_route() -> None:
    m = machine()
    assert m.receive(request_headers("POST", "/upload", mode=DUPLEX)) == []
    assert m.receive(body(b"part1", False)) == []
    assert m.receive(body(b"part2", False)) == []
    assert m.receive(body(b"", True)) == [passthrough("POST", "/upload")]
    assert m.decided(ROUTE) == [route_with_body(b"part1part2")]
    assert m.receive(response_headers("201")) == [cont(Phase.RESPONSE_HEADERS), Started(201)]


def test_duplex_passthrough_empty_body() -> None:
    m = machine()
    m.receive(request_headers("POST", "/upload", mode=DUPLEX))
    assert m.receive(body(b"", True)) == [passthrough("POST", "/upload")]
    assert m.decided(ROUTE) == [route_with_body(b"")]


def test_duplex_passthrough_with_trailers() -> None:
    m = machine()
    m.receive(request_headers("POST", "/upload", mode=DUPLEX))
    m.receive(body(b"part1", False))
    assert m.receive(trailers()) == [passthrough("POST", "/upload")]
    assert m.decided(ROUTE) == [route_with_body(b"part1")]


def test_duplex_passthrough_oversize_by_content_length() -> None:
    m = machine(max_body_bytes=4)
    assert m.receive(
        request_headers("POST", "/upload", mode=DUPLEX, extra={"content-length": "5"})
    ) == too_large(4)


def test_duplex_passthrough_held_bytes_are_bounded() -> None:
    m = machine(max_body_bytes=4)
    m.receive(request_headers("POST", "/upload", mode=DUPLEX))
    assert m.receive(body(b"12345", False)) == too_large(4)


def test_duplex_reject_drops_held_chunks() -> None:
    m = machine()
    m.receive(request_headers(mode=DUPLEX))
    m.receive(body(BODY, True))
    reject = Reject(503, Outcome.DEADLINE, "Waited too long.")
    assert m.decided(reject) == [Send(messages.reject_response(reject))]
    assert m.receive(response_headers("503")) == []


def test_duplex_response_body_is_echoed() -> None:
    m = machine()
    m.receive(request_headers("GET", "/", eos=True, mode=DUPLEX, response_mode=DUPLEX))
    m.decided(ROUTE)
    assert m.receive(response_body(b"data: 1\n\n", False)) == [
        Send(messages.streamed_body_chunk(b"data: 1\n\n", False, phase=Phase.RESPONSE_BODY))
    ]


# --- modes, misuse, response status ------------------------------------------------------


def test_mode_none_decides_inference_from_headers() -> None:
    m = machine()
    assert m.receive(request_headers(mode=BodyMode.NONE, extra={"x-hash-key": "k"})) == [
        Decide(RouteRequest("rid", CHAT, "POST", hash_key="k", inference=True))
    ]
    assert m.decided(ROUTE) == [route(Phase.REQUEST_HEADERS)]


@pytest.mark.parametrize("mode", [BodyMode.STREAMED, BodyMode.BUFFERED_PARTIAL, BodyMode.GRPC])
def test_unsupported_request_body_mode(mode: BodyMode) -> None:
    with pytest.raises(UnsupportedMode, match="request_body_mode"):
        machine().receive(request_headers(mode=mode))


def test_without_protocol_config_the_default_mode_applies() -> None:
    assert machine().receive(request_headers(mode=None)) == [cont(Phase.REQUEST_HEADERS)]
    duplex = StreamMachine("rid", max_body_bytes=100, default_body_mode=DUPLEX)
    assert duplex.receive(request_headers(mode=None)) == []
    assert duplex.body_mode is DUPLEX


def test_decided_without_pending_decide_is_a_bug() -> None:
    m = machine()
    with pytest.raises(RuntimeError, match="no Decide pending"):
        m.decided(ROUTE)
    m.receive(request_headers("GET", "/", eos=True))
    m.decided(ROUTE)
    with pytest.raises(RuntimeError):
        m.decided(ROUTE)


def test_repeated_request_headers_are_ignored() -> None:
    m = machine()
    m.receive(request_headers())
    assert m.receive(request_headers()) == []


@pytest.mark.parametrize(("status", "seen"), [("200", 200), ("503", 503), ("", 0), ("x", 0)])
def test_response_headers_report_status(status: str, seen: int) -> None:
    m = machine()
    m.receive(request_headers("GET", "/", eos=True))
    m.decided(ROUTE)
    assert m.receive(response_headers(status)) == [cont(Phase.RESPONSE_HEADERS), Started(seen)]
