"""The per-stream ext_proc phase machine: ProcessingRequests in, actions out (h11-style).

One `StreamMachine` per ext_proc gRPC stream, i.e. per HTTP request. The driver feeds every
message Envoy sends to `receive`, hands each `Decide` to the router, feeds the router's answer to
`decided`, and performs the returned actions in order (`Send` = write that ProcessingResponse).
No I/O, clock or grpc here, so the whole protocol is testable in memory.

Envoy's request body mode (learnt from `ProcessingRequest.protocol_config`, which Envoy attaches
to the first message of every stream) decides where the route goes:
- NONE: no body will come. Decide at the headers and route in the headers answer.
- BUFFERED: Envoy holds the body until the headers are answered, then sends it whole in ONE
  message (end_of_stream is false when trailers follow). Inference requests answer the headers
  with CONTINUE at once and route in the body answer (header mutation + clear_route_cache);
  other requests are decided on their headers, routed in the headers answer, and their body and
  trailers answered with CONTINUE.
- FULL_DUPLEX_STREAMED: chunks flow without waiting for answers and Envoy forwards only what we
  send back. We hold every body until it is complete (end_of_stream or trailers; at most
  max_body_bytes), decide, and answer the headers with the route AND the whole body
  (CONTINUE_AND_REPLACE): one message, and no answers owed for the chunks or trailers. Measured on
  Envoy 1.40: re-sending the chunks as `streamed_response` works only without request trailers;
  with trailers Envoy forwarded the body twice (whether the trailers came before or after the
  headers answer). The replacement forwards it once, trailers or not, also for a 5 MB body.
  Envoy runs no message_timeout on the request phases in this mode, so a request can wait at the
  balancer longer than message_timeout.
STREAMED / BUFFERED_PARTIAL cannot carry a route with the body answer: `UnsupportedMode`.

Requests without a body (GET, or end_of_stream on the headers) are decided on their headers.

Cross-region: every `x-skylb-*` request header is reported with the `Decide` (the driver verifies
a forwarding marker from them) and removed by whatever answer routes the request (`remove_headers`),
so none of them reaches a replica or a peer unless the decision sets it again. A `PeerForward`
decision is answered exactly where a `Route` would be, with `messages.forward_response`.
Non-inference bodies are never parsed (RouteRequest.inference=False).

Bad bodies are answered here (immediate 400/413) with a `Fail` action so the driver can count the
outcome: the router never sees them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skylb_extproc.envoy import messages
from skylb_extproc.envoy.headers import content_length, header_values, skylb_headers
from skylb_extproc.envoy.messages import Phase
from skylb_extproc.errors import BadRequest, BodyTooLarge, SkylbError
from skylb_extproc.parsing.openai import is_inference, parse_body, passthrough_request
from skylb_extproc.types import Outcome, PeerForward, Reject, Route, RouteRequest

HASH_KEY_HEADER = "x-hash-key"
_REQUEST_HEADERS_READ = frozenset({":method", ":path", HASH_KEY_HEADER, "content-length"})


class BodyMode(enum.IntEnum):
    """ProcessingMode.BodySendMode numbers as Envoy reports them in ProtocolConfiguration."""

    NONE = 0
    STREAMED = 1
    BUFFERED = 2
    BUFFERED_PARTIAL = 3
    FULL_DUPLEX_STREAMED = 4
    GRPC = 5


SUPPORTED_REQUEST_BODY_MODES = frozenset(
    {BodyMode.NONE, BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED}
)


class UnsupportedMode(ValueError):
    """Envoy's request_body_mode is one the machine cannot route with (a config error)."""


@dataclass(frozen=True, slots=True)
class Send:
    """Write this ProcessingResponse on the stream."""

    response: Any


