"""Fakes for unit tests of the P/D protocol classes (pdmesh/disagg): an engine whose
outputs the test releases by hand, a KV writer that blocks until told, prefill peers."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

from pdmesh.disagg.ports import Code, RoomError, TransferReply, TransferTarget
from pdmesh.transfer.base import TransferStats
from pdmesh.worker.streams import OutputStream, StreamClosed


@dataclass
class Out:
    request_id: str
    token_ids: list[int]
    finished: bool
    pages: list[int] = field(default_factory=list)
    logprobs: list | None = None
    new_token_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """make_request/add/hold/adopt/abort/release, with every effect recorded."""

    def __init__(self) -> None:
        self.streams: dict[str, OutputStream] = {}
        self.holds: dict[str, asyncio.Future] = {}
        self.aborted: list[str] = []
        self.released: list[str] = []
        self.added: list[str] = []

    async def make_request(self, ids, params, request_id, mode):
        if any(t < 0 for t in ids):
            raise ValueError("token ids must be >= 0")
        return SimpleNamespace(request_id=request_id, prompt_len=len(ids), mode=mode)

    def add(self, req) -> OutputStream:
        self.added.append(req.request_id)
        s = self.streams[req.request_id] = OutputStream()
        return s

    async def hold(self, req) -> list[int]:
        fut = self.holds[req.request_id] = asyncio.get_running_loop().create_future()
        return await fut

    async def adopt(self, rid, first_token, first_logprob) -> OutputStream:
        s = self.streams[rid] = OutputStream()
        s.put(Out(rid, [first_token], False, new_token_ids=[first_token]))
        return s

    def _done(self, value=True) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(value)
        return fut

    def abort(self, rid: str):
        self.aborted.append(rid)
        if (s := self.streams.pop(rid, None)) is not None:
            s.close(StreamClosed("aborted"))
        return self._done()

    def release(self, rid: str):
        self.released.append(rid)
        return self._done(None)

    # test controls
    def prefill_done(self, rid: str, token: int = 7, pages=(3, 4)) -> None:
        self.streams[rid].put(Out(rid, [token], True, pages=list(pages)))

    def decode(self, rid: str, token: int, finished: bool = False) -> None:
        self.streams[rid].put(Out(rid, [token], finished, new_token_ids=[token]))

    def freed(self, rid: str) -> int:
        """How many times the request's pages were given back (must end at 1)."""
        return self.aborted.count(rid) + self.released.count(rid)


class FakeWriter:
    """write() waits for `release()`; `fail` makes it raise."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.writes: list[tuple] = []
        self.fail = False
        self.in_flight = 0

    async def write(self, src_pages, target):
        self.in_flight += 1
        try:
            self.writes.append((list(src_pages), target.page_ids))
            await self.gate.wait()
            if self.fail:
                raise RuntimeError("link down")
            return TransferStats(bytes=100 * len(src_pages), descriptors=1, seconds=0.01)
        finally:
            self.in_flight -= 1


def target(pages=(10, 11), room: int = 0) -> TransferTarget:
    return TransferTarget(session_id="d:1", kv_base=0, page_ids=tuple(pages), layout=None,
                          room=room)


class FakePeers:
    """transfer() waits for the test to answer via `reply`/`error`; abort() records."""

    def __init__(self) -> None:
        self.calls: dict[int, asyncio.Future] = {}
        self.aborts: list[int] = []
        self.abort_ok = True
        self.cancelled: list[int] = []

    async def transfer(self, address, room, target, timeout):
        fut = self.calls[room] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise RoomError(Code.DEADLINE_EXCEEDED, "deadline") from None
        except asyncio.CancelledError:
            self.cancelled.append(room)
            raise

    def reply(self, room: int, token: int = 7) -> None:
        self.calls[room].set_result(TransferReply(first_token=token))

    def error(self, room: int, code: Code, msg: str = "boom") -> None:
        self.calls[room].set_exception(RoomError(code, msg))

    async def abort(self, address, room, timeout):
        self.aborts.append(room)
        if not self.abort_ok:
            raise RoomError(Code.UNAVAILABLE, "unreachable")
        return True


class FakeLiveness:
    def __init__(self) -> None:
        self.gone: set[str] = set()

    def is_gone(self, address: str) -> bool:
        return address in self.gone


async def settle(n: int = 5) -> None:
    """Let every ready task run a few turns."""
    for _ in range(n):
        await asyncio.sleep(0)
