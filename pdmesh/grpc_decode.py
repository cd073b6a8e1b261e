"""Corrupt request bytes get INVALID_ARGUMENT, on every pdmesh gRPC server.

grpc.aio calls a method handler's `request_deserializer` itself; when it raises (bytes
that are not a valid protobuf message), grpc logs a traceback and the caller gets
UNKNOWN. `DecodeGuard` (an aio server interceptor, installed by
`grpc_util.create_aio_server`) wraps the deserializer so that it never raises: it
returns a `BadRequest` marker instead, and the wrapped behaviour aborts the call with
INVALID_ARGUMENT "request is not a valid pdmesh.v1.X message" before the servicer runs.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)


class BadRequest:
    """What the guarded deserializer returns for bytes it could not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def message_name(deserializer: Callable[[bytes], Any]) -> str:
    """"pdmesh.v1.X" for a generated `X.FromString` (a classmethod of the message class)."""
    cls = getattr(deserializer, "__self__", None)
    desc = getattr(cls, "DESCRIPTOR", None)
    return getattr(desc, "full_name", "") or "request"


def guard_deserializer(deserializer: Callable[[bytes], Any], method: str) -> Callable:
    """`deserializer` that returns a BadRequest instead of raising."""
    text = f"request is not a valid {message_name(deserializer)} message"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or anything a codec raises
            log.info("%s: undecodable request (%d bytes): %s", method, len(data or b""), e)
            return BadRequest(text)
    return deserialize


async def _abort(context, bad: BadRequest) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


async def _responses(result):
    """Yield what a streaming behaviour produced: an async iterator, a sync iterator,
    or nothing (a reader-writer coroutine that wrote its responses with context.write)."""
    if hasattr(result, "__aiter__"):
        async for response in result:
            yield response
    elif inspect.isawaitable(result):
        await result
    else:
        for response in result:
            yield response


async def _reply(result):
    """The response of a unary behaviour, coroutine or plain function."""
    return await result if inspect.isawaitable(result) else result


def _guard_unary_request(behavior: Callable, streaming_response: bool) -> Callable:
    """Wrap a unary-request behaviour so that a BadRequest aborts before it runs."""
    if streaming_response:
        async def stream(request, context):
            if isinstance(request, BadRequest):
                await _abort(context, request)
            async for response in _responses(behavior(request, context)):
                yield response
        return stream

    async def unary(request, context):
        if isinstance(request, BadRequest):
            await _abort(context, request)
        return await _reply(behavior(request, context))
    return unary


def _guard_iterator(behavior: Callable, streaming_response: bool) -> Callable:
    """Wrap a stream-request behaviour: its request iterator aborts at a BadRequest."""
    async def checked(requests, context):
        async for request in requests:
            if isinstance(request, BadRequest):
                await _abort(context, request)
            yield request

    if streaming_response:
        async def stream(requests, context):
            async for response in _responses(behavior(checked(requests, context), context)):
                yield response
        return stream

    async def unary(requests, context):
        return await _reply(behavior(checked(requests, context), context))
    return unary


def guard_handler(handler: Any, method: str) -> Any:
    """The same RpcMethodHandler with a guarded deserializer and behaviour."""
    if handler is None or handler.request_deserializer is None:
        return handler
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)
    if behavior is None:
        return handler
    if handler.request_streaming:
        wrapped = _guard_iterator(behavior, handler.response_streaming)
    else:
        wrapped = _guard_unary_request(behavior, handler.response_streaming)
    return handler._replace(**{
        "request_deserializer": guard_deserializer(handler.request_deserializer, method),
        kind: wrapped})


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Outermost interceptor: guards whatever handler the rest of the chain returns."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return guard_handler(handler, handler_call_details.method)
