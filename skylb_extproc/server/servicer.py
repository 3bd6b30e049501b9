"""The grpc.aio ExternalProcessor servicer: one StreamMachine per ext_proc stream.

Each message from Envoy goes through the stream machine; its actions are performed here (Send:
write the response; Decide: ask the driver; Started / Fail: tell the driver). Completion is
reported in `finally:`, because a stream may end as an iterator end, a CancelledError (grpc.aio
at reset, measured with Envoy 1.40), or the generator being closed: in every case the router
must learn the request is over, or its in-flight count leaks.

While a request waits at the balancer the stream keeps being read, so a stream that Envoy ends
meanwhile (client gone) leaves the queue at once instead of being routed to a replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from skylb_extproc.envoy.stream import (
    Action,
    Decide,
    Fail,
    Send,
    Started,
    StreamMachine,
    UnsupportedMode,
)
from skylb_extproc.server.driver import Decision, Driver

log = logging.getLogger(__name__)


class _Reader:
    """The request stream, with at most one read in flight as a task (only while waiting)."""

    def __init__(self, messages: AsyncIterable[Any]) -> None:
        self._iterator = aiter(messages)
        self._task: asyncio.Task[Any] | None = None

    async def next(self) -> Any:
        """The next message, None at the end of the stream."""
        if self._task is not None:
            task, self._task = self._task, None
            return await task
        return await self._read()

    def reading(self) -> asyncio.Task[Any]:
        if self._task is None:
            self._task = asyncio.ensure_future(self._read())
        return self._task

    def take(self) -> Any:
        """The result of the finished background read."""
        assert self._task is not None and self._task.done()
        task, self._task = self._task, None
        return task.result()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _read(self) -> Any:
        try:
            return await anext(self._iterator)
        except StopAsyncIteration:
            return None


class ExtProcServicer(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Envoy's ExternalProcessor service, backed by the driver."""

    def __init__(
        self, driver: Driver, *, max_body_bytes: int, tenant_header: str | None = None
    ) -> None:
        self._driver = driver
        self._max_body_bytes = max_body_bytes
        self._tenant_header = tenant_header
        self._mode_error_logged = False

    async def Process(  # the gRPC method name, hence CamelCase
        self, request_iterator: AsyncIterable[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        driver = self._driver
        machine = StreamMachine(
            driver.new_request_id(),
            max_body_bytes=self._max_body_bytes,
            tenant_header=self._tenant_header,
        )
        reader = _Reader(request_iterator)
        driver.stream_opened()
        try:
            open_ = True
            while open_ and (message := await reader.next()) is not None:
                responses, open_ = await self._perform(machine.receive(message), machine, reader)
                for response in responses:
                    yield response
        except UnsupportedMode as exc:
            # An Envoy config error hits every stream: say it loudly once, not per request.
            level = logging.DEBUG if self._mode_error_logged else logging.ERROR
            self._mode_error_logged = True
            log.log(level, "ext_proc stream %s: %s", machine.request_id, exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Exception as exc:  # one broken stream must not take the server down with it
            log.exception("ext_proc stream %s failed", machine.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"skylb: {type(exc).__name__}")
        finally:
            reader.close()
            try:
                driver.on_finished(machine.request_id)
            finally:
                driver.stream_closed()

    async def _perform(
        self, actions: list[Action], machine: StreamMachine, reader: _Reader
    ) -> tuple[list[Any], bool]:
        """The responses to write for these actions, and False if the stream ended meanwhile."""
        responses: list[Any] = []
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            if isinstance(action, Send):
                responses.append(action.response)
            elif isinstance(action, Decide):
                decided = await self._decision(action, machine, reader)
                if decided is None:
                    return responses, False
                decision, early = decided
                todo.extend(early)
                todo.extend(machine.decided(decision))
            elif isinstance(action, Started):
                self._driver.on_started(machine.request_id)
            elif isinstance(action, Fail):
                self._driver.on_failed(action.outcome)
        return responses, True

    async def _decision(
        self, action: Decide, machine: StreamMachine, reader: _Reader
    ) -> tuple[Decision, list[Action]] | None:
        """Wait for the decision while still reading the stream; None if the stream ended."""
        future = self._driver.submit(action.request, action.skylb_headers)
        early: list[Action] = []
        while not future.done():
            read = reader.reading()
            await asyncio.wait((future, read), return_when=asyncio.FIRST_COMPLETED)
            if read.done():
                message = reader.take()
                if message is None:
                    return None  # Envoy closed the stream: the finally reports it finished
                early.extend(machine.receive(message))
        return future.result(), early
