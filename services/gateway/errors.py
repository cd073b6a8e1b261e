"""What a client is told when the mesh fails its request.

A leg's failure names the worker ("decode worker 10.0.0.7:41234 failed: ..."): useful
to an operator, but internal addresses are none of a client's business. `public` logs
the full detail under a fresh request id and gives the client a generic message that
carries the id, so a report can be matched to the log line. Failures that say nothing
internal (admission's 429, "no worker is registered ...") pass unchanged.
"""
from __future__ import annotations

import logging
import re
import secrets

import grpc

log = logging.getLogger("pdmesh.services.gateway")

# host:port, [v6]:port or a.b.c.d:port: what a worker's (or a channel's) address looks like
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.%\w]+\]|\b[A-Za-z0-9][\w.-]*):\d{1,5}\b")
# codes whose details come from inside grpc or a worker's code, never meant for clients
_INTERNAL = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                       grpc.StatusCode.DATA_LOSS})


def reveals_internals(code: grpc.StatusCode, message: str) -> bool:
    """True when `message` names an address, or comes from an internal failure."""
    return code in _INTERNAL or bool(_ADDRESS.search(message))


def new_request_id() -> str:
    return "req-" + secrets.token_hex(8)


def public(code: grpc.StatusCode, message: str) -> str:
    """The message the client gets for a mesh failure (`message`, when it is safe)."""
    if not reveals_internals(code, message):
        return message
    rid = new_request_id()
    log.warning("request %s failed: %s: %s", rid, code.name, message)
    what = {grpc.StatusCode.INVALID_ARGUMENT: "a worker refused the request as invalid",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "every worker tried is shedding load, "
            "retry later"}.get(code, "no worker could complete the request")
    return (f"The request failed: {what} ({code.name}). Request id {rid}: the gateway's "
            "log has the details.")
