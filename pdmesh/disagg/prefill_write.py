"""The write step of a prefill room: its prompt KV into the decode's pages, verified.

`write_room` checks the destination against the computed prompt pages, writes the pages
after the decode's `cached_pages` (decode-side reuse: at least one page always goes)
through the KVWriter and verifies them (integrity.write_verified); `transfer_reply` is
the Transfer's answer once the room is DONE. The room's state transitions (WRITING ->
DONE / FAILED, pages released or aborted) stay with the room machine in prefill.py.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from pdmesh.disagg.integrity import write_verified
from pdmesh.disagg.ports import Code, KVChecksum, KVWriter, RoomError, TransferReply
from pdmesh.disagg.ports import TransferTarget
from pdmesh.disagg.prefill_room import PrefillRoom


async def write_room(room: PrefillRoom, writer: KVWriter,
                     on_integrity: Callable[[str], None]) -> RoomError | None:
    """Write the WRITING room's prompt KV into `room.target`; fills `room.stats`,
    `room.checksum` and `room.write_s`. Returns the room's error, if any (the caller ends
    the room). `on_integrity("retry" | "failure")`: a destination checksum mismatch."""
    first, target = room.first, room.target
    err = check_pages(room.room, first, target)
    if err is not None:
        return err
    t0 = time.monotonic()
    try:
        room.stats, room.checksum = await write_verified(
            writer, room.room, first.pages[target.cached_pages:], target,
            lambda: room.failed, lambda: on_integrity("retry"))
    except RoomError as e:  # DATA_LOSS: the rewrite mismatched too
        on_integrity("failure")
        err = e
    except Exception as e:  # TransferError, or a bad destination
        err = RoomError(Code.INTERNAL, f"KV transfer of room {room.room} to "
                        f"{target.session_id} failed: {e}")
    room.write_s = time.monotonic() - t0
    return err


def check_pages(room: int, first: Any, target: TransferTarget) -> RoomError | None:
    """The decode's destination pages must be exactly the prompt's pages after the
    `cached_pages` it has already (at least one page is always sent: the decode never
    caches the last prompt token's page)."""
    have, skip = len(first.pages), target.cached_pages
    if not 0 <= skip < have:
        return RoomError(Code.INVALID_ARGUMENT, f"room {room} has {have} prompt pages; the "
                         f"decode's {skip} cached pages must be fewer")
    if len(target.page_ids) != have - skip:
        return RoomError(Code.INVALID_ARGUMENT, f"room {room} has {have} prompt pages, "
                         f"{skip} cached on the decode: got {len(target.page_ids)} "
                         f"destination pages, want {have - skip}")
    return None


def transfer_reply(first: Any, stats: Any, checksum: KVChecksum | None) -> TransferReply:
    """The Transfer's answer: token 1 (and its logprob) and what the write moved."""
    lp = first.logprobs[0] if first.logprobs else None
    return TransferReply(first_token=first.token_ids[0], first_logprob=lp,
                         cached_tokens=getattr(first, "cached_tokens", 0),
                         bytes_moved=stats.bytes, descriptors=stats.descriptors,
                         seconds=stats.seconds, path=getattr(stats, "path", ""),
                         checksum=checksum)