@dataclass(frozen=True, slots=True)
class Decide:
    """Ask the router; answer with `decided(...)` (possibly much later: the request waits).

    `skylb_headers`: every x-skylb-* header of the request (first values), for the driver to
    verify a forwarding marker. Whatever the decision, none of them reaches the upstream unless
    the decision sets it again."""

    request: RouteRequest
    skylb_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Started:
    """The upstream answered (response headers seen) with this HTTP status (0 if unreadable)."""

    status: int


@dataclass(frozen=True, slots=True)
class Fail:
    """The machine answered the client itself (bad or oversized body); count the outcome."""

    outcome: Outcome
    status: int
    message: str


Action = Send | Decide | Started | Fail


class _State(enum.Enum):
    HEADERS = "headers"  # waiting for the request headers
    BODY = "body"  # collecting a body (inference; any body in duplex)
    DECIDING = "deciding"  # Decide emitted, waiting for decided()
    ROUTED = "routed"  # route sent; the request flows upstream
    CLOSED = "closed"  # immediate response sent; Envoy sends nothing more that needs an answer


class StreamMachine:
    """The request/response phases of one ext_proc stream; see the module docstring."""

    def __init__(
        self,
        request_id: str,
        *,
        max_body_bytes: int,
        default_body_mode: BodyMode = BodyMode.BUFFERED,
        tenant_header: str | None = None,
    ) -> None:
        """`default_body_mode` applies only if Envoy sends no protocol_config (observability);
        `tenant_header`: its value becomes `RouteRequest.tenant` (residency rules)."""
        self.request_id = request_id
        self._max_body_bytes = max_body_bytes
        self._tenant_header = tenant_header
        self._tenant: str | None = None
        self._skylb: dict[str, str] = {}  # x-skylb-* request headers: stripped when routing
        self._default_body_mode = default_body_mode
        self._mode: BodyMode | None = None
        self._response_duplex = False
        self._state = _State.HEADERS
        self._method = ""
        self._path = ""
        self._hash_key: str | None = None
        self._inference = False
        self._chunks: list[bytes] = []  # held body chunks, joined once when complete
        self._held_bytes = 0
        self._body: bytes | None = None  # duplex: the complete body, sent back with the route
        self._headers_answered = False
        self._body_pending = False  # BUFFERED pass-through body waiting for the route
        self._trailers_pending = False  # BUFFERED pass-through trailers waiting for the route

    # --- what the driver may ask -------------------------------------------------------

    @property
    def body_mode(self) -> BodyMode | None:
        """Envoy's request body mode, known after the first message."""
        return self._mode

    @property
    def awaiting_decision(self) -> bool:
        """A Decide was emitted and `decided` not yet called: the router holds the request."""
        return self._state is _State.DECIDING

    @property
    def routed(self) -> bool:
        return self._state is _State.ROUTED

    @property
    def closed(self) -> bool:
        """An immediate response was sent."""
        return self._state is _State.CLOSED

    # --- inputs ------------------------------------------------------------------------

    def receive(self, msg: Any) -> list[Action]:
        """Feed one ProcessingRequest; returns the actions to perform, in order."""
        if self._mode is None:
            self._learn_modes(msg)
        kind = msg.WhichOneof("request")
        handler = self._HANDLERS.get(kind)
        if handler is None or self._state is _State.CLOSED:
            return []
        return handler(self, getattr(msg, kind))

    def decided(self, decision: Route | Reject | PeerForward) -> list[Action]:
        """Apply the router's decision for the request of the last Decide."""
        if self._state is _State.CLOSED:
            return []
        if self._state is not _State.DECIDING:
            raise RuntimeError(f"decided() in state {self._state.value}: no Decide pending")
        if isinstance(decision, Reject):
            return self._close(messages.reject_response(decision))
        return self._route(decision)

    # --- request phases ----------------------------------------------------------------

    def _learn_modes(self, msg: Any) -> None:
        """Envoy encodes protocol_config once, on the first message of the stream."""
        if not msg.HasField("protocol_config"):
            self._mode = self._default_body_mode
            return
        config = msg.protocol_config
        if config.request_body_mode not in SUPPORTED_REQUEST_BODY_MODES:
            raise UnsupportedMode(
                f"request_body_mode {config.request_body_mode} is not supported; "
                "configure NONE, BUFFERED or FULL_DUPLEX_STREAMED"
            )
        self._mode = BodyMode(config.request_body_mode)
        self._response_duplex = config.response_body_mode == BodyMode.FULL_DUPLEX_STREAMED

    def _on_request_headers(self, headers: Any) -> list[Action]:
        if self._state is not _State.HEADERS:
            return []
        values = header_values(headers.headers, self._headers_read)
        self._skylb = skylb_headers(headers.headers)
        if self._tenant_header is not None:
            self._tenant = values.get(self._tenant_header)
        self._method = values.get(":method", "")
        self._path = values.get(":path", "")
        self._hash_key = values.get(HASH_KEY_HEADER)
        self._inference = is_inference(self._method, self._path)
        if headers.end_of_stream:
            # No body: an inference request is then a bad one, and parse says why.
            return self._parse() if self._inference else self._decide(self._passthrough())
        if self._mode is BodyMode.NONE:
            return self._decide(dataclasses.replace(self._passthrough(), inference=self._inference))
        if self._mode is BodyMode.BUFFERED and not self._inference:
            return self._decide(self._passthrough())  # Envoy keeps the body; route on headers
        if content_length(values) > self._max_body_bytes:
            return self._too_large()
        self._state = _State.BODY
        if self._mode is BodyMode.BUFFERED:
            self._headers_answered = True
            return [Send(messages.continue_response(Phase.REQUEST_HEADERS))]
        return []

    def _on_request_body(self, body: Any) -> list[Action]:
        if self._state is _State.BODY:
            if body.body:
                self._chunks.append(body.body)
                self._held_bytes += len(body.body)
                if self._held_bytes > self._max_body_bytes:
                    return self._too_large()
            # BUFFERED sends the whole body in one message, end_of_stream false if trailers follow.
            if body.end_of_stream or self._mode is BodyMode.BUFFERED:
                return self._complete()
            return []
        if self._mode is not BodyMode.BUFFERED or self._state is _State.HEADERS:
            return []  # nothing Envoy should send; answering would be a spurious message
        if self._headers_answered:
            return [Send(messages.continue_response(Phase.REQUEST_BODY))]
        self._body_pending = True
        return []

    def _on_request_trailers(self, _trailers: Any) -> list[Action]:
        if self._state is _State.BODY:
            return self._complete()  # trailers mark the end of a duplex body
        if self._state is _State.ROUTED and self._mode is BodyMode.BUFFERED:
            return [Send(messages.continue_response(Phase.REQUEST_TRAILERS))]
        if self._state is _State.DECIDING and self._mode is BodyMode.BUFFERED:
            self._trailers_pending = True
        return []

    def _complete(self) -> list[Action]:
        """The held body is complete: parse it (inference) and decide."""
        if self._inference:
            return self._parse()
        self._body = self._joined()
        return self._decide(self._passthrough())

    def _parse(self) -> list[Action]:
        body = self._joined()
        try:
            request = parse_body(
                self.request_id, self._method, self._path, body, hash_key=self._hash_key
            )
        except BadRequest as exc:
            return self._fail(Outcome.BAD_REQUEST, exc)
        # BUFFERED: Envoy keeps its own copy and forwards it on CONTINUE.
        if self._mode is BodyMode.FULL_DUPLEX_STREAMED:
            self._body = body
        return self._decide(request)

    def _joined(self) -> bytes:
        """The held body as one bytes object; the chunk list is dropped (one copy kept)."""
        chunks, self._chunks, self._held_bytes = self._chunks, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _passthrough(self) -> RouteRequest:
        return passthrough_request(
            self.request_id, self._method, self._path, hash_key=self._hash_key
        )

    def _decide(self, request: RouteRequest) -> list[Action]:
        self._state = _State.DECIDING
        if self._tenant is not None:
            request = dataclasses.replace(request, tenant=self._tenant)
        return [Decide(request, tuple(self._skylb.items()))]

    @property
    def _headers_read(self) -> frozenset[str]:
        if self._tenant_header is None:
            return _REQUEST_HEADERS_READ
        return _REQUEST_HEADERS_READ | {self._tenant_header}

    # --- decisions -----------------------------------------------------------------------

    def _answer(self, decision: Route | PeerForward, phase: Phase, body: bytes | None) -> Any:
        remove = tuple(self._skylb)
        if isinstance(decision, PeerForward):
            return messages.forward_response(phase, decision, body=body, remove=remove)
        return messages.route_response(phase, decision, body=body, remove=remove)

    def _route(self, decision: Route | PeerForward) -> list[Action]:
        """Route in the first answer Envoy still waits for, then release what waited for it."""
        self._state = _State.ROUTED
        if self._body is not None:  # duplex: Envoy expects no more request answers after this
            body, self._body = self._body, None
            self._headers_answered = True
            return [Send(self._answer(decision, Phase.REQUEST_HEADERS, body))]
        if self._headers_answered:  # BUFFERED inference: the body answer carries the route
            return [Send(self._answer(decision, Phase.REQUEST_BODY, None))]
        self._headers_answered = True
        actions: list[Action] = [Send(self._answer(decision, Phase.REQUEST_HEADERS, None))]
        if self._body_pending:
            self._body_pending = False
            actions.append(Send(messages.continue_response(Phase.REQUEST_BODY)))
        if self._trailers_pending:
            self._trailers_pending = False
            actions.append(Send(messages.continue_response(Phase.REQUEST_TRAILERS)))
        return actions

    def _too_large(self) -> list[Action]:
        limit = self._max_body_bytes
        return self._fail(
            Outcome.TOO_LARGE, BodyTooLarge(f"Request body exceeds the limit of {limit} bytes.")
        )

    def _fail(self, outcome: Outcome, error: SkylbError) -> list[Action]:
        actions = self._close(messages.error_response(error))
        return [*actions, Fail(outcome, error.status, error.message)]

    def _close(self, response: Any) -> list[Action]:
        self._state = _State.CLOSED
        self._chunks, self._held_bytes, self._body = [], 0, None
        return [Send(response)]

    # --- response phases -------------------------------------------------------------------

    def _on_response_headers(self, headers: Any) -> list[Action]:
        status = header_values(headers.headers, frozenset({":status"})).get(":status", "")
        return [
            Send(messages.continue_response(Phase.RESPONSE_HEADERS)),
            Started(int(status) if status.isdigit() else 0),
        ]

    def _on_response_body(self, body: Any) -> list[Action]:
        if self._response_duplex:
            chunk = messages.streamed_body_chunk(
                body.body, body.end_of_stream, phase=Phase.RESPONSE_BODY
            )
            return [Send(chunk)]
        return [Send(messages.continue_response(Phase.RESPONSE_BODY))]

    def _on_response_trailers(self, _trailers: Any) -> list[Action]:
        return [Send(messages.continue_response(Phase.RESPONSE_TRAILERS))]

    _HANDLERS: dict[str, Callable[[StreamMachine, Any], list[Action]]] = {
        Phase.REQUEST_HEADERS.value: _on_request_headers,
        Phase.REQUEST_BODY.value: _on_request_body,
        Phase.REQUEST_TRAILERS.value: _on_request_trailers,
        Phase.RESPONSE_HEADERS.value: _on_response_headers,
        Phase.RESPONSE_BODY.value: _on_response_body,
        Phase.RESPONSE_TRAILERS.value: _on_response_trailers,
    }
