"""Fakes for unit tests of the P/D protocol classes (pdmesh/disagg): an engine whose
outputs the test releases by hand, a KV writer that blocks until told (and moves page
bytes between two dict "pools", with checksums), a receiver, prefill peers."""
from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace

from pdmesh.disagg.ports import Code, KVChecksum, RoomError, TransferReply, TransferTarget
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
        self.adopted: list[str] = []

    async def make_request(self, ids, params, request_id, mode):
        if any(t < 0 for t in ids):
            raise ValueError("token ids must be >= 0")
        return SimpleNamespace(request_id=request_id, prompt_len=len(ids), mode=mode)

    async def start(self, ids, params, request_id, mode):
        req = await self.make_request(ids, params, request_id, mode)
        return req, self.add(req)

    def add(self, req) -> OutputStream:
        self.added.append(req.request_id)
        s = self.streams[req.request_id] = OutputStream()
        return s

    async def hold(self, req) -> list[int]:
        fut = self.holds[req.request_id] = asyncio.get_running_loop().create_future()
        return await fut

    async def adopt(self, rid, first_token, first_logprob, n=1) -> OutputStream:
        self.adopted.append(rid)
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


def crc(pool: dict, pages) -> KVChecksum:
    """The fakes' checksum: crc32 over the pages' bytes in order."""
    value = 0
    for p in pages:
        value = zlib.crc32(pool.get(p, b""), value)
    return KVChecksum("crc32", value)


class FakeWriter:
    """write() waits for `gate`; `fail` makes it raise. Page bytes: `src` (the prefill
    pool, page -> bytes) are copied into `dst` (the decode pool); `corrupt` writes from
    now flip a byte in the destination (chaos); `checksums=False`: checks off."""

    def __init__(self, dst: dict | None = None) -> None:
        self.gate = asyncio.Event()
        self.writes: list[tuple] = []
        self.fail = False
        self.in_flight = 0
        self.src: dict[int, bytes] = {p: b"page-%d" % p for p in range(64)}
        self.dst = {} if dst is None else dst
        self.corrupt = 0
        self.checksums = True

    async def write(self, src_pages, target):
        self.in_flight += 1
        try:
            self.writes.append((list(src_pages), target.page_ids))
            await self.gate.wait()
            if self.fail:
                raise RuntimeError("link down")
            for s, d in zip(src_pages, target.page_ids):
                self.dst[d] = self.src[s]
            if self.corrupt and target.page_ids:
                self.corrupt -= 1
                d = target.page_ids[0]
                self.dst[d] = bytes([self.dst[d][0] ^ 0xFF]) + self.dst[d][1:]
            return TransferStats(bytes=100 * len(src_pages), descriptors=1, seconds=0.01)
        finally:
            self.in_flight -= 1

    async def checksum(self, src_pages):
        return crc(self.src, src_pages) if self.checksums else None

    async def read_checksum(self, target, algo):
        return crc(self.dst, target.page_ids) if self.checksums else None


class FakeReceiver:
    """KVReceiver over a dict pool (shared with a FakeWriter's `dst`)."""

    def __init__(self, pool: dict | None = None) -> None:
        self.pool = {} if pool is None else pool
        self.landed: list[list[int]] = []
        self.checksums = True

    async def land(self, pages, path):
        self.landed.append(list(pages))

    async def checksum(self, pages, algo):
        return crc(self.pool, pages) if self.checksums else None


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

    def reply(self, room: int, token: int = 7, checksum: KVChecksum | None = None) -> None:
        self.calls[room].set_result(TransferReply(first_token=token, checksum=checksum))

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
