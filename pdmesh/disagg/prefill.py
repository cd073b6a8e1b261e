"""The prefill worker's room machine (plain Python over asyncio; no grpc, no torch).

A room is created by whichever arrives first, the gateway's Prefill or the decode
worker's Transfer (they race by design). Its life:

    PENDING ──(prompt queued + KV computed + Transfer arrived)──▶ WRITING ──▶ DONE
       └───(abort / bootstrap timeout / decode gone / caller cancelled)───▶ FAILED

Compute-ahead budget (ahead.py): a room is computed before its decode has pages for
it (no Transfer yet) only while such rooms hold at most `ahead_pages` pages; other rooms
wait for their Transfer first. The room's data is prefill_room.py; the write step
itself (destination check, verified write, the reply) is prefill_write.py.

Invariants:
- only the write task touches a room's pages from WRITING until `write_done` is set; a
  failure during WRITING is recorded and acted on by that task, so `abort` returning
  True always means no write into the decode's pages is in flight;
- a room's engine request is aborted (FAILED) or released (DONE) exactly once;
- an ended room id is tombstoned, so a late Prefill or Transfer for it fails at once;
- KV integrity (when the writer reads back: --kv-checksum on): a room is DONE only
  once its destination pages, read back, match the checksum of its source pages; a
  mismatch is rewritten once, a second one fails the room (DATA_LOSS) and frees its
  pages. The source checksum goes to the decode in the reply unless checksums are off.
- decode-side reuse: a Transfer may say the decode has the prompt's first
  `cached_pages` pages already (its prefix cache); this prefill still computes the
  whole prompt (the prefix from its own cache when there, else recomputed: it never
  reads KV back from a decode) and writes, and checksums, only the pages after them.
Everything runs on one event loop: no locks.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from pdmesh.disagg.ahead import AheadBudget
from pdmesh.disagg.ports import Code, KVWriter, RoomError, TransferReply, TransferTarget
from pdmesh.disagg.prefill_room import PrefillCounters, PrefillRoom, State
from pdmesh.disagg.prefill_write import transfer_reply, write_room
from pdmesh.disagg.rooms import Tombstones, wait_until
from pdmesh.disagg.shedding import check_load

__all__ = ["PREFILL_ONLY", "PrefillCounters", "PrefillProtocol", "PrefillRoom", "State"]
PREFILL_ONLY = "prefill_only"  # the engine mode the protocol asks for (Mode.PREFILL_ONLY)


class PrefillProtocol:
    """Rooms of one prefill worker. `engine`: AsyncEngine-like; `writer`: KVWriter;
    `check_target(target)` raises ValueError for an incompatible destination;
    `mode`: the engine's PREFILL_ONLY mode value; `on_integrity("retry" | "failure")`
    is told of every checksum mismatch (metrics)."""

    def __init__(self, engine: Any, writer: KVWriter, bootstrap_timeout: float,
                 check_target: Callable[[TransferTarget], None], mode: Any = PREFILL_ONLY,
                 on_bootstrap_timeout: Callable[[], None] = lambda: None,
                 page_size: int = 16, ahead_pages: int | None = None,
                 on_integrity: Callable[[str], None] = lambda kind: None,
                 shed_queued: int = 0) -> None:
        self.engine, self.writer, self.mode = engine, writer, mode
        self.shed_queued = shed_queued  # shedding.py: 0 = never refuse
        self.bootstrap_timeout = bootstrap_timeout
        self.check_target = check_target
        self.on_bootstrap_timeout = on_bootstrap_timeout
        self.on_integrity = on_integrity
        self.page_size = page_size
        self.budget = AheadBudget(ahead_pages)
        self.rooms: dict[int, PrefillRoom] = {}
        self.ended = Tombstones()
        self.counters = PrefillCounters()
        self._tasks: set[asyncio.Task] = set()

    # -- the gateway's Prefill -----------------------------------------------------------
    async def prefill(self, room_id: int, decode_address: str, token_ids: list[int],
                      params: Any) -> PrefillRoom:
        """Queue the prompt at once; return the room when its KV is in the decode worker.
        Raises RoomError; cancelling the call fails the room and frees its KV."""
        check_load(self.shed_queued, self.waiting, "prefill")
        room = self._room(room_id, Code.CANCELLED, "was aborted")
        if room.has_prefill:
            raise RoomError(Code.ALREADY_EXISTS, f"room {room_id} is already prefilling")
        room.has_prefill, room.decode_address = True, decode_address
        try:
            room.req = await self.engine.make_request(token_ids, params, str(room_id), self.mode)
        except ValueError as e:
            self.fail(room, Code.INVALID_ARGUMENT, str(e))
            raise RoomError(Code.INVALID_ARGUMENT, str(e)) from None
        except RuntimeError as e:  # the engine stopped (failed, or shutting down)
            self.fail(room, Code.UNAVAILABLE, str(e))
            raise RoomError(Code.UNAVAILABLE, str(e)) from None
        try:
            if room.failed:  # aborted while the request was being made
                raise room.error
            await self._admit(room, len(token_ids))
            room.queued = True
            self._spawn(self._compute(room, self.engine.add(room.req)))
            await self._await_transfer(room)
            if not await wait_until(room, lambda: room.state is State.DONE, None):
                raise room.error
            return room
        except asyncio.CancelledError:
            self.fail(room, Code.CANCELLED, "Prefill was cancelled")
            raise

    def waiting(self) -> int:
        """Prompts not computing yet: queued in the engine, or rooms still being made
        or deferred here (shedding.py)."""
        making = sum(1 for r in self.rooms.values() if r.has_prefill and not r.queued)
        return self.engine.stats.waiting + making

    async def _admit(self, room: PrefillRoom, prompt_len: int) -> None:
        """Return when the room may be computed: its Transfer is here, or it fits the
        compute-ahead budget. Waits at most the bootstrap timeout."""
        room.need, budget = -(-prompt_len // self.page_size), self.budget
        if room.target is None and not budget.fits(room.need):
            self.counters.deferred += 1
            with budget.deferring(room):
                await self._await_transfer(room, lambda: room.target is not None or
                                           budget.fits(room.need))
        if room.target is None:
            budget.enter(room)

    @property
    def ahead_pages(self) -> int:
        """Pages of rooms computed (or computing) before their Transfer."""
        return self.budget.pages

    @property
    def deferred_rooms(self) -> int:
        """Rooms waiting for their Transfer before computing (budget full)."""
        return len(self.budget.deferred)

    async def _compute(self, room: PrefillRoom, stream: Any) -> None:
        try:
            outs = await stream.next_batch()
        except Exception as e:  # aborted (the room failed already), or the engine failed
            self.fail(room, Code.UNAVAILABLE, f"room {room.room}: {e}")
            return
        room.first, room.prefill_done_at = outs[-1], time.monotonic()
        room.notify()

    async def _await_transfer(self, room: PrefillRoom, until: Callable[[], bool] | None = None
                              ) -> None:
        left = self.bootstrap_timeout - (time.monotonic() - room.arrival)
        if not await wait_until(room, until or (lambda: room.target is not None), left):
            if not room.failed:
                self.counters.bootstrap_timeouts += 1
                self.on_bootstrap_timeout()
                self.fail(room, Code.DEADLINE_EXCEEDED,
                          f"no Transfer from the decode worker for room {room.room} within the "
                          f"bootstrap timeout ({self.bootstrap_timeout:g}s); its KV was freed")
            raise room.error

    # -- the decode's Transfer -----------------------------------------------------------
    async def transfer(self, room_id: int, target: TransferTarget,
                       timeout: float | None) -> TransferReply:
        """Write the room's prompt KV into the target's pages; answer with token 1."""
        try:
            self.check_target(target)
        except ValueError as e:
            code = Code.INVALID_ARGUMENT if "must be" in str(e) else Code.FAILED_PRECONDITION
            if (room := self.rooms.get(room_id)) is not None:
                self.fail(room, code, str(e))
            raise RoomError(code, str(e)) from None
        room = self._room(room_id, Code.NOT_FOUND, "is unknown here (aborted or finished)")
        if room.target is not None:
            raise RoomError(Code.ALREADY_EXISTS, f"room {room_id} already has a Transfer")
        room.target, room.transfer_at = target, time.monotonic()
        self.budget.leave(room)
        room.notify()
        try:
            limit = self.bootstrap_timeout if timeout is None else timeout
            if not await wait_until(room, lambda: room.first is not None, limit):
                self.fail(room, Code.DEADLINE_EXCEEDED,
                          f"room {room.room}: KV not ready before the Transfer deadline")
            if room.failed:
                raise room.error
            return await asyncio.shield(self._spawn(self._write(room)))
        except asyncio.CancelledError:
            self.fail(room, Code.CANCELLED, "Transfer was cancelled by the decode worker")
            raise

    async def _write(self, room: PrefillRoom) -> TransferReply:
        """WRITING -> DONE (pages released) or FAILED (pages aborted); runs to the end
        even when the Transfer call is cancelled (the write can't be taken back)."""
        room.state = State.WRITING
        err = await write_room(room, self.writer, self._integrity)
        room.error = room.error or err
        room.state = State.FAILED if room.error else State.DONE
        rid = str(room.room)
        self.engine.release(rid) if room.state is State.DONE else self.engine.abort(rid)
        self._end(room, ok=room.state is State.DONE)
        room.write_done.set()
        room.notify()
        if room.error:
            raise room.error
        return transfer_reply(room.first, room.stats, room.checksum)

    def _integrity(self, kind: str) -> None:
        """Count a checksum mismatch: "retry" (rewritten) or "failure" (room failed)."""
        if kind == "retry":
            self.counters.integrity_retries += 1
        else:
            self.counters.integrity_failures += 1
        self.on_integrity(kind)

    # -- endings -------------------------------------------------------------------------
    def fail(self, room: PrefillRoom, code: Code, message: str, blame: str = "") -> State:
        """Fail the room (first error wins) and free its KV, unless it is being written
        (the writer frees it). Returns the state it was in. `blame`: RoomError's."""
        before = room.state
        if before in (State.PENDING, State.WRITING):
            room.error = room.error or RoomError(code, message, blame)
        if before is State.PENDING:
            room.state = State.FAILED
            if room.queued:
                self.engine.abort(str(room.room))
            self._end(room, ok=False)
        room.notify()
        return before

    async def abort(self, room_id: int) -> bool:
        """Drop the room; when this returns no write of it is in flight. True when the
        room was live."""
        room = self.rooms.get(room_id)
        if room is None:
            self.ended.add(room_id)  # a late Prefill/Transfer for it fails at once
            return False
        before = self.fail(room, Code.CANCELLED, f"room {room_id} was aborted")
        if before is State.WRITING:
            await room.write_done.wait()
        return before in (State.PENDING, State.WRITING)

    def engine_failed(self, error: BaseException) -> None:
        """This worker's engine failed (e.g. a tensor-parallel rank died): every room's KV
        is in it, so every room fails now (not when the worker's shutdown grace ends)."""
        for room in list(self.rooms.values()):
            room.queued = False  # nothing to abort in a failed engine
            self.fail(room, Code.UNAVAILABLE, f"the prefill engine failed ({error}); room "
                                              f"{room.room} dropped")

    def peer_gone(self, address: str, event: str = "EXPIRED") -> None:
        """A decode worker expired or left: free every room bound for it."""
        for room in [r for r in self.rooms.values() if r.decode_address == address]:
            self.fail(room, Code.UNAVAILABLE,
                      f"decode worker {address} {event.lower()}; room {room.room} dropped",
                      "decode")

    def _end(self, room: PrefillRoom, ok: bool) -> None:
        self.budget.leave(room)
        if self.rooms.pop(room.room, None) is None:
            return
        self.ended.add(room.room)
        if ok:
            self.counters.transferred += 1
        else:
            self.counters.failed += 1

    def _room(self, room_id: int, code: Code, why: str) -> PrefillRoom:
        if room_id in self.ended:
            raise RoomError(code, f"room {room_id} {why}")
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = PrefillRoom(room_id)
        return room

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(_forget(self._tasks))
        return task


def _forget(tasks: set) -> Callable[[asyncio.Task], None]:
    def done(task: asyncio.Task) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its caller may have gone (cancelled Transfer)
    return done
