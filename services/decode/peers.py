"""PrefillPeers (pdmesh.disagg.ports) over gRPC: Prefill.Transfer and Prefill.Abort.

One grpc.aio channel per prefill address, kept for the worker's life; an RPC error
becomes a RoomError with the same status name.
"""
from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable

import grpc

from pdmesh import auth
from pdmesh.disagg.ports import Code, KVChecksum, RoomError, TransferReply, TransferTarget
from pdmesh.telemetry import tracing
from pdmesh.transfer.sharded import kv_rank_proto
from pdmesh.v1 import prefill_pb2 as ppb
from pdmesh.v1 import prefill_pb2_grpc as ppb_grpc
from pdmesh.worker.convert import logprob_from_proto


Endpoint = Callable[[str], Awaitable[tuple[str, int]]]


class GrpcPrefillPeers:
    """Stubs to prefill workers by address."""

    def __init__(self, endpoint: Endpoint | None = None) -> None:
        """endpoint(prefill address) -> (session id, pool base) to send it (the decode's
        transfer engine started first where needed: services/common/kv_engine.py)."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._endpoint = endpoint

    def _stub(self, address: str) -> ppb_grpc.PrefillStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = auth.aio_insecure_channel(
                address, interceptors=tracing.aio_client_interceptors())
        return ppb_grpc.PrefillStub(ch)

    async def transfer(self, address: str, room: int, target: TransferTarget,
                       timeout: float) -> TransferReply:
        """Ask the prefill to write the room's KV into `target`; its reply or RoomError."""
        if self._endpoint is not None:
            session, base = await self._endpoint(address)
            target = dataclasses.replace(target, session_id=session, kv_base=base)
        lay = target.layout
        msg = ppb.TransferRequest(
            room=room, decode_worker_id=target.decode_worker_id,
            dst_session_id=target.session_id, dst_kv_base_address=target.kv_base,
            dst_page_ids=list(target.page_ids), model_id=lay.model, dtype=lay.dtype,
            page_size=lay.page_size, num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
            head_dim=lay.head_dim, bytes_per_page=lay.bytes_per_page,
            dst_host_id=target.host_id, dst_local_endpoints=list(target.local_endpoints),
            dst_cached_pages=target.cached_pages,
            dst_ranks=[kv_rank_proto(r) for r in getattr(lay, "ranks", ())])
        try:
            resp = await self._stub(address).Transfer(msg, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _room_error(e) from None
        lp = logprob_from_proto(resp.first_logprob) if resp.HasField("first_logprob") else None
        return TransferReply(first_token=resp.first_token_id, first_logprob=lp,
                             cached_tokens=resp.cached_tokens, bytes_moved=resp.bytes_moved,
                             descriptors=resp.descriptor_count, seconds=resp.transfer_s,
                             path=resp.transfer_path, checksum=_checksum(resp))

    async def abort(self, address: str, room: int, timeout: float) -> bool:
        """Prefill.Abort; returns once the prefill confirmed (no write in flight)."""
        try:
            resp = await self._stub(address).Abort(ppb.PrefillAbortRequest(room=room),
                                                   timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _room_error(e) from None
        return resp.aborted

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()


def _checksum(resp: ppb.TransferResponse) -> KVChecksum | None:
    """The prefill's checksum of the room's KV; None when it has checksums off."""
    if not resp.kv_checksum_algo:
        return None
    return KVChecksum(resp.kv_checksum_algo, resp.kv_checksum)


def _room_error(e: grpc.aio.AioRpcError) -> RoomError:
    name = e.code().name
    code = Code[name] if name in Code.__members__ else Code.UNAVAILABLE
    return RoomError(code, e.details() or name)
