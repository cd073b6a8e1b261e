"""The cluster credential: a shared secret token that internal RPCs carry, or an mTLS
client certificate.

Every RPC to the registry and the workers must carry metadata `x-pdmesh-cluster-token`
equal to the mesh's token, or it is refused with UNAUTHENTICATED before its handler runs.
grpc.health.v1 and server reflection stay open (health probes, `grpcurl list`), and the
gateway's public `pdmesh.v1.Gateway` is never guarded by it (the API key guards that).
A server on mTLS (pdmesh/tls.py, --tls-ca) needs no token: only a client with a
certificate signed by the mesh's CA gets through the handshake, and that identity is the
credential.

    server: create_aio_server (pdmesh/grpc_util.py) adds `server_interceptors(...)`
    client: channel(addr) / aio_channel(addr) attach the token, over TLS when the process
            has TLS material (pdmesh/tls.py), else plaintext

The process's token is what its command set with `configure()` (from
--cluster-token-file or PDMESH_CLUSTER_TOKEN); a process that never called it (a test, a
library user) reads PDMESH_CLUSTER_TOKEN. No token: every caller is accepted, and the
server says so in one warning line at start.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any, Iterable

import grpc

from pdmesh.config import auth_config_from_env

log = logging.getLogger(__name__)

METADATA_KEY = "x-pdmesh-cluster-token"
# methods open to anyone: "/<service>/<method>" prefixes
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# services facing clients outside the mesh: a server of only these gets no interceptor
PUBLIC_SERVICES = frozenset({"pdmesh.v1.Gateway"})
UNAUTHENTICATED_WARNING = ("internal RPCs are unauthenticated: set PDMESH_CLUSTER_TOKEN "
                           "or --cluster-token-file")
REFUSED = (f"missing or wrong cluster token: internal pdmesh RPCs need metadata "
           f"'{METADATA_KEY}' equal to the mesh's token (PDMESH_CLUSTER_TOKEN or "
           f"--cluster-token-file)")


class _Unset:
    def __repr__(self) -> str:
        return "PROCESS"


PROCESS: Any = _Unset()  # "the process's token" (the default of every `token` argument)
_configured: Any = PROCESS


def configure(token: str | None) -> None:
    """Set this process's token (None: no token); service commands call it at start."""
    global _configured
    _configured = token


def cluster_token() -> str | None:
    """This process's token: the configured one, else PDMESH_CLUSTER_TOKEN, else None."""
    if _configured is not PROCESS:
        return _configured
    return auth_config_from_env().cluster_token


def _resolve(token: Any) -> str | None:
    return cluster_token() if token is PROCESS else token


def read_secret_file(path: str) -> str:
    """The secret in `path`, surrounding whitespace (a trailing newline) stripped;
    ValueError naming the file when it can't be read or is empty."""
    try:
        secret = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read secret file {path}: {e}") from None
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def matches(given: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison (the time taken says nothing of how much matched)."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected.encode())


def _metadata_value(metadata: Iterable[Any] | None, key: str) -> str | bytes | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


# ---- server side --------------------------------------------------------------------
def _refuse(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with UNAUTHENTICATED.
    No request deserializer: nothing a refused caller sent is ever parsed."""
    async def deny(_request_or_iterator, context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(_request_or_iterator, context):
        # an async generator, as outer interceptors (metrics) expect of a stream's handler
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class ClusterTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every RPC without the cluster token, except EXEMPT_PREFIXES methods."""

    def __init__(self, token: str, exempt: tuple[str, ...] = EXEMPT_PREFIXES) -> None:
        if not token:
            raise ValueError("ClusterTokenInterceptor needs a non-empty token")
        self._token, self._exempt = token, exempt

    def allows(self, method: str, metadata: Iterable[Any] | None) -> bool:
        """True when `method` is exempt or `metadata` carries the token."""
        return method.startswith(self._exempt) or matches(
            _metadata_value(metadata, METADATA_KEY), self._token)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or self.allows(handler_call_details.method,
                                          handler_call_details.invocation_metadata):
            return handler
        return _refuse(handler, REFUSED)


def server_interceptors(service_names: Iterable[str], token: Any = PROCESS,
                        mutual_tls: bool = False) -> list:
    """The interceptors guarding a server of `service_names`: none for a public-only
    server (the gateway), none on an mTLS server (the handshake already required a
    certificate of the mesh's CA), none and one warning line when there is no token."""
    if all(name in PUBLIC_SERVICES for name in service_names) or mutual_tls:
        return []
    token = _resolve(token)
    if not token:
        log.warning(UNAUTHENTICATED_WARNING)
        return []
    return [ClusterTokenInterceptor(token)]


# ---- client side --------------------------------------------------------------------
def call_metadata(token: Any = PROCESS) -> tuple[tuple[str, str], ...]:
    """The metadata pair to send on a call (empty without a token)."""
    token = _resolve(token)
    return ((METADATA_KEY, token),) if token else ()


class _AioToken:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details):
        md = grpc.aio.Metadata(*tuple(details.metadata or ()))
        md.add(METADATA_KEY, self._token)
        return details._replace(metadata=md)


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def aio_client_interceptors(token: Any = PROCESS) -> list:
    """grpc.aio client interceptors attaching the token to every call ([] without one).
    grpc.aio files an interceptor under one call kind only, hence four."""
    token = _resolve(token)
    if not token:
        return []
    return [cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary,
                                   _AioStreamStream)]


def aio_channel(target: str, *, options: list | None = None,
                interceptors: Iterable[Any] | None = None,
                token: Any = PROCESS, tls: Any = PROCESS) -> grpc.aio.Channel:
    """A grpc.aio channel whose calls carry the cluster token (when there is one): TLS
    with `tls` (default: this process's material, pdmesh.tls.current()), else plaintext."""
    from pdmesh import tls as tls_

    chain = [*aio_client_interceptors(token), *(interceptors or ())]
    material = tls_.current() if tls is PROCESS else tls
    if material is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=chain or None)
    return grpc.aio.secure_channel(target, tls_.channel_credentials(material),
                                   options=options, interceptors=chain or None)


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """The sync API takes one interceptor for every call kind."""

    def __init__(self, token: str) -> None:
        self._pair = (METADATA_KEY, token)

    def _details(self, details):
        return details._replace(metadata=(*(details.metadata or ()), self._pair))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def channel(target: str, *, options: list | None = None, token: Any = PROCESS,
            tls: Any = PROCESS) -> grpc.Channel:
    """A sync grpc channel whose calls carry the cluster token (when there is one): TLS
    with `tls` (default: this process's material, pdmesh.tls.current()), else plaintext."""
    from pdmesh import tls as tls_

    material = tls_.current() if tls is PROCESS else tls
    ch = grpc.insecure_channel(target, options=options) if material is None else \
        grpc.secure_channel(target, tls_.channel_credentials(material), options=options)
    token = _resolve(token)
    return grpc.intercept_channel(ch, _SyncToken(token)) if token else ch


# the names from before TLS: they follow the process's TLS material like the new ones
insecure_channel, aio_insecure_channel = channel, aio_channel
