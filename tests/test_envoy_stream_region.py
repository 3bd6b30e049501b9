"""envoy/stream.py, cross-region part: x-skylb-* headers reported and stripped, forwarding
answers in every body mode, the tenant header."""

from __future__ import annotations

import dataclasses

from test_envoy_stream import (
    BODY,
    CHAT_REQUEST,
    ROUTE,
    body,
    cont,
    request_headers,
    trailers,
)

from skylb_extproc.envoy import messages
from skylb_extproc.envoy.messages import Phase
from skylb_extproc.envoy.stream import BodyMode, Decide, Send, StreamMachine
from skylb_extproc.parsing.openai import passthrough_request
from skylb_extproc.types import PeerForward

FORWARD = PeerForward("eu", "peer-eu", (("x-skylb-origin", "us"), ("x-skylb-sig", "00")))
SENT = {"x-skylb-origin": "asia", "X-Skylb-Evil": "1", "x-other": "kept"}


def test_skylb_headers_are_reported_and_stripped_from_a_local_route() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20)
    assert m.receive(request_headers(extra=SENT)) == [cont(Phase.REQUEST_HEADERS)]
    [decide] = m.receive(body(BODY, True))
    assert decide == Decide(CHAT_REQUEST, (("x-skylb-origin", "asia"), ("x-skylb-evil", "1")))
    answer = messages.route_response(
        Phase.REQUEST_BODY, ROUTE, remove=("x-skylb-origin", "x-skylb-evil")
    )
    assert m.decided(ROUTE) == [Send(answer)]


def test_forward_in_buffered_mode_answers_the_body() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20)
    m.receive(request_headers())
    assert m.receive(body(BODY, True)) == [Decide(CHAT_REQUEST)]
    assert m.decided(FORWARD) == [Send(messages.forward_response(Phase.REQUEST_BODY, FORWARD))]
    assert m.routed


def test_forward_in_duplex_mode_carries_the_whole_body() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20)
    assert m.receive(request_headers(mode=BodyMode.FULL_DUPLEX_STREAMED, extra=SENT)) == []
    m.receive(body(BODY[:10], False))
    assert m.receive(body(BODY[10:], True))[0] == Decide(
        CHAT_REQUEST, (("x-skylb-origin", "asia"), ("x-skylb-evil", "1"))
    )
    expected = messages.forward_response(
        Phase.REQUEST_HEADERS, FORWARD, body=BODY, remove=("x-skylb-origin", "x-skylb-evil")
    )
    assert m.decided(FORWARD) == [Send(expected)]


def test_forward_of_a_get_answers_the_headers_and_releases_held_phases() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20)
    [decide] = m.receive(request_headers("POST", "/v1/embeddings"))
    assert decide == Decide(passthrough_request("rid", "POST", "/v1/embeddings", hash_key=None))
    assert m.receive(body(b"{}", False)) == []
    assert m.receive(trailers()) == []
    assert m.decided(FORWARD) == [
        Send(messages.forward_response(Phase.REQUEST_HEADERS, FORWARD)),
        cont(Phase.REQUEST_BODY),
        cont(Phase.REQUEST_TRAILERS),
    ]


def test_tenant_header_becomes_the_request_tenant() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20, tenant_header="x-tenant")
    m.receive(request_headers(extra={"x-tenant": "acme"}))
    [decide] = m.receive(body(BODY, True))
    assert isinstance(decide, Decide)
    assert decide.request == dataclasses.replace(CHAT_REQUEST, tenant="acme")


def test_no_tenant_header_configured_means_no_tenant() -> None:
    m = StreamMachine("rid", max_body_bytes=1 << 20)
    m.receive(request_headers(extra={"x-tenant": "acme"}))
    [decide] = m.receive(body(BODY, True))
    assert isinstance(decide, Decide) and decide.request.tenant is None
