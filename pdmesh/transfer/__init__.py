"""KV data plane: move KV pages from a prefill worker's pool into a decode worker's pool.

Transports are plug-ins looked up by name and imported lazily, so importing this package
never loads a transfer engine:

    transport = get_transport("mooncake")(hostname="10.0.0.5", protocol="rdma")
    base = transport.register(engine.runner.kv)
    check_compatible(my_layout, peer_layout, dst_pages)
    stats = transport.write_pages(peer_session, base, peer_base, layout.bytes_per_page,
                                  src_pages, dst_pages)
"""
from __future__ import annotations

import importlib
from typing import Callable

from pdmesh.transfer.base import TransferError, TransferStats, Transport
from pdmesh.transfer.layout import KVLayout, check_compatible, check_pages
# the class only: the module imports mooncake itself on first use, not at import
from pdmesh.transfer.mooncake_transport import MooncakeUnavailable
from pdmesh.transfer.plan import plan_runs
from pdmesh.transfer.staged import StagedTransport, choose_mode, make_kv_transport

# name -> "module:attribute" (imported on first use) or an already-imported factory.
_TRANSPORTS: dict[str, str | Callable[..., Transport]] = {
    "mooncake": "pdmesh.transfer.mooncake_transport:MooncakeTransport",
}


def register_transport(name: str, factory: str | Callable[..., Transport]) -> None:
    """Add (or replace) a transport: a "module:attribute" path or a callable returning one."""
    _TRANSPORTS[name] = factory


def get_transport(name: str) -> Callable[..., Transport]:
    """The factory (usually the class) of transport `name`; call it to build one."""
    if name not in _TRANSPORTS:
        raise ValueError(f"unknown transport {name!r} (known: {', '.join(sorted(_TRANSPORTS))})")
    factory = _TRANSPORTS[name]
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _TRANSPORTS[name] = factory
    return factory


def check_transport(name: str) -> None:
    """Raise an ImportError whose str() is one line naming what to install (for mooncake:
    MooncakeUnavailable) unless transport `name` can be built on this machine. Building
    one raises the same; commands check first, before loading a model or starting children."""
    getattr(get_transport(name), "check_available", lambda: None)()


__all__ = ["KVLayout", "MooncakeUnavailable", "TransferError", "TransferStats", "Transport",
           "check_compatible", "check_pages", "check_transport", "get_transport", "plan_runs",
           "register_transport", "StagedTransport", "choose_mode", "make_kv_transport"]
