"""ASGI middleware for vLLM's `--middleware`: tag every response with `x-inference-pod: NAME`.

The simulated replica (and llm-d's inference simulator) name themselves in this header, and
our workload driver and tests count requests per replica by it. vLLM has no such header, so each
replica we start loads this class with SKYLB_POD_NAME set. A pure ASGI wrapper (not Starlette's
BaseHTTPMiddleware): it only edits the response start message, so streaming and vLLM's
client-disconnect detection see the same events as without it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"x-inference-pod"


class PodHeader:
    """Adds `x-inference-pod` to every HTTP response of the wrapped app."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.value = os.environ.get("SKYLB_POD_NAME", "vllm").encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message.get("type") == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((HEADER, self.value))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, tagged)
