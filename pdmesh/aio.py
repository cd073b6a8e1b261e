"""Running a service's event loop: uvloop when it is installed, else asyncio's own.

Every pdmesh service is one asyncio program (grpc.aio servers and clients); uvloop
cuts the per-message cost of the loop itself (epoll, handles, futures).
"""
from __future__ import annotations

import asyncio
from typing import Any, Coroutine


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """`asyncio.run(main)`, on uvloop when available."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
