"""Builders of the ProcessingResponses skylb sends to Envoy (golden-tested).

One function per answer kind; every answer is a fresh message (callers may mutate it).
- `continue_response(phase)`: let the phase proceed unchanged.
- `route_response(phase, route)`: pick the replica, the GIE endpoint-picker way: header
  `x-gateway-destination-endpoint: ip:port` (for `override_host` / ORIGINAL_DST clusters) and the
  same value as `envoy.lb` dynamic metadata, plus `x-skylb-replica: <name>` for observability.
  `clear_route_cache` makes Envoy re-evaluate routes that match on the header. With `body=`, the
  headers answer is CONTINUE_AND_REPLACE carrying the whole request body: in
  FULL_DUPLEX_STREAMED, one message instead of one per chunk, and the only way found that does
  not duplicate the body when request trailers arrived before the headers answer (Envoy 1.40).
- `forward_response(phase, forward)`: send the request to a peer region: header
  `x-skylb-cluster: <peer cluster>` (the route's `cluster_header`; `clear_route_cache` so Envoy
  re-routes on it) plus the signed marker headers; `x-gateway-destination-endpoint` removed, no
  `envoy.lb` metadata (the peer cluster balances over the peer's Envoys itself). Same `body=`.
- `remove=` (route and forward): request headers to delete, the `x-skylb-*` headers a client or
  a peer sent that must not reach the upstream (Envoy removes before it sets).
- `immediate_error(status, message, code)`: answer the client directly with an OpenAI-style body.
- `streamed_body_chunk(body, end_of_stream)`: FULL_DUPLEX_STREAMED hands the body to us, so a body
  not replaced at once must come back as `streamed_response` chunks, the last one with
  `end_of_stream` unless trailers follow.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from skylb_extproc.envoy import proto
from skylb_extproc.errors import SkylbError
from skylb_extproc.types import PeerForward, Reject, Route

DESTINATION_HEADER = "x-gateway-destination-endpoint"
REPLICA_HEADER = "x-skylb-replica"
CLUSTER_HEADER = "x-skylb-cluster"
LB_METADATA_NAMESPACE = "envoy.lb"


class Phase(enum.Enum):
    """An ext_proc phase; the value is the ProcessingRequest/ProcessingResponse oneof field."""

    REQUEST_HEADERS = "request_headers"
    REQUEST_BODY = "request_body"
    REQUEST_TRAILERS = "request_trailers"
    RESPONSE_HEADERS = "response_headers"
    RESPONSE_BODY = "response_body"
    RESPONSE_TRAILERS = "response_trailers"


# The answer message each phase takes; headers and body phases wrap a CommonResponse.
_ANSWER: dict[Phase, Any] = {
    Phase.REQUEST_HEADERS: proto.HeadersResponse,
    Phase.REQUEST_BODY: proto.BodyResponse,
    Phase.REQUEST_TRAILERS: proto.TrailersResponse,
    Phase.RESPONSE_HEADERS: proto.HeadersResponse,
    Phase.RESPONSE_BODY: proto.BodyResponse,
    Phase.RESPONSE_TRAILERS: proto.TrailersResponse,
}
_BODY_PHASES = frozenset({Phase.REQUEST_BODY, Phase.RESPONSE_BODY})


def continue_response(phase: Phase) -> Any:
    """CONTINUE for any phase (trailers phases take an empty TrailersResponse)."""
    return proto.ProcessingResponse(**{phase.value: _ANSWER[phase]()})


def route_response(
    phase: Phase,
    route: Route,
    *,
    clear_route_cache: bool = True,
    body: bytes | None = None,
    remove: tuple[str, ...] = (),
) -> Any:
    """Send the request to `route.address`; only the request headers or body answer can route.

    `body` (request headers only) replaces the request body and ends request processing: Envoy
    sends no further request body or trailers message and expects no answer to those it sent.
    """
    headers = ((DESTINATION_HEADER, route.address), (REPLICA_HEADER, route.replica))
    response = _request_answer(phase, headers, remove, clear_route_cache, body)
    metadata = proto.Struct()
    metadata.update({LB_METADATA_NAMESPACE: {DESTINATION_HEADER: route.address}})
    response.dynamic_metadata.CopyFrom(metadata)
    return response


def forward_response(
    phase: Phase, forward: PeerForward, *, body: bytes | None = None, remove: tuple[str, ...] = ()
) -> Any:
    """Send the request to peer region `forward.region` through Envoy cluster `forward.cluster`."""
    headers = ((CLUSTER_HEADER, forward.cluster), *forward.headers)
    return _request_answer(phase, headers, (DESTINATION_HEADER, *remove), True, body)


def _request_answer(
    phase: Phase,
    headers: tuple[tuple[str, str], ...],
    remove: tuple[str, ...],
    clear_route_cache: bool,
    body: bytes | None,
) -> Any:
    if phase not in (Phase.REQUEST_HEADERS, Phase.REQUEST_BODY):
        raise ValueError(f"a route can only be set on request headers or body, not {phase.value}")
    if body is not None and phase is not Phase.REQUEST_HEADERS:
        raise ValueError("only the request headers answer can replace the body")
    setting = {key for key, _ in headers}
    common = proto.CommonResponse(
        header_mutation=proto.HeaderMutation(
            set_headers=[_set_header(key, value) for key, value in headers],
            # A header we set anyway needs no removal (and Envoy would remove then set it).
            remove_headers=[name for name in remove if name not in setting],
        ),
        clear_route_cache=clear_route_cache,
    )
    if body is not None:
        common.status = proto.CONTINUE_AND_REPLACE
        common.body_mutation.body = body
    return proto.ProcessingResponse(**{phase.value: _ANSWER[phase](response=common)})


def immediate_error(status: int, message: str, code: str) -> Any:
    """Answer the client with `status` and `{"error": {"message", "type": code, "code": status}}`.

    `details` (Envoy's %RESPONSE_CODE_DETAILS%) names skylb and the code, so access logs tell
    our rejections from Envoy's own local replies.
    """
    body = json.dumps({"error": {"message": message, "type": code, "code": status}})
    return proto.ProcessingResponse(
        immediate_response=proto.ImmediateResponse(
            status=proto.HttpStatus(code=status),
            headers=proto.HeaderMutation(
                set_headers=[_set_header("content-type", "application/json")]
            ),
            body=body.encode(),
            details=f"skylb_{code}",
        )
    )


def reject_response(reject: Reject) -> Any:
    """A router Reject: the outcome label doubles as the OpenAI error type."""
    return immediate_error(reject.status, reject.message, reject.outcome.value)


def error_response(error: SkylbError) -> Any:
    """A balancer-side error (BadRequest, BodyTooLarge) with its own status and code."""
    return immediate_error(error.status, error.message, error.code)


def streamed_body_chunk(
    body: bytes, end_of_stream: bool, *, phase: Phase = Phase.REQUEST_BODY
) -> Any:
    """One FULL_DUPLEX_STREAMED body chunk handed back to Envoy (request or response body)."""
    if phase not in _BODY_PHASES:
        raise ValueError(f"body chunks belong to a body phase, not {phase.value}")
    common = proto.CommonResponse(
        body_mutation=proto.BodyMutation(
            streamed_response=proto.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
        )
    )
    return proto.ProcessingResponse(**{phase.value: _ANSWER[phase](response=common)})


def _set_header(key: str, value: str) -> Any:
    """Overwrite rather than append: a client-sent copy of a routing header must not survive."""
    return proto.HeaderValueOption(
        header=proto.HeaderValue(key=key, raw_value=value.encode()),
        append_action=proto.OVERWRITE_IF_EXISTS_OR_ADD,
    )
