"""The decode worker's side of P/D (plain Python over asyncio; no grpc, no torch).

A room goes: pre-allocation queue -> pages held -> Transfer sent -> KV arrived
(adopted, decoding) -> finished. Colocated rooms skip the middle: the prompt is
computed here. A room of n sequences (SamplingParams.n > 1) holds, transfers and adopts
its prompt once; the engine forks it at adoption (runtime/fork.py), one stream carries
every sequence's outputs (each with its `index`) and the room finishes when all have.

Invariants:
- a room is cleaned up exactly once (`closed`), by whoever ends it first;
- pages a prefill may still be writing (Transfer sent, no answer) are never reused:
  they are quarantined until that prefill confirms the abort or its lease expires;
- every other ending returns the room's pages at once (engine abort);
- KV integrity: when the prefill sent a checksum and this worker checks, the room's
  pages are digested after `land` and before `adopt`; a mismatch fails the room
  (DATA_LOSS): never adopted, its pages freed.
- decode-side reuse: the hold may start with pages of this worker's prefix cache
  (`cached_pages`, pinned by the engine); the Transfer names only the pages after them,
  so the prefill writes, this worker lands and checks, only those. The engine unpins
  the cached ones on every ending (abort, quarantine's abort, finish) with the rest.
Everything runs on one event loop: no locks.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator

from pdmesh.disagg.ports import (Code, KVReceiver, Liveness, PrefillPeers, RoomError,
                                 TransferReply)
from pdmesh.disagg.quarantine import Quarantine
from pdmesh.disagg.shedding import check_load

# Errors from the prefill's Transfer passed through as they are; the rest -> UNAVAILABLE.
_PASS_THROUGH = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.DEADLINE_EXCEEDED,
                 Code.DATA_LOSS}
PREFILL = "prefill"  # RoomError.blame: the room's prefill failed it
ADOPTED, GENERATE = "adopted", "generate"  # engine modes (runtime Mode values, by default)


@dataclass(eq=False)
class DecodeRoom:
    room: int
    prefill_address: str  # "" when colocated
    pages: list[int] | None = None
    error: RoomError | None = None
    failed_event: asyncio.Event = field(default_factory=asyncio.Event)
    stream: Any = None  # the engine's OutputStream once decoding
    transfer_sent: bool = False
    kv_done: bool = False  # the Transfer answered: no write of this room is in flight
    finished: bool = False  # the engine finished it (its pages are free already)
    closed: bool = False
    stamps: dict[str, float] = field(default_factory=dict)  # arrival, pages, kv (monotonic)
    reply: TransferReply | None = None
    n: int = 1  # sequences (SamplingParams.n)
    done: int = 0  # sequences finished
    cached_pages: int = 0  # leading pages held with KV already (this worker's prefix cache)

    @property
    def sent_pages(self) -> list[int]:
        """The pages the prefill writes: those after the cached prefix."""
        return (self.pages or [])[self.cached_pages:]

    @property
    def request_id(self) -> str:
        return str(self.room)

    def fail(self, code: Code, message: str, blame: str = "") -> None:
        """Record the first error and wake whatever the room waits on."""
        self.error = self.error or RoomError(code, message, blame)
        self.failed_event.set()
        if self.stream is not None:
            self.stream.close(self.error)


@dataclass
class DecodeCounters:
    finished: int = 0
    waiting_timeouts: int = 0
    integrity_failures: int = 0  # rooms whose pages mismatched the prefill's checksum


class DecodeProtocol:
    """Rooms of one decode (or colocated) worker."""

    def __init__(self, engine: Any, peers: PrefillPeers | None, kv: KVReceiver | None,
                 target_for: Any, waiting_timeout: float, liveness: Liveness | None = None,
                 modes: tuple[Any, Any] = (ADOPTED, GENERATE), stream_interval: int = 1,
                 on_integrity_failure: Any = lambda: None, shed_queued: int = 0) -> None:
        """`target_for(pages) -> TransferTarget` builds this worker's destination;
        `stream_interval`: tokens per stream message after the first (SGLang's
        --stream-interval; fewer, larger messages cost the stream's hops less CPU);
        `on_integrity_failure()`: a room's pages mismatched its checksum (metrics)."""
        self.engine, self.peers, self.kv = engine, peers, kv
        self.target_for, self.waiting_timeout = target_for, waiting_timeout
        self.liveness, self.stream_interval = liveness, stream_interval
        self.on_integrity_failure = on_integrity_failure
        self.shed_queued = shed_queued  # shedding.py: 0 = never refuse
        self.adopted_mode, self.generate_mode = modes
        self.rooms: dict[int, DecodeRoom] = {}
        self.quarantine = Quarantine(self._confirm_abort, engine.abort)
        self.counters = DecodeCounters()

    # -- Generate ------------------------------------------------------------------------
    async def generate(self, room_id: int, prefill_address: str, token_ids: list[int],
                       params: Any) -> AsyncIterator[tuple[list[Any], DecodeRoom]]:
        """Yield (outputs ready now, room) until a finished output; raises RoomError.
        Closing the iterator early (client gone) frees the room's pages."""
        if room_id in self.rooms:
            raise RoomError(Code.ALREADY_EXISTS, f"room {room_id} is already live")
        check_load(self.shed_queued, self.waiting, "decode")
        room = self.rooms[room_id] = DecodeRoom(room_id, prefill_address,
                                                n=getattr(params, "n", 1))
        try:
            try:
                if prefill_address:
                    req = await self.engine.make_request(token_ids, params, room.request_id,
                                                         self.adopted_mode)
                else:  # made and queued in one trip to the engine
                    _, room.stream = await self.engine.start(token_ids, params,
                                                             room.request_id, self.generate_mode)
            except ValueError as e:
                raise RoomError(Code.INVALID_ARGUMENT, str(e)) from None
            if prefill_address:
                await self._pull_kv(room, req)
            first = True
            while not room.finished:
                outs = await self._next(room.stream, 1 if first else self.stream_interval)
                room.done += sum(1 for o in outs if o.finished)
                room.finished, first = room.done >= room.n, False
                yield outs, room
            self.counters.finished += 1
        except RoomError:
            raise
        except Exception as e:  # the engine failed under the room (or stopped)
            raise room.error or RoomError(Code.UNAVAILABLE, f"room {room_id}: {e}") from None
        finally:
            self.cleanup(room)

    def waiting(self) -> int:
        """Requests not running yet: rooms still being made or waiting for pages here,
        and requests queued in the engine (shedding.py)."""
        pending = sum(1 for r in self.rooms.values() if r.pages is None and r.stream is None)
        return self.engine.stats.waiting + pending

    @staticmethod
    async def _next(stream: Any, tokens: int) -> list[Any]:
        """Outputs ready now, waiting for more until they hold `tokens` tokens or the
        request finished."""
        outs = await stream.next_batch()
        while (not any(o.finished for o in outs) and
               sum(len(o.new_token_ids) for o in outs) < tokens):
            outs += await stream.next_batch()
        return outs

    async def _pull_kv(self, room: DecodeRoom, req: Any) -> None:
        """Hold pages, ask the prefill to write them, adopt."""
        t0 = room.stamps["arrival"] = time.monotonic()
        deadline = t0 + self.waiting_timeout
        room.pages = await self._wait(
            room, self.engine.hold(req), deadline,
            f"no KV pages became free for room {room.room} within the waiting timeout")
        room.cached_pages = getattr(room.pages, "cached_pages", 0)
        room.stamps["pages"] = time.monotonic()
        room.reply = await self._transfer(room, deadline)
        if self.kv is not None:  # never the cached pages: this pool's copy is the newest
            await self.kv.land(room.sent_pages, room.reply.path)
            await self._verify(room)
        room.stamps["kv"] = time.monotonic()
        room.stream = await self.engine.adopt(room.request_id, room.reply.first_token,
                                              room.reply.first_logprob, n=room.n)

    async def _verify(self, room: DecodeRoom) -> None:
        """Compare the room's landed pages with the prefill's checksum (off the event
        loop; the pages are held, so the engine never reads or frees them meanwhile)."""
        want = room.reply.checksum
        if want is None:  # the prefill has checksums off
            return
        got = await self._wait(room, self.kv.checksum(room.sent_pages, want.algo), None, "")
        if got is None or got == want:  # None: this worker's checks are off
            return
        self.counters.integrity_failures += 1
        self.on_integrity_failure()
        raise RoomError(Code.DATA_LOSS, f"KV of room {room.room} from "
                        f"{room.prefill_address} is corrupted: checksum of its pages here "
                        f"{got} != the prefill's {want}; not adopted, pages freed")

    async def _transfer(self, room: DecodeRoom, deadline: float) -> TransferReply:
        room.transfer_sent = True  # from here a cleanup must assume a write in flight
        target = self.target_for(room.sent_pages)
        if room.cached_pages:
            target = replace(target, cached_pages=room.cached_pages)
        call = self.peers.transfer(room.prefill_address, room.room, target,
                                   timeout=max(0.0, deadline - time.monotonic()))
        try:
            reply = await self._wait(room, call, None, "")
        except RoomError as e:
            if e.code is Code.DATA_LOSS:  # sent only once the prefill's write ended
                room.kv_done = True
            if e.code is Code.DEADLINE_EXCEEDED and room.error is None:
                raise self._timeout_error(room) from None
            if room.error is None and e.code not in _PASS_THROUGH:
                raise RoomError(Code.UNAVAILABLE, f"prefill {room.prefill_address} failed "
                                f"room {room.room}: {e.code.name}: {e.message}",
                                PREFILL) from None
            raise
        room.kv_done = True
        return reply

    async def _wait(self, room: DecodeRoom, aw: Any, deadline: float | None, what: str) -> Any:
        """Await `aw` unless the room fails, its prefill goes away or the deadline passes
        (then `aw` is cancelled and RoomError raised)."""
        task = asyncio.ensure_future(aw)
        if room.prefill_address and self.liveness and self.liveness.is_gone(room.prefill_address):
            room.fail(Code.UNAVAILABLE, f"prefill worker {room.prefill_address} is gone",
                      PREFILL)
        failed = asyncio.ensure_future(room.failed_event.wait())
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            done, _ = await asyncio.wait({task, failed}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this stream was cancelled (the client left): so is the call
            task.cancel()
            task.add_done_callback(_consume)
            raise
        finally:
            failed.cancel()
        if task in done and room.error is None:
            return task.result()
        task.cancel()
        # the call may have failed too (the same fault that failed the room): its error
        # is the room's, not one to log as "Task exception was never retrieved"
        task.add_done_callback(_consume)
        if room.error is not None:
            raise room.error
        raise self._timeout_error(room, what)

    def _timeout_error(self, room: DecodeRoom, what: str = "") -> RoomError:
        self.counters.waiting_timeouts += 1
        return RoomError(Code.DEADLINE_EXCEEDED, what or (
            f"the KV of room {room.room} did not arrive from {room.prefill_address} "
            f"within the waiting timeout ({self.waiting_timeout:g}s)"))

    # -- endings -------------------------------------------------------------------------
    def abort(self, room_id: int) -> bool:
        """End the room's stream (CANCELLED); its pages are freed by the cleanup."""
        room = self.rooms.get(room_id)
        if room is None:
            return False
        room.fail(Code.CANCELLED, f"room {room_id} was aborted")
        return True

    def cleanup(self, room: DecodeRoom) -> None:
        """Free the room once; pages a prefill may be writing are quarantined."""
        if room.closed:
            return
        room.closed = True
        self.rooms.pop(room.room, None)
        if room.finished:
            return
        if room.transfer_sent and not room.kv_done:
            # the pages a write may still reach: not the cached prefix (never written)
            self.quarantine.add(room.request_id, room.prefill_address, len(room.sent_pages))
        else:
            self.engine.abort(room.request_id)

    def peer_gone(self, address: str, event: str = "EXPIRED") -> None:
        """A prefill expired or left: rooms waiting on it fail at once; its quarantined
        pages are free to reuse (its lease is over, it writes nothing more)."""
        for room in list(self.rooms.values()):
            if room.prefill_address == address and not room.kv_done:
                room.fail(Code.UNAVAILABLE, f"prefill worker {address} {event.lower()} "
                          f"while room {room.room} waited for its KV", PREFILL)
        self.quarantine.release_peer(address)

    async def _confirm_abort(self, address: str, request_id: str) -> bool:
        if self.liveness is not None and self.liveness.is_gone(address):
            return True
        try:
            await self.peers.abort(address, int(request_id), timeout=2.0)
            return True
        except RoomError:
            return self.liveness is not None and self.liveness.is_gone(address)


def _consume(task: asyncio.Future) -> None:
    """Retrieve an abandoned task's outcome (so asyncio does not log it)."""
    if not task.cancelled():
        task.exception()
